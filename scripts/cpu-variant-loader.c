// prebuilds/linux-arm64/kvstash.node: a small loader that picks, at load time, which of the two
// arm64 builds of the addon this CPU can run, and hands Node's module registration to it.
//
// Why a loader: llama.cpp compiles its fast ARM kernels (dotprod, fp16 arithmetic) in only when the
// compiler targets those features, and its own run-time choice between CPU variants
// (GGML_CPU_ALL_VARIANTS) needs GGML_BACKEND_DL, which needs shared ggml libraries; kvstash links
// llama.cpp statically into one addon. So scripts/arm64.sh builds the whole addon twice, and this
// loader chooses by the features the kernel reports (getauxval, the same source ggml uses):
//   kvstash-armv8.2-a+dotprod+fp16.so  RK3588 (Cortex-A76/A55) and any core with dotprod + fp16
//   kvstash-armv8-a.so                 every other arm64 core (Raspberry Pi 4's Cortex-A72, ...)
// Both sit next to this file. KVSTASH_ARM64_VARIANT=armv8-a or armv8.2-a+dotprod+fp16 forces one
// (for diagnosis and for the tests that prove which kernels run).
// Their names do not end in .node, so node-gyp-build only ever picks this loader.
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#include <node_api.h>

#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1UL << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1UL << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif

static const char FAST_VARIANT[] = "armv8.2-a+dotprod+fp16";
static const char GENERIC_VARIANT[] = "armv8-a";

typedef napi_value (*register_fn)(napi_env, napi_value);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static register_fn variant_register;
static char failure[PATH_MAX + 512];

static const char* chosen_variant(void) {
  const char* forced = getenv("KVSTASH_ARM64_VARIANT");
  if (forced && *forced) return forced;
  unsigned long hwcap = getauxval(AT_HWCAP);
  unsigned long needed = HWCAP_ASIMDDP | HWCAP_FPHP | HWCAP_ASIMDHP;
  return (hwcap & needed) == needed ? FAST_VARIANT : GENERIC_VARIANT;
}

static void load_variant(void) {
  Dl_info self;
  if (!dladdr((void*)&load_variant, &self) || !self.dli_fname) {
    snprintf(failure, sizeof failure, "kvstash arm64 loader: cannot find its own path");
    return;
  }
  char path[PATH_MAX];
  const char* slash = strrchr(self.dli_fname, '/');
  int dir_length = slash ? (int)(slash - self.dli_fname) : 1;
  const char* dir = slash ? self.dli_fname : ".";
  const char* variant = chosen_variant();
  snprintf(path, sizeof path, "%.*s/kvstash-%s.so", dir_length, dir, variant);
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    snprintf(failure, sizeof failure, "kvstash arm64 loader: cannot load the %s build: %s", variant, dlerror());
    return;
  }
  variant_register = (register_fn)dlsym(handle, "napi_register_module_v1");
  if (!variant_register) snprintf(failure, sizeof failure, "kvstash arm64 loader: %s has no napi_register_module_v1", path);
}

NAPI_MODULE_INIT() {
  pthread_once(&once, load_variant);
  if (!variant_register) {
    napi_throw_error(env, "E_NATIVE_UNAVAILABLE", failure);
    return NULL;
  }
  return variant_register(env, exports);
}
