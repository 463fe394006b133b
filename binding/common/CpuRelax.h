// A hint to the CPU inside a spin-wait loop: lets the sibling hyper-thread run and saves power.
#pragma once

namespace kvstash {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace kvstash
