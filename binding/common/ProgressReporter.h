// Carries progress (done, total) from a worker thread to an optional JS callback, never blocking
// the worker (CallbackChannel).
#pragma once

#include <napi.h>

#include <vector>

#include "common/CallbackChannel.h"

namespace kvstash {

class ProgressReporter {
 public:
  // `callback` may be undefined: then Report() does nothing.
  ProgressReporter(Napi::Env env, Napi::Value callback, const char* name) : channel_(env, callback, name, &Arguments) {}

  // Worker thread.
  void Report(double done, double total) { channel_.Send({done, total}); }
  // Main thread, once the work is over.
  void Release() { channel_.Release(); }

 private:
  struct Progress {
    double done;
    double total;
  };
  static std::vector<napi_value> Arguments(Napi::Env env, const Progress& progress) {
    return {Napi::Number::New(env, progress.done), Napi::Number::New(env, progress.total)};
  }
  CallbackChannel<Progress> channel_;
};

}  // namespace kvstash
