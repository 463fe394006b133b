import { native } from './binding.js';

/** What the native build is and runs on: llama.cpp commit and the CPU features it uses. */
export function systemInfo(): { llamaCommit: string; cpuFeatures: string } {
  const binding = native();
  return { llamaCommit: binding.llamaCommit, cpuFeatures: binding.systemInfo() };
}
