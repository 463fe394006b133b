#include <exception>
#include "llama/LlamaModel.h"

#include <cmath>
#include <string>
#include <vector>

#include "common/AddonData.h"
#include "common/Errors.h"
#include "common/ProgressReporter.h"
#include "common/PromiseWorker.h"
#include "llama/LlamaContext.h"
#include "llama/LlamaEmbedding.h"

namespace kvstash {

namespace {

std::string MetaString(const llama_model* model, const char* key) {
  char small[256];
  int32_t n = llama_model_meta_val_str(model, key, small, sizeof(small));
  if (n < 0) return std::string();
  if (static_cast<size_t>(n) < sizeof(small)) return std::string(small, n);
  std::string big(static_cast<size_t>(n) + 1, '\0');
  llama_model_meta_val_str(model, key, big.data(), big.size());
  big.resize(n);
  return big;
}

}  // namespace

std::vector<llama_token> TokensFromJs(Napi::Env env, Napi::Value value, int32_t nVocab, const char* what) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    throw Napi::TypeError::New(env, std::string(what) + " must be an Int32Array");
  }
  Napi::Int32Array array = value.As<Napi::Int32Array>();
  std::vector<llama_token> tokens(array.Data(), array.Data() + array.ElementLength());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= nVocab) {
      throw MakeError(env, "E_TOKEN_INVALID",
                      std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                          " is not a token of this model (vocabulary size " + std::to_string(nVocab) + ")");
    }
  }
  return tokens;
}

class ModelLoadWorker : public PromiseWorker {
 public:
  ModelLoadWorker(Napi::Env env, std::string path, bool useMmap, Napi::Value onProgress)
      : PromiseWorker(env, "kvstash.loadModel"), path_(std::move(path)), useMmap_(useMmap),
        progress_(env, onProgress, "kvstash.loadModel.progress") {}

 protected:
  void Run() override {
    llama_model_params params = llama_model_default_params();
    params.load_mode = useMmap_ ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    params.progress_callback = [](float fraction, void* self) {
      static_cast<ModelLoadWorker*>(self)->progress_.Report(fraction, 1.0);
      return true;
    };
    params.progress_callback_user_data = this;
    TakeLastLlamaError();
    llama_model* model = llama_model_load_from_file(path_.c_str(), params);
    if (model == nullptr) {
      throw NativeError("E_MODEL_LOAD", WithLlamaReason("llama.cpp could not load the model " + path_));
    }
    model_ = ModelHandle(model, llama_model_free);
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object object = AddonData::Of(env)->modelClass.Value().New({});
    LlamaModel::Unwrap(object)->Attach(std::move(model_));
    return object;
  }

  void Settle() override { progress_.Release(); }

 private:
  std::string path_;
  bool useMmap_;
  ProgressReporter progress_;
  ModelHandle model_;
};

Napi::Function LlamaModel::DefineClass(Napi::Env env) {
  return Napi::ObjectWrap<LlamaModel>::DefineClass(
      env, "LlamaModel",
      {
          InstanceMethod<&LlamaModel::Info>("info"),
          InstanceMethod<&LlamaModel::Metadata>("metadata"),
          InstanceMethod<&LlamaModel::Tokenize>("tokenize"),
          InstanceMethod<&LlamaModel::Detokenize>("detokenize"),
          InstanceMethod<&LlamaModel::TokenPiece>("tokenPiece"),
          InstanceMethod<&LlamaModel::IsEndOfGeneration>("isEndOfGeneration"),
          InstanceMethod<&LlamaModel::ApplyChatTemplate>("applyChatTemplate"),
          InstanceMethod<&LlamaModel::CreateContext>("createContext"),
          InstanceMethod<&LlamaModel::Embed>("embed"),
          InstanceMethod<&LlamaModel::Dispose>("dispose"),
      });
}

Napi::Value LlamaModel::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "loadModel: path must be a string");
  bool useMmap = true;
  if (info[1].IsObject()) {
    Napi::Value mmap = info[1].As<Napi::Object>().Get("useMmap");
    if (mmap.IsBoolean()) useMmap = mmap.As<Napi::Boolean>();
  }
  auto* worker = new ModelLoadWorker(env, info[0].As<Napi::String>(), useMmap, info[2]);
  return worker->Start();
}

LlamaModel::LlamaModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LlamaModel>(info) {}

void LlamaModel::Attach(ModelHandle model) {
  model_ = std::move(model);
  vocab_ = llama_model_get_vocab(model_.get());
  nVocab_ = llama_vocab_n_tokens(vocab_);
}

void LlamaModel::RequireLive(Napi::Env env) const {
  if (!model_) throw MakeError(env, "E_DISPOSED", "the model was disposed; load it again to use it");
}

