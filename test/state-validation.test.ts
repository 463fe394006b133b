// Cache entries whose checksums are valid but whose state lies (re-signed after the change): each is
// refused with a coded error before llama.cpp sizes anything by it, a proven lie is removed, and
// generation falls back to exactly the output of a full prefill.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { entryKey, readVerifiedEntry, writeEntry, type EntryHeader } from '../lib/cache/entry.js';
import { generate, KvstashError, loadModel, PromptCache, type Context, type Model } from '../lib/index.js';
import { promptTokens, tinyModel } from './helpers/fixtures.js';
import { cloneState, keepCells, parseState, serializeState, type SequenceState } from './helpers/sequence-state.js';

const PREFIX = 20;
let model: Model;
let context: Context;
let prompt: Int32Array;
/** What a full prefill of `prompt` generates (greedy). */
let reference: number[];
/** A true entry: the header and state of the first PREFIX tokens of `prompt`. */
let baseHeader: EntryHeader;
let basePayload: Buffer;
let baseState: SequenceState;

t.before(async () => {
  model = await loadModel(await tinyModel());
  // One thread: the suite runs beside other work, where llama.cpp's spinning threads crawl.
  context = await model.createContext({ contextSize: 256, threads: 1 });
  prompt = new Int32Array([...promptTokens(model, PREFIX, 61), ...promptTokens(model, 16, 62)]);
  reference = Array.from((await generate(context, { prompt, maxTokens: 8 }).result).tokens);
  const dir = t.testdir({});
  const cache = new PromptCache({ dir, maxRamBytes: 0 });
  await cache.warm(context, prompt.subarray(0, PREFIX));
  await cache.flush();
  const [name] = fs.readdirSync(dir);
  ({ payload: basePayload } = await readVerifiedEntry(path.join(dir, name!)));
  baseHeader = (await readVerifiedEntry(path.join(dir, name!))).entry.header;
  baseState = parseState(basePayload);
});
t.teardown(() => model.dispose());

/** Writes a signed entry (valid digests and checksum) with this header's tokens and this payload. */
async function writeLie(dir: string, tokens: number, payload: Buffer): Promise<string> {
  const header: EntryHeader = { ...baseHeader, tokens: Array.from(prompt.subarray(0, tokens)), tokenCount: tokens, payloadBytes: payload.length };
  const file = path.join(dir, `${entryKey(header)}.kvstash`);
  await writeEntry(file, header, payload);
  return file;
}

function withState(change: (state: SequenceState) => void): Buffer {
  const state = cloneState(baseState);
  change(state);
  return serializeState(state);
}

function mutateLayerRow(state: SequenceState, which: 'k' | 'v', rowBytes: bigint): void {
  state[which][0]!.rowBytes = rowBytes;
}

interface Lie {
  name: string;
  tokens?: number;
  payload: () => Buffer;
  /** E_CACHE_CORRUPT (a proven lie: removed) unless the state is merely for another context. */
  code?: 'E_CACHE_CORRUPT' | 'E_CACHE_MISMATCH';
}

