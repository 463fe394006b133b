#include "rkllm/RkllmRuntime.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <functional>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/Errors.h"

namespace kvstash {

using namespace rkllm;

class RkllmRunState;

namespace {

constexpr double kInt32Max = std::numeric_limits<int32_t>::max();
constexpr double kFloatLimit = 1e6;  // generous bound for penalties and temperatures; rejects inf and nonsense

// Argument readers. A wrong type is a TypeError, a value out of range a RangeError, both naming the
// call and the field: the runtime itself does not check, and some bad values crash it.
class Fields {
 public:
  Fields(Napi::Object object, std::string scope) : object_(object), scope_(std::move(scope)) {}

  bool Has(const char* name) const { return !object_.Get(name).IsUndefined(); }

  double Number(const char* name, double min, double max, bool integer) const {
    Napi::Value value = object_.Get(name);
    if (!value.IsNumber()) throw Napi::TypeError::New(object_.Env(), scope_ + ": " + name + " must be a number");
    double number = value.As<Napi::Number>().DoubleValue();
    if (std::isnan(number) || number < min || number > max || (integer && number != std::floor(number))) {
      throw Napi::RangeError::New(object_.Env(), scope_ + ": " + name + " must be " + (integer ? "an integer" : "a number") +
                                                     " in [" + Format(min) + ", " + Format(max) + "]");
    }
    return number;
  }
  void Int(const char* name, int32_t& out, double min, double max) const {
    if (Has(name)) out = static_cast<int32_t>(Number(name, min, max, true));
  }
  void Float(const char* name, float& out, double min, double max) const {
    if (Has(name)) out = static_cast<float>(Number(name, min, max, false));
  }
  void Bool(const char* name, bool& out) const {
    if (!Has(name)) return;
    Napi::Value value = object_.Get(name);
    if (!value.IsBoolean()) throw Napi::TypeError::New(object_.Env(), scope_ + ": " + name + " must be a boolean");
    out = value.As<Napi::Boolean>().Value();
  }
  std::string String(const char* name) const { return CString(object_.Env(), object_.Get(name), scope_ + ": " + name); }
  void OptionalString(const char* name, std::optional<std::string>& out) const {
    if (!Has(name)) return;
    if (object_.Get(name).IsNull()) out.reset();
    else out = String(name);
  }
  // Rejects keys this call does not know (typos would otherwise be silently ignored).
  void OnlyKnown(const std::set<std::string>& known) const {
    Napi::Array names = object_.GetPropertyNames();
    for (uint32_t i = 0; i < names.Length(); ++i) {
      std::string key = names.Get(i).ToString();
      if (known.count(key) == 0 && !object_.Get(key).IsUndefined()) {
        throw Napi::TypeError::New(object_.Env(), scope_ + ": unknown option '" + key + "'");
      }
    }
  }

  // A string the runtime receives as a C string: an embedded NUL would silently cut it.
  static std::string CString(Napi::Env env, Napi::Value value, const std::string& what) {
    if (!value.IsString()) throw Napi::TypeError::New(env, what + " must be a string");
    std::string out = value.As<Napi::String>();
    if (out.find('\0') != std::string::npos) throw Napi::RangeError::New(env, what + " must not contain NUL characters");
    return out;
  }

 private:
  static std::string Format(double v) {
    if (v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
    return std::to_string(v);
  }
  Napi::Object object_;
  std::string scope_;
};

Napi::Object RequireObject(Napi::Env env, Napi::Value value, const char* what) {
  if (!value.IsObject() || value.IsArray()) throw Napi::TypeError::New(env, std::string(what) + " must be an object");
  return value.As<Napi::Object>();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

Napi::Value NullableString(Napi::Env env, const std::optional<std::string>& s) {
  return s ? Napi::String::New(env, *s) : env.Null();
}

Napi::Object ParamsToJs(Napi::Env env, const RkllmParams& p, RkllmVersion version) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("modelPath", p.modelPath);
  o.Set("maxContextLen", p.maxContextLen);
  o.Set("maxNewTokens", p.maxNewTokens);
  o.Set("topK", p.sampling.topK);
  o.Set("nKeep", p.nKeep);
  o.Set("topP", p.sampling.topP);
  o.Set("temperature", p.sampling.temperature);
  o.Set("repeatPenalty", p.sampling.repeatPenalty);
  o.Set("frequencyPenalty", p.sampling.frequencyPenalty);
  o.Set("presencePenalty", p.sampling.presencePenalty);
  o.Set("mirostat", p.sampling.mirostat);
  o.Set("mirostatTau", p.sampling.mirostatTau);
  o.Set("mirostatEta", p.sampling.mirostatEta);
  o.Set("skipSpecialToken", p.skipSpecialToken);
  if (version == RkllmVersion::V130) o.Set("ignoreEosToken", p.ignoreEosToken);
  o.Set("isAsync", p.isAsync);
  if (version == RkllmVersion::V121) {
    o.Set("imgStart", NullableString(env, p.imgStart));
    o.Set("imgEnd", NullableString(env, p.imgEnd));
    o.Set("imgContent", NullableString(env, p.imgContent));
  }
  o.Set("baseDomainId", p.baseDomainId);
  o.Set("embedFlash", p.embedFlash);
  o.Set("enabledCpusNum", p.enabledCpusNum);
  o.Set("enabledCpusMask", static_cast<double>(p.enabledCpusMask));
  o.Set("nBatch", p.nBatch);
  o.Set("useCrossAttn", p.useCrossAttn);
  return o;
}

// Sampling fields shared by init params and per-run sampling, with one set of limits.
void ReadSampling(const Fields& f, RkllmSampling& s) {
  f.Int("topK", s.topK, 0, kInt32Max);
  f.Float("topP", s.topP, 0, 1);
  f.Float("temperature", s.temperature, 0, kFloatLimit);
  f.Float("repeatPenalty", s.repeatPenalty, 0, kFloatLimit);
  f.Float("frequencyPenalty", s.frequencyPenalty, -kFloatLimit, kFloatLimit);
  f.Float("presencePenalty", s.presencePenalty, -kFloatLimit, kFloatLimit);
  f.Int("mirostat", s.mirostat, 0, 2);
  f.Float("mirostatTau", s.mirostatTau, 0, kFloatLimit);
  f.Float("mirostatEta", s.mirostatEta, 0, kFloatLimit);
}

const std::set<std::string> kSamplingKeys = {"topK",     "topP",        "temperature", "repeatPenalty", "frequencyPenalty",
                                             "presencePenalty", "mirostat", "mirostatTau", "mirostatEta"};

// ---------------------------------------------------------------------------------------------
// runs and their callbacks

// What a run's callback receives as userdata is not a pointer but the run's number, looked up here.
// A callback that arrives after its run ended (the runtime's own thread, late, or after rkllm_destroy
// and garbage collection) finds no entry and is dropped: it never reaches freed memory, nor the text
// of the next run. The registry is allocated once and never freed, because such a callback may come
// at any time until the process ends (even during exit, after static destructors): a mutex and a
// map are the few bytes that buy that.
struct RunRegistry {
  std::mutex mutex;
  std::unordered_map<uintptr_t, RkllmRunState*> runs;
  uintptr_t next = 2;
};
RunRegistry& Runs() {
  static auto* registry = new RunRegistry();
  return *registry;
}
// 1.3.0's RKLLMCallback.result_userdata (used only when rkllm_run passes none): no run.
constexpr uintptr_t kNoRunUserdata = 1;

int OnRkllmResult(RKLLMResult* result, void* userdata, LLMCallState state) noexcept;

}  // namespace

// Everything one run collects from the callback, which may fire on the runtime's own thread.
class RkllmRunState {
 public:
  using Send = std::function<void(uint32_t index, std::string bytes, int32_t tokenId)>;
  RkllmRunState(Send send, RKLLMInferMode mode, const std::atomic<bool>* abort)
      : send_(std::move(send)), mode_(mode), abort_(abort) {}

