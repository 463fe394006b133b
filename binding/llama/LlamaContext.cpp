#include "llama/LlamaContext.h"

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "common/AddonData.h"
#include "common/Checksum.h"
#include "common/Errors.h"
#include "common/ProgressReporter.h"
#include "common/PromiseWorker.h"
#include "llama/StateReadGate.h"

namespace kvstash {

namespace {

// llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h, not a public header): more sequences abort.
constexpr int32_t kMaxSequences = 256;

const std::unordered_map<std::string, ggml_type>& KvTypes() {
  static const std::unordered_map<std::string, ggml_type> types = {
      {"f32", GGML_TYPE_F32},   {"f16", GGML_TYPE_F16},   {"bf16", GGML_TYPE_BF16},
      {"q8_0", GGML_TYPE_Q8_0}, {"q4_0", GGML_TYPE_Q4_0}, {"q4_1", GGML_TYPE_Q4_1},
      {"q5_0", GGML_TYPE_Q5_0}, {"q5_1", GGML_TYPE_Q5_1}, {"iq4_nl", GGML_TYPE_IQ4_NL},
  };
  return types;
}

int32_t IntOption(Napi::Object options, const char* name, int32_t fallback, int32_t min, int32_t max) {
  Napi::Value value = options.Get(name);
  if (value.IsUndefined()) return fallback;
  if (!value.IsNumber()) throw Napi::TypeError::New(options.Env(), std::string("createContext: ") + name + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (number != static_cast<int64_t>(number) || number < min || number > max) {
    throw Napi::RangeError::New(options.Env(), std::string("createContext: ") + name + " must be an integer in [" +
                                                   std::to_string(min) + ", " + std::to_string(max) + "]");
  }
  return static_cast<int32_t>(number);
}

std::string StringOption(Napi::Object options, const char* name, const std::string& fallback) {
  Napi::Value value = options.Get(name);
  if (value.IsUndefined()) return fallback;
  if (!value.IsString()) throw Napi::TypeError::New(options.Env(), std::string("createContext: ") + name + " must be a string");
  return value.As<Napi::String>();
}

bool AbortCallback(void* flag) { return static_cast<std::atomic<bool>*>(flag)->load(); }

}  // namespace

// Base of every slow context operation: holds the JS context alive, and releases the context's
// busy state on both threads however the work ends.
class ContextWorker : public PromiseWorker {
 public:
  ContextWorker(Napi::Env env, const char* name, LlamaContext* owner)
      : PromiseWorker(env, name), owner_(owner) {
    ownerRef_ = Napi::Persistent(owner->Value());
  }

 protected:
  virtual void Work(llama_context* ctx) = 0;

  void Run() final {
    struct IdleOnExit {
      LlamaContext* owner;
      ~IdleOnExit() { owner->MarkIdle(); }
    } idle{owner_};
    TakeLastLlamaError();
    Work(owner_->raw());
  }

  void Settle() override { owner_->FinishOperation(); }

  // Every operation of a context runs on that context's own thread (OperationThread.h says why).
  void Dispatch() override {
    if (!owner_->operations().Run(Env(), this)) Queue();
  }

  LlamaContext* owner_;

 private:
  Napi::ObjectReference ownerRef_;
};

// ---------------------------------------------------------------------------------------------
// create

class ContextCreateWorker : public PromiseWorker {
 public:
  ContextCreateWorker(Napi::Env env, ModelHandle model, llama_context_params params, std::string kvType,
                      std::string flash, Napi::Object modelObject)
      : PromiseWorker(env, "kvstash.createContext"), model_(std::move(model)), params_(params),
        kvType_(std::move(kvType)), flash_(std::move(flash)) {
    modelRef_ = Napi::Persistent(modelObject);
  }

 protected:
  void Run() override {
    TakeLastLlamaError();
    ctx_ = llama_init_from_model(model_.get(), params_);
    if (ctx_ == nullptr) {
      throw NativeError("E_CONTEXT_CREATE",
                        WithLlamaReason("llama.cpp could not create the context (too large for memory, or an "
                                        "unsupported combination of options)"));
    }
    // One pool serves single-token steps and prompt batches alike (n_threads == n_threads_batch).
    // Its default polling (workers spin briefly after a graph before they sleep) is what
    // llama.cpp's own tools run with.
    ggml_threadpool_params pool = ggml_threadpool_params_default(params_.n_threads);
    threadpool_ = ggml_threadpool_new(&pool);
    if (threadpool_ == nullptr) throw NativeError("E_CONTEXT_CREATE", "ggml could not start the context's compute threads");
    llama_attach_threadpool(ctx_, threadpool_, nullptr);
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object object = AddonData::Of(env)->contextClass.Value().New({});
    LlamaContext* context = LlamaContext::Unwrap(object);
    context->kvType_ = kvType_;
    context->flashAttention_ = flash_;
    context->unifiedKv_ = params_.kv_unified;
    context->nUbatch_ = static_cast<int32_t>(params_.n_ubatch);
    context->threads_ = params_.n_threads;
    context->Attach(std::move(model_), ctx_, threadpool_);
    ctx_ = nullptr;
    threadpool_ = nullptr;
    return object;
  }

  ~ContextCreateWorker() override {
    // Created, but the promise could not be resolved: the context first, then its threads.
    if (ctx_ != nullptr) llama_free(ctx_);
    if (threadpool_ != nullptr) ggml_threadpool_free(threadpool_);
  }

