// model.embed on the synthetic embedding shape (tiny-embed: silent blocks, mean pooling). There a
// text's vector is exactly the mean of its tokens' RMS-normalized embedding rows, which this test
// recomputes from the GGUF file: batching, pooling per sequence and normalization are checked
// against arithmetic, not against another run of the same code.
import fs from 'node:fs';
import t from 'tap';
import { KvstashError, loadModel, type Model } from '../lib/index.js';
import { f16BitsToF32 } from '../lib/models/f16.js';
import { GgmlType, readGgufHeader } from '../lib/models/gguf.js';
import { SYNTHETIC_SHAPES } from '../lib/models/synthetic.js';
import { embeddingModel } from './helpers/fixtures.js';

const DIM = SYNTHETIC_SHAPES['tiny-embed'].embeddingLength;
let model: Model;
let file: string;
let tokenRow: (token: number) => Float64Array;

t.before(async () => {
  file = await embeddingModel();
  model = await loadModel(file);
  const header = await readGgufHeader(file);
  const info = header.tensors.find((x) => x.name === 'token_embd.weight')!;
  if (info.type !== GgmlType.F16) throw new Error('tiny-embed is written as f16');
  const fd = fs.openSync(file, 'r');
  const eps = SYNTHETIC_SHAPES['tiny-embed'].rmsEpsilon;
  tokenRow = (token) => {
    const bytes = Buffer.alloc(DIM * 2);
    fs.readSync(fd, bytes, 0, bytes.length, header.dataOffset + info.offset + token * DIM * 2);
    const row = Float64Array.from({ length: DIM }, (_, i) => f16BitsToF32(bytes.readUInt16LE(2 * i)));
    // output_norm (weight 1): x / sqrt(mean(x²) + eps).
    const rms = Math.sqrt(row.reduce((s, x) => s + x * x, 0) / DIM + eps);
    return row.map((x) => x / rms);
  };
});
t.teardown(() => model?.dispose());

function expected(text: string, pooling: 'mean' | 'cls' | 'last' = 'mean', normalize = true): Float64Array {
  const tokens = Array.from(model.tokenize(text));
  const picked = pooling === 'mean' ? tokens : pooling === 'cls' ? tokens.slice(0, 1) : tokens.slice(-1);
  const sum = new Float64Array(DIM);
  for (const token of picked) tokenRow(token).forEach((x, i) => (sum[i]! += x / picked.length));
  if (!normalize) return sum;
  const norm = Math.sqrt(sum.reduce((s, x) => s + x * x, 0));
  return sum.map((x) => x / norm);
}

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
};
const dot = (a: Float32Array, b: Float32Array): number => a.reduce((s, x, i) => s + x * b[i]!, 0);
const norm = (a: ArrayLike<number>): number => Math.sqrt(Array.from(a).reduce((s, x) => s + x * x, 0));

// Words are compared as tokens: ' cat' mid-sentence and 'cat' at the start are different tokens.
const TEXTS = [
  'the cat sat on the mat',
  'a cat sat on a warm mat',
  'so stock markets fell sharply',
  'so stock markets rallied today',
  'quantum chromodynamics describes strong forces',
  'Grüße aus Köln — 日本語 🙂',
];

t.test('one unit vector per text, equal to the mean of its normalized token rows', async (t) => {
  const vectors = await model.embed(TEXTS);
  t.equal(vectors.length, TEXTS.length);
  for (const [i, v] of vectors.entries()) {
    t.type(v, Float32Array);
    t.equal(v.length, DIM, `text ${i}: ${DIM} dimensions (the shape's n_embd)`);
    t.ok(Math.abs(norm(v) - 1) < 1e-6, `text ${i}: length ${norm(v)}`);
    t.ok(maxDiff(v, expected(TEXTS[i]!)) < 1e-4, `text ${i}: max difference from the recomputed vector ${maxDiff(v, expected(TEXTS[i]!))}`);
  }
  t.equal(model.metadata()['qwen2.pooling_type'], '1', 'the shape declares mean pooling');
});

t.test('texts that share words are nearer than texts that share none', async (t) => {
  const [cat, cat2, stock, stock2, physics] = await model.embed(TEXTS.slice(0, 5));
  t.ok(dot(cat!, cat2!) > dot(cat!, stock!) + 0.2, `cat/cat ${dot(cat!, cat2!)} vs cat/stock ${dot(cat!, stock!)}`);
  t.ok(dot(cat!, cat2!) > dot(cat!, physics!) + 0.2, `cat/cat ${dot(cat!, cat2!)} vs cat/physics ${dot(cat!, physics!)}`);
  t.ok(dot(stock!, stock2!) > dot(stock!, cat!) + 0.2, `stock/stock ${dot(stock!, stock2!)} vs stock/cat ${dot(stock!, cat!)}`);
  // Ranking a query against all of them puts the word-sharing text first.
  for (const [query, near] of [
    ['so what did stock markets do', [2, 3]],
    ['where the cat sat', [0, 1]],
  ] as const) {
    const [q] = await model.embed([query]);
    const ranked = [cat, cat2, stock, stock2, physics].map((v, i) => ({ i, score: dot(q!, v!) })).sort((a, b) => b.score - a.score);
    t.strictSame(ranked.slice(0, 2).map((r) => r.i).sort(), near, `"${query}": ${JSON.stringify(ranked)}`);
  }
});

