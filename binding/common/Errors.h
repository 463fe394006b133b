// Coded errors. Every error kvstash's native layer reports carries a stable code (E_DECODE,
// E_DISPOSED, ...) and is built with the KvstashError class that lib/ registers at load time, so a
// JS caller sees the same type whether the failure was found in TypeScript or in C++.
#pragma once

#include <napi.h>

#include <stdexcept>
#include <string>

namespace kvstash {

// Thrown on worker threads (which must never touch JS values) and turned into a KvstashError on
// the main thread by PromiseWorker.
class NativeError : public std::runtime_error {
 public:
  NativeError(std::string code, const std::string& message)
      : std::runtime_error(message), code_(std::move(code)) {}
  const std::string& code() const { return code_; }

 private:
  std::string code_;
};

// Builds a KvstashError(code, message). Falls back to a plain Error with a `code` property when lib/
// has not registered the class (only possible when the .node is loaded by hand).
Napi::Error MakeError(Napi::Env env, const std::string& code, const std::string& message);

// Registers the JS KvstashError constructor (called once by lib/binding.ts).
void SetErrorClass(const Napi::CallbackInfo& info);

// The last message llama.cpp logged at error level on this thread, consumed by the call. llama.cpp
// explains most refusals only in its log; appending it makes our messages say why.
std::string TakeLastLlamaError();
void RecordLlamaError(const char* text);

// With a llama.cpp log line appended when there is one.
std::string WithLlamaReason(const std::string& message);

}  // namespace kvstash