 private:
  ModelHandle model_;
  llama_context_params params_;
  std::string kvType_, flash_;
  Napi::ObjectReference modelRef_;
  llama_context* ctx_ = nullptr;
  ggml_threadpool* threadpool_ = nullptr;
};

// createContext({contextSize, batchSize, ubatchSize, sequences, threads, kvType, flashAttention, unifiedKv})
Napi::Value LlamaContext::Create(const Napi::CallbackInfo& info, LlamaModel* model) {
  Napi::Env env = info.Env();
  Napi::Object options = info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  const int32_t trained = llama_model_n_ctx_train(model->handle().get());
  llama_context_params params = llama_context_default_params();
  params.n_ctx = IntOption(options, "contextSize", std::min(trained, 4096), 16, 1 << 24);
  params.n_batch = IntOption(options, "batchSize", 512, 1, 1 << 20);
  params.n_ubatch = IntOption(options, "ubatchSize", std::min<int32_t>(params.n_batch, 512), 1, params.n_batch);
  params.n_seq_max = IntOption(options, "sequences", 1, 1, kMaxSequences);
  params.n_threads = IntOption(options, "threads", 4, 1, 1024);
  params.n_threads_batch = params.n_threads;
  Napi::Value unified = options.Get("unifiedKv");
  params.kv_unified = unified.IsUndefined() ? true : unified.ToBoolean().Value();
  std::string kvType = StringOption(options, "kvType", "f16");
  auto found = KvTypes().find(kvType);
  if (found == KvTypes().end()) throw Napi::RangeError::New(env, "createContext: unknown kvType '" + kvType + "'");
  params.type_k = found->second;
  params.type_v = found->second;
  std::string flash = StringOption(options, "flashAttention", "auto");
  if (flash == "auto") params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
  else if (flash == "on") params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
  else if (flash == "off") params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  else throw Napi::RangeError::New(env, "createContext: flashAttention must be 'auto', 'on' or 'off'");
  if (found->second != GGML_TYPE_F16 && found->second != GGML_TYPE_F32 && found->second != GGML_TYPE_BF16 &&
      params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
    throw Napi::RangeError::New(env, "createContext: a quantized kvType needs flashAttention 'on' or 'auto'");
  }
  params.no_perf = true;
  auto* worker = new ContextCreateWorker(env, model->handle(), params, kvType, flash, model->Value());
  return worker->Start();
}

Napi::Function LlamaContext::DefineClass(Napi::Env env) {
  return Napi::ObjectWrap<LlamaContext>::DefineClass(
      env, "LlamaContext",
      {
          InstanceMethod<&LlamaContext::Info>("info"),
          InstanceMethod<&LlamaContext::Decode>("decode"),
          InstanceMethod<&LlamaContext::Logits>("logits"),
          InstanceMethod<&LlamaContext::Abort>("abort"),
          InstanceMethod<&LlamaContext::AbortAndWait>("abortAndWait"),
          InstanceMethod<&LlamaContext::IsBusy>("isBusy"),
          InstanceMethod<&LlamaContext::MemoryClear>("memoryClear"),
          InstanceMethod<&LlamaContext::MemoryRemove>("memoryRemove"),
          InstanceMethod<&LlamaContext::MemoryCopy>("memoryCopy"),
          InstanceMethod<&LlamaContext::MemoryKeep>("memoryKeep"),
          InstanceMethod<&LlamaContext::MemoryShift>("memoryShift"),
          InstanceMethod<&LlamaContext::MemoryRange>("memoryRange"),
          InstanceMethod<&LlamaContext::StateSize>("stateSize"),
          InstanceMethod<&LlamaContext::SaveStateFile>("saveStateFile"),
          InstanceMethod<&LlamaContext::LoadStateFile>("loadStateFile"),
          InstanceMethod<&LlamaContext::ExportState>("exportState"),
          InstanceMethod<&LlamaContext::ImportState>("importState"),
          InstanceMethod<&LlamaContext::ImportVerifiedStateFile>("importVerifiedStateFile"),
          InstanceMethod<&LlamaContext::Dispose>("dispose"),
      });
}

LlamaContext::LlamaContext(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LlamaContext>(info) {}

LlamaContext::~LlamaContext() { WaitIdleAndFree(); }

void LlamaContext::Attach(ModelHandle model, llama_context* ctx, ggml_threadpool* threadpool) {
  model_ = std::move(model);
  ctx_ = ctx;
  threadpool_ = threadpool;
  nVocab_ = llama_vocab_n_tokens(llama_model_get_vocab(model_.get()));
  nCtx_ = static_cast<int32_t>(llama_n_ctx(ctx_));
  nCtxSeq_ = static_cast<int32_t>(llama_n_ctx_seq(ctx_));
  nSeqMax_ = static_cast<int32_t>(llama_n_seq_max(ctx_));
  nBatch_ = static_cast<int32_t>(llama_n_batch(ctx_));
  llama_set_abort_callback(ctx_, AbortCallback, &abort_);
}

void LlamaContext::WaitIdleAndFree() {
  if (ctx_ == nullptr) return;
  abort_.store(true);
  {
    std::unique_lock<std::mutex> lock(idleMutex_);
    idleCv_.wait(lock, [this] { return !running_; });
  }
  llama_free(ctx_);
  ctx_ = nullptr;
  if (threadpool_ != nullptr) ggml_threadpool_free(threadpool_);
  threadpool_ = nullptr;
  model_.reset();
  outputs_ = DecodeOutputs();
  importScratch_.Release();
  importReader_.Stop();
  operations_.Stop();
}

void LlamaContext::RequireLive(Napi::Env env) const {
  if (ctx_ == nullptr) throw MakeError(env, "E_DISPOSED", "the context was disposed; create a new one");
}

void LlamaContext::RequireIdle(Napi::Env env) const {
  RequireLive(env);
  if (busy_.load()) {
    throw MakeError(env, "E_BUSY", "another operation is running on this context; await it first");
  }
}

void LlamaContext::BeginOperation(Napi::Env env) {
  RequireIdle(env);
  busy_.store(true);
  abort_.store(false);
  std::lock_guard<std::mutex> lock(idleMutex_);
  running_ = true;
}

void LlamaContext::FinishOperation() { busy_.store(false); }

void LlamaContext::MarkIdle() {
  std::lock_guard<std::mutex> lock(idleMutex_);
  running_ = false;
  idleCv_.notify_all();
}

llama_seq_id LlamaContext::SequenceArg(Napi::Env env, Napi::Value value, bool allowAll, const char* what) const {
  if (value.IsUndefined() && allowAll) return -1;
  if (!value.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (allowAll && number == -1) return -1;
  if (number != static_cast<int64_t>(number) || number < 0 || number >= nSeqMax_) {
    throw MakeError(env, "E_SEQUENCE_INVALID",
                    std::string(what) + " " + std::to_string(number) + " is outside this context's sequences [0, " +
                        std::to_string(nSeqMax_) + ")");
  }
  return static_cast<llama_seq_id>(number);
}

// Positions for memory ranges: -1 (or undefined) means "open end", as in llama.cpp.
llama_pos LlamaContext::PositionArg(Napi::Env env, Napi::Value value, const char* what) const {
  if (value.IsUndefined() || value.IsNull()) return -1;
  if (!value.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (number == -1 || std::isinf(number)) return -1;
  if (number != static_cast<int64_t>(number) || number < 0 || number > nCtxSeq_) {
    throw MakeError(env, "E_POSITION_INVALID",
                    std::string(what) + " " + std::to_string(number) + " is outside [0, " + std::to_string(nCtxSeq_) + "]");
  }
  return static_cast<llama_pos>(number);
}

int32_t LlamaContext::ExpectedTokensArg(Napi::Env env, Napi::Value value, const char* what) const {
  if (value.IsUndefined() || value.IsNull()) return -1;
  if (!value.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + ": tokens must be a number");
  const double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0 && number <= 2147483647.0) || number != std::floor(number)) {
    throw Napi::RangeError::New(env, std::string(what) + ": tokens must be an integer in [0, 2147483647]");
  }
  return static_cast<int32_t>(number);
}

SequenceStateShape LlamaContext::StateShape(int32_t tokens) const {
  const llama_model* model = model_.get();
  SequenceStateShape shape;
  // Recurrent and hybrid memories write another layout, which this check does not parse; the
  // check after the import still holds for them.
  shape.known = !llama_model_is_recurrent(model) && !llama_model_is_hybrid(model);
  shape.streams = unifiedKv_ ? 1 : static_cast<uint32_t>(nSeqMax_);
  shape.cellsPerStream = static_cast<uint32_t>(nCtxSeq_);
  shape.tokens = tokens;
  // llama_kv_cache::has_cell_ext(): M-RoPE keeps a 2D position, PLE models the token of each cell.
  const llama_rope_type rope = llama_model_rope_type(model);
  char arch[128] = "";
  llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch));
  char ple[16];
  const bool hasPle = llama_model_meta_val_str(model, (std::string(arch) + ".ple.layers").c_str(), ple, sizeof(ple)) >= 0;
  shape.cellExtBytes = rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE || hasPle ? 12 : 0;
  shape.maxLayers = static_cast<uint32_t>(std::max(0, llama_model_n_layer(model)));
  shape.swaFirst = llama_model_n_swa(model) > 0;
  return shape;
}

namespace {

// After an import into `seq` of a state whose header lists `tokens` tokens: the sequence must hold
// exactly positions [0, tokens). Anything else is emptied and reported as `code`.
void RequireImportedPositions(llama_context* ctx, llama_seq_id seq, int32_t tokens, const char* code, const std::string& what) {
  if (seq < 0 || tokens < 0) return;
  llama_memory_t mem = llama_get_memory(ctx);
  const llama_pos min = llama_memory_seq_pos_min(mem, seq), max = llama_memory_seq_pos_max(mem, seq);
  const bool exact = tokens == 0 ? max == -1 : min == 0 && max == tokens - 1;
  if (exact) return;
  llama_memory_seq_rm(mem, seq, -1, -1);
  throw NativeError(code, what + " does not hold what its header says: after the import the sequence holds positions " +
                              std::to_string(min) + ".." + std::to_string(max) + ", not the " + std::to_string(tokens) +
                              " tokens listed");
}

}  // namespace

Napi::Value LlamaContext::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  Napi::Object out = Napi::Object::New(env);
  out.Set("contextSize", nCtx_);
  out.Set("sequenceContextSize", nCtxSeq_);
  out.Set("batchSize", nBatch_);
  out.Set("ubatchSize", nUbatch_);
  out.Set("sequences", nSeqMax_);
  out.Set("threads", threads_);
  out.Set("kvType", kvType_);
  out.Set("flashAttention", flashAttention_);
  out.Set("unifiedKv", unifiedKv_);
  out.Set("vocabSize", nVocab_);
  out.Set("canShift", llama_memory_can_shift(llama_get_memory(ctx_)));
  return out;
}

