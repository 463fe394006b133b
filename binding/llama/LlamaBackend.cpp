#include "llama/LlamaBackend.h"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "common/Errors.h"
#include "llama.h"

namespace kvstash {

namespace {

std::atomic<int> logLevel{0};

int Rank(ggml_log_level level) {
  switch (level) {
    case GGML_LOG_LEVEL_ERROR: return 1;
    case GGML_LOG_LEVEL_WARN: return 2;
    case GGML_LOG_LEVEL_INFO: return 3;
    case GGML_LOG_LEVEL_DEBUG: return 4;
    default: return 5;  // GGML_LOG_LEVEL_CONT and NONE: continuation lines
  }
}

thread_local int lastRank = 5;

void LogSink(ggml_log_level level, const char* text, void*) {
  int rank = Rank(level);
  if (rank == 5) rank = lastRank;  // a continuation belongs to the line before it
  lastRank = rank;
  if (rank == 1) RecordLlamaError(text);
  if (rank <= logLevel.load(std::memory_order_relaxed)) {
    std::fputs(text, stderr);
  }
}

}  // namespace

void InitLlamaBackend() {
  static std::once_flag once;
  std::call_once(once, [] {
    llama_log_set(LogSink, nullptr);
    llama_backend_init();
  });
}

void SetLogLevel(const Napi::CallbackInfo& info) {
  if (!info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "setLogLevel expects a number");
  logLevel.store(info[0].As<Napi::Number>().Int32Value());
}

Napi::Value SystemInfo(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), llama_print_system_info());
}

}  // namespace kvstash