Napi::Value LlamaModel::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  const llama_model* m = model_.get();
  Napi::Object out = Napi::Object::New(env);
  char desc[256];
  llama_model_desc(m, desc, sizeof(desc));
  out.Set("architecture", MetaString(m, "general.architecture"));
  out.Set("name", MetaString(m, "general.name"));
  out.Set("description", std::string(desc));
  out.Set("trainedContextSize", llama_model_n_ctx_train(m));
  out.Set("embeddingSize", llama_model_n_embd(m));
  out.Set("layers", llama_model_n_layer(m));
  out.Set("heads", llama_model_n_head(m));
  out.Set("kvHeads", llama_model_n_head_kv(m));
  out.Set("vocabSize", nVocab_);
  out.Set("parameters", static_cast<double>(llama_model_n_params(m)));
  out.Set("sizeBytes", static_cast<double>(llama_model_size(m)));
  out.Set("canShift", !llama_model_is_recurrent(m) && !llama_model_is_hybrid(m));
  Napi::Object special = Napi::Object::New(env);
  special.Set("bos", llama_vocab_bos(vocab_));
  special.Set("eos", llama_vocab_eos(vocab_));
  special.Set("eot", llama_vocab_eot(vocab_));
  special.Set("sep", llama_vocab_sep(vocab_));
  special.Set("nl", llama_vocab_nl(vocab_));
  special.Set("pad", llama_vocab_pad(vocab_));
  special.Set("addBos", llama_vocab_get_add_bos(vocab_));
  special.Set("addEos", llama_vocab_get_add_eos(vocab_));
  out.Set("specialTokens", special);
  const char* tmpl = llama_model_chat_template(m, nullptr);
  out.Set("chatTemplate", tmpl != nullptr ? Napi::Value(Napi::String::New(env, tmpl)) : env.Null());
  return out;
}

Napi::Value LlamaModel::Metadata(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  Napi::Object out = Napi::Object::New(env);
  int32_t count = llama_model_meta_count(model_.get());
  std::vector<char> key(512), value(1024);
  for (int32_t i = 0; i < count; ++i) {
    int32_t nk = llama_model_meta_key_by_index(model_.get(), i, key.data(), key.size());
    if (nk < 0) continue;
    if (static_cast<size_t>(nk) >= key.size()) {
      key.resize(nk + 1);
      llama_model_meta_key_by_index(model_.get(), i, key.data(), key.size());
    }
    int32_t nv = llama_model_meta_val_str_by_index(model_.get(), i, value.data(), value.size());
    if (nv < 0) continue;
    if (static_cast<size_t>(nv) >= value.size()) {
      value.resize(nv + 1);
      llama_model_meta_val_str_by_index(model_.get(), i, value.data(), value.size());
    }
    out.Set(std::string(key.data(), nk), std::string(value.data(), nv));
  }
  return out;
}

// llama.cpp's tokenizers throw C++ exceptions on some vocabularies it loads (a SentencePiece
// vocabulary without its <0xNN> byte tokens throws std::out_of_range on the first character it
// cannot place). Uncaught, that terminates the process; caught, it is the caller's E_TOKENIZE.
template <typename Call>
static int32_t CallTokenizer(Napi::Env env, const char* what, Call call) {
  try {
    return call();
  } catch (const std::exception& e) {
    throw MakeError(env, "E_TOKENIZE", std::string(what) + " failed inside llama.cpp (" + e.what() +
                                           "): this model's vocabulary cannot encode this input");
  }
}

// tokenize(text, addSpecial, parseSpecial) -> Int32Array
Napi::Value LlamaModel::Tokenize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "tokenize: text must be a string");
  std::string text = info[0].As<Napi::String>();
  bool addSpecial = info[1].ToBoolean();
  bool parseSpecial = info[2].ToBoolean();
  if (text.size() > static_cast<size_t>(INT32_MAX / 2)) throw Napi::RangeError::New(env, "tokenize: text is too long");
  std::vector<llama_token> tokens(text.size() + 8);
  auto tokenize = [&] {
    return llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                          static_cast<int32_t>(tokens.size()), addSpecial, parseSpecial);
  };
  int32_t n = CallTokenizer(env, "tokenization", tokenize);
  if (n < 0 && n != INT32_MIN) {
    tokens.resize(static_cast<size_t>(-n));
    n = CallTokenizer(env, "tokenization", tokenize);
  }
  if (n < 0) throw MakeError(env, "E_TOKENIZE", WithLlamaReason("tokenization failed"));
  Napi::Int32Array out = Napi::Int32Array::New(env, n);
  std::copy(tokens.begin(), tokens.begin() + n, out.Data());
  return out;
}

// detokenize(tokens, removeSpecial, unparseSpecial) -> string
Napi::Value LlamaModel::Detokenize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  std::vector<llama_token> tokens = TokensFromJs(env, info[0], nVocab_, "tokens");
  bool removeSpecial = info[1].ToBoolean();
  bool unparseSpecial = info[2].ToBoolean();
  std::string text(tokens.size() * 8 + 16, '\0');
  auto detokenize = [&] {
    return llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), text.data(),
                            static_cast<int32_t>(text.size()), removeSpecial, unparseSpecial);
  };
  int32_t n = CallTokenizer(env, "detokenization", detokenize);
  if (n < 0) {
    text.resize(static_cast<size_t>(-n));
    n = CallTokenizer(env, "detokenization", detokenize);
  }
  if (n < 0) throw MakeError(env, "E_TOKENIZE", WithLlamaReason("detokenization failed"));
  text.resize(n);
  return Napi::String::New(env, text);
}