// ---------------------------------------------------------------------------------------------
// decode

class ContextDecodeWorker : public ContextWorker {
 public:
  ContextDecodeWorker(Napi::Env env, LlamaContext* owner, int32_t nBatch, std::vector<llama_token> tokens,
                      std::vector<llama_pos> positions, std::vector<llama_seq_id> sequences,
                      std::vector<int8_t> keep, Napi::Value onProgress)
      : ContextWorker(env, "kvstash.decode", owner), nBatch_(nBatch), tokens_(std::move(tokens)),
        positions_(std::move(positions)), sequences_(std::move(sequences)), keep_(std::move(keep)),
        progress_(env, onProgress, "kvstash.decode.progress") {}

 protected:
  void Work(llama_context* ctx) override {
    const int32_t n = static_cast<int32_t>(tokens_.size());
    DecodeOutputs out;
    out.nVocab = owner_->VocabSize();
    out.nTokens = n;
    out.rowOfToken.assign(n, -1);
    int32_t rows = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (keep_[i]) out.rowOfToken[i] = rows++;
    }
    out.logits.resize(static_cast<size_t>(rows) * out.nVocab);

    llama_batch batch = llama_batch_init(nBatch_, 0, 1);
    struct FreeBatch {
      llama_batch& b;
      ~FreeBatch() { llama_batch_free(b); }
    } freeBatch{batch};

