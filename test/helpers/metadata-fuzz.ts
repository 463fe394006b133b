/**
 * Metadata-value fuzzing of a model file: a small qwen2 model (the tiny shape with a 403-token
 * cut of the real Qwen2 vocabulary, so a load takes milliseconds), a catalogue of edits to its
 * metadata values, and a runner that loads each edited file in a child process, which may abort
 * without taking the test down. Used by test/model-metadata.test.ts and by wider runs by hand.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { GgmlType, GgufType, readGgufHeader, typedMetadata, writeGguf, type GgufTensorSource, type GgufTypedValue } from '../../lib/models/gguf.js';
import { SYNTHETIC_SHAPES, syntheticTensors } from '../../lib/models/synthetic.js';
import { qwen2VocabPath } from '../../lib/models/vocab.js';

const { UINT32, INT32, UINT64, FLOAT32, BOOL, STRING, ARRAY } = GgufType;
export type Metadata = Array<[string, GgufTypedValue]>;

/** Byte-level tokens kept from the Qwen2 vocabulary; three control tokens follow them. */
const KEPT_TOKENS = 400;
export const SMALL_VOCAB = KEPT_TOKENS + 3;

/** The metadata of the small model: the tiny shape's hyper-parameters and a cut Qwen2 tokenizer. */
export async function smallModelMetadata(): Promise<Metadata> {
  const vocab = await readGgufHeader(qwen2VocabPath());
  const all = vocab.metadata.get('tokenizer.ggml.tokens') as string[];
  const tokens = [...all.slice(0, KEPT_TOKENS), '<|endoftext|>', '<|im_start|>', '<|im_end|>'];
  const kept = new Set(tokens);
  // A merge stays when both halves and the result are tokens, so the BPE tokenizer stays closed.
  const merges = (vocab.metadata.get('tokenizer.ggml.merges') as string[]).filter((m) => {
    const [a, b] = m.split(' ');
    return a !== undefined && b !== undefined && kept.has(a) && kept.has(b) && kept.has(a + b);
  });
  const tokenTypes = new Int32Array(SMALL_VOCAB).fill(1);
  tokenTypes.fill(3, KEPT_TOKENS);
  const s = SYNTHETIC_SHAPES.tiny;
  const u32 = (value: number): GgufTypedValue => ({ type: UINT32, value });
  const f32 = (value: number): GgufTypedValue => ({ type: FLOAT32, value });
  const str = (value: string): GgufTypedValue => ({ type: STRING, value });
  return [
    ['general.architecture', str('qwen2')],
    ['general.name', str('kvstash metadata fuzz')],
    ['general.file_type', u32(0)],
    ['qwen2.context_length', u32(s.contextLength)],
    ['qwen2.embedding_length', u32(s.embeddingLength)],
    ['qwen2.block_count', u32(s.layers)],
    ['qwen2.feed_forward_length', u32(s.feedForwardLength)],
    ['qwen2.attention.head_count', u32(s.heads)],
    ['qwen2.attention.head_count_kv', u32(s.kvHeads)],
    ['qwen2.rope.freq_base', f32(s.ropeFreqBase)],
    ['qwen2.attention.layer_norm_rms_epsilon', f32(s.rmsEpsilon)],
    ['tokenizer.ggml.model', str('gpt2')],
    ['tokenizer.ggml.pre', str('qwen2')],
    ['tokenizer.ggml.tokens', { type: ARRAY, itemType: STRING, value: tokens }],
    ['tokenizer.ggml.token_type', { type: ARRAY, itemType: INT32, value: tokenTypes }],
    ['tokenizer.ggml.merges', { type: ARRAY, itemType: STRING, value: merges }],
    ['tokenizer.ggml.eos_token_id', u32(KEPT_TOKENS)],
    ['tokenizer.ggml.padding_token_id', u32(KEPT_TOKENS)],
    ['tokenizer.ggml.bos_token_id', u32(KEPT_TOKENS)],
    ['tokenizer.ggml.add_bos_token', { type: BOOL, value: false }],
  ];
}

/** The tiny shape's tensors for the small vocabulary, f32, filled with a constant. */
function smallModelTensors(): GgufTensorSource[] {
  return syntheticTensors(SYNTHETIC_SHAPES.tiny, SMALL_VOCAB).map((t) => ({
    name: t.name,
    dims: t.dims,
    type: GgmlType.F32,
    *data() {
      const values = new Float32Array(t.dims.reduce((a, b) => a * b, 1)).fill(t.role === 'norm' ? 1 : 0.01);
      yield new Uint8Array(values.buffer);
    },
  }));
}

export async function writeSmallModel(file: string, metadata: Metadata): Promise<void> {
  await writeGguf(file, { metadata, tensors: smallModelTensors() });
}

