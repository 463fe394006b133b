// JS class LlamaSampler: a llama.cpp sampler chain applied to the logits a context kept.
#pragma once

#include <napi.h>

#include <vector>

#include "llama.h"

namespace kvstash {

class LlamaSampler : public Napi::ObjectWrap<LlamaSampler> {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  explicit LlamaSampler(const Napi::CallbackInfo& info);
  ~LlamaSampler() override;

 private:
  Napi::Value Sample(const Napi::CallbackInfo& info);
  Napi::Value Accept(const Napi::CallbackInfo& info);
  Napi::Value Reset(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  void RequireLive(Napi::Env env) const;

  llama_sampler* chain_ = nullptr;

  int32_t nVocab_ = 0;  // accept() refuses ids outside [0, nVocab_)
  std::vector<llama_token_data> candidates_;  // reused: a vocabulary is ~150k entries
};

}  // namespace kvstash
