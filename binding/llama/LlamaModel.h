// JS class LlamaModel: one loaded GGUF model (weights + vocabulary).
#pragma once

#include <napi.h>

#include <memory>

#include "llama.h"

namespace kvstash {

using ModelHandle = std::shared_ptr<llama_model>;
struct EmbeddingContext;

class LlamaModel : public Napi::ObjectWrap<LlamaModel> {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  // loadModel(path, {useMmap}, onProgress?) -> Promise<LlamaModel>
  static Napi::Value Load(const Napi::CallbackInfo& info);

  explicit LlamaModel(const Napi::CallbackInfo& info);

  // The model stays alive while any context made from it lives (contexts hold the handle), even
  // after dispose(): freeing weights under a running context would crash.
  const ModelHandle& handle() const { return model_; }
  const llama_vocab* vocab() const { return vocab_; }
  // Throws E_DISPOSED when the model was disposed.
  void RequireLive(Napi::Env env) const;

  // The embeddings protocol (main thread): one embed at a time per model (lib/ queues them; this
  // is the last guard, E_BUSY), and the context it used is kept for the next one.
  void BeginEmbedding(Napi::Env env);
  void FinishEmbedding(std::shared_ptr<EmbeddingContext> context);
  const std::shared_ptr<EmbeddingContext>& embedding() const { return embedding_; }

 private:
  friend class ModelLoadWorker;
  void Attach(ModelHandle model);

  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Metadata(const Napi::CallbackInfo& info);
  Napi::Value Tokenize(const Napi::CallbackInfo& info);
  Napi::Value Detokenize(const Napi::CallbackInfo& info);
  Napi::Value TokenPiece(const Napi::CallbackInfo& info);
  Napi::Value IsEndOfGeneration(const Napi::CallbackInfo& info);
  Napi::Value ApplyChatTemplate(const Napi::CallbackInfo& info);
  Napi::Value CreateContext(const Napi::CallbackInfo& info);
  Napi::Value Embed(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  ModelHandle model_;
  const llama_vocab* vocab_ = nullptr;
  int32_t nVocab_ = 0;
  std::shared_ptr<EmbeddingContext> embedding_;
  bool embeddingBusy_ = false;
};

// Reads a token array argument and checks every id against the vocabulary: llama.cpp indexes its
// tables with token ids unchecked in several places.
std::vector<llama_token> TokensFromJs(Napi::Env env, Napi::Value value, int32_t nVocab, const char* what);

}  // namespace kvstash
