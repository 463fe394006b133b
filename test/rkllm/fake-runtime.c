/*
 * A fake librkllmrt.so for kvstash's tests: the RKLLM ABI of one runtime version, implemented by a
 * deterministic toy model. Written for kvstash from shared/RKLLM_ABI.md (its declarations are
 * independent of binding/rkllm/RkllmAbi.h on purpose: two declarations that must agree on every
 * byte the tests look at). The test suite compiles it; no binary is committed.
 *
 *   cc -shared -fPIC -O1 -DFAKE_RKLLM_V=130 -o librkllmrt.so fake-runtime.c -lpthread   (or =121)
 *   add -Drkllm_abort=fake_omitted_rkllm_abort to build a library that lacks rkllm_abort (any
 *   exported function can be renamed away like that).
 *
 * The toy model: one token per byte of the rendered prompt (system prompt + prefix + prompt +
 * postfix of the chat template), or the given token ids. Prefill sleeps FAKE_RKLLM_PREFILL_US
 * (default 300) per token that is neither in the kept history nor matched by the loaded prompt
 * cache (longest common prefix, as the runtime matches "from the start"). Generation emits words
 * chosen by a hash of the whole token sequence, FAKE_RKLLM_TOKEN_US (default 1000) apart, and
 * stops after 24 tokens (end of sequence) or max_new_tokens. A prompt cache file is really written
 * (magic, count, the prompt's token ids) and read back.
 *
 * Every call appends one JSON line to the file named by FAKE_RKLLM_LOG, with the arguments as
 * received and "live" = handles alive. FAKE_RKLLM_FAIL=init,run,... makes those calls fail with
 * status -7 (run_state: the callback reports RKLLM_RUN_ERROR instead; save_prompt_cache: no file
 * is written, as with models that refuse to save one). Env is read at each call.
 *
 * Faults of a misbehaving runtime (issue 20), also read at each call:
 *   FAKE_RKLLM_SPLIT_UTF8=1     generate emits "é☕😀" as 5 tokens whose bytes split every character
 *   FAKE_RKLLM_NEVER_RETURN=1   rkllm_run never returns after its first token (rkllm_abort ignored)
 *   FAKE_RKLLM_LATE_CALLBACK=ms after rkllm_run returned, a thread of the fake calls the callback
 *                               again (text "LATE", then FINISH) with that run's userdata, ms later
 *   FAKE_RKLLM_CACHE_LATE=ms    the prompt cache file is written ms after rkllm_run returned
 *   FAKE_RKLLM_NO_FINISH=1      rkllm_run returns 0 without the FINISH callback
 *   FAKE_RKLLM_AFTER_FINISH=1   one more token ("AFTER") comes after FINISH
 *   FAKE_RKLLM_FAIL=abort       rkllm_abort fails (status -7) without stopping anything
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if !defined(FAKE_RKLLM_V) || (FAKE_RKLLM_V != 130 && FAKE_RKLLM_V != 121)
#error "compile with -DFAKE_RKLLM_V=130 or -DFAKE_RKLLM_V=121"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ---- the ABI ---------------------------------------------------------------------------- */

typedef void* LLMHandle;
typedef int LLMCallState; /* NORMAL 0, WAITING 1, FINISH 2, ERROR 3 */
typedef int RKLLMInputType; /* PROMPT 0, TOKEN 1, EMBED 2, MULTIMODAL 3 */
typedef int RKLLMInferMode; /* GENERATE 0, LAST_HIDDEN_LAYER 1, LOGITS 2 */

typedef struct {
  int32_t base_domain_id;
  int8_t embed_flash;
  int8_t enabled_cpus_num;
  uint32_t enabled_cpus_mask;
  uint8_t n_batch;
  int8_t use_cross_attn;
  uint8_t reserved[104];
} ExtendParam;

typedef struct {
  const char* model_path;
  int32_t max_context_len, max_new_tokens, top_k, n_keep;
  float top_p, temperature, repeat_penalty, frequency_penalty, presence_penalty;
  int32_t mirostat;
  float mirostat_tau, mirostat_eta;
  bool skip_special_token;
#if FAKE_RKLLM_V == 130
  bool ignore_eos_token;
#endif
  bool is_async;
#if FAKE_RKLLM_V == 121
  const char *img_start, *img_end, *img_content;
#endif
  ExtendParam extend_param;
} Param;

typedef struct { const char *path, *name; float scale; } LoraAdapter;
typedef struct { float* embed; size_t n_tokens; } EmbedInput;
typedef struct { int32_t* ids; size_t n_tokens; } TokenInput;
#if FAKE_RKLLM_V == 130
typedef struct { char* prompt; size_t image_part[8]; size_t video_part[9]; } MultiModalInput;
#else
typedef struct { char* prompt; float* image_embed; size_t n_image_tokens, n_image, width, height; } MultiModalInput;
#endif