// tokenPiece(token, special) -> Buffer: the raw bytes of one token. A token can end inside a
// multi-byte UTF-8 character, so streaming text must be assembled from bytes, not strings.
Napi::Value LlamaModel::TokenPiece(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "tokenPiece: token must be a number");
  // Compared as a double: Int32Value() would wrap 2^32 + 5 to token 5.
  const double number = info[0].As<Napi::Number>().DoubleValue();
  if (!(number >= 0 && number < nVocab_) || number != std::floor(number)) {
    throw MakeError(env, "E_TOKEN_INVALID", "token " + Napi::Number::New(env, number).ToString().Utf8Value() +
                                                " is not a token of this model (vocabulary size " + std::to_string(nVocab_) + ")");
  }
  const llama_token token = static_cast<llama_token>(number);
  const bool special = info[1].ToBoolean();
  char small[128];
  int32_t n = CallTokenizer(env, "tokenPiece", [&] { return llama_token_to_piece(vocab_, token, small, sizeof(small), 0, special); });
  if (n >= 0) return Napi::Buffer<char>::Copy(env, small, n);
  std::vector<char> big(static_cast<size_t>(-n));
  n = CallTokenizer(env, "tokenPiece", [&] {
    return llama_token_to_piece(vocab_, token, big.data(), static_cast<int32_t>(big.size()), 0, special);
  });
  return Napi::Buffer<char>::Copy(env, big.data(), n < 0 ? 0 : n);
}

Napi::Value LlamaModel::IsEndOfGeneration(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "isEndOfGeneration: token must be a number");
  const double number = info[0].As<Napi::Number>().DoubleValue();
  if (!(number >= 0 && number < nVocab_) || number != std::floor(number)) return Napi::Boolean::New(env, false);
  return Napi::Boolean::New(env, llama_vocab_is_eog(vocab_, static_cast<llama_token>(number)));
}

// applyChatTemplate(template, [{role, content}], addAssistant) -> string
Napi::Value LlamaModel::ApplyChatTemplate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "applyChatTemplate: template must be a string");
  if (!info[1].IsArray()) throw Napi::TypeError::New(env, "applyChatTemplate: messages must be an array");
  std::string tmpl = info[0].As<Napi::String>();
  Napi::Array list = info[1].As<Napi::Array>();
  std::vector<std::string> roles, contents;
  size_t total = 0;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value item = list.Get(i);
    if (!item.IsObject()) throw Napi::TypeError::New(env, "applyChatTemplate: every message must be {role, content}");
    Napi::Object message = item.As<Napi::Object>();
    if (!message.Get("role").IsString() || !message.Get("content").IsString()) {
      throw Napi::TypeError::New(env, "applyChatTemplate: message " + std::to_string(i) + " needs string role and content");
    }
    roles.push_back(message.Get("role").As<Napi::String>());
    contents.push_back(message.Get("content").As<Napi::String>());
    total += roles.back().size() + contents.back().size();
  }
  std::vector<llama_chat_message> chat(roles.size());
  for (size_t i = 0; i < roles.size(); ++i) chat[i] = {roles[i].c_str(), contents[i].c_str()};
  std::string out(total * 2 + 256, '\0');
  int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), info[2].ToBoolean(), out.data(),
                                        static_cast<int32_t>(out.size()));
  if (n > static_cast<int32_t>(out.size())) {
    out.resize(n);
    n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), info[2].ToBoolean(), out.data(),
                                  static_cast<int32_t>(out.size()));
  }
  if (n < 0) {
    throw MakeError(env, "E_CHAT_TEMPLATE",
                    "llama.cpp does not support this chat template; pass a built-in template name such as 'chatml'");
  }
  out.resize(n);
  return Napi::String::New(env, out);
}

Napi::Value LlamaModel::CreateContext(const Napi::CallbackInfo& info) {
  RequireLive(info.Env());
  return LlamaContext::Create(info, this);
}

Napi::Value LlamaModel::Embed(const Napi::CallbackInfo& info) {
  RequireLive(info.Env());
  return EmbedTokens(info, this);
}

void LlamaModel::BeginEmbedding(Napi::Env env) {
  if (embeddingBusy_) throw MakeError(env, "E_BUSY", "embed: another embed of this model is running; await it (lib/ does)");
  embeddingBusy_ = true;
}

void LlamaModel::FinishEmbedding(std::shared_ptr<EmbeddingContext> context) {
  embeddingBusy_ = false;
  if (model_) embedding_ = std::move(context);
}

Napi::Value LlamaModel::Dispose(const Napi::CallbackInfo& info) {
  embedding_.reset();
  model_.reset();
  vocab_ = nullptr;
  return info.Env().Undefined();
}

}  // namespace kvstash