/** One edit of the metadata: `key` is the key it is about (the one a refusal should name). */
export interface MetadataCase {
  name: string;
  key: string;
  edit(metadata: Metadata): Metadata;
}

export function setKey(key: string, value: GgufTypedValue): (m: Metadata) => Metadata {
  return (m) => (m.some(([k]) => k === key) ? m.map(([k, v]) => [k, k === key ? value : v]) : [...m, [key, value]]);
}

function removeKey(key: string): (m: Metadata) => Metadata {
  return (m) => m.filter(([k]) => k !== key);
}

function getValue(m: Metadata, key: string): GgufTypedValue['value'] | undefined {
  return m.find(([k]) => k === key)?.[1].value;
}

const U32_VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 63, 64, 65, 128, 511, 512, 513, 4096, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1];
const F32_VALUES = [0, -0, -1, 1, 0.5, NaN, Infinity, -Infinity, 1e-30, 1e30, -1e-6, 3.4e38];

/** Keys llama.cpp reads as u32 (the tiny model's and optional ones it would also read). */
const U32_KEYS = [
  'qwen2.context_length', 'qwen2.embedding_length', 'qwen2.block_count', 'qwen2.feed_forward_length',
  'qwen2.attention.head_count', 'qwen2.attention.head_count_kv', 'qwen2.attention.key_length',
  'qwen2.attention.value_length', 'qwen2.rope.dimension_count', 'qwen2.expert_count', 'qwen2.expert_used_count',
  'qwen2.expert_group_count', 'qwen2.expert_group_used_count', 'qwen2.nextn_predict_layers',
  'qwen2.rope.scaling.original_context_length', 'qwen2.attention.sliding_window', 'qwen2.vocab_size',
  'qwen2.embedding_length_out', 'qwen2.pooling_type', 'general.file_type', 'general.quantization_version',
  'tokenizer.ggml.eos_token_id', 'tokenizer.ggml.bos_token_id', 'tokenizer.ggml.padding_token_id',
  'tokenizer.ggml.unknown_token_id', 'tokenizer.ggml.seperator_token_id', 'tokenizer.ggml.eot_token_id',
];
const F32_KEYS = [
  'qwen2.rope.freq_base', 'qwen2.attention.layer_norm_rms_epsilon', 'qwen2.attention.layer_norm_epsilon',
  'qwen2.rope.scaling.factor', 'qwen2.rope.scaling.attn_factor', 'qwen2.rope.scale_linear', 'qwen2.attention.scale',
  'qwen2.rope.scaling.yarn_beta_fast', 'qwen2.rope.scaling.yarn_log_multiplier',
];
const PER_LAYER_KEYS = ['qwen2.feed_forward_length', 'qwen2.attention.head_count', 'qwen2.attention.head_count_kv', 'qwen2.expert_used_count'];
const BOOL_KEYS = ['tokenizer.ggml.add_bos_token', 'tokenizer.ggml.add_eos_token', 'tokenizer.ggml.add_sep_token', 'qwen2.attention.causal', 'qwen2.rope.scaling.finetuned'];
const STRING_VALUES: Array<[string, string[]]> = [
  ['qwen2.rope.scaling.type', ['none', 'linear', 'yarn', 'longrope', '', 'LINEAR', 'ntk', '\u0000']],
  // 'llama' (SentencePiece) over this byte-level vocabulary loads, then its tokenizer looks up
  // "<0x0A>"-style byte tokens that do not exist and llama.cpp throws std::out_of_range: the
  // addon turns that into E_TOKENIZE instead of letting it terminate the process.
  ['tokenizer.ggml.model', ['gpt2', 'llama', 'bert', 't5', 'rwkv', 'none', 'no_vocab', 'gemma4', 'plamo2', '', 'unknown']],
  ['tokenizer.ggml.pre', ['qwen2', 'default', 'llama3', 'tekken', 'roberta-bpe', 'gemma4', '', 'unknown']],
  ['general.architecture', ['qwen2', 'llama', 'qwen3', 'gpt2', 'bert', 'mamba', 'rwkv6', 'clip', '', 'unknown']],
];

/**
 * The catalogue: every u32/f32/bool/string key above with its boundary values, per-layer keys as
 * arrays of the right and wrong lengths, wrong types, and edits of the token tables.
 */
