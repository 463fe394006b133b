// Registers kvstash's native classes and functions; nothing else lives here.
#include <napi.h>

#include "common/AddonData.h"
#include "common/Checksum.h"
#include "common/Errors.h"
#include "common/FileLock.h"
#include "common/VectorScan.h"
#include "llama/LlamaBackend.h"
#include "llama/LlamaContext.h"
#include "llama/LlamaModel.h"
#include "llama/LlamaSampler.h"
#include "llama/Quantize.h"
#include "rkllm/RkllmRuntime.h"

namespace kvstash {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InitLlamaBackend();
  auto* data = new AddonData();
  env.SetInstanceData(data);

  Napi::Function model = LlamaModel::DefineClass(env);
  Napi::Function context = LlamaContext::DefineClass(env);
  data->modelClass = Napi::Persistent(model);
  data->contextClass = Napi::Persistent(context);

  exports.Set("LlamaModel", model);
  exports.Set("LlamaContext", context);
  exports.Set("LlamaSampler", LlamaSampler::DefineClass(env));
  exports.Set("RkllmRuntime", RkllmRuntime::DefineClass(env));
  exports.Set("loadModel", Napi::Function::New<LlamaModel::Load>(env, "loadModel"));
  exports.Set("checksum", Napi::Function::New<Checksum>(env, "checksum"));
  exports.Set("chunkChecksums", Napi::Function::New<ChunkChecksums>(env, "chunkChecksums"));
  exports.Set("crc32cImplementation", Napi::Function::New<Crc32cImplementationName>(env, "crc32cImplementation"));
  exports.Set("tryLockFile", Napi::Function::New<TryLockFile>(env, "tryLockFile"));
  exports.Set("unlockFile", Napi::Function::New<UnlockFile>(env, "unlockFile"));
  exports.Set("quantize", Napi::Function::New<Quantize>(env, "quantize"));
  exports.Set("setErrorClass", Napi::Function::New<SetErrorClass>(env, "setErrorClass"));
  exports.Set("setLogLevel", Napi::Function::New<SetLogLevel>(env, "setLogLevel"));
  exports.Set("vectorQuantizeQ8", Napi::Function::New<VectorQuantizeQ8>(env, "vectorQuantizeQ8"));
  exports.Set("vectorScanQ8", Napi::Function::New<VectorScanQ8>(env, "vectorScanQ8"));
  exports.Set("systemInfo", Napi::Function::New<SystemInfo>(env, "systemInfo"));
  exports.Set("llamaCommit", Napi::String::New(env, KVSTASH_LLAMA_COMMIT));
  return exports;
}

}  // namespace kvstash

static Napi::Object InitKvstash(Napi::Env env, Napi::Object exports) { return kvstash::Init(env, exports); }

NODE_API_MODULE(kvstash, InitKvstash)
