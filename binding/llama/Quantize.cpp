#include "llama/Quantize.h"

#include <string>
#include <unordered_map>

#include "common/Errors.h"
#include "common/PromiseWorker.h"
#include "llama.h"

namespace kvstash {

namespace {

const std::unordered_map<std::string, llama_ftype>& Types() {
  // The *_M mixes for k-quants: what "q4_k" means to anyone who has downloaded a model.
  static const std::unordered_map<std::string, llama_ftype> types = {
      {"f32", LLAMA_FTYPE_ALL_F32},         {"f16", LLAMA_FTYPE_MOSTLY_F16},
      {"bf16", LLAMA_FTYPE_MOSTLY_BF16},    {"q8_0", LLAMA_FTYPE_MOSTLY_Q8_0},
      {"q4_0", LLAMA_FTYPE_MOSTLY_Q4_0},    {"q5_0", LLAMA_FTYPE_MOSTLY_Q5_0},
      {"q4_k", LLAMA_FTYPE_MOSTLY_Q4_K_M},  {"q5_k", LLAMA_FTYPE_MOSTLY_Q5_K_M},
      {"q6_k", LLAMA_FTYPE_MOSTLY_Q6_K},
  };
  return types;
}

class ModelQuantizeWorker : public PromiseWorker {
 public:
  ModelQuantizeWorker(Napi::Env env, std::string src, std::string dst, llama_ftype type, int32_t threads)
      : PromiseWorker(env, "kvstash.quantize"), src_(std::move(src)), dst_(std::move(dst)), type_(type), threads_(threads) {}

 protected:
  void Run() override {
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.ftype = type_;
    params.nthread = threads_;
    TakeLastLlamaError();
    if (llama_model_quantize(src_.c_str(), dst_.c_str(), &params) != 0) {
      throw NativeError("E_QUANTIZE", WithLlamaReason("could not quantize " + src_));
    }
  }

 private:
  std::string src_, dst_;
  llama_ftype type_;
  int32_t threads_;
};

}  // namespace

Napi::Value Quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !info[1].IsString() || !info[2].IsString()) {
    throw Napi::TypeError::New(env, "quantize(src, dst, type, threads)");
  }
  std::string type = info[2].As<Napi::String>();
  auto found = Types().find(type);
  if (found == Types().end()) throw Napi::RangeError::New(env, "quantize: unknown type '" + type + "'");
  int32_t threads = info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : 0;
  return (new ModelQuantizeWorker(env, info[0].As<Napi::String>(), info[1].As<Napi::String>(), found->second, threads))
      ->Start();
}

}  // namespace kvstash
