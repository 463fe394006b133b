// The binary interface of Rockchip's librkllmrt.so, declared by kvstash from the documented facts in
// shared/RKLLM_ABI.md (Rockchip's header is not used, copied or shipped). The library is loaded
// with dlopen, so nothing here is linked: these are the layouts kvstash must build and read, and
// the signatures it casts resolved symbols to.
//
// One namespace per supported runtime version (v130 = 1.3.0, v121 = 1.2.1 and later 1.2.x); the
// types both versions share live in `rkllm` and are re-exported into each, so a version namespace
// is complete on its own. The static_asserts pin every size and offset that the ABI notes give; they
// hold for LP64 targets (x86-64 here, aarch64 in the arm64 cross build, which compiles them too). A
// failed assert means a declaration here is wrong, never "fix the number".
//
// v1.2.x facts that RKLLM_ABI.md asked to confirm (field order only). Read from a public copy of a
// v1.2.x `rkllm.h` (1.2.1/1.2.2: it has n_batch, the four-argument clear_kv_cache, perf stats and
// set_function_tools; found by content search, its repository not named by the index), and
// cross-checked against two third-party bindings of the same version that agree field by field.
// The airockchip/rknn-llm copy indexed there is the 1.2.0 header; milhcbt/rknn-llm's is 1.3.0 and
// matches RKLLM_ABI.md's 1.3.0 table; it adds that rkllm_run's userdata, when not NULL, is what the
// result callback receives (else RKLLMCallback.result_userdata).
//   - RKLLMParam: model_path, max_context_len, max_new_tokens, top_k, n_keep, top_p, temperature,
//     repeat_penalty, frequency_penalty, presence_penalty, mirostat, mirostat_tau, mirostat_eta,
//     skip_special_token, is_async, img_start, img_end, img_content, extend_param. So there is no
//     ignore_eos_token, the two bools sit at 56/57 and the three pointers at 64/72/80, which puts
//     extend_param at 88 as RKLLM_ABI.md says; the struct is 208 bytes.
//   - RKLLMExtendParam already ends with n_batch, use_cross_attn, reserved[104] (120 bytes), as in
//     1.3.0. (1.2.0's header had reserved[106] without those two fields: same size.)
//   - RKLLMMultiModelInput (1.2.1/1.2.2 spelling): prompt, image_embed, n_image_tokens, n_image,
//     image_width, image_height. kvstash never sends multimodal input; the union is declared only
//     so that RKLLMInput has the runtime's size. (1.2.3 renamed this type; whether its size changed
//     is not among the confirmed facts, so RkllmLibrary::Run leaves zeroed room after the struct.)
//   - LLMResultCallback already returns int (0 continue, 1 pause); RKLLMResult already carries
//     RKLLMPerfStat; rkllm_set_function_tools, rkllm_get_kv_cache_size and the four-argument
//     rkllm_clear_kv_cache are present; rkllm_is_running is documented as 0 while a task runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvstash {
namespace rkllm {

using LLMHandle = void*;

// Enums are int-sized in the C ABI; fixed underlying types make that explicit.
enum LLMCallState : int32_t { RUN_NORMAL = 0, RUN_WAITING = 1, RUN_FINISH = 2, RUN_ERROR = 3 };
enum RKLLMInputType : int32_t { INPUT_PROMPT = 0, INPUT_TOKEN = 1, INPUT_EMBED = 2, INPUT_MULTIMODAL = 3 };
enum RKLLMInferMode : int32_t { INFER_GENERATE = 0, INFER_GET_LAST_HIDDEN_LAYER = 1, INFER_GET_LOGITS = 2 };

// What a result callback returns to the runtime.
constexpr int kCallbackContinue = 0;
constexpr int kCallbackPause = 1;

struct RKLLMExtendParam {
  int32_t base_domain_id;
  int8_t embed_flash;
  int8_t enabled_cpus_num;
  uint32_t enabled_cpus_mask;
  uint8_t n_batch;
  int8_t use_cross_attn;
  uint8_t reserved[104];
};

struct RKLLMLoraAdapter {
  const char* lora_adapter_path;
  const char* lora_adapter_name;
  float scale;
};

struct RKLLMEmbedInput {
  float* embed;
  size_t n_tokens;
};

struct RKLLMTokenInput {
  int32_t* input_ids;
  size_t n_tokens;
};

struct RKLLMLoraParam {
  const char* lora_adapter_name;
};

struct RKLLMPromptCacheParam {
  int save_prompt_cache;
  const char* prompt_cache_path;
};

struct RKLLMCrossAttnParam {
  float* encoder_k_cache;
  float* encoder_v_cache;
  float* encoder_mask;
  int32_t* encoder_pos;
  int num_tokens;
};

struct RKLLMResultLastHiddenLayer {
  const float* hidden_states;
  int embd_size;
  int num_tokens;
};

struct RKLLMResultLogits {
  const float* logits;
  int vocab_size;
  int num_tokens;
};

struct RKLLMPerfStat {
  float prefill_time_ms;
  int prefill_tokens;
  float generate_time_ms;
  int generate_tokens;
  float memory_usage_mb;
};

struct RKLLMResult {
  const char* text;
  int32_t token_id;
  RKLLMResultLastHiddenLayer last_hidden_layer;
  RKLLMResultLogits logits;
  RKLLMPerfStat perf;
};

using LLMResultCallback = int (*)(RKLLMResult* result, void* userdata, LLMCallState state);

static_assert(sizeof(LLMCallState) == 4 && sizeof(RKLLMInputType) == 4 && sizeof(RKLLMInferMode) == 4, "enums are int");
static_assert(sizeof(RKLLMExtendParam) == 120, "RKLLMExtendParam is 120 bytes");
static_assert(offsetof(RKLLMExtendParam, enabled_cpus_mask) == 8, "RKLLMExtendParam.enabled_cpus_mask");
static_assert(offsetof(RKLLMExtendParam, n_batch) == 12, "RKLLMExtendParam.n_batch");
static_assert(offsetof(RKLLMExtendParam, reserved) == 14, "RKLLMExtendParam.reserved");
static_assert(sizeof(RKLLMPerfStat) == 20, "RKLLMPerfStat");
static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult is 72 bytes");
static_assert(offsetof(RKLLMResult, last_hidden_layer) == 16, "RKLLMResult.last_hidden_layer");
static_assert(offsetof(RKLLMResult, logits) == 32, "RKLLMResult.logits");
static_assert(offsetof(RKLLMResult, perf) == 48, "RKLLMResult.perf");
static_assert(sizeof(RKLLMPromptCacheParam) == 16, "RKLLMPromptCacheParam");
static_assert(sizeof(RKLLMLoraAdapter) == 24, "RKLLMLoraAdapter");

// Signatures both versions share.
using rkllm_load_lora_fn = int (*)(LLMHandle, RKLLMLoraAdapter*);
using rkllm_load_prompt_cache_fn = int (*)(LLMHandle, const char*);
using rkllm_release_prompt_cache_fn = int (*)(LLMHandle);
using rkllm_destroy_fn = int (*)(LLMHandle);
using rkllm_abort_fn = int (*)(LLMHandle);
using rkllm_is_running_fn = int (*)(LLMHandle);
using rkllm_clear_kv_cache_fn = int (*)(LLMHandle, int keep_system_prompt, int* start_pos, int* end_pos);
using rkllm_get_kv_cache_size_fn = int (*)(LLMHandle, int* cache_sizes);
using rkllm_set_chat_template_fn = int (*)(LLMHandle, const char* system_prompt, const char* prompt_prefix,
                                           const char* prompt_postfix);
using rkllm_set_function_tools_fn = int (*)(LLMHandle, const char* system_prompt, const char* tools,
                                            const char* tool_response_str);
using rkllm_set_cross_attn_params_fn = int (*)(LLMHandle, RKLLMCrossAttnParam*);

// ------------------------------------------------------------------------------------------------
// Runtime 1.3.0

namespace v130 {

using namespace ::kvstash::rkllm;  // the shared types, so this namespace reads as the whole ABI

struct RKLLMParam {
  const char* model_path;
  int32_t max_context_len;
  int32_t max_new_tokens;
  int32_t top_k;
  int32_t n_keep;
  float top_p;
  float temperature;
  float repeat_penalty;
  float frequency_penalty;
  float presence_penalty;
  int32_t mirostat;
  float mirostat_tau;
  float mirostat_eta;
  bool skip_special_token;
  bool ignore_eos_token;
  bool is_async;
  RKLLMExtendParam extend_param;
};

struct RKLLMMultiModalInput {
  char* prompt;
  struct {
    float* image_embed;
    size_t n_image_tokens;
    size_t n_image;
    const char* image_start;
    const char* image_end;
    const char* image_content;
    size_t image_width;
    size_t image_height;
  } image;
  struct {
    float* video_embed;
    size_t n_frame_tokens;
    size_t n_frame_per_video;
    size_t n_video;
    const char* video_start;
    const char* video_end;
    const char* video_content;
    size_t frame_width;
    size_t frame_height;
  } video;
};

struct RKLLMInput {
  const char* role;
  bool enable_thinking;
  RKLLMInputType input_type;
  union {
    const char* prompt_input;
    RKLLMEmbedInput embed_input;
    RKLLMTokenInput token_input;
    RKLLMMultiModalInput multimodal_input;
  };
};

struct RKLLMSamplingParam {
  int32_t top_k;
  float top_p;
  float temperature;
  float repeat_penalty;
  float frequency_penalty;
  float presence_penalty;
  int32_t mirostat;
  float mirostat_tau;
  float mirostat_eta;
};

struct RKLLMInferParam {
  RKLLMInferMode mode;
  RKLLMLoraParam* lora_params;
  RKLLMPromptCacheParam* prompt_cache_params;
  RKLLMSamplingParam* sampling_params;
  int keep_history;
  int32_t max_new_tokens;
};

using LLMTokenizerCallback = int (*)(void* userdata, const char* text, int32_t text_len, int32_t* tokens,
                                     int32_t n_tokens_max);
using LLMGetEmbedCallback = int (*)(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed, uint64_t len);

struct RKLLMCallback {
  LLMResultCallback result_callback;
  void* result_userdata;
  LLMTokenizerCallback tokenizer_callback;
  void* tokenizer_userdata;
  LLMGetEmbedCallback embed_callback;
  void* embed_userdata;
};

static_assert(sizeof(RKLLMParam) == 184, "v1.3.0 RKLLMParam is 184 bytes");
static_assert(offsetof(RKLLMParam, top_p) == 24, "v1.3.0 RKLLMParam.top_p");
static_assert(offsetof(RKLLMParam, skip_special_token) == 56, "v1.3.0 RKLLMParam.skip_special_token");
static_assert(offsetof(RKLLMParam, is_async) == 58, "v1.3.0 RKLLMParam.is_async");
static_assert(offsetof(RKLLMParam, extend_param) == 60, "v1.3.0 RKLLMParam.extend_param");
static_assert(sizeof(RKLLMMultiModalInput) == 144, "v1.3.0 RKLLMMultiModalInput");
static_assert(sizeof(RKLLMInput) == 160, "v1.3.0 RKLLMInput is 160 bytes");
static_assert(offsetof(RKLLMInput, enable_thinking) == 8, "v1.3.0 RKLLMInput.enable_thinking");
static_assert(offsetof(RKLLMInput, input_type) == 12, "v1.3.0 RKLLMInput.input_type");
static_assert(offsetof(RKLLMInput, prompt_input) == 16, "v1.3.0 RKLLMInput union");
static_assert(sizeof(RKLLMSamplingParam) == 36, "v1.3.0 RKLLMSamplingParam");
static_assert(sizeof(RKLLMInferParam) == 40, "v1.3.0 RKLLMInferParam is 40 bytes");
static_assert(offsetof(RKLLMInferParam, sampling_params) == 24, "v1.3.0 RKLLMInferParam.sampling_params");
static_assert(offsetof(RKLLMInferParam, keep_history) == 32, "v1.3.0 RKLLMInferParam.keep_history");
static_assert(offsetof(RKLLMInferParam, max_new_tokens) == 36, "v1.3.0 RKLLMInferParam.max_new_tokens");
static_assert(sizeof(RKLLMCallback) == 48, "v1.3.0 RKLLMCallback");

using rkllm_createDefaultParam_fn = RKLLMParam (*)();
using rkllm_init_fn = int (*)(LLMHandle*, RKLLMParam*, RKLLMCallback*);
using rkllm_run_fn = int (*)(LLMHandle, RKLLMInput*, RKLLMInferParam*, void* userdata);

}  // namespace v130

// ------------------------------------------------------------------------------------------------
// Runtime 1.2.1 and later 1.2.x

namespace v121 {

using namespace ::kvstash::rkllm;

struct RKLLMParam {
  const char* model_path;
  int32_t max_context_len;
  int32_t max_new_tokens;
  int32_t top_k;
  int32_t n_keep;
  float top_p;
  float temperature;
  float repeat_penalty;
  float frequency_penalty;
  float presence_penalty;
  int32_t mirostat;
  float mirostat_tau;
  float mirostat_eta;
  bool skip_special_token;
  bool is_async;
  const char* img_start;
  const char* img_end;
  const char* img_content;
  RKLLMExtendParam extend_param;
};

struct RKLLMMultiModelInput {
  char* prompt;
  float* image_embed;
  size_t n_image_tokens;
  size_t n_image;
  size_t image_width;
  size_t image_height;
};

struct RKLLMInput {
  const char* role;
  bool enable_thinking;
  RKLLMInputType input_type;
  union {
    const char* prompt_input;
    RKLLMEmbedInput embed_input;
    RKLLMTokenInput token_input;
    RKLLMMultiModelInput multimodal_input;
  };
};

struct RKLLMInferParam {
  RKLLMInferMode mode;
  RKLLMLoraParam* lora_params;
  RKLLMPromptCacheParam* prompt_cache_params;
  int keep_history;
};

static_assert(sizeof(RKLLMParam) == 208, "v1.2.1 RKLLMParam is 208 bytes");
static_assert(offsetof(RKLLMParam, is_async) == 57, "v1.2.1 RKLLMParam.is_async");
static_assert(offsetof(RKLLMParam, img_start) == 64, "v1.2.1 RKLLMParam.img_start");
static_assert(offsetof(RKLLMParam, extend_param) == 88, "v1.2.1 RKLLMParam.extend_param");
static_assert(offsetof(RKLLMInput, input_type) == 12, "v1.2.1 RKLLMInput.input_type");
static_assert(offsetof(RKLLMInput, prompt_input) == 16, "v1.2.1 RKLLMInput union");
static_assert(sizeof(RKLLMInput) == 64, "v1.2.1 RKLLMInput");
static_assert(sizeof(RKLLMInferParam) == 32, "v1.2.1 RKLLMInferParam");
static_assert(offsetof(RKLLMInferParam, keep_history) == 24, "v1.2.1 RKLLMInferParam.keep_history");

using rkllm_createDefaultParam_fn = RKLLMParam (*)();
using rkllm_init_fn = int (*)(LLMHandle*, RKLLMParam*, LLMResultCallback);
using rkllm_run_fn = int (*)(LLMHandle, RKLLMInput*, RKLLMInferParam*, void* userdata);

}  // namespace v121

}  // namespace rkllm
}  // namespace kvstash
