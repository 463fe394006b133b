// prebuilds/linux-<arch>/kvstash.node: a small loader that picks, at load time, the fastest build of
// the addon this CPU can run, and hands Node's module registration to it.
//
// Why a loader: llama.cpp compiles its fast kernels (AVX2, AVX-512, ARM dotprod/fp16) in only when
// the compiler targets those features, and its own run-time choice among CPU variants
// (GGML_CPU_ALL_VARIANTS) needs GGML_BACKEND_DL, which needs shared ggml libraries; kvstash links
// llama.cpp statically into one self-contained addon. So scripts/prebuild.js builds the whole addon
// once per CPU level (the levels and their compiler flags are listed in scripts/cpu-variants.js; the
// names below must match them), and this loader chooses by what the CPU and kernel report:
//   x86-64  x86-64-v4+vnni  AVX-512 F/BW/CD/DQ/VL + VNNI + VBMI (Ice Lake and later, Zen 4 and later)
//           x86-64-v4       AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Cascade Lake without VBMI)
//           x86-64-v3       AVX2, FMA, F16C, BMI2 (Haswell and later, Zen 1 and later)
//           x86-64-v2       SSE4.2, SSSE3, POPCNT: the floor; older CPUs must build from source
//   arm64   armv8.2-a+dotprod+fp16  RK3588 (Cortex-A76/A55) and any core with dotprod + fp16
//           armv8-a                 every other arm64 core (Raspberry Pi 4's Cortex-A72, ...)
// The x86 checks use GCC's __builtin_cpu_supports, which also requires the kernel to save the
// AVX/AVX-512 registers (XCR0), so a CPU whose OS disabled AVX-512 gets the AVX2 build. The arm64
// checks read the kernel's HWCAP, the same source ggml uses.
//
// The builds sit next to this file as kvstash-<variant>.so; their names do not end in .node, so
// node-gyp-build only ever picks this loader. KVSTASH_CPU_VARIANT=<variant> forces one (for
// diagnosis and for the checks that prove which kernels run). The chosen name is published on the
// module as `cpuVariant`.
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <node_api.h>

#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1UL << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1UL << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

typedef napi_value (*register_fn)(napi_env, napi_value);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static register_fn variant_register;
static const char* loaded_variant;
static char failure[PATH_MAX + 512];

// The best variant this CPU runs, or NULL with `failure` set.
static const char* best_variant(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("avx512vbmi"))
    return "x86-64-v4+vnni";
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  if (__builtin_cpu_supports("x86-64-v2")) return "x86-64-v2";
  snprintf(failure, sizeof failure,
           "kvstash loader: this CPU lacks SSE4.2 (x86-64-v2), the oldest level kvstash ships prebuilt; "
           "install with `npm install kvstash --build-from-source`");
  return NULL;
#elif defined(__aarch64__)
  unsigned long hwcap = getauxval(AT_HWCAP);
  unsigned long needed = HWCAP_ASIMDDP | HWCAP_FPHP | HWCAP_ASIMDHP;
  return (hwcap & needed) == needed ? "armv8.2-a+dotprod+fp16" : "armv8-a";
#else
#error "kvstash ships prebuilt CPU variants for x86-64 and aarch64 only"
#endif
}

static void load_variant(void) {
  const char* forced = getenv("KVSTASH_CPU_VARIANT");
  const char* variant = forced && *forced ? forced : best_variant();
  if (!variant) return;
  Dl_info self;
  if (!dladdr((void*)&load_variant, &self) || !self.dli_fname) {
    snprintf(failure, sizeof failure, "kvstash loader: cannot find its own path");
    return;
  }
  char path[PATH_MAX];
  const char* slash = strrchr(self.dli_fname, '/');
  int dir_length = slash ? (int)(slash - self.dli_fname) : 1;
  const char* dir = slash ? self.dli_fname : ".";
  snprintf(path, sizeof path, "%.*s/kvstash-%s.so", dir_length, dir, variant);
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    snprintf(failure, sizeof failure, "kvstash loader: cannot load the %s build: %s", variant, dlerror());
    return;
  }
  variant_register = (register_fn)dlsym(handle, "napi_register_module_v1");
  if (!variant_register) {
    snprintf(failure, sizeof failure, "kvstash loader: %s has no napi_register_module_v1", path);
    return;
  }
  loaded_variant = variant;
}

NAPI_MODULE_INIT() {
  pthread_once(&once, load_variant);
  if (!variant_register) {
    napi_throw_error(env, "E_NATIVE_UNAVAILABLE", failure);
    return NULL;
  }
  napi_value result = variant_register(env, exports);
  napi_value name;
  if (result && napi_create_string_utf8(env, loaded_variant, NAPI_AUTO_LENGTH, &name) == napi_ok) {
    napi_set_named_property(env, result, "cpuVariant", name);
  }
  return result;
}