const lies: Lie[] = [
  // The header's token count against the state's cells.
  ...[-4, -1, 1, 5, 10].map((k) => ({ name: `header lists ${PREFIX + k} tokens over ${PREFIX} cells`, tokens: PREFIX + k, payload: () => basePayload })),
  ...[1, 5, 19].map((k) => ({ name: `state holds ${PREFIX - k} cells under a header of ${PREFIX}`, payload: () => serializeState(keepCells(baseState, PREFIX - k)) })),
  // Cell counts the bytes cannot back.
  ...[2 ** 28, 2 ** 32 - 1, PREFIX + 1, 257].map((n) => ({ name: `cell count ${n}`, payload: () => withState((s) => (s.cellCounts[0] = n)) })),
  { name: 'cell count 19 over 20 cells', payload: () => withState((s) => (s.cellCounts[0] = PREFIX - 1)) },
  // Positions.
  ...[1, 100, 236, 2 ** 31 - 30].map((d) => ({ name: `every position moved by ${d}`, payload: () => withState((s) => s.cells.forEach((c) => (c.pos += d))) })),
  { name: 'position -1', payload: () => withState((s) => (s.cells[0]!.pos = -1)) },
  { name: 'position -2^31', payload: () => withState((s) => (s.cells[5]!.pos = -(2 ** 31))) },
  { name: 'position 2^31-1', payload: () => withState((s) => (s.cells[7]!.pos = 2 ** 31 - 1)) },
  { name: 'a gap (last cell at 25)', payload: () => withState((s) => (s.cells[PREFIX - 1]!.pos = 25)) },
  { name: 'a duplicate position', payload: () => withState((s) => (s.cells[PREFIX - 1]!.pos = 3)) },
  // Sequence ids.
  ...[-1, 256, 1e9].map((id) => ({ name: `cell names sequence ${id}`, payload: () => withState((s) => (s.cells[3]!.seqs = [id])) })),
  { name: 'cell in no sequence', payload: () => withState((s) => (s.cells[3]!.seqs = [])) },
  { name: 'cell in two sequences', payload: () => withState((s) => (s.cells[3]!.seqs = [0, 1])) },
  { name: 'n_seq_id 2^31 with one id', payload: () => withState((s) => (s.cells[3]!.nSeqId = 2 ** 31)) },
  { name: 'source sequence 300', payload: () => withState((s) => (s.source = 300)) },
  { name: 'wrong magic', payload: () => withState((s) => (s.magic = 0x12345678)) },
  // Streams.
  ...[0, 2 ** 31].map((n) => ({ name: `${n} streams`, payload: () => withState((s) => (s.nStream = n)) })),
  { name: '2 streams (another context)', payload: () => withState((s) => (s.nStream = 2)), code: 'E_CACHE_MISMATCH' as const },
  // Layers, types and row sizes.
  ...[0, 1, 3, 2 ** 31].map((n) => ({ name: `${n} layers`, payload: () => withState((s) => (s.nLayer = n)) })),
  ...[999, -1].map((type) => ({ name: `K type ${type}`, payload: () => withState((s) => (s.k[0]!.type = type)) })),
  ...[0n, 65n, 128n, 2n ** 63n, 2n ** 64n - 1n].map((row) => ({ name: `K row size ${row}`, payload: () => withState((s) => mutateLayerRow(s, 'k', row)) })),
  ...[0n, 63n, 2n ** 62n].map((row) => ({ name: `V row size ${row}`, payload: () => withState((s) => mutateLayerRow(s, 'v', row)) })),
  ...[1, 2, 2 ** 32 - 1].map((flag) => ({ name: `V-transposed flag ${flag}`, payload: () => withState((s) => (s.vTrans = flag)) })),
  // Length.
  { name: '4 bytes after the state', payload: () => withState((s) => (s.trailing = Buffer.alloc(4))) },
  { name: 'the last 8 bytes cut off', payload: () => basePayload.subarray(0, basePayload.length - 8) },
];

t.test('every lying entry is refused with a coded error, removed, and generation equals a full prefill', async (t) => {
  const rssBefore = process.memoryUsage().rss;
  const root = t.testdir({});
  for (const [i, lie] of lies.entries()) {
    const dir = path.join(root, String(i));
    fs.mkdirSync(dir);
    const file = await writeLie(dir, lie.tokens ?? PREFIX, lie.payload());
    const cache = new PromptCache({ dir, maxRamBytes: 0 });
    const problems: Array<{ code: string; message: string }> = [];
    cache.on('problem', (p) => problems.push(p));
    await context.exclusive(() => context.memory.clear());
    const result = await generate(context, { prompt, cache, maxTokens: 8 }).result;
    await cache.flush();
    const code = lie.code ?? 'E_CACHE_CORRUPT';
    t.same(Array.from(result.tokens), reference, `${lie.name}: the output of a full prefill`);
    t.equal(result.cachedTokens, 0, `${lie.name}: nothing restored`);
    t.same(problems.map((p) => p.code), [code], `${lie.name}: reported as ${code} (${problems[0]?.message ?? 'no problem reported'})`);
    t.equal(fs.existsSync(file), code !== 'E_CACHE_CORRUPT', `${lie.name}: ${code === 'E_CACHE_CORRUPT' ? 'removed' : 'kept'}`);
    // A later generate() is not broken by what the lie left behind.
    await context.exclusive(() => context.memory.clear());
    const again = await generate(context, { prompt, cache, maxTokens: 8 }).result;
    t.same(Array.from(again.tokens), reference, `${lie.name}: a later generate() too`);
  }
  // The 2^28-cell claim made llama.cpp allocate gigabytes before any bound check.
  t.ok(process.memoryUsage().rss - rssBefore < 256 * 2 ** 20, 'no large allocation for any claim');
});

