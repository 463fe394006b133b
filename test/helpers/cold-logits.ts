/** What a restore must reproduce: the logits of a cold prefill, and the problems a cache reports. */
import type { CacheProblem, Model, PromptCache } from '../../lib/index.js';

/**
 * A memoized cold prefill of `tokens` in two batches, [0, split) and the rest: what a restore of
 * `split` tokens followed by the rest computes (batch boundaries change the floating-point sums).
 */
export function coldLogitsOf(model: Model): (tokens: Int32Array, split?: number) => Promise<Float32Array> {
  const known = new Map<string, Float32Array>();
  return async (tokens, split = 0) => {
    const id = `${split}:${tokens.join(',')}`;
    if (known.has(id)) return known.get(id)!;
    const context = await model.createContext({ contextSize: 1024 });
    if (split > 0) await context.decode(tokens.subarray(0, split), { logits: 'none' });
    await context.decode(tokens.subarray(split), { start: split });
    const logits = context.logits();
    await context.dispose();
    known.set(id, logits);
    return logits;
  };
}

/** Every problem `cache` reports from now on. */
export function problemsOf(cache: PromptCache): CacheProblem[] {
  const problems: CacheProblem[] = [];
  cache.on('problem', (p: CacheProblem) => problems.push(p));
  return problems;
}
