import { native } from '../binding.js';
import { readGgufHeader } from '../models/gguf.js';
import { replaceFileAtomic } from '../util/atomic-file.js';
import { requireString } from '../util/validate.js';

export type QuantizeType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0' | 'q5_0' | 'q4_k' | 'q5_k' | 'q6_k';

/**
 * Quantizes a GGUF model with llama.cpp's quantizer (k-quants as the usual *_M mixes). The source
 * is checked first; the destination appears atomically.
 */
export async function quantizeModel(source: string, destination: string, type: QuantizeType, options: { threads?: number } = {}): Promise<void> {
  requireString(source, 'source');
  requireString(destination, 'destination');
  await readGgufHeader(source);
  await replaceFileAtomic(destination, (temporary) => native().quantize(source, temporary, type, options.threads ?? 0));
}
