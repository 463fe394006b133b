/**
 * The synthetic models of `kvstash demo`, `kvstash chat` and the benchmark: written once into a
 * cache directory and reused.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { writeSyntheticModel, type SyntheticShapeName, type SyntheticWeightType } from '../models/synthetic.js';
import { isProcessAlive } from '../util/process.js';
import type { Ui } from './status.js';

export interface SyntheticModelSpec {
  shape: SyntheticShapeName;
  type: SyntheticWeightType;
  seed: number;
}

/** The demo's model (and chat's default): a Qwen2-0.5B shape with random q4_k weights. */
export const DEMO_SYNTHETIC = { shape: 'qwen2-0.5b', type: 'q4_k', seed: 1 } as const satisfies SyntheticModelSpec;

/** The cached synthetic model `model` under `root`/models, written on first use (announced on stderr). */
export async function syntheticModelPath(root: string, signal: AbortSignal, ui: Ui, model: SyntheticModelSpec = DEMO_SYNTHETIC): Promise<string> {
  const dir = path.join(root, 'models');
  const file = path.join(dir, `synthetic-${model.shape}-${model.type}-seed${model.seed}.gguf`);
  if (fs.existsSync(file)) return file;
  await fsp.mkdir(dir, { recursive: true });
  await removeAbandonedStaging(dir);
  process.stderr.write(
    `First run: writing the synthetic ${model.shape} model to ${ui.showPath(file)}.\n` +
      `This happens once: about 1 GB of f16 weights are written, then quantized to ${model.type} (from under a minute to a few\n` +
      'minutes, depending on the machine). Later runs reuse the file.\n',
  );
  // Everything is written inside one staging directory, so an interrupt cleans up by removing it.
  const staging = await fsp.mkdtemp(path.join(dir, `.writing-${process.pid}-`));
  try {
    const staged = path.join(staging, path.basename(file));
    await ui.status('Writing the synthetic model', () =>
      // The writer cannot be cancelled; on SIGINT stop waiting for it (the process then exits).
      Promise.race([writeSyntheticModel({ ...model, path: staged }), rejectOnAbort(signal)]),
    );
    await fsp.rename(staged, file);
  } finally {
    await fsp.rm(staging, { recursive: true, force: true });
  }
  return file;
}

/** Removes staging directories of writers that died (SIGKILL, power loss): each holds up to 1 GB. */
async function removeAbandonedStaging(dir: string): Promise<void> {
  for (const name of await fsp.readdir(dir)) {
    const pid = /^\.writing-(\d+)-/.exec(name)?.[1];
    if (pid !== undefined && !isProcessAlive(Number(pid))) await fsp.rm(path.join(dir, name), { recursive: true, force: true });
  }
}

function rejectOnAbort(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
}
