#include "common/Errors.h"

#include "common/AddonData.h"

namespace kvstash {

namespace {
thread_local std::string lastLlamaError;
}

Napi::Error MakeError(Napi::Env env, const std::string& code, const std::string& message) {
  AddonData* data = AddonData::Of(env);
  if (data != nullptr && !data->errorClass.IsEmpty()) {
    Napi::Object err = data->errorClass.Value().New({Napi::String::New(env, code), Napi::String::New(env, message)});
    return Napi::Error(env, err);
  }
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  return err;
}

void SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "setErrorClass expects a constructor");
  AddonData::Of(info.Env())->errorClass = Napi::Persistent(info[0].As<Napi::Function>());
}

std::string TakeLastLlamaError() {
  std::string out;
  out.swap(lastLlamaError);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

void RecordLlamaError(const char* text) {
  // llama.cpp sometimes emits one message in several calls; keep the pieces together.
  if (lastLlamaError.size() < 4096) lastLlamaError += text;
}

std::string WithLlamaReason(const std::string& message) {
  std::string reason = TakeLastLlamaError();
  return reason.empty() ? message : message + " (llama.cpp: " + reason + ")";
}

}  // namespace kvstash
