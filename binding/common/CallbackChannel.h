// Carries values from a worker thread to an optional JS callback through a thread-safe function,
// without ever blocking the worker: when JS is behind, values queue up. Model-load and prefill
// progress and RKLLM's token stream all go through it.
#pragma once

#include <napi.h>

#include <memory>
#include <utility>
#include <vector>

namespace kvstash {

template <typename Value>
class CallbackChannel {
 public:
  // Turns a value into the callback's arguments, on the main thread.
  using Arguments = std::vector<napi_value> (*)(Napi::Env, const Value&);

  // `callback` may be undefined: then Send() does nothing.
  CallbackChannel(Napi::Env env, Napi::Value callback, const char* name, Arguments arguments) : arguments_(arguments) {
    if (callback.IsFunction()) {
      tsfn_ = Napi::ThreadSafeFunction::New(env, callback.As<Napi::Function>(), name, 0, 1);
      active_ = true;
    }
  }
  CallbackChannel(const CallbackChannel&) = delete;
  CallbackChannel& operator=(const CallbackChannel&) = delete;
  ~CallbackChannel() { Release(); }

  // Worker thread.
  void Send(Value value) {
    if (!active_) return;
    auto* item = new Item{std::move(value), arguments_};
    napi_status status = tsfn_.NonBlockingCall(item, [](Napi::Env env, Napi::Function fn, Item* raw) {
      std::unique_ptr<Item> owned(raw);
      if (env == nullptr || fn == nullptr) return;
      try {
        fn.Call(owned->arguments(env, owned->value));
      } catch (const Napi::Error&) {
        // A throwing callback must not take the operation down with it.
      }
    });
    if (status != napi_ok) delete item;
  }

  // Main thread, once the work is over.
  void Release() {
    if (active_) {
      active_ = false;
      tsfn_.Release();
    }
  }

 private:
  struct Item {
    Value value;
    Arguments arguments;
  };
  Napi::ThreadSafeFunction tsfn_;
  Arguments arguments_;
  bool active_ = false;
};

}  // namespace kvstash