    for (int32_t begin = 0; begin < n; begin += nBatch_) {
      if (owner_->AbortRequested()) throw NativeError("E_ABORTED", "decode aborted");
      const int32_t count = std::min(nBatch_, n - begin);
      batch.n_tokens = count;
      for (int32_t j = 0; j < count; ++j) {
        batch.token[j] = tokens_[begin + j];
        batch.pos[j] = positions_[begin + j];
        batch.n_seq_id[j] = 1;
        batch.seq_id[j][0] = sequences_[begin + j];
        batch.logits[j] = keep_[begin + j];
      }
      const int32_t status = llama_decode(ctx, batch);
      if (status == 2) throw NativeError("E_ABORTED", "decode aborted");
      if (status == 1) {
        throw NativeError("E_CONTEXT_FULL",
                          "the context has no free KV cells for this batch; remove tokens from a sequence or "
                          "create a larger context");
      }
      if (status != 0) {
        throw NativeError("E_DECODE", WithLlamaReason("llama_decode failed with status " + std::to_string(status)));
      }
      for (int32_t j = 0; j < count; ++j) {
        if (!keep_[begin + j]) continue;
        const float* row = llama_get_logits_ith(ctx, j);
        if (row == nullptr) throw NativeError("E_DECODE", "llama.cpp kept no logits for a requested output");
        std::memcpy(out.logits.data() + static_cast<size_t>(out.rowOfToken[begin + j]) * out.nVocab, row,
                    sizeof(float) * out.nVocab);
      }
      progress_.Report(begin + count, n);
    }
    outputs_ = std::move(out);
  }

  Napi::Value Result(Napi::Env env) override {
    int32_t rows = static_cast<int32_t>(outputs_.logits.size() / std::max(1, outputs_.nVocab));
    owner_->PublishOutputs(std::move(outputs_));
    return Napi::Number::New(env, rows);
  }

  void Settle() override {
    progress_.Release();
    ContextWorker::Settle();
  }

 private:
  int32_t nBatch_;
  std::vector<llama_token> tokens_;
  std::vector<llama_pos> positions_;
  std::vector<llama_seq_id> sequences_;
  std::vector<int8_t> keep_;
  ProgressReporter progress_;
  DecodeOutputs outputs_;
};

// decode(tokens: Int32Array, positions: Int32Array, sequences: Int32Array, keep: Uint8Array, onProgress?)
// Every argument is checked here, before llama.cpp sees it: llama.cpp rejects some bad batches
// with a log line and aborts the process on others.
Napi::Value LlamaContext::Decode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::vector<llama_token> tokens = TokensFromJs(env, info[0], nVocab_, "tokens");
  const size_t n = tokens.size();
  if (n == 0) throw Napi::RangeError::New(env, "decode: tokens must not be empty");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
      !info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
      !info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, "decode: positions and sequences must be Int32Array, keep a Uint8Array");
  }
  Napi::Int32Array posArray = info[1].As<Napi::Int32Array>();
  Napi::Int32Array seqArray = info[2].As<Napi::Int32Array>();
  Napi::Uint8Array keepArray = info[3].As<Napi::Uint8Array>();
  if (posArray.ElementLength() != n || seqArray.ElementLength() != n || keepArray.ElementLength() != n) {
    throw Napi::RangeError::New(env, "decode: positions, sequences and keep must have one entry per token");
  }
  std::vector<llama_pos> positions(posArray.Data(), posArray.Data() + n);
  std::vector<llama_seq_id> sequences(seqArray.Data(), seqArray.Data() + n);
  std::vector<int8_t> keep(n);

  // llama.cpp requires each sequence to continue exactly where its cells end (Y = X + 1) and to
  // advance one position per token. Check that per sequence, in call order, so a batch split
  // anywhere stays valid.
  llama_memory_t mem = llama_get_memory(ctx_);
  std::unordered_map<llama_seq_id, llama_pos> next;
  for (size_t i = 0; i < n; ++i) {
    const llama_seq_id seq = sequences[i];
    if (seq < 0 || seq >= nSeqMax_) {
      throw MakeError(env, "E_SEQUENCE_INVALID",
                      "sequence " + std::to_string(seq) + " of token " + std::to_string(i) +
                          " is outside this context's sequences [0, " + std::to_string(nSeqMax_) + ")");
    }
    const llama_pos pos = positions[i];
    if (pos < 0 || pos >= nCtxSeq_) {
      throw MakeError(env, "E_POSITION_INVALID",
                      "position " + std::to_string(pos) + " of token " + std::to_string(i) +
                          " is outside the context [0, " + std::to_string(nCtxSeq_) + ")");
    }
    auto it = next.find(seq);
    if (it == next.end()) {
      const llama_pos last = llama_memory_seq_pos_max(mem, seq);
      if (last >= 0 && pos != last + 1) {
        throw MakeError(env, "E_POSITION_INVALID",
                        "sequence " + std::to_string(seq) + " holds positions up to " + std::to_string(last) +
                            ", so its next token must be at position " + std::to_string(last + 1) + ", not " +
                            std::to_string(pos) + " (remove positions first to overwrite them)");
      }
    } else if (pos != it->second) {
      throw MakeError(env, "E_POSITION_INVALID",
                      "positions of sequence " + std::to_string(seq) + " must increase by one per token: token " +
                          std::to_string(i) + " is at " + std::to_string(pos) + ", expected " + std::to_string(it->second));
    }
    next[seq] = pos + 1;
    keep[i] = keepArray[i] != 0 ? 1 : 0;
  }

  BeginOperation(env);
  auto* worker = new ContextDecodeWorker(env, this, nBatch_, std::move(tokens), std::move(positions),
                                         std::move(sequences), std::move(keep), info[4]);
  return worker->Start();
}

const float* LlamaContext::OutputRow(Napi::Env env, int32_t index) const {
  RequireLive(env);
  const int32_t resolved = index < 0 ? outputs_.nTokens + index : index;
  const float* row = outputs_.Row(resolved);
  if (row == nullptr) {
    throw MakeError(env, "E_NO_LOGITS",
                    "the last decode kept no output for token index " + std::to_string(index) +
                        "; ask for it with the decode option `logits`");
  }
  return row;
}

