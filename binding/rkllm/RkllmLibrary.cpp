#include "rkllm/RkllmLibrary.h"

#include <dlfcn.h>

#include <cstddef>
#include <cstring>
#include <new>

#include "common/Errors.h"

namespace kvstash {

using namespace rkllm;

namespace {

const char* const kFixHint =
    "librkllmrt.so comes with Rockchip's rknn-llm SDK (rkllm-runtime/Linux/librkllm_api/aarch64/) and runs on "
    "aarch64 Linux boards (RK3588, RK3576, RK3562, RV1126B). Pass its path as the `libraryPath` option, set "
    "RKLLM_LIB_PATH, or install it in the system library path (for example /usr/lib/librkllmrt.so)";

const char* NullIfAbsent(const std::optional<std::string>& s) { return s ? s->c_str() : nullptr; }
std::optional<std::string> OptionalString(const char* s) { return s ? std::optional<std::string>(s) : std::nullopt; }

// RKLLMParam and RKLLMSamplingParam name their sampling fields alike.
template <typename AbiSampling>
RkllmSampling ReadSamplingFields(const AbiSampling& p) {
  return RkllmSampling{p.top_k,    p.top_p,    p.temperature,  p.repeat_penalty, p.frequency_penalty,
                       p.presence_penalty, p.mirostat, p.mirostat_tau, p.mirostat_eta};
}

template <typename AbiSampling>
void WriteSamplingFields(const RkllmSampling& in, AbiSampling& p) {
  p.top_k = in.topK;
  p.top_p = in.topP;
  p.temperature = in.temperature;
  p.repeat_penalty = in.repeatPenalty;
  p.frequency_penalty = in.frequencyPenalty;
  p.presence_penalty = in.presencePenalty;
  p.mirostat = in.mirostat;
  p.mirostat_tau = in.mirostatTau;
  p.mirostat_eta = in.mirostatEta;
}

template <typename AbiParam>
void ReadCommonParams(const AbiParam& p, RkllmParams& out) {
  out.modelPath = p.model_path ? p.model_path : "";
  out.maxContextLen = p.max_context_len;
  out.maxNewTokens = p.max_new_tokens;
  out.nKeep = p.n_keep;
  out.sampling = ReadSamplingFields(p);
  out.skipSpecialToken = p.skip_special_token;
  out.isAsync = p.is_async;
  out.baseDomainId = p.extend_param.base_domain_id;
  out.embedFlash = p.extend_param.embed_flash != 0;
  out.enabledCpusNum = p.extend_param.enabled_cpus_num;
  out.enabledCpusMask = p.extend_param.enabled_cpus_mask;
  out.nBatch = p.extend_param.n_batch;
  out.useCrossAttn = p.extend_param.use_cross_attn != 0;
}

// Starts from the runtime's own defaults so reserved bytes (and anything a newer runtime put there)
// keep the values it chose.
template <typename AbiParam>
void WriteCommonParams(const RkllmParams& in, AbiParam& p) {
  p.model_path = in.modelPath.c_str();
  p.max_context_len = in.maxContextLen;
  p.max_new_tokens = in.maxNewTokens;
  p.n_keep = in.nKeep;
  WriteSamplingFields(in.sampling, p);
  p.skip_special_token = in.skipSpecialToken;
  p.is_async = in.isAsync;
  p.extend_param.base_domain_id = in.baseDomainId;
  p.extend_param.embed_flash = in.embedFlash ? 1 : 0;
  p.extend_param.enabled_cpus_num = static_cast<int8_t>(in.enabledCpusNum);
  p.extend_param.enabled_cpus_mask = in.enabledCpusMask;
  p.extend_param.n_batch = static_cast<uint8_t>(in.nBatch);
  p.extend_param.use_cross_attn = in.useCrossAttn ? 1 : 0;
}

template <typename AbiInput>
void FillInput(RkllmRunRequest& request, AbiInput& input) {
  input.role = request.role.c_str();
  input.enable_thinking = request.enableThinking;
  input.input_type = request.inputType;
  switch (request.inputType) {
    case INPUT_TOKEN:
      input.token_input.input_ids = request.tokens.data();
      input.token_input.n_tokens = request.tokens.size();
      break;
    case INPUT_EMBED:
      input.embed_input.embed = request.embedding.data();
      input.embed_input.n_tokens = request.embeddingTokens;
      break;
    default:
      input.prompt_input = request.prompt.c_str();
      break;
  }
}

}  // namespace

std::optional<RkllmVersion> ParseRkllmVersion(const std::string& text) {
  if (text == "1.3.0") return RkllmVersion::V130;
  if (text == "1.2.1") return RkllmVersion::V121;
  return std::nullopt;
}

const char* RkllmVersionName(RkllmVersion version) { return version == RkllmVersion::V130 ? "1.3.0" : "1.2.1"; }

std::unique_ptr<RkllmLibrary> RkllmLibrary::Open(const std::string& path, const std::string& source,
                                                 std::optional<RkllmVersion> declared) {
  dlerror();
  // RTLD_NOW: a missing dependency of the runtime (libomp on Android, a libc too old) fails here,
  // not at the first call. RTLD_NODELETE: dlclose drops our reference but never unmaps the code,
  // because a closed runtime's own threads may outlive rkllm_destroy.
  void* dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (dl == nullptr) {
    const char* reason = dlerror();
    throw NativeError("E_RKLLM_UNAVAILABLE", "the RKLLM runtime could not be loaded from '" + path + "' (" + source +
                                                 "): " + (reason ? reason : "unknown dlopen error") + ". " + kFixHint);
  }
  std::unique_ptr<RkllmLibrary> lib(new RkllmLibrary(dl, path, declared.value_or(RkllmVersion::V130)));
  // 1.2.1 added rkllm_get_kv_cache_size and rkllm_set_function_tools (the 1.2.1 beta "1.2.1b1",
  // 1.2.0 and 1.1.x lack both, and differ in callback and struct layouts): without them the library
  // is older than anything kvstash declares, whatever was declared. Checked before the other
  // symbols so that the message says so.
  for (const char* since121 : {"rkllm_get_kv_cache_size", "rkllm_set_function_tools"}) {
    dlerror();
    if (dlsym(dl, since121) == nullptr) {
      throw NativeError("E_RKLLM_UNAVAILABLE",
                        "the RKLLM runtime at '" + path + "' (" + source + ") has no symbol " + since121 +
                            ": it is older than runtime 1.2.1 (1.2.1b1, 1.2.0 or 1.1.x, whose ABI kvstash does "
                            "not speak) or not librkllmrt.so. Install runtime 1.2.1 or later (1.3.0 preferred) and "
                            "point `libraryPath`/RKLLM_LIB_PATH at it; the `runtimeVersion` option cannot change this");
    }
  }
  lib->createDefaultParam_ = lib->Resolve("rkllm_createDefaultParam", source, declared);
  lib->init_ = lib->Resolve("rkllm_init", source, declared);
  lib->run_ = lib->Resolve("rkllm_run", source, declared);
  lib->loadLora = reinterpret_cast<rkllm_load_lora_fn>(lib->Resolve("rkllm_load_lora", source, declared));
  lib->loadPromptCache =
      reinterpret_cast<rkllm_load_prompt_cache_fn>(lib->Resolve("rkllm_load_prompt_cache", source, declared));
  lib->releasePromptCache =
      reinterpret_cast<rkllm_release_prompt_cache_fn>(lib->Resolve("rkllm_release_prompt_cache", source, declared));
  lib->destroy = reinterpret_cast<rkllm_destroy_fn>(lib->Resolve("rkllm_destroy", source, declared));
  lib->abort = reinterpret_cast<rkllm_abort_fn>(lib->Resolve("rkllm_abort", source, declared));
  lib->isRunning = reinterpret_cast<rkllm_is_running_fn>(lib->Resolve("rkllm_is_running", source, declared));
  lib->clearKvCache = reinterpret_cast<rkllm_clear_kv_cache_fn>(lib->Resolve("rkllm_clear_kv_cache", source, declared));
  lib->getKvCacheSize =
      reinterpret_cast<rkllm_get_kv_cache_size_fn>(lib->Resolve("rkllm_get_kv_cache_size", source, declared));
  lib->setChatTemplate =
      reinterpret_cast<rkllm_set_chat_template_fn>(lib->Resolve("rkllm_set_chat_template", source, declared));
  lib->setFunctionTools =
      reinterpret_cast<rkllm_set_function_tools_fn>(lib->Resolve("rkllm_set_function_tools", source, declared));

  // The ABI from the library itself. 1.2.x and 1.3.0 export the same symbols, but their RKLLMParam
  // differ (208 and 184 bytes), and rkllm_createDefaultParam returns it by value: through memory the
  // caller provides. Called with room for kDefaultParamProbeBytes (more than any known layout), it
  // can write its whole struct whatever its version, and which bytes it writes tell the layout.
  bool written[kDefaultParamProbeBytes];
  size_t extent = 0;
  lib->ProbeDefaultParam(written, extent);
  lib->defaultParamBytes_ = extent;
  auto all = [&written](size_t from, size_t to) {
    for (size_t i = from; i < to; ++i) if (!written[i]) return false;
    return true;
  };
  auto none = [&written](size_t from, size_t to) {
    for (size_t i = from; i < to; ++i) if (written[i]) return false;
    return true;
  };
  std::optional<RkllmVersion> detected;
  if (extent > sizeof(v130::RKLLMParam) && extent <= sizeof(v121::RKLLMParam)) {
    // Written past 184 bytes: 1.3.0 never does. (A 1.2.x that zeroes its struct writes all 208.)
    detected = RkllmVersion::V121;
  } else if (extent <= sizeof(v130::RKLLMParam) && all(offsetof(v130::RKLLMParam, is_async), offsetof(v130::RKLLMParam, is_async) + 1) &&
             all(offsetof(v130::RKLLMParam, extend_param), offsetof(v130::RKLLMParam, extend_param) + 4)) {
    // 1.3.0's is_async (58) and extend_param.base_domain_id (60..63) sit in 1.2.x's padding before
    // img_start: a 1.2.x that sets its fields one by one leaves them alone.
    detected = RkllmVersion::V130;
  } else if (extent <= sizeof(v121::RKLLMParam) && none(offsetof(v121::RKLLMParam, is_async) + 1, offsetof(v121::RKLLMParam, img_start)) &&
             all(offsetof(v121::RKLLMParam, img_start), offsetof(v121::RKLLMParam, extend_param) + 4)) {
    detected = RkllmVersion::V121;  // field by field: padding untouched, the image pointers set
  }
  if (!detected && declared) {
    // The layout tells nothing certain (a runtime that writes few of its fields): the declaration
    // decides, as before detection existed.
    detected = declared;
  }
  if (!detected) {
    throw NativeError("E_RKLLM_VERSION",
                      "the RKLLM runtime at '" + path + "' (" + source + ") returns a default parameter struct of " +
                          std::to_string(extent) + " written bytes, which matches no runtime kvstash knows (1.3.0: " +
                          std::to_string(sizeof(v130::RKLLMParam)) + " bytes, 1.2.1-1.2.x: " +
                          std::to_string(sizeof(v121::RKLLMParam)) +
                          "). If it is runtime 1.3.0 or 1.2.1+, declare it with the `runtimeVersion` option ('1.3.0', "
                          "or '1.2.1' for every 1.2.x from 1.2.1 on); else use one of those runtimes");
  }
  if (declared && *declared != *detected) {
    throw NativeError("E_RKLLM_VERSION",
                      "runtimeVersion '" + std::string(RkllmVersionName(*declared)) + "' was declared, but the RKLLM "
                          "runtime at '" + path + "' (" + source + ") speaks the " + RkllmVersionName(*detected) +
                          (*detected == RkllmVersion::V121 ? " (1.2.x)" : "") + " ABI (its rkllm_createDefaultParam "
                          "writes " + std::to_string(extent) + " bytes). Remove the runtimeVersion option (kvstash "
                          "detects the version) or declare '" + RkllmVersionName(*detected) + "'");
  }
  lib->version_ = *detected;
  return lib;
}

namespace {
// Declared as returning a struct of kDefaultParamProbeBytes: the caller then passes a buffer that
// large (on LP64 and armhf alike, such a struct is returned through memory the caller owns), and a
// callee with a smaller struct writes only its own bytes into it.
struct OversizedParam {
  unsigned char bytes[kDefaultParamProbeBytes];
};
using OversizedDefaultParamFn = OversizedParam (*)();

// Fills `storage` with `fill`, then has the function return into it: constructing from the call's
// result places the object (and so the callee's writes) right there, with no temporary between.
void CallDefaultParamInto(void* function, OversizedParam* storage, unsigned char fill) {
  std::memset(static_cast<void*>(storage), fill, sizeof *storage);
  // The compiler may treat stores before an object's construction as dead (its lifetime starts
  // anew): this barrier makes the filling happen.
  asm volatile("" : : "r"(storage) : "memory");
  new (storage) OversizedParam(reinterpret_cast<OversizedDefaultParamFn>(function)());
}

// The runtime's defaults in its layout `AbiParam`, never letting it write past our buffer.
template <typename AbiParam>
AbiParam DefaultParamAs(void* function) {
  static_assert(sizeof(AbiParam) <= kDefaultParamProbeBytes, "probe buffer smaller than a known RKLLMParam");
  OversizedParam storage;
  CallDefaultParamInto(function, &storage, 0);
  AbiParam out;
  std::memcpy(static_cast<void*>(&out), storage.bytes, sizeof out);
  return out;
}
}  // namespace

void RkllmLibrary::ProbeDefaultParam(bool (&written)[kDefaultParamProbeBytes], size_t& extent) const {
  // Two calls over two different fillings: a byte the function writes reads the same both times
  // (its defaults are deterministic, as they must be), a byte it leaves alone keeps the filling.
  OversizedParam a, b;
  CallDefaultParamInto(createDefaultParam_, &a, 0xA5);
  CallDefaultParamInto(createDefaultParam_, &b, 0x5A);
  extent = 0;
  for (size_t i = 0; i < kDefaultParamProbeBytes; ++i) {
    written[i] = a.bytes[i] == b.bytes[i];
    if (written[i]) extent = i + 1;
  }
}

void* RkllmLibrary::Resolve(const char* name, const std::string& source, std::optional<RkllmVersion> declared) {
  dlerror();
  void* symbol = dlsym(dl_, name);
  if (symbol == nullptr) {
    throw NativeError("E_RKLLM_UNAVAILABLE",
                      "the RKLLM runtime at '" + path_ + "' (" + source + ") has no symbol " + name + ", which runtime " +
                          (declared ? RkllmVersionName(*declared) : "1.3.0 and 1.2.1+") +
                          " provides: it is another RKLLM version or not librkllmrt.so. Point `libraryPath`/"
                          "RKLLM_LIB_PATH at the right librkllmrt.so (runtime 1.3.0 or 1.2.1+; the `runtimeVersion` "
                          "option is optional, kvstash reads the version from the library)");
  }
  return symbol;
}

RkllmLibrary::~RkllmLibrary() {
  if (dl_ != nullptr) dlclose(dl_);
}

RkllmParams RkllmLibrary::DefaultParams() const {
  RkllmParams out;
  if (version_ == RkllmVersion::V130) {
    v130::RKLLMParam p = DefaultParamAs<v130::RKLLMParam>(createDefaultParam_);
    ReadCommonParams(p, out);
    out.ignoreEosToken = p.ignore_eos_token;
  } else {
    v121::RKLLMParam p = DefaultParamAs<v121::RKLLMParam>(createDefaultParam_);
    ReadCommonParams(p, out);
    out.imgStart = OptionalString(p.img_start);
    out.imgEnd = OptionalString(p.img_end);
    out.imgContent = OptionalString(p.img_content);
  }
  return out;
}

int RkllmLibrary::Init(LLMHandle* handle, const RkllmParams& params, LLMResultCallback callback, void* userdata) {
  if (version_ == RkllmVersion::V130) {
    v130::RKLLMParam p = DefaultParamAs<v130::RKLLMParam>(createDefaultParam_);
    WriteCommonParams(params, p);
    p.ignore_eos_token = params.ignoreEosToken;
    callbacks_ = v130::RKLLMCallback{};
    callbacks_.result_callback = callback;
    // The same pointer goes to every rkllm_run too (which 1.3.0 prefers): the callback finds the
    // current run through it whichever of the two the runtime passes.
    callbacks_.result_userdata = userdata;
    return reinterpret_cast<v130::rkllm_init_fn>(init_)(handle, &p, &callbacks_);
  }
  v121::RKLLMParam p = DefaultParamAs<v121::RKLLMParam>(createDefaultParam_);
  WriteCommonParams(params, p);
  p.img_start = NullIfAbsent(params.imgStart);
  p.img_end = NullIfAbsent(params.imgEnd);
  p.img_content = NullIfAbsent(params.imgContent);
  return reinterpret_cast<v121::rkllm_init_fn>(init_)(handle, &p, callback);
}

int RkllmLibrary::Run(LLMHandle handle, RkllmRunRequest& request, void* userdata) const {
  RKLLMLoraParam lora{};
  RKLLMPromptCacheParam cache{};
  if (request.loraName) lora.lora_adapter_name = request.loraName->c_str();
  if (request.savePromptCachePath) {
    cache.save_prompt_cache = 1;
    cache.prompt_cache_path = request.savePromptCachePath->c_str();
  }
  if (version_ == RkllmVersion::V130) {
    v130::RKLLMInput input{};
    FillInput(request, input);
    v130::RKLLMSamplingParam sampling{};
    v130::RKLLMInferParam infer{};
    infer.mode = request.mode;
    infer.lora_params = request.loraName ? &lora : nullptr;
    infer.prompt_cache_params = request.savePromptCachePath ? &cache : nullptr;
    if (request.sampling) {
      WriteSamplingFields(*request.sampling, sampling);
      infer.sampling_params = &sampling;
    }
    infer.keep_history = request.keepHistory ? 1 : 0;
    infer.max_new_tokens = request.maxNewTokens;
    return reinterpret_cast<v130::rkllm_run_fn>(run_)(handle, &input, &infer, userdata);
  }
  // 1.2.3 renamed the multimodal input; its size there is not among the confirmed facts. Spare
  // zeroed room after the struct keeps a runtime that copies a larger RKLLMInput inside our memory.
  struct {
    v121::RKLLMInput input;
    unsigned char spare[sizeof(v130::RKLLMInput)];
  } padded{};
  FillInput(request, padded.input);
  v121::RKLLMInferParam infer{};
  infer.mode = request.mode;
  infer.lora_params = request.loraName ? &lora : nullptr;
  infer.prompt_cache_params = request.savePromptCachePath ? &cache : nullptr;
  infer.keep_history = request.keepHistory ? 1 : 0;
  return reinterpret_cast<v121::rkllm_run_fn>(run_)(handle, &padded.input, &infer, userdata);
}

bool RkllmLibrary::IsRunning(LLMHandle handle) const {
  const int answer = isRunning(handle);
  return version_ == RkllmVersion::V130 ? answer == 1 : answer == 0;
}

}  // namespace kvstash
