// JS class LlamaContext: one llama.cpp context (KV cache + compute buffers) of a model.
//
// Concurrency contract: at most one slow operation (decode, state load/save) runs at a time; the
// TypeScript layer queues them, and this class refuses a second one with E_BUSY as a last guard, so
// two threads are never inside llama.cpp with the same context. Memory operations are immediate
// and are refused with E_BUSY while a slow operation runs.
#pragma once

#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include "common/HelperThread.h"
#include "common/OperationThread.h"
#include "common/ScratchBuffer.h"
#include "ggml-cpu.h"
#include "llama.h"
#include "llama/LlamaModel.h"
#include "llama/StateReadGate.h"

namespace kvstash {

// Output rows kept by one decode call: row r holds the logits of token tokenIndex[r] of that call.
struct DecodeOutputs {
  int32_t nVocab = 0;
  int32_t nTokens = 0;
  std::vector<int32_t> rowOfToken;  // -1 where the token's output was not kept
  std::vector<float> logits;        // rows * nVocab

  const float* Row(int32_t tokenIndex) const {
    if (tokenIndex < 0 || tokenIndex >= nTokens || rowOfToken[tokenIndex] < 0) return nullptr;
    return logits.data() + static_cast<size_t>(rowOfToken[tokenIndex]) * nVocab;
  }
};

class LlamaContext : public Napi::ObjectWrap<LlamaContext> {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  static Napi::Value Create(const Napi::CallbackInfo& info, LlamaModel* model);

  explicit LlamaContext(const Napi::CallbackInfo& info);
  ~LlamaContext() override;

  // The logits row of token `index` of the last decode (index < 0 counts from the end), or throws
  // E_NO_LOGITS. Safe while a decode runs: that decode publishes its rows only when it ends.
  const float* OutputRow(Napi::Env env, int32_t index) const;
  int32_t VocabSize() const { return nVocab_; }

  // Used by the workers (friend-free): the slow-operation protocol.
  llama_context* raw() const { return ctx_; }
  void FinishOperation();  // main thread
  void MarkIdle();         // worker thread, at the very end of its work
  bool AbortRequested() const { return abort_.load(); }
  void PublishOutputs(DecodeOutputs&& outputs) { outputs_ = std::move(outputs); }
  OperationThread& operations() { return operations_; }

 private:
  friend class ContextCreateWorker;
  void Attach(ModelHandle model, llama_context* ctx, ggml_threadpool* threadpool);
  void RequireLive(Napi::Env env) const;
  // Claims the context for a slow operation or throws E_BUSY / E_DISPOSED.
  void BeginOperation(Napi::Env env);
  void RequireIdle(Napi::Env env) const;
  llama_seq_id SequenceArg(Napi::Env env, Napi::Value value, bool allowAll, const char* what) const;
  llama_pos PositionArg(Napi::Env env, Napi::Value value, const char* what) const;
  // The expected-token-count argument of the imports: -1 when absent.
  int32_t ExpectedTokensArg(Napi::Env env, Napi::Value value, const char* what) const;
  // What a sequence state must look like to be imported here (`tokens`: the header's count or -1).
  SequenceStateShape StateShape(int32_t tokens) const;
  void WaitIdleAndFree();

  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Decode(const Napi::CallbackInfo& info);
  Napi::Value Logits(const Napi::CallbackInfo& info);
  Napi::Value Abort(const Napi::CallbackInfo& info);
  Napi::Value AbortAndWait(const Napi::CallbackInfo& info);
  Napi::Value IsBusy(const Napi::CallbackInfo& info);
  Napi::Value MemoryClear(const Napi::CallbackInfo& info);
  Napi::Value MemoryRemove(const Napi::CallbackInfo& info);
  Napi::Value MemoryCopy(const Napi::CallbackInfo& info);
  Napi::Value MemoryKeep(const Napi::CallbackInfo& info);
  Napi::Value MemoryShift(const Napi::CallbackInfo& info);
  Napi::Value MemoryRange(const Napi::CallbackInfo& info);
  Napi::Value StateSize(const Napi::CallbackInfo& info);
  Napi::Value SaveStateFile(const Napi::CallbackInfo& info);
  Napi::Value LoadStateFile(const Napi::CallbackInfo& info);
  Napi::Value ExportState(const Napi::CallbackInfo& info);
  Napi::Value ImportState(const Napi::CallbackInfo& info);
  Napi::Value ImportVerifiedStateFile(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  ModelHandle model_;
  llama_context* ctx_ = nullptr;
  // The context's own compute threads, kept between decodes (freed after ctx_). Without one,
  // llama.cpp starts and joins its worker threads on every decode: a generation step then waits
  // for a new thread to be scheduled, which on a busy machine cost 35 ms per token where the same
  // step took 3 ms on one thread (tiny model, 2 threads, 2 cores with a build beside it).
  ggml_threadpool* threadpool_ = nullptr;
  int32_t nVocab_ = 0;
  int32_t nCtx_ = 0;
  int32_t nCtxSeq_ = 0;
  int32_t nSeqMax_ = 0;
  int32_t nBatch_ = 0;
  std::string kvType_;
  std::string flashAttention_;
  bool unifiedKv_ = true;
  int32_t nUbatch_ = 0;
  int32_t threads_ = 0;

  DecodeOutputs outputs_;
  ScratchBuffer importScratch_;  // verified imports read entry files into it
  HelperThread importReader_;    // and read ahead on this thread (StateReadGate)
  OperationThread operations_;   // where decodes and state operations run
  std::atomic<bool> busy_{false};
  std::atomic<bool> abort_{false};
  // `running_` is true from the start of a slow operation until its worker thread has left
  // llama.cpp; the destructor waits on it so memory is never freed under a running decode.
  std::mutex idleMutex_;
  std::condition_variable idleCv_;
  bool running_ = false;
};

}  // namespace kvstash