export function metadataCases(): MetadataCase[] {
  const cases: MetadataCase[] = [];
  const add = (name: string, key: string, edit: (m: Metadata) => Metadata): void => void cases.push({ name, key, edit });
  for (const key of U32_KEYS) {
    for (const v of U32_VALUES) add(`${key} = ${v}`, key, setKey(key, { type: UINT32, value: v }));
    add(`${key} as i32 -1`, key, setKey(key, { type: INT32, value: -1 }));
    add(`${key} as u64`, key, setKey(key, { type: UINT64, value: 2n }));
    add(`${key} as string`, key, setKey(key, { type: STRING, value: '4' }));
    add(`${key} removed`, key, removeKey(key));
  }
  for (const key of F32_KEYS) {
    for (const v of F32_VALUES) add(`${key} = ${v}`, key, setKey(key, { type: FLOAT32, value: v }));
    add(`${key} as u32`, key, setKey(key, { type: UINT32, value: 1 }));
  }
  for (const key of PER_LAYER_KEYS) {
    for (const values of [[4, 4], [4, 0], [0, 4], [4], [4, 4, 4], [], [2, 1], [1, 2], [3, 3], [2 ** 32 - 1, 4]]) {
      add(`${key} = [${values}] u32`, key, setKey(key, { type: ARRAY, itemType: UINT32, value: values }));
    }
    add(`${key} = [-1, -1] i32`, key, setKey(key, { type: ARRAY, itemType: INT32, value: [-1, -1] }));
    add(`${key} = [1.5, 2] f32`, key, setKey(key, { type: ARRAY, itemType: FLOAT32, value: [1.5, 2] }));
  }
  for (const key of BOOL_KEYS) {
    add(`${key} = true`, key, setKey(key, { type: BOOL, value: true }));
    add(`${key} = false`, key, setKey(key, { type: BOOL, value: false }));
  }
  for (const [key, values] of STRING_VALUES) {
    for (const v of values) add(`${key} = ${JSON.stringify(v)}`, key, setKey(key, { type: STRING, value: v }));
  }

  const tokensKey = 'tokenizer.ggml.tokens';
  const tokens = (m: Metadata): string[] => [...(getValue(m, tokensKey) as string[])];
  const withTokens = (f: (t: string[]) => string[]) => (m: Metadata) => setKey(tokensKey, { type: ARRAY, itemType: STRING, value: f(tokens(m)) })(m);
  add('two identical tokens', tokensKey, withTokens((t) => { t[5] = t[6]!; return t; }));
  add('the last token repeats the first', tokensKey, withTokens((t) => { t[t.length - 1] = t[0]!; return t; }));
  add('an empty token', tokensKey, withTokens((t) => { t[7] = ''; return t; }));
  add('two empty tokens', tokensKey, withTokens((t) => { t[7] = ''; t[9] = ''; return t; }));
  add('an empty token and its placeholder name', tokensKey, withTokens((t) => { t[7] = ''; t[8] = '[EMPTY_7]'; return t; }));
  add('tokens cut to 10', tokensKey, withTokens((t) => t.slice(0, 10)));
  add('no tokens', tokensKey, withTokens(() => []));
  add('one more token', tokensKey, withTokens((t) => [...t, 'extra']));
  add('a token of invalid UTF-8', tokensKey, withTokens((t) => { t[3] = '\udc00x'; return t; }));
  add('tokens as an i32 array', tokensKey, setKey(tokensKey, { type: ARRAY, itemType: INT32, value: [1, 2, 3] }));
  add('tokens removed', tokensKey, removeKey(tokensKey));
  const arrayKeys: Array<[string, GgufType]> = [['tokenizer.ggml.token_type', INT32], ['tokenizer.ggml.scores', FLOAT32]];
  for (const [key, itemType] of arrayKeys) {
    for (const length of [0, 1, SMALL_VOCAB - 1, SMALL_VOCAB, SMALL_VOCAB + 1]) {
      for (const fill of itemType === INT32 ? [1, 3, 6, -1, 2 ** 31 - 1] : [0, NaN, -Infinity]) {
        add(`${key} of ${length} × ${fill}`, key, setKey(key, { type: ARRAY, itemType, value: new Array<number>(length).fill(fill) }));
      }
    }
    add(`${key} as u32 array`, key, setKey(key, { type: ARRAY, itemType: UINT32, value: new Array<number>(SMALL_VOCAB).fill(1) }));
  }
  const mergesKey = 'tokenizer.ggml.merges';
  for (const merges of [[], ['a'], [' '], ['  '], ['a b c'], ['Ġ Ġ Ġ'], ['', ''], ['! !', '! !']]) {
    add(`merges ${JSON.stringify(merges)}`, mergesKey, setKey(mergesKey, { type: ARRAY, itemType: STRING, value: merges }));
  }
  add('merges removed', mergesKey, removeKey(mergesKey));
  add('chat template of garbage', 'tokenizer.chat_template', setKey('tokenizer.chat_template', { type: STRING, value: '{% for %}' }));
  return cases;
}

