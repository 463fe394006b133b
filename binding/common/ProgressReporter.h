// Carries progress (done, total) from a worker thread to an optional JS callback through a
// thread-safe function. Calls never block the worker: when JS is behind, updates queue up.
#pragma once

#include <napi.h>

namespace kvstash {

class ProgressReporter {
 public:
  // `callback` may be undefined: then Report() does nothing.
  ProgressReporter(Napi::Env env, Napi::Value callback, const char* name) {
    if (callback.IsFunction()) {
      tsfn_ = Napi::ThreadSafeFunction::New(env, callback.As<Napi::Function>(), name, 0, 1);
      active_ = true;
    }
  }
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;
  ~ProgressReporter() { Release(); }

  // Worker thread.
  void Report(double done, double total) {
    if (!active_) return;
    auto* update = new Update{done, total};
    napi_status status = tsfn_.NonBlockingCall(update, [](Napi::Env env, Napi::Function fn, Update* u) {
      double done = u->done, total = u->total;
      delete u;
      if (env != nullptr && fn != nullptr) {
        // A throwing progress callback must not take the operation down with it.
        try {
          fn.Call({Napi::Number::New(env, done), Napi::Number::New(env, total)});
        } catch (const Napi::Error&) {
        }
      }
    });
    if (status != napi_ok) delete update;
  }

  // Main thread, once the work is over.
  void Release() {
    if (active_) {
      active_ = false;
      tsfn_.Release();
    }
  }

 private:
  struct Update {
    double done;
    double total;
  };
  Napi::ThreadSafeFunction tsfn_;
  bool active_ = false;
};

}  // namespace kvstash
