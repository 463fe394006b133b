// Restore equals recompute: a saved prefix, loaded into a fresh context, gives exactly the logits
// of evaluating the prefix there.
import path from 'node:path';
import t, { type Test } from 'tap';
import { loadModel, type Context, type Model } from '../lib/index.js';
import { bitIdentical, maxAbsDiff, promptTokens, tinyModel } from './helpers/fixtures.js';

const PREFIX = 320;
const SUFFIX = 24;

let model: Model;
let prefix: Int32Array;
let suffix: Int32Array;

t.before(async () => {
  model = await loadModel(await tinyModel());
  prefix = promptTokens(model, PREFIX, 1);
  suffix = promptTokens(model, SUFFIX, 2);
});
t.teardown(() => model.dispose());

/** Logits of every suffix token after the prefix, evaluated in `context` in sequence `sequence`. */
async function suffixLogits(context: Context, sequence: number): Promise<Float32Array[]> {
  await context.decode(suffix, { sequence, start: PREFIX, logits: 'all' });
  return Array.from({ length: SUFFIX }, (_, i) => context.logits(i));
}

async function recompute(sequences: number, sequence: number): Promise<{ context: Context; logits: Float32Array[] }> {
  const context = await model.createContext({ contextSize: 1024, sequences });
  await context.decode(prefix, { sequence, start: 0 });
  return { context, logits: await suffixLogits(context, sequence) };
}

function assertIdentical(t: Test, restored: Float32Array[], reference: Float32Array[]): void {
  t.equal(restored.length, reference.length);
  const identical = restored.every((row, i) => bitIdentical(row, reference[i]!));
  t.ok(identical, `all ${reference.length} suffix logit rows bit-identical (max |diff| ${Math.max(...restored.map((r, i) => maxAbsDiff(r, reference[i]!)))})`);
}

for (const [sequences, sequence] of [
  [1, 0],
  [4, 3],
] as const) {
  t.test(`sequence ${sequence} of a ${sequences}-sequence context`, async (t) => {
    const reference = await recompute(sequences, sequence);
    const dir = t.testdir();
    const file = path.join(dir, 'prefix.state');
    // Save the prefix only: trim the suffix off the reference context first.
    t.equal(reference.context.memory.remove(sequence, PREFIX), true);
    const saved = await reference.context.saveState(file, { sequence, tokens: prefix });
    t.ok(saved.bytes > reference.context.stateSize({ sequence }) - 1024, 'the file holds the KV state');
    const exported = await reference.context.exportState({ sequence });
    t.equal(exported.length, reference.context.stateSize({ sequence }));

    t.test('through a state file', async (t) => {
      const fresh = await model.createContext({ contextSize: 1024, sequences });
      const tokens = await fresh.loadState(file, { sequence });
      t.same(Array.from(tokens), Array.from(prefix), 'the file returns the prefix tokens');
      t.same(fresh.memory.range(sequence), { min: 0, max: PREFIX - 1 });
      assertIdentical(t, await suffixLogits(fresh, sequence), reference.logits);
      await fresh.dispose();
    });

    t.test('through exported bytes', async (t) => {
      const fresh = await model.createContext({ contextSize: 1024, sequences });
      await fresh.importState(exported, { sequence });
      t.same(fresh.memory.range(sequence), { min: 0, max: PREFIX - 1 });
      assertIdentical(t, await suffixLogits(fresh, sequence), reference.logits);
      await fresh.dispose();
    });

    t.teardown(() => reference.context.dispose());
  });
}

t.test('the whole context (no sequence) round-trips too', async (t) => {
  const reference = await recompute(2, 1);
  reference.context.memory.remove(1, PREFIX);
  const state = await reference.context.exportState();
  const file = path.join(t.testdir(), 'whole.state');
  await reference.context.saveState(file, { tokens: prefix });
  for (const restore of [
    (c: Context) => c.importState(state),
    async (c: Context) => void t.same(Array.from(await c.loadState(file)), Array.from(prefix)),
  ]) {
    const fresh = await model.createContext({ contextSize: 1024, sequences: 2 });
    await restore(fresh);
    assertIdentical(t, await suffixLogits(fresh, 1), reference.logits);
    await fresh.dispose();
  }
  await reference.context.dispose();
});

t.test('a restored prefix trimmed back equals recomputing the shorter prefix', async (t) => {
  const cut = PREFIX - 40;
  const short = await model.createContext({ contextSize: 1024 });
  await short.decode(prefix.subarray(0, cut), { start: 0 });
  await short.decode(suffix, { start: cut, logits: 'all' });
  const reference = Array.from({ length: SUFFIX }, (_, i) => short.logits(i));

  const long = await model.createContext({ contextSize: 1024 });
  await long.decode(prefix, { start: 0 });
  const state = await long.exportState({ sequence: 0 });
  const fresh = await model.createContext({ contextSize: 1024 });
  await fresh.importState(state, { sequence: 0 });
  t.equal(fresh.memory.remove(0, cut), true);
  await fresh.decode(suffix, { start: cut, logits: 'all' });
  const trimmed = Array.from({ length: SUFFIX }, (_, i) => fresh.logits(i));
  // The trimmed cells are free again, and the suffix lands in them exactly as in the short run.
  assertIdentical(t, trimmed, reference);
  await Promise.all([short.dispose(), long.dispose(), fresh.dispose()]);
});

t.test('a prefix copied between sequences with memory.copy', async (t) => {
  const reference = await recompute(1, 0);
  for (const unifiedKv of [true, false]) {
    const context = await model.createContext({ contextSize: 2048, sequences: 2, unifiedKv });
    await context.decode(prefix, { sequence: 0, start: 0 });
    context.memory.copy(0, 1);
    t.same(context.memory.range(1), { min: 0, max: PREFIX - 1 }, 'the copy holds the prefix');
    const logits = await suffixLogits(context, 1);
    // The copy's KV cells are shared (unified cache) or copied bit for bit into another stream, and
    // the suffix runs through the same kernels. What may differ is the order and padding of the
    // cells the attention sums over, an f16-accumulated sum over < 400 cells: a reordering moves
    // O(1) logits by a few f16 ulps (2^-11 relative), so 2e-3 bounds it, while a missing prefix
    // moves them by > 1e-1 (asserted below).
    const worst = Math.max(...logits.map((row, i) => maxAbsDiff(row, reference.logits[i]!)));
    t.ok(worst < 2e-3, `unifiedKv ${unifiedKv}: max |diff| ${worst} < 2e-3`);
    await context.dispose();
  }
  const empty = await model.createContext({ contextSize: 1024 });
  await empty.decode(suffix, { start: PREFIX, logits: 'all' });
  const without = maxAbsDiff(empty.logits(0), reference.logits[0]!);
  t.ok(without > 1e-1, `without the prefix the logits differ by ${without}`);
  await Promise.all([empty.dispose(), reference.context.dispose()]);
});
