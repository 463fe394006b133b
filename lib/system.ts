import { native } from './binding.js';

export interface SystemInfo {
  /** The llama.cpp commit compiled in. */
  llamaCommit: string;
  /** llama.cpp's report of the CPU features its kernels use. */
  cpuFeatures: string;
  /** Which prebuilt CPU level the loader chose (e.g. 'x86-64-v3', 'armv8-a'), or 'source' for an
   * addon built on this machine. */
  cpuVariant: string;
}

/** What the native build is and runs on. */
export function systemInfo(): SystemInfo {
  const binding = native();
  return { llamaCommit: binding.llamaCommit, cpuFeatures: binding.systemInfo(), cpuVariant: binding.cpuVariant ?? 'source' };
}