t.test('the true entry still restores, and a permutation of its positions gives the same output', async (t) => {
  const reversed = withState((s) => s.cells.forEach((c) => (c.pos = PREFIX - 1 - c.pos)));
  const root = t.testdir({});
  for (const [name, payload] of [['true entry', basePayload], ['positions in reverse cell order', reversed]] as const) {
    const dir = path.join(root, name.replaceAll(' ', '-'));
    fs.mkdirSync(dir);
    await writeLie(dir, PREFIX, payload);
    const cache = new PromptCache({ dir, maxRamBytes: 0 });
    const problems: unknown[] = [];
    cache.on('problem', (p) => problems.push(p));
    await context.exclusive(() => context.memory.clear());
    const result = await generate(context, { prompt, cache, maxTokens: 8 }).result;
    t.equal(result.cachedTokens, PREFIX, `${name}: restored`);
    t.same(problems, [], `${name}: no problem`);
    // Every cell is visible to the suffix, so which position labels which cell does not change
    // the attention sum: a re-signed permutation cannot be told from the truth, and does no harm.
    t.same(Array.from(result.tokens), reference, `${name}: the output of a full prefill`);
  }
});

t.test('importState: the same checks, E_STATE_LOAD without a header, E_CACHE_CORRUPT against one', async (t) => {
  const huge = withState((s) => (s.cellCounts[0] = 2 ** 28));
  const moved = withState((s) => s.cells.forEach((c) => (c.pos += 2 ** 31 - 30)));
  for (const [name, payload] of [['2^28 cells', huge], ['positions near 2^31', moved]] as const) {
    await t.rejects(context.importState(payload, { sequence: 0 }), { code: 'E_STATE_LOAD' }, `${name}: E_STATE_LOAD`);
    t.same(context.memory.range(0), { min: -1, max: -1 }, `${name}: the sequence is left empty`);
    await t.rejects(context.importState(payload, { sequence: 0, tokens: PREFIX }), { code: 'E_CACHE_CORRUPT' }, `${name} with tokens: E_CACHE_CORRUPT`);
  }
  await t.rejects(context.importState(basePayload, { sequence: 0, tokens: PREFIX + 1 }), { code: 'E_CACHE_CORRUPT' }, 'a true state under a wrong count');
  await context.importState(basePayload, { sequence: 0, tokens: PREFIX });
  t.same(context.memory.range(0), { min: 0, max: PREFIX - 1 }, 'the true state imports');
  // Positions shifted within the context are a valid state without a header (a shifted sequence).
  await context.importState(withState((s) => s.cells.forEach((c) => (c.pos += 100))), { sequence: 0 });
  t.same(context.memory.range(0), { min: 100, max: 100 + PREFIX - 1 }, 'shifted positions import without a header');
  await context.exclusive(() => context.memory.clear());
  t.throws(() => context.importState(basePayload, { sequence: 0, tokens: 1.5 }), TypeError, 'tokens must be an integer');
  t.throws(() => context.importState(basePayload, { sequence: 0, tokens: -1 }), RangeError, 'tokens must not be negative');
});

