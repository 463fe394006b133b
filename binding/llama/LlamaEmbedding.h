// Pooled sequence embeddings of a LlamaModel (JS: model.embed). One embeddings context per model,
// made on first use and kept (remade when a call needs a larger batch, another pooling or thread
// count); many texts share one decode, each in its own sequence, pooled by llama.cpp.
#pragma once

#include <napi.h>

#include <cstdint>
#include <memory>

#include "llama.h"
#include "llama/LlamaModel.h"

namespace kvstash {

struct EmbeddingContext {
  ModelHandle model;  // keeps the weights alive as long as the context
  llama_context* ctx = nullptr;
  enum llama_pooling_type pooling = LLAMA_POOLING_TYPE_MEAN;
  int32_t batchTokens = 0;  // tokens one decode may hold (n_batch = n_ubatch = n_ctx)
  int32_t threads = 0;

  EmbeddingContext() = default;
  EmbeddingContext(const EmbeddingContext&) = delete;
  EmbeddingContext& operator=(const EmbeddingContext&) = delete;
  ~EmbeddingContext() {
    if (ctx != nullptr) llama_free(ctx);
  }
};

// Sequences one embedding decode may pool at once.
constexpr int32_t kEmbeddingSequences = 64;

// model.embed(tokenLists: Int32Array[], {pooling: 'mean'|'cls'|'last', batchTokens, threads, normalize})
//   -> Promise<Float32Array[]>
Napi::Value EmbedTokens(const Napi::CallbackInfo& info, LlamaModel* model);

}  // namespace kvstash