// logits(index) -> Float32Array (a copy)
Napi::Value LlamaContext::Logits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const double number = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!(number >= -2147483648.0 && number <= 2147483647.0) || number != std::floor(number)) {
    throw Napi::RangeError::New(env, "logits: index must be an integer in [-2147483648, 2147483647]");
  }
  const float* row = OutputRow(env, static_cast<int32_t>(number));
  Napi::Float32Array out = Napi::Float32Array::New(env, nVocab_);
  std::memcpy(out.Data(), row, sizeof(float) * nVocab_);
  return out;
}

Napi::Value LlamaContext::Abort(const Napi::CallbackInfo& info) {
  if (busy_.load()) abort_.store(true);
  return info.Env().Undefined();
}

// process.exit() does not wait for this context's own thread, and a decode still running there
// when exit() tears the process down crashed it (under qemu); lib/util/stop-at-exit.ts calls this
// on 'exit'.
// The operation's promise is left unsettled: nothing runs JS after it.
Napi::Value LlamaContext::AbortAndWait(const Napi::CallbackInfo& info) {
  if (busy_.load()) abort_.store(true);
  std::unique_lock<std::mutex> lock(idleMutex_);
  idleCv_.wait(lock, [this] { return !running_; });
  return info.Env().Undefined();
}

Napi::Value LlamaContext::IsBusy(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), busy_.load()); }

// ---------------------------------------------------------------------------------------------
// memory (immediate)

Napi::Value LlamaContext::MemoryClear(const Napi::CallbackInfo& info) {
  RequireIdle(info.Env());
  llama_memory_clear(llama_get_memory(ctx_), true);
  return info.Env().Undefined();
}

Napi::Value LlamaContext::MemoryRemove(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_seq_id seq = SequenceArg(env, info[0], true, "sequence");
  llama_pos p0 = PositionArg(env, info[1], "p0");
  llama_pos p1 = PositionArg(env, info[2], "p1");
  return Napi::Boolean::New(env, llama_memory_seq_rm(llama_get_memory(ctx_), seq, p0, p1));
}

Napi::Value LlamaContext::MemoryCopy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_seq_id src = SequenceArg(env, info[0], false, "source sequence");
  llama_seq_id dst = SequenceArg(env, info[1], false, "destination sequence");
  llama_pos p0 = PositionArg(env, info[2], "p0");
  llama_pos p1 = PositionArg(env, info[3], "p1");
  if (src != dst) llama_memory_seq_cp(llama_get_memory(ctx_), src, dst, p0, p1);
  return env.Undefined();
}

Napi::Value LlamaContext::MemoryKeep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_memory_seq_keep(llama_get_memory(ctx_), SequenceArg(env, info[0], false, "sequence"));
  return env.Undefined();
}

Napi::Value LlamaContext::MemoryShift(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_memory_t mem = llama_get_memory(ctx_);
  if (!llama_memory_can_shift(mem)) {
    throw MakeError(env, "E_SHIFT_UNSUPPORTED", "this model's memory cannot shift positions");
  }
  llama_seq_id seq = SequenceArg(env, info[0], false, "sequence");
  llama_pos p0 = PositionArg(env, info[1], "p0");
  llama_pos p1 = PositionArg(env, info[2], "p1");
  if (!info[3].IsNumber()) throw Napi::TypeError::New(env, "delta must be a number");
  const double number = info[3].As<Napi::Number>().DoubleValue();
  if (!(number >= -2147483648.0 && number <= 2147483647.0) || number != std::floor(number)) {
    throw Napi::RangeError::New(env, "delta must be an integer in [-2147483648, 2147483647]");
  }
  const llama_pos delta = static_cast<llama_pos>(number);
  // llama.cpp adds delta to each position as int32 without a bound: past INT32_MAX it wraps, and
  // past the context every later decode of the sequence is refused. Positions moved below 0 are
  // removed by llama.cpp, which is what a context shift wants.
  const int64_t highest = std::min<int64_t>(llama_memory_seq_pos_max(mem, seq), p1 < 0 ? INT64_MAX : int64_t{p1} - 1);
  if (delta > 0 && highest >= 0 && highest >= p0 && highest + delta >= nCtxSeq_) {
    throw MakeError(env, "E_POSITION_INVALID",
                    "shifting by " + std::to_string(delta) + " would move position " + std::to_string(highest) + " to " +
                        std::to_string(highest + delta) + ", past the context [0, " + std::to_string(nCtxSeq_) +
                        "); remove positions first");
  }
  llama_memory_seq_add(mem, seq, p0, p1, delta);
  return env.Undefined();
}

// memoryRange(seq) -> [min, max] (both -1 when the sequence is empty)
Napi::Value LlamaContext::MemoryRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_seq_id seq = SequenceArg(env, info[0], false, "sequence");
  llama_memory_t mem = llama_get_memory(ctx_);
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, llama_memory_seq_pos_min(mem, seq));
  out.Set(1u, llama_memory_seq_pos_max(mem, seq));
  return out;
}

Napi::Value LlamaContext::StateSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_seq_id seq = SequenceArg(env, info[0], true, "sequence");
  size_t size = seq < 0 ? llama_state_get_size(ctx_) : llama_state_seq_get_size(ctx_, seq);
  return Napi::Number::New(env, static_cast<double>(size));
}

// ---------------------------------------------------------------------------------------------
// state

class StateSaveFileWorker : public ContextWorker {
 public:
  StateSaveFileWorker(Napi::Env env, LlamaContext* owner, std::string path, llama_seq_id seq,
                      std::vector<llama_token> tokens)
      : ContextWorker(env, "kvstash.saveState", owner), path_(std::move(path)), seq_(seq), tokens_(std::move(tokens)) {}

