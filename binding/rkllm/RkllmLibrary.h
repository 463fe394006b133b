// librkllmrt.so loaded at run time: dlopen, one resolved function per symbol kvstash calls, and the
// translation between version-neutral requests and the ABI structs of the declared runtime version.
// Not a JS class: RkllmRuntime owns one. Everything version-specific stays in RkllmLibrary.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rkllm/RkllmAbi.h"

namespace kvstash {

enum class RkllmVersion { V130, V121 };

// "1.3.0" / "1.2.1"; nullopt for anything else.
std::optional<RkllmVersion> ParseRkllmVersion(const std::string& text);
const char* RkllmVersionName(RkllmVersion version);

// The buffer rkllm_createDefaultParam returns into: larger than every known RKLLMParam (208 bytes)
// with a wide margin, so a runtime of any version writes inside it.
constexpr size_t kDefaultParamProbeBytes = 512;

// The sampling fields: RKLLMParam holds them at init (both versions), RKLLMSamplingParam per run
// (1.3.0 only).
struct RkllmSampling {
  int32_t topK = 0;
  float topP = 0;
  float temperature = 0;
  float repeatPenalty = 0;
  float frequencyPenalty = 0;
  float presencePenalty = 0;
  int32_t mirostat = 0;
  float mirostatTau = 0;
  float mirostatEta = 0;
};

// Every RKLLMParam and RKLLMExtendParam field, in whichever version has it. Fields a version does
// not have are ignored when building its struct (the JS layer refuses to set them).
struct RkllmParams {
  std::string modelPath;
  int32_t maxContextLen = 0;
  int32_t maxNewTokens = 0;
  int32_t nKeep = 0;
  RkllmSampling sampling;
  bool skipSpecialToken = false;
  bool ignoreEosToken = false;  // 1.3.0 only
  bool isAsync = false;
  std::optional<std::string> imgStart, imgEnd, imgContent;  // 1.2.x only; nullopt = NULL pointer
  int32_t baseDomainId = 0;
  bool embedFlash = false;
  int32_t enabledCpusNum = 0;
  uint32_t enabledCpusMask = 0;
  int32_t nBatch = 0;
  bool useCrossAttn = false;
};


// One rkllm_run call, with every string and array owned here so the worker thread needs nothing else.
struct RkllmRunRequest {
  rkllm::RKLLMInputType inputType = rkllm::INPUT_PROMPT;
  std::string prompt;
  std::vector<int32_t> tokens;
  std::vector<float> embedding;
  size_t embeddingTokens = 0;
  std::string role = "user";
  bool enableThinking = false;
  rkllm::RKLLMInferMode mode = rkllm::INFER_GENERATE;
  bool keepHistory = false;
  std::optional<std::string> loraName;
  std::optional<std::string> savePromptCachePath;
  std::optional<RkllmSampling> sampling;  // 1.3.0 only
  int32_t maxNewTokens = 0;               // 1.3.0 only; <= 0: the value given at init
};

class RkllmLibrary {
 public:
  // dlopen(path), resolve every function kvstash calls, and find the library's ABI from the library
  // itself (symbols, then the size of the struct rkllm_createDefaultParam writes). `declared`, when
  // given, must agree. `source` says where the path came from, for the error message. Throws
  // NativeError E_RKLLM_UNAVAILABLE (no library, a symbol missing, a runtime older than 1.2.1) or
  // E_RKLLM_VERSION (the declared version contradicts the library, or its layout is unknown).
  static std::unique_ptr<RkllmLibrary> Open(const std::string& path, const std::string& source,
                                            std::optional<RkllmVersion> declared);
  ~RkllmLibrary();
  RkllmLibrary(const RkllmLibrary&) = delete;
  RkllmLibrary& operator=(const RkllmLibrary&) = delete;

  RkllmVersion version() const { return version_; }
  // Bytes rkllm_createDefaultParam wrote when probed, the evidence the version was read from.
  size_t defaultParamBytes() const { return defaultParamBytes_; }
  const std::string& path() const { return path_; }

  RkllmParams DefaultParams() const;
  // `params` must outlive the handle: the runtime may keep pointers to its strings.
  int Init(rkllm::LLMHandle* handle, const RkllmParams& params, rkllm::LLMResultCallback callback, void* userdata);
  int Run(rkllm::LLMHandle handle, RkllmRunRequest& request, void* userdata) const;
  // Normalised: true while a task runs (1.3.0 answers 1 then, 1.2.x answers 0).
  bool IsRunning(rkllm::LLMHandle handle) const;

  rkllm::rkllm_load_lora_fn loadLora = nullptr;
  rkllm::rkllm_load_prompt_cache_fn loadPromptCache = nullptr;
  rkllm::rkllm_release_prompt_cache_fn releasePromptCache = nullptr;
  rkllm::rkllm_destroy_fn destroy = nullptr;
  rkllm::rkllm_abort_fn abort = nullptr;
  rkllm::rkllm_is_running_fn isRunning = nullptr;
  rkllm::rkllm_clear_kv_cache_fn clearKvCache = nullptr;
  rkllm::rkllm_get_kv_cache_size_fn getKvCacheSize = nullptr;
  rkllm::rkllm_set_chat_template_fn setChatTemplate = nullptr;
  rkllm::rkllm_set_function_tools_fn setFunctionTools = nullptr;

 private:
  RkllmLibrary(void* dl, std::string path, RkllmVersion version) : dl_(dl), path_(std::move(path)), version_(version) {}
  void* Resolve(const char* name, const std::string& source, std::optional<RkllmVersion> declared);
  // Calls rkllm_createDefaultParam into a kDefaultParamProbeBytes buffer: which bytes it writes,
  // and the end of the last one.
  void ProbeDefaultParam(bool (&written)[kDefaultParamProbeBytes], size_t& extent) const;

  void* dl_;
  std::string path_;
  RkllmVersion version_;
  size_t defaultParamBytes_ = 0;
  void* createDefaultParam_ = nullptr;  // cast per version
  void* init_ = nullptr;
  void* run_ = nullptr;
  // 1.3.0 takes the callbacks by pointer; kept for the handle's lifetime in case the runtime keeps it.
  rkllm::v130::RKLLMCallback callbacks_{};
};

}  // namespace kvstash