t.test('random field mutations (seeded): coded error or an exact import, never a crash', async (t) => {
  let seed = 20261203;
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  const extremes = [0, 1, -1, 2, 19, 20, 21, 255, 256, 257, 2 ** 16, 2 ** 28, 2 ** 31 - 1, -(2 ** 31), 2 ** 32 - 1];
  const value = () => (random(3) === 0 ? random(2 ** 31) - 2 ** 30 : extremes[random(extremes.length)]!);
  const fields: Array<(s: SequenceState) => void> = [
    (s) => (s.cells[random(PREFIX)]!.pos = value()),
    (s) => (s.cells[random(PREFIX)]!.nSeqId = value() >>> 0),
    (s) => (s.cells[random(PREFIX)]!.seqs = [value()]),
    (s) => (s.cellCounts[0] = value() >>> 0),
    (s) => (s.nStream = value() >>> 0),
    (s) => (s.nLayer = value() >>> 0),
    (s) => (s.vTrans = value() >>> 0),
    (s) => (s.k[random(2)]!.type = value()),
    (s) => (s.v[random(2)]!.rowBytes = BigInt(value() >>> 0)),
    (s) => (s.k[random(2)]!.rowBytes = BigInt(value() >>> 0)),
    (s) => (s.source = value()),
  ];
  const counts = { refused: 0, imported: 0 };
  for (let i = 0; i < 300; i++) {
    const state = cloneState(baseState);
    for (let m = 1 + random(2); m > 0; m--) fields[random(fields.length)]!(state);
    const payload = serializeState(state);
    const tokens = random(4) === 0 ? undefined : PREFIX;
    try {
      await context.importState(payload, { sequence: 0, tokens });
      counts.imported++;
      const range = context.memory.range(0);
      if (tokens !== undefined && (range.min !== 0 || range.max !== PREFIX - 1)) t.fail(`mutation ${i}: imported as ${range.min}..${range.max}`);
    } catch (err) {
      counts.refused++;
      if (!(err instanceof KvstashError) || !['E_CACHE_CORRUPT', 'E_CACHE_MISMATCH', 'E_STATE_LOAD'].includes(err.code)) {
        t.fail(`mutation ${i}: ${String(err)}`);
      }
      if (context.memory.range(0).max !== -1) t.fail(`mutation ${i}: a refused import left cells behind`);
    }
    await context.exclusive(() => context.memory.clear());
  }
  t.equal(counts.refused + counts.imported, 300, `300 mutations: ${counts.refused} refused, ${counts.imported} imported`);
  t.ok(counts.refused > 250, 'most mutations are refused');
  // The context still decodes the prompt to the reference output.
  const result = await generate(context, { prompt, maxTokens: 8 }).result;
  t.same(Array.from(result.tokens), reference, 'generation afterwards equals a full prefill');
});

t.test('loadState: a llama.cpp state file that lies is E_STATE_LOAD before llama.cpp sizes anything by it', async (t) => {
  await context.exclusive(() => context.memory.clear());
  await context.decode(prompt.subarray(0, PREFIX), { start: 0, logits: 'none' });
  const dir = t.testdir({});
  const file = path.join(dir, 'seq.bin');
  await context.saveState(file, { sequence: 0, tokens: prompt.subarray(0, PREFIX) });
  const bytes = fs.readFileSync(file);
  // magic, version, token count, the tokens; then the state without state_seq_get_data's prefix.
  const state = 12 + 4 * PREFIX;
  const cells = state + 4;
  t.equal(bytes.readUInt32LE(state), 1, 'one KV stream');
  t.equal(bytes.readUInt32LE(cells), PREFIX, 'the cell count where it is expected');
  const rssBefore = process.memoryUsage().rss;
  const variants: Array<[string, (b: Buffer) => void]> = [
    ['2^28 cells', (b) => b.writeUInt32LE(2 ** 28, cells)],
    ['2^32-1 cells', (b) => b.writeUInt32LE(2 ** 32 - 1, cells)],
    ['a position near 2^31', (b) => b.writeInt32LE(2 ** 31 - 5, cells + 4)],
    ['a negative position', (b) => b.writeInt32LE(-3, cells + 4)],
    ['a cell in 2^31 sequences', (b) => b.writeUInt32LE(2 ** 31, cells + 8)],
  ];
  for (const [name, change] of variants) {
    const lie = Buffer.from(bytes);
    change(lie);
    fs.writeFileSync(file, lie);
    await t.rejects(context.loadState(file, { sequence: 0 }), { code: 'E_STATE_LOAD' }, `${name}: E_STATE_LOAD`);
    t.same(context.memory.range(0), { min: -1, max: -1 }, `${name}: the sequence is left empty`);
  }
  t.ok(process.memoryUsage().rss - rssBefore < 256 * 2 ** 20, 'no large allocation for any claim');
  fs.writeFileSync(file, bytes);
  t.same(Array.from(await context.loadState(file, { sequence: 0 })), Array.from(prompt.subarray(0, PREFIX)), 'the true file still loads');
  t.same(context.memory.range(0), { min: 0, max: PREFIX - 1 });
  await context.exclusive(() => context.memory.clear());
});
