#include "llama/LlamaEmbedding.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "common/Errors.h"
#include "common/PromiseWorker.h"

namespace kvstash {

namespace {

struct BatchGuard {
  llama_batch batch;
  explicit BatchGuard(int32_t tokens) : batch(llama_batch_init(tokens, 0, 1)) {}
  ~BatchGuard() { llama_batch_free(batch); }
};

}  // namespace

class ModelEmbedWorker : public PromiseWorker {
 public:
  ModelEmbedWorker(Napi::Env env, LlamaModel* owner, std::shared_ptr<EmbeddingContext> current,
                   std::vector<std::vector<llama_token>> texts, enum llama_pooling_type pooling, int32_t batchTokens,
                   int32_t threads, bool normalize)
      : PromiseWorker(env, "kvstash.embed"), owner_(owner), context_(std::move(current)), texts_(std::move(texts)),
        pooling_(pooling), batchTokens_(batchTokens), threads_(threads), normalize_(normalize) {
    ownerRef_ = Napi::Persistent(owner->Value());
    model_ = owner->handle();
  }

 protected:
  void Run() override {
    if (!context_ || context_->pooling != pooling_ || context_->batchTokens < batchTokens_ || context_->threads != threads_) {
      context_ = CreateContext();
    }
    llama_context* ctx = context_->ctx;
    const int32_t budget = context_->batchTokens;
    const int32_t width = llama_model_n_embd_out(model_.get());
    vectors_.assign(texts_.size(), std::vector<float>());
    BatchGuard guard(budget);
    llama_batch& batch = guard.batch;
    size_t next = 0;
    while (next < texts_.size()) {
      // Whole texts only: llama.cpp pools a sequence per ubatch, so one must never straddle two.
      const size_t first = next;
      batch.n_tokens = 0;
      while (next < texts_.size() && static_cast<int32_t>(next - first) < kEmbeddingSequences &&
             batch.n_tokens + static_cast<int32_t>(texts_[next].size()) <= budget) {
        const llama_seq_id seq = static_cast<llama_seq_id>(next - first);
        const std::vector<llama_token>& tokens = texts_[next];
        for (size_t p = 0; p < tokens.size(); ++p) {
          const int32_t at = batch.n_tokens++;
          batch.token[at] = tokens[p];
          batch.pos[at] = static_cast<llama_pos>(p);
          batch.n_seq_id[at] = 1;
          batch.seq_id[at][0] = seq;
          batch.logits[at] = 1;
        }
        ++next;
      }
      if (next == first) throw NativeError("E_NATIVE", "a text longer than the embedding batch reached the native layer");
      llama_memory_clear(llama_get_memory(ctx), true);
      TakeLastLlamaError();
      const int32_t rc = llama_decode(ctx, batch);
      if (rc != 0) throw NativeError("E_DECODE", WithLlamaReason("llama_decode failed (" + std::to_string(rc) + ") while embedding"));
      for (size_t i = first; i < next; ++i) {
        const float* pooled = llama_get_embeddings_seq(ctx, static_cast<llama_seq_id>(i - first));
        if (pooled == nullptr) throw NativeError("E_DECODE", "llama.cpp returned no pooled embedding for a sequence");
        std::vector<float>& out = vectors_[i];
        out.assign(pooled, pooled + width);
        if (normalize_) Normalize(out);
      }
    }
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Array out = Napi::Array::New(env, vectors_.size());
    for (size_t i = 0; i < vectors_.size(); ++i) {
      Napi::Float32Array v = Napi::Float32Array::New(env, vectors_[i].size());
      std::copy(vectors_[i].begin(), vectors_[i].end(), v.Data());
      out.Set(static_cast<uint32_t>(i), v);
    }
    return out;
  }

  // Main thread: the model keeps the (possibly new) context for the next call, unless it was
  // disposed meanwhile, in which case the context goes with this worker.
  void Settle() override { owner_->FinishEmbedding(std::move(context_)); }

