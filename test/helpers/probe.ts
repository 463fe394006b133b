/** Comparing what a sequence holds, cell by cell, through what it predicts. */
import type { Context, Model } from '../../lib/index.js';

/**
 * The next-token logits of what sequence 0 of `context` holds, for a fixed probe token (the probe's
 * cell is removed again). Replies alone prove little with the synthetic models: the tiny model's
 * greedy replies are the same few tokens whatever it was told, while these logits change with
 * every cell (one wrong or missing token moves them by more than 1e-2).
 */
export async function probeLogits(model: Model, context: Context): Promise<Float32Array> {
  const end = (await context.exclusive(() => context.memory.range(0))).max + 1;
  await context.decode(model.tokenize(' cache', { addSpecial: false }), { start: end });
  const logits = context.logits();
  await context.exclusive(() => context.memory.remove(0, end));
  return logits;
}
