// JS class RkllmRuntime: one librkllmrt.so loaded with dlopen and (after init) one RKLLM handle.
//
// Lifecycle: `new RkllmRuntime(libraryPath, version?)` opens the library, resolves its symbols
// (E_RKLLM_UNAVAILABLE when either is missing) and reads its ABI version from it (E_RKLLM_VERSION
// when a declared version contradicts it); `init(params)` creates the handle off the main
// thread; `dispose()` aborts a running run, waits until no worker is inside the runtime, calls
// rkllm_destroy, then dlclose. The destructor (garbage collection, or environment teardown at exit)
// does the same, and so do an environment cleanup hook (a run in progress keeps the object
// referenced, so no destructor runs at teardown) and an atexit handler (process.exit() tears
// nothing down): neither the handle nor a worker inside the library outlives the object or the
// process.
//
// Concurrency contract, as LlamaContext's: at most one slow operation (init, run, loadLora,
// loadPromptCache) at a time; the TypeScript layer queues them and this class refuses a second
// one with E_BUSY as a last guard. Immediate calls that touch the handle are refused while one runs;
// abort() and isRunning() are the exceptions, since they exist to be called during a run.
#pragma once

#include <napi.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "rkllm/RkllmLibrary.h"

namespace kvstash {


class RkllmRuntime : public Napi::ObjectWrap<RkllmRuntime> {
 public:
  static Napi::Function DefineClass(Napi::Env env);

  explicit RkllmRuntime(const Napi::CallbackInfo& info);
  ~RkllmRuntime() override;

  // Used by the workers: the slow-operation protocol.
  RkllmLibrary& library() { return *library_; }
  rkllm::LLMHandle handle() const { return handle_; }
  const RkllmParams& params() const { return params_; }
  void AdoptHandle(rkllm::LLMHandle handle);  // worker thread, init only
  // Marks the worker as inside rkllm_run, unless an abort came first (then returns false).
  bool EnterRun();
  void LeaveRun();
  void FinishOperation();  // main thread
  void MarkIdle();         // worker thread, at the very end of its work
  bool AbortRequested() const { return abort_.load(); }
  bool DisposeRequested() const { return disposeRequested_.load(); }
  // Waits until no worker is inside the runtime, then rkllm_destroy and dlclose. Idempotent, and
  // safe from several threads. Returns the rkllm_destroy status (0 when there was no handle).
  int WaitIdleAndRelease(std::chrono::milliseconds limit = std::chrono::milliseconds::max());

 private:
  using CleanupHook = Napi::Env::CleanupHook<void (*)(RkllmRuntime*), RkllmRuntime>;
  static void CleanupAtExit(RkllmRuntime* self);
  static void ShutdownAllAtExit();
  void Register();
  void Unregister();
  // Aborts a running run, then WaitIdleAndRelease().
  void Shutdown();

  void RequireLive(Napi::Env env) const;
  // Live, initialised, and no slow operation running; else E_DISPOSED / E_BUSY / E_RKLLM_CALL.
  void RequireIdle(Napi::Env env) const;
  void BeginOperation();
  void RequestAbort(Napi::Env env, bool reportFailure);
  void CheckStatus(Napi::Env env, int status, const char* function) const;

  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value DefaultParams(const Napi::CallbackInfo& info);
  Napi::Value Init(const Napi::CallbackInfo& info);
  Napi::Value Run(const Napi::CallbackInfo& info);
  Napi::Value Abort(const Napi::CallbackInfo& info);
  Napi::Value IsRunning(const Napi::CallbackInfo& info);
  Napi::Value IsBusy(const Napi::CallbackInfo& info);
  Napi::Value ClearKvCache(const Napi::CallbackInfo& info);
  Napi::Value KvCacheSize(const Napi::CallbackInfo& info);
  Napi::Value SetChatTemplate(const Napi::CallbackInfo& info);
  Napi::Value SetFunctionTools(const Napi::CallbackInfo& info);
  Napi::Value LoadLora(const Napi::CallbackInfo& info);
  Napi::Value LoadPromptCache(const Napi::CallbackInfo& info);
  Napi::Value ReleasePromptCache(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  std::unique_ptr<RkllmLibrary> library_;
  std::string librarySource_;
  RkllmParams params_;  // the handle's; its strings stay alive as long as the handle
  rkllm::LLMHandle handle_ = nullptr;
  bool disposed_ = false;  // main thread
  // The last chat template and tools, kept alive in case the runtime keeps the pointers.
  std::string templateStrings_[3];
  std::string toolStrings_[3];
  CleanupHook cleanupHook_;
  bool cleanupHookPending_ = false;

  std::atomic<bool> busy_{false};
  std::atomic<bool> abort_{false};
  std::atomic<bool> disposeRequested_{false};
  // `running_`: a slow operation was started and its worker has not left the runtime yet.
  // `inRun_`: the worker is inside rkllm_run, so rkllm_abort has something to stop.
  std::mutex idleMutex_;
  std::condition_variable idleCv_;
  bool running_ = false;
  bool inRun_ = false;
};

}  // namespace kvstash