  // Runtime thread, under the registry's lock; never throws into the runtime.
  int OnResult(const RKLLMResult* r, LLMCallState state) {
    // The run is over once the runtime said FINISH: anything it sends after that is not part of it.
    if (finished_) return kCallbackContinue;
    if (state == RUN_ERROR) {
      errorState_ = true;
      return kCallbackContinue;
    }
    if (r != nullptr) {
      perf_ = r->perf;
      if (state == RUN_NORMAL) {
        if (mode_ == INFER_GENERATE && (r->text != nullptr || r->token_id >= 0)) {
          // Bytes, not text: a character may be split across two callbacks, and JS decodes the
          // stream as a whole (lib/rkllm/runtime.ts).
          std::string bytes = r->text != nullptr ? r->text : "";
          tokenIds_.push_back(r->token_id);
          chunks_.push_back(bytes);
          if (send_) send_(static_cast<uint32_t>(chunks_.size() - 1), std::move(bytes), r->token_id);
        }
        // The runtime's buffers live only during the callback: copy.
        const RKLLMResultLastHiddenLayer& h = r->last_hidden_layer;
        if (mode_ == INFER_GET_LAST_HIDDEN_LAYER && h.hidden_states != nullptr && h.embd_size > 0 && h.num_tokens > 0) {
          hidden_.assign(h.hidden_states, h.hidden_states + static_cast<size_t>(h.embd_size) * h.num_tokens);
          hiddenWidth_ = h.embd_size;
          hiddenRows_ = h.num_tokens;
        }
        const RKLLMResultLogits& l = r->logits;
        if (mode_ == INFER_GET_LOGITS && l.logits != nullptr && l.vocab_size > 0 && l.num_tokens > 0) {
          logits_.assign(l.logits, l.logits + static_cast<size_t>(l.vocab_size) * l.num_tokens);
          logitsWidth_ = l.vocab_size;
          logitsRows_ = l.num_tokens;
        }
      }
    }
    if (state == RUN_FINISH) finished_ = true;
    // rkllm_abort cannot reach a run that was just starting; pausing from the callback stops it too.
    return abort_->load() ? kCallbackPause : kCallbackContinue;
  }

  bool errorState() const { return errorState_; }

  Napi::Object ToJs(Napi::Env env) const {
    Napi::Object o = Napi::Object::New(env);
    Napi::Array chunks = Napi::Array::New(env, chunks_.size());
    for (size_t i = 0; i < chunks_.size(); ++i) chunks.Set(static_cast<uint32_t>(i), Bytes(env, chunks_[i]));
    o.Set("chunks", chunks);
    Napi::Int32Array ids = Napi::Int32Array::New(env, tokenIds_.size());
    std::copy(tokenIds_.begin(), tokenIds_.end(), ids.Data());
    o.Set("tokenIds", ids);
    o.Set("finished", finished_);
    Napi::Object perf = Napi::Object::New(env);
    perf.Set("prefillMs", perf_.prefill_time_ms);
    perf.Set("prefillTokens", perf_.prefill_tokens);
    perf.Set("generateMs", perf_.generate_time_ms);
    perf.Set("generateTokens", perf_.generate_tokens);
    perf.Set("memoryMb", perf_.memory_usage_mb);
    o.Set("perf", perf);
    if (hiddenRows_ > 0) o.Set("hiddenStates", Matrix(env, hidden_, hiddenWidth_, hiddenRows_, "embdSize"));
    if (logitsRows_ > 0) o.Set("logits", Matrix(env, logits_, logitsWidth_, logitsRows_, "vocabSize"));
    return o;
  }

 private:
  static Napi::Uint8Array Bytes(Napi::Env env, const std::string& bytes) {
    Napi::Uint8Array array = Napi::Uint8Array::New(env, bytes.size());
    if (!bytes.empty()) std::memcpy(array.Data(), bytes.data(), bytes.size());
    return array;
  }
  static Napi::Object Matrix(Napi::Env env, const std::vector<float>& data, int width, int rows, const char* widthName) {
    Napi::Object m = Napi::Object::New(env);
    Napi::Float32Array array = Napi::Float32Array::New(env, data.size());
    std::memcpy(array.Data(), data.data(), data.size() * sizeof(float));
    m.Set("data", array);
    m.Set(widthName, width);
    m.Set("tokens", rows);
    return m;
  }