typedef struct {
  const char* role;
  bool enable_thinking;
  RKLLMInputType input_type;
  union {
    const char* prompt_input;
    EmbedInput embed_input;
    TokenInput token_input;
    MultiModalInput multimodal_input;
  };
} Input;

typedef struct { const char* name; } LoraParam;
typedef struct { int save; const char* path; } PromptCacheParam;
typedef struct {
  int32_t top_k;
  float top_p, temperature, repeat_penalty, frequency_penalty, presence_penalty;
  int32_t mirostat;
  float mirostat_tau, mirostat_eta;
} SamplingParam;

typedef struct {
  RKLLMInferMode mode;
  LoraParam* lora_params;
  PromptCacheParam* prompt_cache_params;
#if FAKE_RKLLM_V == 130
  SamplingParam* sampling_params;
#endif
  int keep_history;
#if FAKE_RKLLM_V == 130
  int32_t max_new_tokens;
#endif
} InferParam;

typedef struct { const float* data; int width, rows; } ResultMatrix;
typedef struct { float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens; float memory_usage_mb; } PerfStat;
typedef struct { const char* text; int32_t token_id; ResultMatrix hidden; ResultMatrix logits; PerfStat perf; } Result;
typedef int (*ResultCallback)(Result*, void*, LLMCallState);
typedef struct { ResultCallback cb; void* userdata; void* tok_cb; void* tok_ud; void* emb_cb; void* emb_ud; } Callbacks;

_Static_assert(sizeof(ExtendParam) == 120, "ExtendParam");
_Static_assert(sizeof(Result) == 72, "Result");
#if FAKE_RKLLM_V == 130
_Static_assert(sizeof(Param) == 184 && offsetof(Param, extend_param) == 60, "Param 1.3.0");
_Static_assert(sizeof(Input) == 160, "Input 1.3.0");
_Static_assert(sizeof(InferParam) == 40, "InferParam 1.3.0");
_Static_assert(sizeof(Callbacks) == 48, "Callbacks 1.3.0");
#else
_Static_assert(sizeof(Param) == 208 && offsetof(Param, extend_param) == 88, "Param 1.2.1");
_Static_assert(sizeof(InferParam) == 32, "InferParam 1.2.1");
#endif

/* ---- the log ---------------------------------------------------------------------------- */

typedef struct { char* s; size_t n, cap; } Buf;

static void bput(Buf* b, const char* fmt, ...) {
  va_list ap;
  for (;;) {
    va_start(ap, fmt);
    size_t room = b->cap - b->n;
    int w = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? room : 0, fmt, ap);
    va_end(ap);
    if (w < 0) return;
    if (b->s && (size_t)w < room) { b->n += (size_t)w; return; }
    b->cap = (b->cap + (size_t)w + 64) * 2;
    b->s = realloc(b->s, b->cap);
  }
}

static void bstr(Buf* b, const char* s) {
  if (!s) { bput(b, "null"); return; }
  bput(b, "\"");
  for (const unsigned char* p = (const unsigned char*)s; *p; ++p) {
    if (*p == '"' || *p == '\\') bput(b, "\\%c", *p);
    else if (*p < 0x20) bput(b, "\\u%04x", *p);
    else bput(b, "%c", *p);
  }
  bput(b, "\"");
}

static void bfloat(Buf* b, float v) { if (isfinite(v)) bput(b, "%.9g", (double)v); else bput(b, "null"); }

static atomic_int live_handles;
static pthread_mutex_t log_mutex = PTHREAD_MUTEX_INITIALIZER;

static void log_line(Buf* b) {
  bput(b, ",\"live\":%d}\n", atomic_load(&live_handles));
  const char* file = getenv("FAKE_RKLLM_LOG");
  if (file && *file) {
    pthread_mutex_lock(&log_mutex);
    FILE* f = fopen(file, "a");
    if (f) { fwrite(b->s, 1, b->n, f); fclose(f); }
    pthread_mutex_unlock(&log_mutex);
  }
  free(b->s);
}

static Buf log_begin(const char* fn, int handle_id) {
  Buf b = {0};
  bput(&b, "{\"fn\":\"%s\",\"handle\":%d", fn, handle_id);
  return b;
}

static bool failing(const char* what) {
  const char* list = getenv("FAKE_RKLLM_FAIL");
  if (!list) return false;
  size_t n = strlen(what);
  for (const char* p = list; (p = strstr(p, what)) != NULL; p += n) {
    bool start = p == list || p[-1] == ',';
    bool end = p[n] == '\0' || p[n] == ',';
    if (start && end) return true;
  }
  return false;
}