t.test('a batch gives what one-by-one calls give (sequences never mix)', async (t) => {
  // More texts than one decode's sequences (64) and tokens (128+): several decodes.
  const many = Array.from({ length: 70 }, (_, i) => `${TEXTS[i % TEXTS.length]} ${i}`);
  const batched = await model.embed(many);
  for (const i of [0, 1, 63, 64, 69]) {
    const [alone] = await model.embed([many[i]!]);
    t.ok(maxDiff(batched[i]!, alone!) < 1e-6, `text ${i}: batched vs alone differ by ${maxDiff(batched[i]!, alone!)}`);
    t.ok(maxDiff(batched[i]!, expected(many[i]!)) < 1e-4, `text ${i} matches its recomputed vector`);
  }
  // A long text beside short ones (it gets a batch that holds it).
  const long = Array.from({ length: 100 }, (_, i) => `word${i % 37}`).join(' ');
  const mixed = await model.embed(['short one', long, 'short two']);
  t.ok(maxDiff(mixed[1]!, expected(long)) < 1e-4, 'a 200+-token text between short ones');
  t.ok(maxDiff(mixed[2]!, (await model.embed(['short two']))[0]!) < 1e-6);
});

t.test('pooling and normalize options', async (t) => {
  const text = 'the cat sat on the mat';
  const [raw] = await model.embed([text], { normalize: false });
  t.ok(maxDiff(raw!, expected(text, 'mean', false)) < 1e-4, 'normalize: false is the plain mean');
  t.ok(Math.abs(norm(raw!) - 1) > 0.01, `and is not of length 1 (${norm(raw!)})`);
  const [last] = await model.embed([text], { pooling: 'last' });
  t.ok(maxDiff(last!, expected(text, 'last')) < 1e-4, "'last' is the last token's row");
  const [cls] = await model.embed([text], { pooling: 'cls' });
  t.ok(maxDiff(cls!, expected(text, 'cls')) < 1e-4, "'cls' is the first token's row");
  const [mean] = await model.embed([text], { pooling: 'mean' });
  t.ok(maxDiff(mean!, expected(text)) < 1e-4, "'mean' again after the context was remade for other poolings");
  t.strictSame(await model.embed([]), [], 'no texts, no vectors');
});

t.test('the event loop keeps turning while a batch is embedded', async (t) => {
  const texts = Array.from({ length: 64 }, (_, i) => `${TEXTS[i % TEXTS.length]} ${i}`);
  let ticks = 0;
  let running = true;
  const tick = (): void => {
    ticks++;
    if (running) setImmediate(tick);
  };
  setImmediate(tick);
  const concurrent = Promise.all([model.embed(texts), model.embed(['a cat on a warm mat'])]);
  const [vectors, [single]] = await concurrent;
  running = false;
  t.equal(vectors.length, 64);
  t.ok(ticks > 5, `${ticks} event-loop turns during the embed`);
  t.ok(maxDiff(single!, expected('a cat on a warm mat')) < 1e-4, 'two calls at once both answer correctly (queued)');
});

t.test('bad input gets a TypeError, RangeError or coded error, and the model keeps working', async (t) => {
  await t.rejects(model.embed('text' as unknown as string[]), TypeError);
  await t.rejects(model.embed(['ok', 42 as unknown as string]), { name: 'TypeError', message: /texts\[1\] must be a string/ });
  await t.rejects(model.embed(['ok', '']), { name: 'RangeError', message: /texts\[1\] is empty/ });
  await t.rejects(model.embed(['ok'], { pooling: 'max' as 'mean' }), RangeError);
  await t.rejects(model.embed(['ok'], { normalize: 'yes' as unknown as boolean }), TypeError);
  await t.rejects(model.embed(['ok'], null as never), TypeError);
  const tooLong = 'word '.repeat(model.info.trainedContextSize + 10);
  const refused = await model.embed(['ok', tooLong]).catch((err: unknown) => err);
  t.ok(refused instanceof KvstashError, 'a text past the context is a KvstashError');
  t.match(refused, { code: 'E_CONTEXT_FULL', message: /texts\[1\] has \d+ tokens, more than this model's context of 4096/ });
  const [after] = await model.embed(['the cat sat on the mat']);
  t.ok(maxDiff(after!, expected('the cat sat on the mat')) < 1e-4, 'still correct after refused calls');
});

t.test('dispose waits for a running embed; afterwards embed rejects with E_DISPOSED', async (t) => {
  const own = await loadModel(file);
  const texts = Array.from({ length: 40 }, (_, i) => `${TEXTS[i % TEXTS.length]} ${i}`);
  const running = own.embed(texts);
  const queued = own.embed(['queued behind it']).catch((err: unknown) => err);
  let embedded = false;
  void running.then(() => (embedded = true));
  await new Promise((resolve) => setImmediate(resolve)); // the first call has started in native code
  await own.dispose();
  t.ok(embedded, 'the running embed finished before dispose resolved');
  t.equal((await running).length, 40);
  t.match(await queued, { code: 'E_DISPOSED' }, 'a call still waiting in the queue is refused');
  await t.rejects(own.embed(['after']), { code: 'E_DISPOSED' });
});