 protected:
  void Work(llama_context* ctx) override {
    bool ok = seq_ < 0 ? llama_state_save_file(ctx, path_.c_str(), tokens_.data(), tokens_.size())
                       : llama_state_seq_save_file(ctx, path_.c_str(), seq_, tokens_.data(), tokens_.size()) > 0;
    if (!ok) throw NativeError("E_STATE_SAVE", WithLlamaReason("could not write the state to " + path_));
  }

 private:
  std::string path_;
  llama_seq_id seq_;
  std::vector<llama_token> tokens_;
};

// saveStateFile(path, seq, tokens) -> Promise<void>
Napi::Value LlamaContext::SaveStateFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "saveState: path must be a string");
  llama_seq_id seq = SequenceArg(env, info[1], true, "sequence");
  std::vector<llama_token> tokens = TokensFromJs(env, info[2], nVocab_, "tokens");
  BeginOperation(env);
  return (new StateSaveFileWorker(env, this, info[0].As<Napi::String>(), seq, std::move(tokens)))->Start();
}

class StateLoadFileWorker : public ContextWorker {
 public:
  StateLoadFileWorker(Napi::Env env, LlamaContext* owner, std::string path, llama_seq_id seq, size_t capacity)
      : ContextWorker(env, "kvstash.loadState", owner), path_(std::move(path)), seq_(seq), tokens_(capacity) {}

 protected:
  void Work(llama_context* ctx) override {
    if (seq_ >= 0) CheckFile();
    size_t count = 0;
    bool ok = seq_ < 0 ? llama_state_load_file(ctx, path_.c_str(), tokens_.data(), tokens_.size(), &count)
                       : llama_state_seq_load_file(ctx, path_.c_str(), seq_, tokens_.data(), tokens_.size(), &count) > 0;
    if (!ok) {
      throw NativeError("E_STATE_LOAD",
                        WithLlamaReason("the state in " + path_ +
                                        " does not fit this context (another model, other context settings, or "
                                        "not a llama.cpp state file)"));
    }
    tokens_.resize(count);
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Int32Array out = Napi::Int32Array::New(env, tokens_.size());
    std::copy(tokens_.begin(), tokens_.end(), out.Data());
    return out;
  }

 public:
  // What the file's state must look like (LlamaContext::StateShape); set before Start().
  StateLoadFileWorker* Expecting(const SequenceStateShape& shape) {
    shape_ = shape;
    shape_.prefixed = false;  // llama_state_seq_save_file writes the state without that prefix
    return this;
  }

 private:
  // llama_state_seq_load_file sizes its allocations by the file's cell count before any bound (a
  // small file claiming 2^28 cells costs gigabytes): walk the state after the file's tokens first.
  // Files in another format or version are left to llama.cpp, which refuses them.
  void CheckFile() {
    std::vector<uint8_t> bytes;
    {
      const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return;  // llama.cpp reports it
      uint8_t block[1 << 16];
      for (ssize_t got; (got = ::read(fd, block, sizeof(block))) != 0;) {
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) break;
        bytes.insert(bytes.end(), block, block + got);
      }
      ::close(fd);
    }
    uint32_t head[3];
    if (bytes.size() < sizeof(head)) return;
    std::memcpy(head, bytes.data(), sizeof(head));
    if (head[0] != LLAMA_STATE_SEQ_MAGIC || head[1] != LLAMA_STATE_SEQ_VERSION) return;
    const uint64_t stateOffset = sizeof(head) + uint64_t{head[2]} * sizeof(llama_token);
    if (stateOffset > bytes.size()) return;  // llama.cpp refuses a token count past the file's end
    std::string reason;
    const StateCheck check = CheckSequenceState(bytes.data() + stateOffset, bytes.size() - stateOffset, shape_,
                                                [](const uint8_t*, size_t) { return true; }, &reason);
    if (check != StateCheck::kValid) {
      throw NativeError("E_STATE_LOAD", "the state in " + path_ + " cannot be loaded into this context: " + reason);
    }
  }

  std::string path_;
  llama_seq_id seq_;
  std::vector<llama_token> tokens_;
  SequenceStateShape shape_;
};

// loadStateFile(path, seq) -> Promise<Int32Array>
Napi::Value LlamaContext::LoadStateFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "loadState: path must be a string");
  llama_seq_id seq = SequenceArg(env, info[1], true, "sequence");
  BeginOperation(env);
  const SequenceStateShape shape = StateShape(-1);
  return (new StateLoadFileWorker(env, this, info[0].As<Napi::String>(), seq, static_cast<size_t>(nCtx_)))
      ->Expecting(shape)
      ->Start();
}

class StateExportWorker : public ContextWorker {
 public:
  StateExportWorker(Napi::Env env, LlamaContext* owner, llama_seq_id seq)
      : ContextWorker(env, "kvstash.exportState", owner), seq_(seq) {}

 protected:
  void Work(llama_context* ctx) override {
    const size_t size = seq_ < 0 ? llama_state_get_size(ctx) : llama_state_seq_get_size(ctx, seq_);
    bytes_.resize(size);
    const size_t written = seq_ < 0 ? llama_state_get_data(ctx, bytes_.data(), size)
                                    : llama_state_seq_get_data(ctx, bytes_.data(), size, seq_);
    if (written == 0 && size != 0) throw NativeError("E_STATE_SAVE", WithLlamaReason("could not export the state"));
    bytes_.resize(written);
  }

  Napi::Value Result(Napi::Env env) override {
    // Hand the bytes to JS without a copy: the Buffer owns the vector from now on.
    auto* owned = new std::vector<uint8_t>(std::move(bytes_));
    return Napi::Buffer<uint8_t>::New(env, owned->data(), owned->size(),
                                      [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, owned);
  }

 private:
  llama_seq_id seq_;
  std::vector<uint8_t> bytes_;
};

Napi::Value LlamaContext::ExportState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  llama_seq_id seq = SequenceArg(env, info[0], true, "sequence");
  BeginOperation(env);
  return (new StateExportWorker(env, this, seq))->Start();
}

