// The one base of every slow native operation: runs Run() on a libuv worker thread (or its owner's
// OperationThread) and settles a Promise on the main thread. Subclasses are named after what they do (ContextDecodeWorker, ...).
//
// Rules the base enforces: Run() never touches JS values; every exception thrown by Run() is
// caught and becomes a coded KvstashError; Settle() runs on the main thread on success and on
// failure alike, so an owner's busy flag is always released.
#pragma once

#include <napi.h>

#include <string>

#include "common/Errors.h"

namespace kvstash {

class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env, const char* name)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise Start() {
    Napi::Promise promise = deferred_.Promise();
    Dispatch();
    return promise;
  }

 protected:
  // Where Run() goes: libuv's pool, unless the owner keeps a thread of its own (ContextWorker).
  virtual void Dispatch() { Queue(); }
  virtual void Run() = 0;
  // Builds the resolution value on the main thread.
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }
  // Main thread, always called once before the promise settles.
  virtual void Settle() {}

 private:
  void Execute() final {
    try {
      Run();
    } catch (const NativeError& e) {
      code_ = e.code();
      SetError(e.what());
    } catch (const std::exception& e) {
      code_ = "E_NATIVE";
      SetError(std::string("native failure: ") + e.what());
    } catch (...) {
      code_ = "E_NATIVE";
      SetError("native failure of unknown type");
    }
  }

  void OnOK() final {
    Settle();
    Napi::Env env = Env();
    try {
      deferred_.Resolve(Result(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  void OnError(const Napi::Error& e) final {
    Settle();
    deferred_.Reject(MakeError(Env(), code_, e.Message()).Value());
  }

  Napi::Promise::Deferred deferred_;
  std::string code_ = "E_NATIVE";
};

}  // namespace kvstash
