#include "llama/LlamaSampler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/Errors.h"
#include "llama/LlamaContext.h"

namespace kvstash {

namespace {

double NumberOption(Napi::Object options, const char* name, double fallback) {
  Napi::Value value = options.Get(name);
  if (value.IsUndefined()) return fallback;
  if (!value.IsNumber()) throw Napi::TypeError::New(options.Env(), std::string("sampler: ") + name + " must be a number");
  return value.As<Napi::Number>().DoubleValue();
}

}  // namespace

Napi::Function LlamaSampler::DefineClass(Napi::Env env) {
  return Napi::ObjectWrap<LlamaSampler>::DefineClass(env, "LlamaSampler",
                                                     {
                                                         InstanceMethod<&LlamaSampler::Sample>("sample"),
                                                         InstanceMethod<&LlamaSampler::Accept>("accept"),
                                                         InstanceMethod<&LlamaSampler::Reset>("reset"),
                                                         InstanceMethod<&LlamaSampler::Dispose>("dispose"),
                                                     });
}

// new LlamaSampler({temperature, topK, topP, minP, repeatPenalty, repeatLastN, frequencyPenalty,
// presencePenalty, seed, vocabSize}) — lib/ has validated the ranges and filled the defaults.
LlamaSampler::LlamaSampler(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LlamaSampler>(info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  const double temperature = NumberOption(o, "temperature", 0);
  const double topK = NumberOption(o, "topK", 0);
  const double topP = NumberOption(o, "topP", 1);
  const double minP = NumberOption(o, "minP", 0);
  const double repeatPenalty = NumberOption(o, "repeatPenalty", 1);
  const double repeatLastN = NumberOption(o, "repeatLastN", 64);
  const double frequencyPenalty = NumberOption(o, "frequencyPenalty", 0);
  const double presencePenalty = NumberOption(o, "presencePenalty", 0);
  const double seed = NumberOption(o, "seed", 0);
  const double vocabSize = NumberOption(o, "vocabSize", 0);
  if (topK < 0 || topP <= 0 || topP > 1 || minP < 0 || minP > 1 || repeatPenalty <= 0 || repeatLastN < 0 || vocabSize < 1 ||
      seed < 0 || seed > 4294967295.0) {
    throw Napi::RangeError::New(env, "sampler: option out of range");
  }

  nVocab_ = static_cast<int32_t>(std::min(vocabSize, 2147483647.0));
  chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
  if (repeatPenalty != 1 || frequencyPenalty != 0 || presencePenalty != 0) {
    llama_sampler_chain_add(chain_, llama_sampler_init_penalties(static_cast<int32_t>(vocabSize), static_cast<int32_t>(repeatLastN),
                                                                 static_cast<float>(repeatPenalty),
                                                                 static_cast<float>(frequencyPenalty),
                                                                 static_cast<float>(presencePenalty)));
  }
  if (temperature <= 0) {
    llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
    return;
  }
  if (topK > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(static_cast<int32_t>(topK)));
  if (topP < 1) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(static_cast<float>(topP), 1));
  if (minP > 0) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(static_cast<float>(minP), 1));
  llama_sampler_chain_add(chain_, llama_sampler_init_temp(static_cast<float>(temperature)));
  llama_sampler_chain_add(chain_, llama_sampler_init_dist(static_cast<uint32_t>(seed)));
}

LlamaSampler::~LlamaSampler() {
  if (chain_ != nullptr) llama_sampler_free(chain_);
}

void LlamaSampler::RequireLive(Napi::Env env) const {
  if (chain_ == nullptr) throw MakeError(env, "E_DISPOSED", "the sampler was disposed");
}

// sample(context, index) -> token; the token is also accepted (it enters the penalty history).
Napi::Value LlamaSampler::Sample(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsObject()) throw Napi::TypeError::New(env, "sample: a context is required");
  LlamaContext* context = LlamaContext::Unwrap(info[0].As<Napi::Object>());
  const double number = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -1;
  if (!(number >= -2147483648.0 && number <= 2147483647.0) || number != std::floor(number)) {
    throw Napi::RangeError::New(env, "sample: index must be an integer in [-2147483648, 2147483647]");
  }
  const int32_t index = static_cast<int32_t>(number);
  const float* row = context->OutputRow(env, index);
  const int32_t nVocab = context->VocabSize();
  candidates_.resize(nVocab);
  for (int32_t t = 0; t < nVocab; ++t) candidates_[t] = llama_token_data{t, row[t], 0.0f};
  llama_token_data_array array{candidates_.data(), candidates_.size(), -1, false};
  llama_sampler_apply(chain_, &array);
  if (array.selected < 0 || static_cast<size_t>(array.selected) >= array.size) {
    throw MakeError(env, "E_SAMPLE", "the sampler chain selected no token");
  }
  const llama_token token = array.data[array.selected].id;
  llama_sampler_accept(chain_, token);
  return Napi::Number::New(env, token);
}

// accept(tokens: Int32Array): feeds prompt tokens into the penalty history without sampling.
Napi::Value LlamaSampler::Accept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    throw Napi::TypeError::New(env, "accept: tokens must be an Int32Array");
  }
  Napi::Int32Array tokens = info[0].As<Napi::Int32Array>();
  // All checked before any is accepted: the penalty history never takes half a call.
  for (size_t i = 0; i < tokens.ElementLength(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= nVocab_) {
      throw MakeError(env, "E_TOKEN_INVALID", "accept: tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                                                  " is not a token of this model");
    }
  }
  for (size_t i = 0; i < tokens.ElementLength(); ++i) llama_sampler_accept(chain_, tokens[i]);
  return env.Undefined();
}

Napi::Value LlamaSampler::Reset(const Napi::CallbackInfo& info) {
  RequireLive(info.Env());
  llama_sampler_reset(chain_);
  return info.Env().Undefined();
}

Napi::Value LlamaSampler::Dispose(const Napi::CallbackInfo& info) {
  if (chain_ != nullptr) llama_sampler_free(chain_);
  chain_ = nullptr;
  return info.Env().Undefined();
}

}  // namespace kvstash