class StateImportWorker : public ContextWorker {
 public:
  StateImportWorker(Napi::Env env, LlamaContext* owner, Napi::Uint8Array bytes, llama_seq_id seq, SequenceStateShape shape)
      : ContextWorker(env, "kvstash.importState", owner), data_(bytes.Data()), size_(bytes.ByteLength()), seq_(seq),
        shape_(shape) {
    // Pinned until the worker is destroyed: the worker thread reads it in place, without a copy.
    bytesRef_ = Napi::Persistent(static_cast<Napi::Object>(bytes));
  }

 protected:
  void Work(llama_context* ctx) override {
    // With a token count the bytes come with a header (a cache entry) that they contradict.
    const bool entry = shape_.tokens >= 0;
    const char* code = entry ? "E_CACHE_CORRUPT" : "E_STATE_LOAD";
    std::string reason;
    const StateCheck check = seq_ < 0 ? StateCheck::kValid
                                      : CheckSequenceState(data_, size_, shape_, [](const uint8_t*, size_t) { return true; }, &reason);
    if (check == StateCheck::kMismatch) throw NativeError(entry ? "E_CACHE_MISMATCH" : "E_STATE_LOAD", "the state does not fit this context: " + reason);
    if (check != StateCheck::kValid) throw NativeError(code, "the state bytes cannot be loaded: " + reason);
    const size_t read = seq_ < 0 ? llama_state_set_data(ctx, data_, size_) : llama_state_seq_set_data(ctx, data_, size_, seq_);
    if (read == 0) {
      throw NativeError("E_STATE_LOAD",
                        WithLlamaReason("the state bytes do not fit this context (another model, other context "
                                        "settings, or not llama.cpp state data)"));
    }
    RequireImportedPositions(ctx, seq_, shape_.tokens, code, "the state");
  }

 private:
  const uint8_t* data_;
  size_t size_;
  llama_seq_id seq_;
  SequenceStateShape shape_;
  Napi::ObjectReference bytesRef_;
};

// importState(bytes: Uint8Array, seq, tokens?) -> Promise<void>; `tokens`: the count its header lists
Napi::Value LlamaContext::ImportState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, "importState: bytes must be a Buffer or Uint8Array");
  }
  llama_seq_id seq = SequenceArg(env, info[1], true, "sequence");
  Napi::Uint8Array bytes = info[0].As<Napi::Uint8Array>();
  if (bytes.ByteLength() == 0) throw MakeError(env, "E_STATE_LOAD", "importState: the state is empty");
  const SequenceStateShape shape = StateShape(ExpectedTokensArg(env, info[2], "importState"));
  BeginOperation(env);
  return (new StateImportWorker(env, this, bytes, seq, shape))->Start();
}

// Reads a file region, verifies it against its chunk digests (lib/cache/entry.ts: formats 2 and 3
// hash 64 KiB chunks, format 1 is one chunk) and imports a sub-range as sequence state, all off the main
// thread. lib/cache decides what the ranges mean; this guarantees that llama.cpp reads no byte
// before it is verified, and that an import fails as a whole when any chunk does. It reads the
// descriptor lib/cache opened and read the header from (lib/util/regular-file.ts: never a FIFO,
// never through a symlink), and opens nothing by path: a file that another process renames over
// the path meanwhile is never checked against this one's digests. The descriptor stays JS's. Reading,
// checking and importing overlap (StateReadGate): about one pass over the bytes instead of three.
class StateImportVerifiedFileWorker : public ContextWorker {
 public:
  StateImportVerifiedFileWorker(Napi::Env env, LlamaContext* owner, int fd, std::string path, llama_seq_id seq,
                                uint64_t checkedLength, uint64_t chunkBytes, std::vector<uint8_t> digests,
                                DigestScheme scheme, uint64_t payloadOffset, uint64_t payloadLength, bool readAhead,
                                ScratchBuffer* scratch, HelperThread* reader)
      : ContextWorker(env, "kvstash.importVerifiedStateFile", owner), fd_(fd), path_(std::move(path)), seq_(seq),
        checkedLength_(checkedLength), chunkBytes_(chunkBytes), digests_(std::move(digests)),
        scheme_(scheme), payloadOffset_(payloadOffset), payloadLength_(payloadLength), readAhead_(readAhead), scratch_(scratch), reader_(reader) {}

 protected:
  void Work(llama_context* ctx) override {
    const int fd = fd_;
    // Reused across restores: a fresh multi-megabyte allocation page-faults on first touch, which
    // costs as much as the read itself.
    uint8_t* buffer = scratch_->Reserve(checkedLength_);
    size_t read = 0;
    bool verified = false;
    std::string readError, invalid;
    {
      StateReadGate gate(fd, buffer, checkedLength_, chunkBytes_, digests_, scheme_, *reader_, readAhead_);
      // The state's own structure first, from verified bytes only: checksums prove the bytes are
      // the ones written, not that their writer told the truth (StateReadGate.h).
      const StateCheck check =
          seq_ < 0 ? StateCheck::kValid
                   : CheckSequenceState(buffer + payloadOffset_, payloadLength_, shape_,
                                        [&gate](const uint8_t* data, size_t size) { return gate.Verify(data, size); }, &invalid);
      if (check == StateCheck::kInvalid) {
        // Proven from verified bytes: the entry lies. The rest of it need not be read.
        throw NativeError("E_CACHE_CORRUPT", "cache entry " + path_ + " is corrupt: " + invalid + "; it will not be loaded");
      }
      if (check == StateCheck::kMismatch) {
        throw NativeError("E_CACHE_MISMATCH", "cache entry " + path_ + " was made for another context: " + invalid);
      }
      if (check == StateCheck::kValid) {
        read = seq_ < 0 ? llama_state_set_data(ctx, buffer + payloadOffset_, payloadLength_)
                        : llama_state_seq_set_data(ctx, buffer + payloadOffset_, payloadLength_, seq_);
      }
      // Every chunk, also those llama.cpp did not need to read (the header's).
      verified = gate.AllVerified();
      readError = gate.ReadError();
      bounced_ = gate.BouncedChunks();
      if (read != 0 && !gate.Consulted()) {
        // CMakeLists.txt refuses such a tree; this is the check that it did.
        throw NativeError("E_NATIVE", "this build's llama.cpp lacks kvstash's read gate (scripts/fetch-llama.js): rebuild");
      }
    }
    if (!readError.empty()) throw NativeError("E_CACHE_CORRUPT", "cannot read cache entry " + path_ + ": " + readError);
    if (!verified) {
      throw NativeError("E_CACHE_CORRUPT", "cache entry " + path_ + " failed its checksum: its bytes changed after it was written");
    }
    if (read == 0) {
      throw NativeError("E_CACHE_MISMATCH",
                        WithLlamaReason("llama.cpp refused the state in " + path_ +
                                        " (its layout does not match this context)"));
    }
    RequireImportedPositions(ctx, seq_, shape_.tokens, "E_CACHE_CORRUPT", "cache entry " + path_);
  }