/** Seeded xorshift32, for reproducible random combinations. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 4294967296;
  };
}

/** `count` cases combining 2 to 4 catalogue edits, with a random u32 sprinkled in. */
export function randomCases(catalogue: MetadataCase[], count: number, seed: number): MetadataCase[] {
  const next = rng(seed);
  const out: MetadataCase[] = [];
  for (let i = 0; i < count; i++) {
    const picked = Array.from({ length: 2 + Math.floor(next() * 3) }, () => catalogue[Math.floor(next() * catalogue.length)]!);
    if (next() < 0.3) {
      const key = U32_KEYS[Math.floor(next() * U32_KEYS.length)]!;
      const value = Math.floor(next() * 2 ** 32) >>> (Math.floor(next() * 32));
      picked.push({ name: `${key} = ${value}`, key, edit: setKey(key, { type: UINT32, value }) });
    }
    out.push({
      name: picked.map((c) => c.name).join(' + '),
      key: picked[0]!.key,
      edit: (m) => picked.reduce((acc, c) => c.edit(acc), m),
    });
  }
  return out;
}

export interface CaseOutcome {
  /** Path of the model file the child loaded. */
  file: string;
  /** 'ok': loaded, made a context, decoded and tokenized. 'coded': a KvstashError. 'uncoded': any
   * other error. 'died': the child ended (signal or exit status) while on this case. */
  result: 'ok' | 'coded' | 'uncoded' | 'died';
  code?: string;
  message?: string;
  signal?: string | null;
  status?: number | null;
}

const CHILD_SCRIPT = `
  const { loadModel, isKvstashError } = require(${JSON.stringify(path.resolve(__dirname, '../../lib/index.ts'))});
  const files = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));
  const say = (o) => require('node:fs').writeSync(1, JSON.stringify(o) + '\\n');
  (async () => {
    for (const file of files) {
      say({ file, start: true });
      try {
        const model = await loadModel(file);
        try {
          const context = await model.createContext({ contextSize: 64, batchSize: 16, threads: 1 });
          await context.decode(new Int32Array([0, 1, 2]));
          model.detokenize(model.tokenize('Hello\\nworld'));
          model.tokenize('<|im_start|>x', { special: true, addSpecial: true });
          model.applyChatTemplate([{ role: 'user', content: 'hi' }]);
        } finally {
          await model.dispose();
        }
        say({ file, result: 'ok' });
      } catch (err) {
        if (isKvstashError(err)) say({ file, result: 'coded', code: err.code, message: err.message });
        else say({ file, result: 'uncoded', message: String(err && err.stack || err) });
      }
    }
  })();
`;

/**
 * Loads each file in a child process, several per child; a child that dies is charged with the
 * file it was on, and a new child takes the rest.
 */
export function loadInChildren(files: readonly string[], execArgv: readonly string[]): CaseOutcome[] {
  const outcomes: CaseOutcome[] = [];
  let rest = [...files];
  while (rest.length > 0) {
    const child = spawnSync(process.execPath, [...execArgv, '-e', CHILD_SCRIPT], {
      input: JSON.stringify(rest),
      encoding: 'utf8',
      timeout: 600_000,
      maxBuffer: 64 * 1024 * 1024,
      env: { ...process.env, LLAMA_LOG_LEVEL: 'error' },
    });
    const lines = child.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as CaseOutcome & { start?: boolean });
    let current: string | undefined;
    for (const line of lines) {
      if (line.start) current = line.file;
      else {
        outcomes.push(line);
        current = undefined;
      }
    }
    const done = new Set(outcomes.map((o) => o.file));
    if (current !== undefined) {
      outcomes.push({ file: current, result: 'died', signal: child.signal, status: child.status, message: child.stderr.slice(-400) });
      done.add(current);
    } else if (child.status !== 0 || child.signal !== null) {
      throw new Error(`a fuzz child failed outside any case (status ${child.status}, signal ${child.signal}): ${child.stderr.slice(-400)}`);
    }
    rest = rest.filter((f) => !done.has(f));
  }
  return outcomes;
}

/** Writes each case's model into `dir` as case-<i>.gguf; cases the writer refuses are skipped. */
export async function writeCases(dir: string, base: Metadata, cases: readonly MetadataCase[]): Promise<Map<string, MetadataCase>> {
  const written = new Map<string, MetadataCase>();
  for (const [i, c] of cases.entries()) {
    const file = path.join(dir, `case-${i}.gguf`);
    try {
      await writeSmallModel(file, c.edit(base));
    } catch (err) {
      if (err instanceof TypeError || err instanceof RangeError) continue; // not representable in GGUF
      throw err;
    }
    written.set(file, c);
  }
  return written;
}

export function removeCases(files: Iterable<string>): void {
  for (const file of files) fs.rmSync(file, { force: true });
}

export { typedMetadata };