  Send send_;
  RKLLMInferMode mode_;
  const std::atomic<bool>* abort_;
  std::vector<std::string> chunks_;
  std::vector<int32_t> tokenIds_;
  RKLLMPerfStat perf_{};
  bool finished_ = false;
  bool errorState_ = false;
  std::vector<float> hidden_, logits_;
  int hiddenWidth_ = 0, hiddenRows_ = 0, logitsWidth_ = 0, logitsRows_ = 0;
};

namespace {

int OnRkllmResult(RKLLMResult* result, void* userdata, LLMCallState state) noexcept {
  try {
    RunRegistry& registry = Runs();
    std::lock_guard<std::mutex> lock(registry.mutex);
    auto run = registry.runs.find(reinterpret_cast<uintptr_t>(userdata));
    if (run == registry.runs.end()) return kCallbackContinue;  // a stale or foreign call: dropped
    return run->second->OnResult(result, state);
  } catch (...) {
    return kCallbackContinue;  // out of memory while copying: the run reports what it has
  }
}

std::string StatusMessage(const char* function, int status) {
  return std::string(function) + " returned status " + std::to_string(status) +
         " (the RKLLM runtime prints its reason to stderr)";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// tasks

// Base of every slow runtime operation. Not a libuv worker: each runs on a detached thread of its
// own, because a runtime that never returns must not hang the process. libuv joins its pool threads
// when the process exits (process.exit() included), so a pool thread stuck in rkllm_run would hold
// the exit forever; a detached thread is simply ended with the process. The result comes back
// through a thread-safe function, which also carries the token stream of a run (in order).
//
// Work() never touches JS values; every exception it throws becomes a coded KvstashError; Settle()
// runs on the main thread on success and failure alike.
class RuntimeTask {
 public:
  // `claimsBusy`: an init/run/load operation (MarkIdle and FinishOperation when it ends), not dispose.
  RuntimeTask(Napi::Env env, const char* name, RkllmRuntime* owner, bool claimsBusy, Napi::Value jsFunction = Napi::Value())
      : owner_(owner), claimsBusy_(claimsBusy), deferred_(Napi::Promise::Deferred::New(env)) {
    ownerRef_ = Napi::Persistent(owner->Value());
    Napi::Function fn = jsFunction.IsFunction() ? jsFunction.As<Napi::Function>()
                                                : Napi::Function::New(env, [](const Napi::CallbackInfo&) {});
    tsfn_ = Napi::ThreadSafeFunction::New(env, fn, name, 0, 1);
    hasFunction_ = jsFunction.IsFunction();
  }
  virtual ~RuntimeTask() = default;

  // Main thread. Owns itself from here on.
  Napi::Promise Start() {
    Napi::Promise promise = deferred_.Promise();
    try {
      std::thread(&RuntimeTask::Main, this).detach();
    } catch (const std::exception& e) {
      code_ = "E_NATIVE";
      message_ = std::string("could not start a thread for the RKLLM runtime: ") + e.what();
      failed_ = true;
      if (claimsBusy_) owner_->MarkIdle();
      tsfn_.Release();
      Complete(Env());
      delete this;
    }
    return promise;
  }

 protected:
  virtual void Work() = 0;
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }
  virtual void Settle() {}

  Napi::Env Env() const { return deferred_.Env(); }
  // Task thread: calls `deliver` on the main thread, with the JS function given at construction
  // (a no-op one when none was). Never blocks; in order with everything else sent.
  template <typename Data>
  void Post(Data* data, void (*deliver)(Napi::Env, Napi::Function, Data*)) {
    if (tsfn_.NonBlockingCall(data, deliver) != napi_ok) delete data;  // the environment is going away
  }
  bool hasFunction() const { return hasFunction_; }

  RkllmRuntime* owner_;

 private:
  static void Main(RuntimeTask* task) {
    try {
      task->Work();
    } catch (const NativeError& e) {
      task->Fail(e.code(), e.what());
    } catch (const std::exception& e) {
      task->Fail("E_NATIVE", std::string("native failure: ") + e.what());
    } catch (...) {
      task->Fail("E_NATIVE", "native failure of unknown type");
    }
    if (task->claimsBusy_) task->owner_->MarkIdle();
    Napi::ThreadSafeFunction tsfn = task->tsfn_;  // `task` may be gone once the call is queued
    const napi_status queued = tsfn.NonBlockingCall(task, [](Napi::Env env, Napi::Function, RuntimeTask* done) {
      done->Complete(env);
      delete done;
    });
    // Not queued: the environment is being torn down, and the task (with its JS references) is
    // left as it is rather than freed on a thread that may not touch them.
    (void)queued;
    tsfn.Release();
  }

  void Fail(std::string code, std::string message) {
    code_ = std::move(code);
    message_ = std::move(message);
    failed_ = true;
  }

  void Complete(Napi::Env env) {
    Napi::HandleScope scope(env);
    if (claimsBusy_) owner_->FinishOperation();
    Settle();
    if (failed_) {
      deferred_.Reject(MakeError(env, code_, message_).Value());
      return;
    }
    try {
      deferred_.Resolve(Result(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  bool claimsBusy_;
  bool hasFunction_ = false;
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference ownerRef_;
  Napi::ThreadSafeFunction tsfn_;
  std::string code_ = "E_NATIVE";
  std::string message_;
  bool failed_ = false;
};

class RuntimeInitTask : public RuntimeTask {
 public:
  RuntimeInitTask(Napi::Env env, RkllmRuntime* owner) : RuntimeTask(env, "kvstash.rkllmInit", owner, true) {}

 protected:
  void Work() override {
    LLMHandle handle = nullptr;
    const int status = owner_->library().Init(&handle, owner_->params(), OnRkllmResult,
                                              reinterpret_cast<void*>(kNoRunUserdata));
    if (status != 0) {
      // A failed init may or may not have set the handle; destroying a half-made one could crash
      // the runtime, so it is dropped.
      throw NativeError("E_RKLLM_CALL", StatusMessage("rkllm_init", status) + " for model '" +
                                            owner_->params().modelPath +
                                            "': not an .rkllm model for this board and runtime version, or not "
                                            "enough memory");
    }
    if (handle == nullptr) throw NativeError("E_RKLLM_CALL", "rkllm_init returned 0 but no handle");
    version_ = owner_->library().version();
    owner_->AdoptHandle(handle);
  }

  // (A dispose() may have closed the library by now: the version was kept.)
  Napi::Value Result(Napi::Env env) override { return ParamsToJs(env, owner_->params(), version_); }

 private:
  RkllmVersion version_ = RkllmVersion::V130;
};

class RuntimeRunTask : public RuntimeTask {
 public:
  RuntimeRunTask(Napi::Env env, RkllmRuntime* owner, RkllmRunRequest request, Napi::Value onToken,
                 const std::atomic<bool>* abort)
      : RuntimeTask(env, "kvstash.rkllmRun", owner, true, onToken), request_(std::move(request)),
        state_(hasFunction() ? RkllmRunState::Send([this](uint32_t index, std::string bytes, int32_t tokenId) {
                 Post(new Chunk{index, std::move(bytes), tokenId}, &DeliverChunk);
               })
                             : RkllmRunState::Send(),
               request_.mode, abort) {}

 protected:
  void Work() override {
    // This run's own number: the runtime hands it back to the callback, which drops any other.
    uintptr_t id;
    {
      RunRegistry& registry = Runs();
      std::lock_guard<std::mutex> lock(registry.mutex);
      id = registry.next++;
      if (registry.next == 0) registry.next = 2;  // wraps only after 2^64 (2^32 on 32-bit) runs
      registry.runs.emplace(id, &state_);
    }
    int status = 0;
    const bool entered = owner_->EnterRun();
    if (entered) {
      status = owner_->library().Run(owner_->handle(), request_, reinterpret_cast<void*>(id));
      owner_->LeaveRun();
    }
    {
      // From here on the state is this thread's alone: a callback in progress holds the lock.
      RunRegistry& registry = Runs();
      std::lock_guard<std::mutex> lock(registry.mutex);
      registry.runs.erase(id);
    }
    if (owner_->DisposeRequested()) {
      throw NativeError("E_DISPOSED", "the RKLLM runtime was disposed while this run was in progress");
    }
    if (!entered || owner_->AbortRequested()) throw NativeError("E_ABORTED", "the RKLLM run was aborted");
    if (status != 0) throw NativeError("E_RKLLM_CALL", StatusMessage("rkllm_run", status));
    if (state_.errorState()) {
      throw NativeError("E_RKLLM_CALL", "rkllm_run reported an error through its callback (state RKLLM_RUN_ERROR; "
                                        "the RKLLM runtime prints its reason to stderr)");
    }
  }

  Napi::Value Result(Napi::Env env) override { return state_.ToJs(env); }

 private:
  struct Chunk {
    uint32_t index;
    std::string bytes;
    int32_t tokenId;
  };
  // Main thread: onToken(bytes, tokenId, index). A throwing onToken must not take the run down.
  static void DeliverChunk(Napi::Env env, Napi::Function fn, Chunk* raw) {
    std::unique_ptr<Chunk> chunk(raw);
    if (env == nullptr || fn.IsEmpty()) return;
    try {
      Napi::Uint8Array bytes = Napi::Uint8Array::New(env, chunk->bytes.size());
      if (!chunk->bytes.empty()) std::memcpy(bytes.Data(), chunk->bytes.data(), chunk->bytes.size());
      fn.Call({bytes, Napi::Number::New(env, chunk->tokenId), Napi::Number::New(env, chunk->index)});
    } catch (const Napi::Error&) {
    }
  }

  RkllmRunRequest request_;
  RkllmRunState state_;
};

class RuntimeLoadLoraTask : public RuntimeTask {
 public:
  RuntimeLoadLoraTask(Napi::Env env, RkllmRuntime* owner, std::string path, std::string name, float scale)
      : RuntimeTask(env, "kvstash.rkllmLoadLora", owner, true), path_(std::move(path)), name_(std::move(name)), scale_(scale) {}

 protected:
  void Work() override {
    RKLLMLoraAdapter adapter{path_.c_str(), name_.c_str(), scale_};
    const int status = owner_->library().loadLora(owner_->handle(), &adapter);
    if (status != 0) {
      throw NativeError("E_RKLLM_CALL", StatusMessage("rkllm_load_lora", status) + " for '" + path_ + "'");
    }
  }

 private:
  std::string path_, name_;
  float scale_;
};

class RuntimeLoadPromptCacheTask : public RuntimeTask {
 public:
  RuntimeLoadPromptCacheTask(Napi::Env env, RkllmRuntime* owner, std::string path)
      : RuntimeTask(env, "kvstash.rkllmLoadPromptCache", owner, true), path_(std::move(path)) {}

 protected:
  void Work() override {
    const int status = owner_->library().loadPromptCache(owner_->handle(), path_.c_str());
    if (status != 0) {
      throw NativeError("E_RKLLM_CALL", StatusMessage("rkllm_load_prompt_cache", status) + " for '" + path_ +
                                            "' (a cache made by another model or runtime version?)");
    }
  }

 private:
  std::string path_;
};

// dispose(): does not claim the busy state: it waits for the operation that holds it.
class RuntimeDisposeTask : public RuntimeTask {
 public:
  RuntimeDisposeTask(Napi::Env env, RkllmRuntime* owner) : RuntimeTask(env, "kvstash.rkllmDispose", owner, false) {}

 protected:
  void Work() override {
    const int status = owner_->WaitIdleAndRelease();
    if (status != 0) throw NativeError("E_RKLLM_CALL", StatusMessage("rkllm_destroy", status));
  }
};

// ---------------------------------------------------------------------------------------------
// process exit

// process.exit() ends the process without tearing the environment down: no finalizer and no
// cleanup hook runs, while a worker may be inside rkllm_run and the runtime's own threads busy. An
// atexit handler aborts and destroys whatever is still alive first, so the closed runtime never
// runs into its static destructors mid-inference. Heap-allocated and never freed: it must outlive
// every other static at exit.
namespace {
std::mutex& LiveRuntimesMutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::set<RkllmRuntime*>& LiveRuntimes() {
  static auto* live = new std::set<RkllmRuntime*>();
  return *live;
}
}  // namespace

void RkllmRuntime::ShutdownAllAtExit() {
  // Held throughout, so a destructor on another thread waits instead of freeing what is used here.
  std::lock_guard<std::mutex> lock(LiveRuntimesMutex());
  for (RkllmRuntime* runtime : LiveRuntimes()) runtime->Shutdown();
}

void RkllmRuntime::Register() {
  static std::once_flag once;
  std::call_once(once, [] { std::atexit(ShutdownAllAtExit); });
  std::lock_guard<std::mutex> lock(LiveRuntimesMutex());
  LiveRuntimes().insert(this);
}

void RkllmRuntime::Unregister() {
  std::lock_guard<std::mutex> lock(LiveRuntimesMutex());
  LiveRuntimes().erase(this);
}

// ---------------------------------------------------------------------------------------------
// class

Napi::Function RkllmRuntime::DefineClass(Napi::Env env) {
  return Napi::ObjectWrap<RkllmRuntime>::DefineClass(
      env, "RkllmRuntime",
      {
          InstanceMethod<&RkllmRuntime::Info>("info"),
          InstanceMethod<&RkllmRuntime::DefaultParams>("defaultParams"),
          InstanceMethod<&RkllmRuntime::Init>("init"),
          InstanceMethod<&RkllmRuntime::Run>("run"),
          InstanceMethod<&RkllmRuntime::Abort>("abort"),
          InstanceMethod<&RkllmRuntime::IsRunning>("isRunning"),
          InstanceMethod<&RkllmRuntime::IsBusy>("isBusy"),
          InstanceMethod<&RkllmRuntime::ClearKvCache>("clearKvCache"),
          InstanceMethod<&RkllmRuntime::KvCacheSize>("kvCacheSize"),
          InstanceMethod<&RkllmRuntime::SetChatTemplate>("setChatTemplate"),
          InstanceMethod<&RkllmRuntime::SetFunctionTools>("setFunctionTools"),
          InstanceMethod<&RkllmRuntime::LoadLora>("loadLora"),
          InstanceMethod<&RkllmRuntime::LoadPromptCache>("loadPromptCache"),
          InstanceMethod<&RkllmRuntime::ReleasePromptCache>("releasePromptCache"),
          InstanceMethod<&RkllmRuntime::Dispose>("dispose"),
      });
}

// new RkllmRuntime(libraryPath: string | undefined, version?: '1.3.0' | '1.2.1'): the version is read
// from the library; a declared one must agree with it.
RkllmRuntime::RkllmRuntime(const Napi::CallbackInfo& info) : Napi::ObjectWrap<RkllmRuntime>(info) {
  Napi::Env env = info.Env();
  std::optional<RkllmVersion> version;
  if (!info[1].IsUndefined() && !info[1].IsNull()) {
    if (!info[1].IsString()) throw Napi::TypeError::New(env, "RkllmRuntime: version must be a string");
    std::string versionText = info[1].As<Napi::String>();
    version = ParseRkllmVersion(versionText);
    if (!version) {
      throw Napi::RangeError::New(env, "RkllmRuntime: runtimeVersion must be '1.3.0' or '1.2.1' (for 1.2.1 and later "
                                       "1.2.x runtimes), or left out, got '" + versionText + "'");
    }
  }
  std::string path;
  if (!info[0].IsUndefined() && !info[0].IsNull()) {
    path = Fields::CString(env, info[0], "RkllmRuntime: libraryPath");
    if (path.empty()) throw Napi::RangeError::New(env, "RkllmRuntime: libraryPath must not be empty");
    librarySource_ = "the libraryPath option";
  } else if (const char* fromEnv = std::getenv("RKLLM_LIB_PATH"); fromEnv != nullptr && *fromEnv != '\0') {
    path = fromEnv;
    librarySource_ = "the RKLLM_LIB_PATH environment variable";
  } else {
    path = "librkllmrt.so";
    librarySource_ = "the system library search path, as neither libraryPath nor RKLLM_LIB_PATH is set";
  }
  try {
    library_ = RkllmLibrary::Open(path, librarySource_, version);
  } catch (const NativeError& e) {
    throw MakeError(env, e.code(), e.what());
  }
  cleanupHook_ = env.AddCleanupHook(CleanupAtExit, this);
  cleanupHookPending_ = true;
  Register();
}

RkllmRuntime::~RkllmRuntime() {
  Unregister();
  if (cleanupHookPending_) {
    cleanupHookPending_ = false;
    cleanupHook_.Remove(Env());
  }
  Shutdown();
}

// Environment teardown (a worker thread ending, the main thread running out of work) does not
// finalize an object that a running worker still references, so the handle is released here too.
void RkllmRuntime::CleanupAtExit(RkllmRuntime* self) {
  self->cleanupHookPending_ = false;
  self->Shutdown();
}

void RkllmRuntime::Shutdown() {
  // Stop a running run, wait for the worker to leave the runtime, then free. Never leave a worker
  // inside a library we are about to close.
  abort_.store(true);
  disposeRequested_.store(true);
  {
    std::lock_guard<std::mutex> lock(idleMutex_);
    if (inRun_ && handle_ != nullptr && library_) library_->abort(handle_);
  }
  // Bounded: at exit (and at environment teardown), a run that never leaves the runtime must not
  // hang the process. Its thread is detached, so nothing else waits for it; the handle then stays,
  // which the process's end frees anyway. Long enough for a runtime that honours rkllm_abort to stop.
  WaitIdleAndRelease(std::chrono::seconds(2));
}

int RkllmRuntime::WaitIdleAndRelease(std::chrono::milliseconds limit) {
  // dispose()'s task, the cleanup hook and the destructor may all get here: whoever takes the
  // handle and the library out (under idleMutex_, once the runtime is idle) releases them. Nobody
  // waits while holding anything another waiter needs, so a bounded wait stays bounded even while
  // dispose() waits without limit for a run that never returns.
  LLMHandle handle = nullptr;
  std::unique_ptr<RkllmLibrary> closing;
  {
    std::unique_lock<std::mutex> lock(idleMutex_);
    auto idle = [this] { return !running_; };
    // (wait_for with milliseconds::max() would overflow the clock: wait without a limit instead.)
    if (limit == std::chrono::milliseconds::max()) idleCv_.wait(lock, idle);
    else if (!idleCv_.wait_for(lock, limit, idle)) return 0;
    handle = handle_;
    handle_ = nullptr;
    closing = std::move(library_);
  }
  int status = 0;
  if (handle != nullptr && closing) status = closing->destroy(handle);
  closing.reset();  // dlclose
  return status;
}

void RkllmRuntime::AdoptHandle(LLMHandle handle) {
  std::lock_guard<std::mutex> lock(idleMutex_);
  handle_ = handle;
}

bool RkllmRuntime::EnterRun() {
  std::lock_guard<std::mutex> lock(idleMutex_);
  if (abort_.load()) return false;
  inRun_ = true;
  return true;
}

void RkllmRuntime::LeaveRun() {
  std::lock_guard<std::mutex> lock(idleMutex_);
  inRun_ = false;
}

void RkllmRuntime::MarkIdle() {
  std::lock_guard<std::mutex> lock(idleMutex_);
  running_ = false;
  idleCv_.notify_all();
}

void RkllmRuntime::FinishOperation() { busy_.store(false); }

void RkllmRuntime::RequireLive(Napi::Env env) const {
  if (disposed_) throw MakeError(env, "E_DISPOSED", "the RKLLM runtime was disposed; load the model again");
}

void RkllmRuntime::RequireIdle(Napi::Env env) const {
  RequireLive(env);
  // busy_ first: while init runs, its worker may still be writing handle_.
  if (busy_.load()) {
    throw MakeError(env, "E_BUSY", "another operation is running on this RKLLM runtime; await it first");
  }
  if (handle_ == nullptr) throw MakeError(env, "E_RKLLM_CALL", "the RKLLM runtime is not initialised: call init() first");
}

void RkllmRuntime::BeginOperation() {
  busy_.store(true);
  abort_.store(false);
  std::lock_guard<std::mutex> lock(idleMutex_);
  running_ = true;
}

void RkllmRuntime::RequestAbort(Napi::Env env, bool reportFailure) {
  abort_.store(true);
  int status = 0;
  {
    std::lock_guard<std::mutex> lock(idleMutex_);
    if (inRun_ && handle_ != nullptr && library_) status = library_->abort(handle_);
  }
  if (status != 0 && reportFailure) CheckStatus(env, status, "rkllm_abort");
}

void RkllmRuntime::CheckStatus(Napi::Env env, int status, const char* function) const {
  if (status != 0) throw MakeError(env, "E_RKLLM_CALL", StatusMessage(function, status));
}

// info() -> {version, libraryPath, librarySource, initialized, params}
Napi::Value RkllmRuntime::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  Napi::Object o = Napi::Object::New(env);
  o.Set("version", RkllmVersionName(library_->version()));
  o.Set("libraryPath", library_->path());
  o.Set("librarySource", librarySource_);
  const bool initialized = !busy_.load() && handle_ != nullptr;
  o.Set("initialized", initialized);
  o.Set("params", initialized ? Napi::Value(ParamsToJs(env, params_, library_->version())) : env.Null());
  return o;
}

// defaultParams() -> the runtime's rkllm_createDefaultParam(), as a params object
Napi::Value RkllmRuntime::DefaultParams(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  return ParamsToJs(env, library_->DefaultParams(), library_->version());
}

// init(params) -> Promise<params actually used>. Fields left out keep rkllm_createDefaultParam's value.
Napi::Value RkllmRuntime::Init(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLive(env);
  if (busy_.load() || handle_ != nullptr) {
    throw MakeError(env, "E_BUSY", "init() was already called on this RKLLM runtime");
  }
  const RkllmVersion version = library_->version();
  const char* scope = "rkllm init";
  Fields f(RequireObject(env, info[0], "rkllm init: params"), scope);
  std::set<std::string> known = kSamplingKeys;
  known.insert({"modelPath", "maxContextLen", "maxNewTokens", "nKeep", "skipSpecialToken", "isAsync", "baseDomainId",
                "embedFlash", "enabledCpusNum", "enabledCpusMask", "nBatch", "useCrossAttn"});
  if (version == RkllmVersion::V130) known.insert("ignoreEosToken");
  else known.insert({"imgStart", "imgEnd", "imgContent"});
  if (version == RkllmVersion::V121 && f.Has("ignoreEosToken")) {
    throw Napi::RangeError::New(env, "rkllm init: ignoreEosToken needs runtime 1.3.0 (1.2.x has no such field)");
  }
  if (version == RkllmVersion::V130 && (f.Has("imgStart") || f.Has("imgEnd") || f.Has("imgContent"))) {
    throw Napi::RangeError::New(env, "rkllm init: imgStart/imgEnd/imgContent exist only in runtime 1.2.x; 1.3.0 "
                                     "takes them per multimodal input");
  }
  f.OnlyKnown(known);

  RkllmParams p = library_->DefaultParams();
  p.modelPath = f.String("modelPath");
  if (!FileExists(p.modelPath)) {
    throw MakeError(env, "E_MODEL_LOAD", "no RKLLM model file at '" + p.modelPath + "'");
  }
  f.Int("maxContextLen", p.maxContextLen, 1, kInt32Max);
  f.Int("maxNewTokens", p.maxNewTokens, -1, kInt32Max);
  f.Int("nKeep", p.nKeep, -1, kInt32Max);
  ReadSampling(f, p.sampling);
  f.Bool("skipSpecialToken", p.skipSpecialToken);
  f.Bool("ignoreEosToken", p.ignoreEosToken);
  f.Bool("isAsync", p.isAsync);
  f.OptionalString("imgStart", p.imgStart);
  f.OptionalString("imgEnd", p.imgEnd);
  f.OptionalString("imgContent", p.imgContent);
  f.Int("baseDomainId", p.baseDomainId, 0, kInt32Max);
  f.Bool("embedFlash", p.embedFlash);
  f.Int("enabledCpusNum", p.enabledCpusNum, 0, 127);
  if (f.Has("enabledCpusMask")) p.enabledCpusMask = static_cast<uint32_t>(f.Number("enabledCpusMask", 0, 4294967295.0, true));
  f.Int("nBatch", p.nBatch, 1, 255);
  f.Bool("useCrossAttn", p.useCrossAttn);
  if (p.isAsync) {
    // kvstash already runs rkllm_run on a worker thread and frees the run's state when it returns.
    throw Napi::RangeError::New(env, "rkllm init: isAsync must be false (kvstash runs every call off the main thread)");
  }

  params_ = std::move(p);
  BeginOperation();
  return (new RuntimeInitTask(env, this))->Start();
}

// run({prompt | tokens | embedding+embeddingTokens, role, enableThinking, keepHistory, mode, loraName,
//      savePromptCache, sampling, maxNewTokens}, onToken?(text, tokenId, index)) -> Promise<result>
Napi::Value RkllmRuntime::Run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  const bool v130 = library_->version() == RkllmVersion::V130;
  const char* scope = "rkllm run";
  Napi::Object options = RequireObject(env, info[0], "rkllm run: options");
  Fields f(options, scope);
  f.OnlyKnown({"prompt", "tokens", "embedding", "embeddingTokens", "role", "enableThinking", "keepHistory", "mode",
               "loraName", "savePromptCache", "sampling", "maxNewTokens"});
  if (!info[1].IsUndefined() && !info[1].IsFunction()) throw Napi::TypeError::New(env, "rkllm run: onToken must be a function");

  RkllmRunRequest request;
  const int inputs = (f.Has("prompt") ? 1 : 0) + (f.Has("tokens") ? 1 : 0) + (f.Has("embedding") ? 1 : 0);
  if (inputs != 1) throw Napi::TypeError::New(env, "rkllm run: give exactly one of prompt, tokens or embedding");
  if (f.Has("prompt")) {
    request.inputType = INPUT_PROMPT;
    request.prompt = f.String("prompt");
    if (request.prompt.empty()) throw Napi::RangeError::New(env, "rkllm run: prompt must not be empty");
  } else if (f.Has("tokens")) {
    Napi::Value value = options.Get("tokens");
    if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
      throw Napi::TypeError::New(env, "rkllm run: tokens must be an Int32Array");
    }
    Napi::Int32Array tokens = value.As<Napi::Int32Array>();
    if (tokens.ElementLength() == 0) throw Napi::RangeError::New(env, "rkllm run: tokens must not be empty");
    request.tokens.assign(tokens.Data(), tokens.Data() + tokens.ElementLength());
    for (size_t i = 0; i < request.tokens.size(); ++i) {
      if (request.tokens[i] < 0) {
        throw MakeError(env, "E_TOKEN_INVALID", "rkllm run: token " + std::to_string(i) + " is negative (" +
                                                    std::to_string(request.tokens[i]) + ")");
      }
    }
    request.inputType = INPUT_TOKEN;
  } else {
    Napi::Value value = options.Get("embedding");
    if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
      throw Napi::TypeError::New(env, "rkllm run: embedding must be a Float32Array");
    }
    Napi::Float32Array embedding = value.As<Napi::Float32Array>();
    const size_t length = embedding.ElementLength();
    int32_t rows = 0;
    if (!f.Has("embeddingTokens")) throw Napi::TypeError::New(env, "rkllm run: embedding needs embeddingTokens");
    f.Int("embeddingTokens", rows, 1, kInt32Max);
    if (length == 0 || length % static_cast<size_t>(rows) != 0) {
      throw Napi::RangeError::New(env, "rkllm run: embedding length " + std::to_string(length) +
                                           " is not a nonzero multiple of embeddingTokens " + std::to_string(rows));
    }
    request.embedding.assign(embedding.Data(), embedding.Data() + length);
    for (float v : request.embedding) {
      if (!std::isfinite(v)) throw Napi::RangeError::New(env, "rkllm run: embedding holds a NaN or infinite value");
    }
    request.embeddingTokens = static_cast<size_t>(rows);
    request.inputType = INPUT_EMBED;
  }
  if (f.Has("role")) {
    request.role = f.String("role");
    if (request.role.empty()) throw Napi::RangeError::New(env, "rkllm run: role must not be empty");
  }
  f.Bool("enableThinking", request.enableThinking);
  f.Bool("keepHistory", request.keepHistory);
  if (f.Has("mode")) {
    std::string mode = f.String("mode");
    if (mode == "generate") request.mode = INFER_GENERATE;
    else if (mode == "lastHiddenLayer") request.mode = INFER_GET_LAST_HIDDEN_LAYER;
    else if (mode == "logits") request.mode = INFER_GET_LOGITS;
    else throw Napi::RangeError::New(env, "rkllm run: mode must be 'generate', 'lastHiddenLayer' or 'logits'");
  }
  if (f.Has("loraName")) request.loraName = f.String("loraName");
  if (f.Has("savePromptCache")) {
    request.savePromptCachePath = f.String("savePromptCache");
    if (request.savePromptCachePath->empty()) throw Napi::RangeError::New(env, "rkllm run: savePromptCache must not be empty");
  }
  if (f.Has("sampling")) {
    if (!v130) throw Napi::RangeError::New(env, "rkllm run: per-run sampling needs runtime 1.3.0; with 1.2.x set it at init");
    Fields s(RequireObject(env, options.Get("sampling"), "rkllm run: sampling"), "rkllm run: sampling");
    s.OnlyKnown(kSamplingKeys);
    // Fields left out keep the values given at init.
    RkllmSampling sampling = params_.sampling;
    ReadSampling(s, sampling);
    request.sampling = sampling;
  }
  if (f.Has("maxNewTokens")) {
    if (!v130) {
      throw Napi::RangeError::New(env, "rkllm run: per-run maxNewTokens needs runtime 1.3.0; with 1.2.x set it at init");
    }
    f.Int("maxNewTokens", request.maxNewTokens, 0, kInt32Max);
  }

  BeginOperation();
  return (new RuntimeRunTask(env, this, std::move(request), info[1], &abort_))->Start();
}

// abort(): stops a running run (its promise rejects with E_ABORTED). No-op when nothing runs.
Napi::Value RkllmRuntime::Abort(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!disposed_ && busy_.load()) RequestAbort(env, true);
  return env.Undefined();
}

// isRunning(): the runtime's own answer (rkllm_is_running), normalised across versions.
Napi::Value RkllmRuntime::IsRunning(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (disposed_) return Napi::Boolean::New(env, false);
  LLMHandle handle;
  {
    std::lock_guard<std::mutex> lock(idleMutex_);
    handle = handle_;
  }
  return Napi::Boolean::New(env, handle != nullptr && library_->IsRunning(handle));
}

Napi::Value RkllmRuntime::IsBusy(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), busy_.load()); }