 public:
  // What the state must look like (LlamaContext::StateShape); set before Start().
  StateImportVerifiedFileWorker* Expecting(const SequenceStateShape& shape) {
    shape_ = shape;
    return this;
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object result = Napi::Object::New(env);
    result.Set("chunks", static_cast<double>(ChunkCount(checkedLength_, chunkBytes_)));
    result.Set("bouncedChunks", static_cast<double>(bounced_));
    return result;
  }

 private:
  int fd_;
  std::string path_;
  llama_seq_id seq_;
  uint64_t checkedLength_, chunkBytes_;
  std::vector<uint8_t> digests_;
  DigestScheme scheme_;
  uint64_t payloadOffset_, payloadLength_;
  bool readAhead_;
  uint64_t bounced_ = 0;
  ScratchBuffer* scratch_;
  HelperThread* reader_;
  SequenceStateShape shape_;
};

// importVerifiedStateFile(path, seq, checkedLength, chunkBytes, digests: Uint8Array, scheme,
//                         payloadOffset, payloadLength, readAhead: boolean, tokens?: number)
//   -> Promise<{chunks, bouncedChunks}>
// `tokens`: the count the entry's header lists; the sequence must then hold exactly [0, tokens).
// `fd` (info[10]): the open entry file, read with pread and left open; `path` only names it in
// messages.
// `digests`: the little-endian digest of each chunk of [0, checkedLength), as ChunkDigests() with
// `scheme` ('xxh64' | 'crc32c').
Napi::Value LlamaContext::ImportVerifiedStateFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  if (!info[0].IsString() || !info[2].IsNumber() || !info[3].IsNumber() || !info[4].IsTypedArray() ||
      info[4].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array || !info[6].IsNumber() || !info[7].IsNumber() ||
      !info[8].IsBoolean() || !info[10].IsNumber()) {
    throw Napi::TypeError::New(env, "importVerifiedStateFile(path, seq, checkedLength, chunkBytes, digests, scheme, payloadOffset, payloadLength, readAhead, tokens, fd)");
  }
  const double fd = info[10].As<Napi::Number>().DoubleValue();
  if (!(fd >= 0 && fd <= 2147483647.0 && fd == static_cast<double>(static_cast<int>(fd)))) {
    throw Napi::RangeError::New(env, "importVerifiedStateFile: fd must be an open file descriptor");
  }
  const DigestScheme scheme = DigestSchemeArg(env, info[5], "importVerifiedStateFile");
  llama_seq_id seq = SequenceArg(env, info[1], true, "sequence");
  const double checked = info[2].As<Napi::Number>().DoubleValue();
  const double chunkBytes = info[3].As<Napi::Number>().DoubleValue();
  Napi::Uint8Array digests = info[4].As<Napi::Uint8Array>();
  const double offset = info[6].As<Napi::Number>().DoubleValue();
  const double length = info[7].As<Napi::Number>().DoubleValue();
  auto isCount = [](double v) { return v >= 0 && v <= 9.0e15 && v == static_cast<double>(static_cast<uint64_t>(v)); };
  if (!isCount(checked) || !isCount(offset) || !isCount(length) || length == 0 || offset + length > checked) {
    throw Napi::RangeError::New(env, "importVerifiedStateFile: the payload must lie inside the checked range");
  }
  if (!isCount(chunkBytes) || chunkBytes == 0 ||
      digests.ByteLength() != 8 * ChunkCount(static_cast<uint64_t>(checked), static_cast<uint64_t>(chunkBytes))) {
    throw Napi::RangeError::New(env, "importVerifiedStateFile: digests must hold 8 bytes per chunk of the checked range");
  }
  std::vector<uint8_t> expected(digests.Data(), digests.Data() + digests.ByteLength());
  const SequenceStateShape shape = StateShape(ExpectedTokensArg(env, info[9], "importVerifiedStateFile"));
  // The worker starts on a thread-pool thread within about 0.1 ms; the reader thread spins that
  // long instead of being woken after it (StateReadGate).
  importReader_.Prewake(std::chrono::microseconds(2000));
  BeginOperation(env);
  return (new StateImportVerifiedFileWorker(env, this, static_cast<int>(fd), info[0].As<Napi::String>(), seq, static_cast<uint64_t>(checked),
                                            static_cast<uint64_t>(chunkBytes), std::move(expected), scheme,
                                            static_cast<uint64_t>(offset), static_cast<uint64_t>(length),
                                            info[8].As<Napi::Boolean>().Value(), &importScratch_, &importReader_))
      ->Expecting(shape)
      ->Start();
}

Napi::Value LlamaContext::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (ctx_ == nullptr) return env.Undefined();
  if (busy_.load()) throw MakeError(env, "E_BUSY", "dispose: an operation is running; await it (lib/ does)");
  WaitIdleAndFree();
  return env.Undefined();
}

}  // namespace kvstash
