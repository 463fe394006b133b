import { native, type NativeSampler } from '../binding.js';
import { KvstashError } from '../errors.js';
import { INT32_MAX, INT32_MIN, requireInteger, requireNumber, toInt32Array } from '../util/validate.js';
import type { Context } from './context.js';

export interface SamplingOptions {
  /** 0 (the default) is greedy: always the most likely token. */
  temperature?: number;
  /** Keep only the k most likely tokens; 0 disables. Default 40 when temperature > 0. */
  topK?: number;
  /** Nucleus sampling threshold; 1 disables. Default 0.95 when temperature > 0. */
  topP?: number;
  /** Drop tokens below minP × the top probability; 0 disables. Default 0.05 when temperature > 0. */
  minP?: number;
  /** Penalty for repeating recent tokens; 1 disables. Default 1. */
  repeatPenalty?: number;
  /** How many recent tokens the penalties look at. Default 64. Unit: tokens. */
  repeatLastN?: number;
  /** Default 0. */
  frequencyPenalty?: number;
  /** Default 0. */
  presencePenalty?: number;
  /** Random seed: the same seed and logits give the same tokens. Default 0. */
  seed?: number;
}

/** Picks tokens from the logits a context kept. Holds the penalty history of what it picked. */
export class Sampler {
  private readonly handle: NativeSampler;
  private disposed = false;
  private readonly vocabSize: number;

  /** @internal Use model.createSampler(). */
  constructor(options: SamplingOptions, vocabSize: number) {
    this.vocabSize = vocabSize;
    const temperature = requireNumber(options.temperature ?? 0, 'temperature', 0, 100);
    const random = temperature > 0;
    this.handle = new (native().LlamaSampler)({
      temperature,
      topK: requireInteger(options.topK ?? (random ? 40 : 0), 'topK', 0, vocabSize),
      topP: requireNumber(options.topP ?? (random ? 0.95 : 1), 'topP', Number.MIN_VALUE, 1),
      minP: requireNumber(options.minP ?? (random ? 0.05 : 0), 'minP', 0, 1),
      repeatPenalty: requireNumber(options.repeatPenalty ?? 1, 'repeatPenalty', Number.MIN_VALUE, 100),
      repeatLastN: requireInteger(options.repeatLastN ?? 64, 'repeatLastN', 0, 1 << 20),
      frequencyPenalty: requireNumber(options.frequencyPenalty ?? 0, 'frequencyPenalty', -100, 100),
      presencePenalty: requireNumber(options.presencePenalty ?? 0, 'presencePenalty', -100, 100),
      seed: requireInteger(options.seed ?? 0, 'seed', 0, 0xffffffff),
      vocabSize,
    });
  }

  /** Samples from output `index` of the context's last decode (default: its last token) and adds
   * the token to the penalty history. */
  sample(context: Context, index = -1): number {
    this.requireLive();
    context.requireLive();
    requireInteger(index, 'index', INT32_MIN, INT32_MAX);
    return this.handle.sample(context.handle, index);
  }

  /** Adds tokens (a prompt, say) to the penalty history without sampling. */
  accept(tokens: Int32Array | readonly number[]): void {
    this.requireLive();
    const accepted = toInt32Array(tokens, 'tokens');
    // The penalty sampler counts tokens by id: one outside the vocabulary is no token at all.
    for (let i = 0; i < accepted.length; i++) {
      if (accepted[i]! < 0 || accepted[i]! >= this.vocabSize) {
        throw new KvstashError('E_TOKEN_INVALID', `tokens[${i}] = ${accepted[i]} is not a token of this model (vocabulary size ${this.vocabSize})`);
      }
    }
    this.handle.accept(accepted);
  }

  reset(): void {
    this.requireLive();
    this.handle.reset();
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.handle.dispose();
  }

  private requireLive(): void {
    if (this.disposed) throw new KvstashError('E_DISPOSED', 'the sampler was disposed');
  }
}