// clearKvCache(keepSystemPrompt, start?: Int32Array, end?: Int32Array): ranges have one entry per batch.
Napi::Value RkllmRuntime::ClearKvCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  if (!info[0].IsBoolean()) throw Napi::TypeError::New(env, "clearKvCache: keepSystemPrompt must be a boolean");
  const bool keep = info[0].As<Napi::Boolean>().Value();
  const bool hasStart = !info[1].IsUndefined() && !info[1].IsNull();
  const bool hasEnd = !info[2].IsUndefined() && !info[2].IsNull();
  if (hasStart != hasEnd) throw Napi::TypeError::New(env, "clearKvCache: give both start and end positions, or neither");
  std::vector<int> start, end;
  if (hasStart) {
    const size_t batches = static_cast<size_t>(std::max(1, params_.nBatch));
    for (int k = 0; k < 2; ++k) {
      Napi::Value value = info[1 + k];
      if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
        throw Napi::TypeError::New(env, "clearKvCache: start and end must be Int32Array");
      }
      Napi::Int32Array array = value.As<Napi::Int32Array>();
      if (array.ElementLength() != batches) {
        throw Napi::RangeError::New(env, "clearKvCache: start and end need one position per batch (" +
                                             std::to_string(batches) + "), got " + std::to_string(array.ElementLength()));
      }
      (k == 0 ? start : end).assign(array.Data(), array.Data() + batches);
    }
    const int32_t limit = params_.maxContextLen;
    for (size_t i = 0; i < start.size(); ++i) {
      if (start[i] < 0 || end[i] < start[i] || end[i] > limit) {
        throw MakeError(env, "E_POSITION_INVALID",
                        "clearKvCache: batch " + std::to_string(i) + " range [" + std::to_string(start[i]) + ", " +
                            std::to_string(end[i]) + ") is not within [0, maxContextLen " + std::to_string(limit) + "]");
      }
    }
  }
  CheckStatus(env, library_->clearKvCache(handle_, keep ? 1 : 0, hasStart ? start.data() : nullptr,
                                          hasStart ? end.data() : nullptr),
              "rkllm_clear_kv_cache");
  return env.Undefined();
}