static long env_long(const char* name, long fallback) {
  const char* v = getenv(name);
  return v && *v ? strtol(v, NULL, 10) : fallback;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- the handle -------------------------------------------------------------------------- */

typedef struct { int32_t* v; size_t n, cap; } Tokens;

static void tpush(Tokens* t, int32_t x) {
  if (t->n == t->cap) { t->cap = t->cap ? t->cap * 2 : 256; t->v = realloc(t->v, t->cap * sizeof(int32_t)); }
  t->v[t->n++] = x;
}
static void tbytes(Tokens* t, const char* s) { for (; s && *s; ++s) tpush(t, (unsigned char)*s); }

typedef struct {
  int id;
  Param param;
  char* model_path;
  ResultCallback cb;
  void* cb_userdata;
  Tokens kv;    /* the kept history */
  Tokens cache; /* the loaded prompt cache */
  bool cache_loaded;
  char *system, *prefix, *postfix;
  char *tools_system, *tools, *tool_response;
  char* lora;
  atomic_int abort_flag;
  atomic_int running;
} Fake;

static atomic_int next_id = 1;

static char* dup_or_empty(const char* s) { return strdup(s ? s : ""); }

static void log_param(Buf* b, const Param* p) {
  bput(b, ",\"param\":{\"model_path\":");
  bstr(b, p->model_path);
  bput(b, ",\"max_context_len\":%d,\"max_new_tokens\":%d,\"top_k\":%d,\"n_keep\":%d", p->max_context_len, p->max_new_tokens,
       p->top_k, p->n_keep);
  bput(b, ",\"top_p\":"); bfloat(b, p->top_p);
  bput(b, ",\"temperature\":"); bfloat(b, p->temperature);
  bput(b, ",\"repeat_penalty\":"); bfloat(b, p->repeat_penalty);
  bput(b, ",\"frequency_penalty\":"); bfloat(b, p->frequency_penalty);
  bput(b, ",\"presence_penalty\":"); bfloat(b, p->presence_penalty);
  bput(b, ",\"mirostat\":%d,\"mirostat_tau\":", p->mirostat); bfloat(b, p->mirostat_tau);
  bput(b, ",\"mirostat_eta\":"); bfloat(b, p->mirostat_eta);
  bput(b, ",\"skip_special_token\":%s", p->skip_special_token ? "true" : "false");
#if FAKE_RKLLM_V == 130
  bput(b, ",\"ignore_eos_token\":%s", p->ignore_eos_token ? "true" : "false");
#else
  bput(b, ",\"img_start\":"); bstr(b, p->img_start);
  bput(b, ",\"img_end\":"); bstr(b, p->img_end);
  bput(b, ",\"img_content\":"); bstr(b, p->img_content);
#endif
  bput(b, ",\"is_async\":%s", p->is_async ? "true" : "false");
  const ExtendParam* e = &p->extend_param;
  int reserved_nonzero = 0;
  for (int i = 0; i < 104; ++i) reserved_nonzero |= e->reserved[i];
  bput(b, ",\"extend\":{\"base_domain_id\":%d,\"embed_flash\":%d,\"enabled_cpus_num\":%d,\"enabled_cpus_mask\":%u,"
          "\"n_batch\":%d,\"use_cross_attn\":%d,\"reserved_zero\":%s}}",
       e->base_domain_id, e->embed_flash, e->enabled_cpus_num, e->enabled_cpus_mask, e->n_batch, e->use_cross_attn,
       reserved_nonzero ? "false" : "true");
}

EXPORT Param rkllm_createDefaultParam(void) {
  Param p;
  memset(&p, 0, sizeof p);
  p.max_context_len = 512;
  p.max_new_tokens = -1;
  p.top_k = 1;
  p.n_keep = -1;
  p.top_p = 0.9f;
  p.temperature = 0.8f;
  p.repeat_penalty = 1.1f;
  p.mirostat_tau = 5.0f;
  p.mirostat_eta = 0.1f;
  p.skip_special_token = true;
  p.extend_param.enabled_cpus_num = 4;
  p.extend_param.enabled_cpus_mask = 0xF0;
  p.extend_param.n_batch = 1;
  Buf b = log_begin("rkllm_createDefaultParam", 0);
  log_line(&b);
  return p;
}

#if FAKE_RKLLM_V == 130
EXPORT int rkllm_init(LLMHandle* handle, Param* param, Callbacks* callbacks)
#else
EXPORT int rkllm_init(LLMHandle* handle, Param* param, ResultCallback callback)
#endif
{
  Buf b = log_begin("rkllm_init", 0);
  int status = 0;
  if (!handle || !param) status = -1;
  else {
    log_param(&b, param);
#if FAKE_RKLLM_V == 130
    bput(&b, ",\"callbacks\":{\"result\":%s,\"result_userdata\":%s,\"tokenizer\":%s,\"embed\":%s}",
         callbacks && callbacks->cb ? "true" : "false", callbacks && callbacks->userdata ? "true" : "false",
         callbacks && callbacks->tok_cb ? "true" : "false", callbacks && callbacks->emb_cb ? "true" : "false");
    if (!callbacks || !callbacks->cb) status = -1;
#else
    bput(&b, ",\"callbacks\":{\"result\":%s}", callback ? "true" : "false");
    if (!callback) status = -1;
#endif
    FILE* model = param->model_path ? fopen(param->model_path, "rb") : NULL;
    if (!model) status = status ? status : -2;
    else fclose(model);
    if (status == 0 && failing("init")) status = -7;
  }
  if (status == 0) {
    Fake* f = calloc(1, sizeof(Fake));
    f->id = atomic_fetch_add(&next_id, 1);
    f->param = *param;
    f->model_path = strdup(param->model_path);
    f->param.model_path = f->model_path;
#if FAKE_RKLLM_V == 130
    f->cb = callbacks->cb;
    f->cb_userdata = callbacks->userdata;
#else
    f->cb = callback;
#endif
    f->prefix = strdup("<user>");
    f->postfix = strdup("</user><assistant>");
    f->system = strdup("");
    atomic_fetch_add(&live_handles, 1);
    *handle = f;
    bput(&b, ",\"created\":%d", f->id);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

static Fake* as_fake(LLMHandle h) { return (Fake*)h; }
static int fid(LLMHandle h) { return h ? as_fake(h)->id : 0; }

EXPORT int rkllm_destroy(LLMHandle handle) {
  Buf b = log_begin("rkllm_destroy", fid(handle));
  int status = handle ? 0 : -1;
  if (handle) {
    Fake* f = as_fake(handle);
    if (atomic_load(&f->running)) bput(&b, ",\"while_running\":true");
    free(f->kv.v); free(f->cache.v); free(f->model_path);
    free(f->system); free(f->prefix); free(f->postfix);
    free(f->tools_system); free(f->tools); free(f->tool_response); free(f->lora);
    free(f);
    atomic_fetch_sub(&live_handles, 1);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_load_lora(LLMHandle handle, LoraAdapter* adapter) {
  Buf b = log_begin("rkllm_load_lora", fid(handle));
  int status = handle && adapter ? 0 : -1;
  if (adapter) {
    bput(&b, ",\"path\":"); bstr(&b, adapter->path);
    bput(&b, ",\"name\":"); bstr(&b, adapter->name);
    bput(&b, ",\"scale\":"); bfloat(&b, adapter->scale);
  }
  if (status == 0 && failing("load_lora")) status = -7;
  if (status == 0) { free(as_fake(handle)->lora); as_fake(handle)->lora = strdup(adapter->name); }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

static const char kCacheMagic[8] = {'F', 'A', 'K', 'E', 'R', 'K', 'P', 'C'};


EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char* path) {
  Buf b = log_begin("rkllm_load_prompt_cache", fid(handle));
  bput(&b, ",\"path\":"); bstr(&b, path);
  int status = handle && path ? 0 : -1;
  if (status == 0 && failing("load_prompt_cache")) status = -7;
  if (status == 0) {
    Fake* f = as_fake(handle);
    FILE* file = fopen(path, "rb");
    char magic[8];
    uint32_t n = 0;
    if (!file || fread(magic, 1, 8, file) != 8 || memcmp(magic, kCacheMagic, 8) != 0 || fread(&n, 4, 1, file) != 1) {
      status = -3;
    } else {
      f->cache.n = 0;
      for (uint32_t i = 0; i < n && status == 0; ++i) {
        int32_t t;
        if (fread(&t, 4, 1, file) != 1) status = -3;
        else tpush(&f->cache, t);
      }
      f->cache_loaded = status == 0;
      if (status == 0) bput(&b, ",\"tokens\":%u", n);
    }
    if (file) fclose(file);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle) {
  Buf b = log_begin("rkllm_release_prompt_cache", fid(handle));
  int status = handle ? 0 : -1;
  if (status == 0 && failing("release_prompt_cache")) status = -7;
  if (status == 0) { as_fake(handle)->cache.n = 0; as_fake(handle)->cache_loaded = false; }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_abort(LLMHandle handle) {
  Buf b = log_begin("rkllm_abort", fid(handle));
  int status = handle ? 0 : -1;
  if (status == 0 && failing("abort")) status = -7;
  if (status == 0) {
    bput(&b, ",\"was_running\":%s", atomic_load(&as_fake(handle)->running) ? "true" : "false");
    /* Kept until the end of the next run, so an abort racing the start of a run still lands. */
    atomic_store(&as_fake(handle)->abort_flag, 1);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_is_running(LLMHandle handle) {
  int running = handle && atomic_load(&as_fake(handle)->running);
#if FAKE_RKLLM_V == 130
  return running ? 1 : 0;
#else
  return running ? 0 : 1; /* 1.2.x: 0 while a task runs */
#endif
}

EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos) {
  Buf b = log_begin("rkllm_clear_kv_cache", fid(handle));
  int status = handle ? 0 : -1;
  bput(&b, ",\"keep_system_prompt\":%d", keep_system_prompt);
  int batches = handle && as_fake(handle)->param.extend_param.n_batch ? as_fake(handle)->param.extend_param.n_batch : 1;
  for (int k = 0; k < 2; ++k) {
    int* pos = k == 0 ? start_pos : end_pos;
    bput(&b, k == 0 ? ",\"start_pos\":" : ",\"end_pos\":");
    if (!pos) { bput(&b, "null"); continue; }
    bput(&b, "[");
    for (int i = 0; i < batches; ++i) bput(&b, i ? ",%d" : "%d", pos[i]);
    bput(&b, "]");
  }
  if (status == 0 && failing("clear_kv_cache")) status = -7;
  if (status == 0) {
    Fake* f = as_fake(handle);
    if (!start_pos && !end_pos) {
      size_t keep = keep_system_prompt ? strlen(f->system) : 0;
      if (f->kv.n > keep) f->kv.n = keep;
    } else if (start_pos && end_pos && start_pos[0] < end_pos[0] && (size_t)end_pos[0] <= f->kv.n) {
      size_t s = (size_t)start_pos[0], e = (size_t)end_pos[0];
      memmove(f->kv.v + s, f->kv.v + e, (f->kv.n - e) * sizeof(int32_t));
      f->kv.n -= e - s;
    }
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes) {
  Buf b = log_begin("rkllm_get_kv_cache_size", fid(handle));
  int status = handle && cache_sizes ? 0 : -1;
  if (status == 0 && failing("get_kv_cache_size")) status = -7;
  if (status == 0) {
    Fake* f = as_fake(handle);
    int batches = f->param.extend_param.n_batch ? f->param.extend_param.n_batch : 1;
    for (int i = 0; i < batches; ++i) cache_sizes[i] = (int)f->kv.n;
    bput(&b, ",\"size\":%zu", f->kv.n);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

static void set_three(char** dst, const char* a, const char* b2, const char* c) {
  const char* src[3] = {a, b2, c};
  for (int i = 0; i < 3; ++i) { free(dst[i]); dst[i] = dup_or_empty(src[i]); }
}

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prefix, const char* postfix) {
  Buf b = log_begin("rkllm_set_chat_template", fid(handle));
  bput(&b, ",\"system_prompt\":"); bstr(&b, system_prompt);
  bput(&b, ",\"prompt_prefix\":"); bstr(&b, prefix);
  bput(&b, ",\"prompt_postfix\":"); bstr(&b, postfix);
  int status = handle ? 0 : -1;
  if (status == 0 && failing("set_chat_template")) status = -7;
  if (status == 0) {
    Fake* f = as_fake(handle);
    char* three[3] = {f->system, f->prefix, f->postfix};
    set_three(three, system_prompt, prefix, postfix);
    f->system = three[0]; f->prefix = three[1]; f->postfix = three[2];
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools, const char* tool_response) {
  Buf b = log_begin("rkllm_set_function_tools", fid(handle));
  bput(&b, ",\"system_prompt\":"); bstr(&b, system_prompt);
  bput(&b, ",\"tools\":"); bstr(&b, tools);
  bput(&b, ",\"tool_response_str\":"); bstr(&b, tool_response);
  int status = handle ? 0 : -1;
  if (status == 0 && failing("set_function_tools")) status = -7;
  if (status == 0) {
    Fake* f = as_fake(handle);
    char* three[3] = {f->tools_system, f->tools, f->tool_response};
    set_three(three, system_prompt, tools, tool_response);
    f->tools_system = three[0]; f->tools = three[1]; f->tool_response = three[2];
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  return status;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, void* params) {
  Buf b = log_begin("rkllm_set_cross_attn_params", fid(handle));
  bput(&b, ",\"status\":%d", handle && params ? 0 : -1);
  log_line(&b);
  return handle && params ? 0 : -1;
}

/* ---- run ---------------------------------------------------------------------------------- */

/* A callback that arrives after its run returned: only the copied function and userdata are used,
 * never the handle, which may be destroyed by then. */
typedef struct { ResultCallback cb; void* userdata; long delay_ms; } LateCall;

static void* late_callback_thread(void* arg) {
  LateCall* late = arg;
  usleep((useconds_t)(late->delay_ms * 1000));
  Result r;
  memset(&r, 0, sizeof r);
  r.text = "LATE";
  r.token_id = 999;
  late->cb(&r, late->userdata, 0);
  r.text = NULL;
  r.token_id = -1;
  late->cb(&r, late->userdata, 2);
  free(late);
  return NULL;
}

typedef struct { char* path; int32_t* tokens; uint32_t n; long delay_ms; } LateCache;


static void write_cache_file(const char* path, const int32_t* tokens, uint32_t n, bool* saved) {
  FILE* file = fopen(path, "wb");
  if (!file) return;
  fwrite(kCacheMagic, 1, 8, file);
  fwrite(&n, 4, 1, file);
  fwrite(tokens, 4, n, file);
  bool ok = fclose(file) == 0;
  if (saved) *saved = ok;
}

static void* late_cache_thread(void* arg) {
  LateCache* late = arg;
  usleep((useconds_t)(late->delay_ms * 1000));
  write_cache_file(late->path, late->tokens, late->n, NULL);
  free(late->path);
  free(late->tokens);
  free(late);
  return NULL;
}

static void start_detached(void* (*body)(void*), void* arg) {
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_create(&thread, &attr, body, arg);
  pthread_attr_destroy(&attr);
}

static const char* const kWords[16] = {"amber", "basil", "cedar", "delta", "ember", "fjord", "gale",  "harbor",
                                       "iris",  "jade",  "kelp",  "lumen", "moss",  "nectar", "onyx", "pearl"};
enum { kNaturalLength = 24 };

static uint64_t hash_tokens(const Tokens* t) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < t->n; ++i) { h ^= (uint32_t)t->v[i]; h *= 1099511628211ull; }
  return h;
}

static void log_input(Buf* b, const Input* in) {
  bput(b, ",\"input\":{\"role\":"); bstr(b, in->role);
  bput(b, ",\"enable_thinking\":%s,\"input_type\":%d", in->enable_thinking ? "true" : "false", in->input_type);
  if (in->input_type == 0) { bput(b, ",\"prompt\":"); bstr(b, in->prompt_input); }
  else if (in->input_type == 1) {
    bput(b, ",\"n_tokens\":%zu,\"input_ids\":[", in->token_input.n_tokens);
    for (size_t i = 0; i < in->token_input.n_tokens; ++i) bput(b, i ? ",%d" : "%d", in->token_input.ids[i]);
    bput(b, "]");
  } else if (in->input_type == 2) {
    bput(b, ",\"n_tokens\":%zu,\"embed_first\":", in->embed_input.n_tokens); bfloat(b, in->embed_input.embed[0]);
  }
  bput(b, "}");
}

static void log_infer(Buf* b, const InferParam* p) {
  bput(b, ",\"infer\":{\"mode\":%d,\"lora\":", p->mode);
  if (p->lora_params) bstr(b, p->lora_params->name); else bput(b, "null");
  bput(b, ",\"prompt_cache\":");
  if (p->prompt_cache_params) {
    bput(b, "{\"save\":%d,\"path\":", p->prompt_cache_params->save); bstr(b, p->prompt_cache_params->path); bput(b, "}");
  } else bput(b, "null");
#if FAKE_RKLLM_V == 130
  bput(b, ",\"sampling\":");
  if (p->sampling_params) {
    const SamplingParam* s = p->sampling_params;
    bput(b, "{\"top_k\":%d,\"top_p\":", s->top_k); bfloat(b, s->top_p);
    bput(b, ",\"temperature\":"); bfloat(b, s->temperature);
    bput(b, ",\"repeat_penalty\":"); bfloat(b, s->repeat_penalty);
    bput(b, ",\"frequency_penalty\":"); bfloat(b, s->frequency_penalty);
    bput(b, ",\"presence_penalty\":"); bfloat(b, s->presence_penalty);
    bput(b, ",\"mirostat\":%d,\"mirostat_tau\":", s->mirostat); bfloat(b, s->mirostat_tau);
    bput(b, ",\"mirostat_eta\":"); bfloat(b, s->mirostat_eta);
    bput(b, "}");
  } else bput(b, "null");
  bput(b, ",\"max_new_tokens\":%d", p->max_new_tokens);
#endif
  bput(b, ",\"keep_history\":%d}", p->keep_history);
}

static int deliver(Fake* f, void* userdata, Result* r, LLMCallState state) {
  void* ud = userdata ? userdata : f->cb_userdata; /* 1.3.0: the run's userdata wins */
  return f->cb(r, ud, state);
}

static int run_impl(LLMHandle handle, Input* input, InferParam* infer, void* userdata, const char* fn) {
  Buf b = log_begin(fn, fid(handle));
  bput(&b, ",\"userdata\":%s", userdata ? "true" : "false");
  if (input) log_input(&b, input);
  if (infer) log_infer(&b, infer);
  int status = handle && input && infer ? 0 : -1;
  Fake* f = as_fake(handle);
  if (status == 0 && atomic_exchange(&f->running, 1)) { bput(&b, ",\"concurrent\":true"); status = -9; }
  else if (status == 0 && failing("run")) { status = -7; atomic_store(&f->running, 0); }
  else if (status == 0 && infer->lora_params && (!f->lora || strcmp(f->lora, infer->lora_params->name) != 0)) {
    status = -4;
    atomic_store(&f->running, 0);
  }
  bput(&b, ",\"status\":%d", status);
  log_line(&b);
  if (status != 0) return status;

  /* The sequence the model sees: kept history, then this input. */
  Tokens seq = {0};
  for (size_t i = 0; i < f->kv.n; ++i) tpush(&seq, f->kv.v[i]);
  size_t prompt_start = seq.n;
  if (input->input_type == 1) {
    for (size_t i = 0; i < input->token_input.n_tokens; ++i) tpush(&seq, input->token_input.ids[i]);
  } else if (input->input_type == 2) {
    for (size_t i = 0; i < input->embed_input.n_tokens; ++i) tpush(&seq, (int32_t)(fabsf(input->embed_input.embed[i]) * 1000.0f) % 256);
  } else {
    if (f->kv.n == 0) tbytes(&seq, f->system);
    tbytes(&seq, f->prefix);
    tbytes(&seq, input->prompt_input);
    tbytes(&seq, f->postfix);
  }
  size_t matched = f->kv.n;
  size_t cached = 0;
  if (f->kv.n == 0 && f->cache_loaded) {
    while (cached < f->cache.n && cached < seq.n && f->cache.v[cached] == seq.v[cached]) ++cached;
    if (cached >= seq.n) cached = seq.n - 1; /* the last token is always evaluated */
    matched = cached;
  }

  long prefill_us = env_long("FAKE_RKLLM_PREFILL_US", 300), token_us = env_long("FAKE_RKLLM_TOKEN_US", 1000);
  Result r;
  memset(&r, 0, sizeof r);
  r.token_id = -1;
  double t0 = now_ms();
  bool aborted = false, paused = false;
  size_t prefilled = 0;
  for (size_t i = matched; i < seq.n; ++i) {
    if (atomic_load(&f->abort_flag)) { aborted = true; break; }
    if (prefill_us > 0) usleep((useconds_t)prefill_us);
    ++prefilled;
  }
  r.perf.prefill_time_ms = (float)(now_ms() - t0);
  r.perf.prefill_tokens = (int)prefilled;
  r.perf.memory_usage_mb = 64.0f + (float)seq.n / 1024.0f;
  size_t prompt_len = seq.n;

  int limit = f->param.max_new_tokens;
#if FAKE_RKLLM_V == 130
  if (infer->max_new_tokens > 0) limit = infer->max_new_tokens;
  bool ignore_eos = f->param.ignore_eos_token;
#else
  bool ignore_eos = false;
#endif
  int natural = ignore_eos ? 1 << 20 : kNaturalLength;
  int count = limit > 0 && limit < natural ? limit : natural;
  int generated = 0;
  double g0 = now_ms();
  float hidden[8], logits[256];
  if (!aborted && failing("run_state")) {
    deliver(f, userdata, &r, 3);
  } else if (!aborted && infer->mode == 0 && env_long("FAKE_RKLLM_SPLIT_UTF8", 0)) {
    /* "é☕😀" = C3 A9 | E2 98 95 | F0 9F 98 80, cut so that every character spans two tokens. */
    static const char* const pieces[5] = {"\xC3", "\xA9\xE2", "\x98", "\x95\xF0\x9F", "\x98\x80"};
    for (int k = 0; k < 5; ++k) {
      r.text = pieces[k];
      r.token_id = 2000 + k;
      ++generated;
      tpush(&seq, r.token_id);
      if (deliver(f, userdata, &r, 0) == 1) { paused = true; break; }
    }
  } else if (!aborted && infer->mode == 0) {
    uint64_t h = hash_tokens(&seq);
    char text[32];
    for (int k = 0; k < count; ++k) {
      if (k == 1 && env_long("FAKE_RKLLM_NEVER_RETURN", 0)) {
        Buf n = log_begin("rkllm_run:stuck", f->id);
        log_line(&n);
        for (;;) sleep(1); /* a runtime that hangs: abort is ignored, the call never returns */
      }
      if (atomic_load(&f->abort_flag)) { aborted = true; break; }
      if (token_us > 0) usleep((useconds_t)token_us);
      h = h * 6364136223846793005ull + 1442695040888963407ull;
      int word = (int)((h >> 33) % 16);
      snprintf(text, sizeof text, "%s%s", k ? " " : "", kWords[word]);
      r.text = text;
      r.token_id = 1000 + word;
      ++generated;
      r.perf.generate_tokens = generated;
      r.perf.generate_time_ms = (float)(now_ms() - g0);
      tpush(&seq, r.token_id);
      if (deliver(f, userdata, &r, 0) == 1) { paused = true; break; }
    }
  } else if (!aborted && infer->mode == 1) {
    for (int i = 0; i < 8; ++i) hidden[i] = (float)((hash_tokens(&seq) >> (i * 4)) & 15) / 16.0f;
    r.hidden = (ResultMatrix){hidden, 8, 1};
    deliver(f, userdata, &r, 0);
  } else if (!aborted && infer->mode == 2) {
    int next = seq.n ? (int)(seq.v[seq.n - 1] + 1) % 256 : 0;
    for (int i = 0; i < 256; ++i) logits[i] = i == next ? 10.0f : -(float)abs(i - next) / 16.0f;
    r.logits = (ResultMatrix){logits, 256, 1};
    deliver(f, userdata, &r, 0);
  }
  r.text = NULL;
  r.token_id = -1;
  r.hidden = (ResultMatrix){0};
  r.logits = (ResultMatrix){0};
  if (!aborted && !paused && !failing("run_state") && !env_long("FAKE_RKLLM_NO_FINISH", 0)) {
    deliver(f, userdata, &r, 2);
    if (env_long("FAKE_RKLLM_AFTER_FINISH", 0) && infer->mode == 0) {
      r.text = "AFTER";
      r.token_id = 998;
      deliver(f, userdata, &r, 0);
      r.text = NULL;
      r.token_id = -1;
    }
  }

  bool saved = false;
  if (infer->prompt_cache_params && infer->prompt_cache_params->save && !aborted) {
    if (failing("save_prompt_cache")) {
      fprintf(stderr, "W rkllm-fake: this model does not support saving prompt cache\n");
    } else {
      const char* path = infer->prompt_cache_params->path ? infer->prompt_cache_params->path : "./prompt_cache.bin";
      uint32_t n = (uint32_t)(prompt_len - prompt_start);
      long late_ms = env_long("FAKE_RKLLM_CACHE_LATE", 0);
      if (late_ms > 0) {
        LateCache* late = calloc(1, sizeof *late);
        late->path = strdup(path);
        late->n = n;
        late->tokens = malloc((n ? n : 1) * sizeof(int32_t));
        memcpy(late->tokens, seq.v + prompt_start, n * sizeof(int32_t));
        late->delay_ms = late_ms;
        start_detached(late_cache_thread, late);
      } else {
        write_cache_file(path, seq.v + prompt_start, n, &saved);
      }
    }
  }
  if (infer->keep_history && !aborted) {
    f->kv.n = 0;
    for (size_t i = 0; i < seq.n; ++i) tpush(&f->kv, seq.v[i]);
  } else {
    f->kv.n = 0;
  }
  free(seq.v);

  Buf e = log_begin("rkllm_run:end", f->id);
  bput(&e, ",\"prompt_tokens\":%zu,\"cached_tokens\":%zu,\"history_tokens\":%zu,\"prefill_tokens\":%zu,\"generated\":%d",
       prompt_len - prompt_start, cached, prompt_start, prefilled, generated);
  bput(&e, ",\"aborted\":%s,\"paused\":%s,\"saved_prompt_cache\":%s", aborted ? "true" : "false", paused ? "true" : "false",
       saved ? "true" : "false");
  log_line(&e);
  atomic_store(&f->abort_flag, 0);
  atomic_store(&f->running, 0);
  long late_ms = env_long("FAKE_RKLLM_LATE_CALLBACK", 0);
  if (late_ms > 0) {
    LateCall* late = calloc(1, sizeof *late);
    late->cb = f->cb;
    late->userdata = userdata ? userdata : f->cb_userdata;
    late->delay_ms = late_ms;
    start_detached(late_callback_thread, late);
  }
  return 0;
}

EXPORT int rkllm_run(LLMHandle handle, Input* input, InferParam* infer, void* userdata) {
  return run_impl(handle, input, infer, userdata, "rkllm_run");
}

EXPORT int rkllm_run_async(LLMHandle handle, Input* input, InferParam* infer, void* userdata) {
  /* kvstash never calls it; synchronous here, which the ABI allows a caller to observe anyway. */
  return run_impl(handle, input, infer, userdata, "rkllm_run_async");
}
