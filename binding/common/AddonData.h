// Per-environment state of the addon (one per Node environment, so worker_threads each get theirs).
#pragma once

#include <napi.h>

namespace kvstash {

struct AddonData {
  Napi::FunctionReference errorClass;
  Napi::FunctionReference modelClass;
  Napi::FunctionReference contextClass;

  static AddonData* Of(Napi::Env env) { return env.GetInstanceData<AddonData>(); }
};

}  // namespace kvstash