 private:
  std::shared_ptr<EmbeddingContext> CreateContext() const {
    auto created = std::make_shared<EmbeddingContext>();
    created->model = model_;
    created->pooling = pooling_;
    created->threads = threads_;
    llama_context_params params = llama_context_default_params();
    params.n_ctx = static_cast<uint32_t>(batchTokens_);
    params.n_batch = params.n_ctx;
    params.n_ubatch = params.n_ctx;
    params.n_seq_max = kEmbeddingSequences;
    params.kv_unified = true;
    params.n_threads = threads_;
    params.n_threads_batch = threads_;
    params.embeddings = true;
    params.pooling_type = pooling_;
    params.no_perf = true;
    TakeLastLlamaError();
    created->ctx = llama_init_from_model(model_.get(), params);
    if (created->ctx == nullptr) {
      throw NativeError("E_CONTEXT_CREATE", WithLlamaReason("llama.cpp could not create the embeddings context"));
    }
    created->batchTokens = static_cast<int32_t>(std::min(llama_n_batch(created->ctx), llama_n_ctx(created->ctx)));
    if (created->batchTokens < batchTokens_) {
      throw NativeError("E_CONTEXT_CREATE", "llama.cpp made an embeddings batch of " + std::to_string(created->batchTokens) +
                                                " tokens, " + std::to_string(batchTokens_) + " were asked for");
    }
    return created;
  }

  static void Normalize(std::vector<float>& v) {
    double squares = 0;
    for (float x : v) squares += static_cast<double>(x) * x;
    if (!(squares > 0) || !std::isfinite(squares)) return;  // lib/ reports a zero or non-finite vector
    const double norm = std::sqrt(squares);
    for (float& x : v) x = static_cast<float>(x / norm);
  }

  LlamaModel* owner_;
  Napi::ObjectReference ownerRef_;
  ModelHandle model_;
  std::shared_ptr<EmbeddingContext> context_;
  std::vector<std::vector<llama_token>> texts_;
  enum llama_pooling_type pooling_;
  int32_t batchTokens_;
  int32_t threads_;
  bool normalize_;
  std::vector<std::vector<float>> vectors_;
};

Napi::Value EmbedTokens(const Napi::CallbackInfo& info, LlamaModel* model) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray()) throw Napi::TypeError::New(env, "embed: tokenLists must be an array of Int32Array");
  if (!info[1].IsObject()) throw Napi::TypeError::New(env, "embed: options must be an object");
  Napi::Array lists = info[0].As<Napi::Array>();
  Napi::Object options = info[1].As<Napi::Object>();
  const int32_t nVocab = llama_vocab_n_tokens(model->vocab());
  const int32_t trained = llama_model_n_ctx_train(model->handle().get());

  auto intOption = [&](const char* name, int32_t min, int32_t max) {
    Napi::Value v = options.Get(name);
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
    if (!(d >= min && d <= max) || d != std::floor(d)) {
      throw Napi::RangeError::New(env, std::string("embed: ") + name + " must be an integer in [" + std::to_string(min) +
                                           ", " + std::to_string(max) + "]");
    }
    return static_cast<int32_t>(d);
  };
  const int32_t batchTokens = intOption("batchTokens", 1, std::max(trained, 1));
  const int32_t threads = intOption("threads", 1, 1024);
  std::string poolingName = options.Get("pooling").IsString() ? options.Get("pooling").As<Napi::String>().Utf8Value() : "";
  enum llama_pooling_type pooling;
  if (poolingName == "mean") pooling = LLAMA_POOLING_TYPE_MEAN;
  else if (poolingName == "cls") pooling = LLAMA_POOLING_TYPE_CLS;
  else if (poolingName == "last") pooling = LLAMA_POOLING_TYPE_LAST;
  else throw Napi::RangeError::New(env, "embed: pooling must be 'mean', 'cls' or 'last'");

  std::vector<std::vector<llama_token>> texts;
  texts.reserve(lists.Length());
  for (uint32_t i = 0; i < lists.Length(); ++i) {
    const std::string what = "tokenLists[" + std::to_string(i) + "]";
    texts.push_back(TokensFromJs(env, lists.Get(i), nVocab, what.c_str()));
    // Checked here, not only in lib/: llama.cpp asserts (aborts) on a batch past n_batch.
    if (texts.back().empty() || static_cast<int32_t>(texts.back().size()) > batchTokens) {
      throw MakeError(env, "E_CONTEXT_FULL", what + " has " + std::to_string(texts.back().size()) +
                                                " tokens; an embedded text needs 1 to " + std::to_string(batchTokens));
    }
  }
  model->BeginEmbedding(env);
  auto* worker = new ModelEmbedWorker(env, model, model->embedding(), std::move(texts), pooling, batchTokens, threads,
                                      options.Get("normalize").ToBoolean());
  return worker->Start();
}

}  // namespace kvstash