// kvCacheSize() -> positions held, one number per batch
Napi::Value RkllmRuntime::KvCacheSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::vector<int> sizes(static_cast<size_t>(std::max(1, params_.nBatch)), 0);
  CheckStatus(env, library_->getKvCacheSize(handle_, sizes.data()), "rkllm_get_kv_cache_size");
  Napi::Array out = Napi::Array::New(env, sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) out.Set(static_cast<uint32_t>(i), sizes[i]);
  return out;
}

// setChatTemplate(systemPrompt, promptPrefix, promptPostfix)
Napi::Value RkllmRuntime::SetChatTemplate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::string s[3] = {Fields::CString(env, info[0], "setChatTemplate: systemPrompt"),
                      Fields::CString(env, info[1], "setChatTemplate: promptPrefix"),
                      Fields::CString(env, info[2], "setChatTemplate: promptPostfix")};
  CheckStatus(env, library_->setChatTemplate(handle_, s[0].c_str(), s[1].c_str(), s[2].c_str()), "rkllm_set_chat_template");
  for (int i = 0; i < 3; ++i) templateStrings_[i] = std::move(s[i]);
  return env.Undefined();
}

// setFunctionTools(systemPrompt, toolsJson, toolResponseStr)
Napi::Value RkllmRuntime::SetFunctionTools(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::string s[3] = {Fields::CString(env, info[0], "setFunctionTools: systemPrompt"),
                      Fields::CString(env, info[1], "setFunctionTools: tools"),
                      Fields::CString(env, info[2], "setFunctionTools: toolResponseStr")};
  CheckStatus(env, library_->setFunctionTools(handle_, s[0].c_str(), s[1].c_str(), s[2].c_str()), "rkllm_set_function_tools");
  for (int i = 0; i < 3; ++i) toolStrings_[i] = std::move(s[i]);
  return env.Undefined();
}

// loadLora(path, name, scale) -> Promise<void>
Napi::Value RkllmRuntime::LoadLora(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::string path = Fields::CString(env, info[0], "loadLora: path");
  std::string name = Fields::CString(env, info[1], "loadLora: name");
  if (name.empty()) throw Napi::RangeError::New(env, "loadLora: name must not be empty");
  if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "loadLora: scale must be a number");
  const double scale = info[2].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(scale)) throw Napi::RangeError::New(env, "loadLora: scale must be finite");
  if (!FileExists(path)) throw MakeError(env, "E_MODEL_LOAD", "no LoRA adapter file at '" + path + "'");
  BeginOperation();
  return (new RuntimeLoadLoraTask(env, this, std::move(path), std::move(name), static_cast<float>(scale)))->Start();
}

// loadPromptCache(path) -> Promise<void>
Napi::Value RkllmRuntime::LoadPromptCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  std::string path = Fields::CString(env, info[0], "loadPromptCache: path");
  if (!FileExists(path)) throw MakeError(env, "E_STATE_LOAD", "no prompt cache file at '" + path + "'");
  BeginOperation();
  return (new RuntimeLoadPromptCacheTask(env, this, std::move(path)))->Start();
}

Napi::Value RkllmRuntime::ReleasePromptCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireIdle(env);
  CheckStatus(env, library_->releasePromptCache(handle_), "rkllm_release_prompt_cache");
  return env.Undefined();
}

// dispose() -> Promise<void>: aborts a running run, waits for it, destroys the handle, closes the
// library. Every later call rejects with E_DISPOSED; a second dispose() resolves at once.
Napi::Value RkllmRuntime::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (disposed_) {
    Napi::Promise::Deferred done = Napi::Promise::Deferred::New(env);
    done.Resolve(env.Undefined());
    return done.Promise();
  }
  disposed_ = true;
  disposeRequested_.store(true);
  RequestAbort(env, false);
  return (new RuntimeDisposeTask(env, this))->Start();
}

}  // namespace kvstash
