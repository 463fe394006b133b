/**
 * Checks a GGUF's hyper-parameters and vocabulary against what llama.cpp asserts on, before
 * llama.cpp sees the file. llama.cpp refuses most bad metadata with an exception (which kvstash
 * reports as E_MODEL_LOAD), but some values reach a GGML_ASSERT instead and abort the whole
 * process: a layer count of 0 or above 512, two identical token strings, expert counts that
 * contradict each other, heads that do not divide the embedding. Each rule below names the
 * llama.cpp check it stands in front of (pinned tree: src/llama-model.cpp load_hparams,
 * src/llama-vocab.cpp load, src/llama-model-loader.cpp, the model graphs in src/models/).
 *
 * Only metadata is read (the header the caller already parsed), never tensor data. A key whose
 * GGUF type is not the one llama.cpp reads is left alone here: llama.cpp's typed getters refuse it
 * with an exception, not an abort.
 */
import { KvstashError } from '../errors.js';
import { GgufType, type GgufHeader, type GgufValue } from './gguf.js';

/** llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h). */
export const MAX_LAYERS = 512;
/** llama.cpp's LLAMA_MAX_EXPERTS (src/llama-hparams.h). */
export const MAX_EXPERTS = 1024;
/** Token ids are int32 in llama.cpp. */
const MAX_TOKENS = 0x7fffffff;
/** llama.cpp's LLAMA_ROPE_SCALING_TYPES (src/llama-model.cpp): any other name is an assert. */
const ROPE_SCALING_TYPES = new Set(['none', 'linear', 'yarn', 'longrope']);

/**
 * Architectures whose graph asserts that a head's key size, value size and rotary dimension are
 * all equal (`n_embd_head == n_embd_head_k` and `n_embd_head == n_rot` in src/models/<arch>.cpp),
 * so a file that says otherwise aborts when the first context is built.
 */
const HEAD_SIZE_EQUALS_ROT = new Set([
  'apertus', 'arcee', 'arctic', 'baichuan', 'chameleon', 'codeshell', 'cogvlm', 'cohere2moe', 'dbrx', 'deci',
  'deepseek', 'dots1', 'dream', 'exaone', 'falcon', 'granite', 'grok', 'grovemoe', 'hunyuan-moe', 'internlm2',
  'jais2', 'llada', 'llada-moe', 'llama', 'llama4', 'maincoder', 'mellum', 'mistral3', 'olmo', 'olmo2', 'olmoe',
  'orion', 'paddleocr', 'plamo', 'pockettts', 'qwen2', 'qwen2moe', 'qwen2vl', 'qwen3', 'qwen3moe', 'qwen3vl',
  'qwen3vlmoe', 'rnd1', 'smallthinker', 'smollm3', 'starcoder2', 'xverse',
]);

/** Of those, the ones without recurrent or attention-free layers (deci has them). */
const EVERY_LAYER_ATTENDS = new Set([...HEAD_SIZE_EQUALS_ROT].filter((arch) => arch !== 'deci'));

type Problem = (key: string, problem: string) => never;

/**
 * Throws E_MODEL_FORMAT naming the first metadata key whose value llama.cpp would abort on
 * (rather than refuse with an error). `file` is only used in the message.
 */
export function validateModelMetadata(header: GgufHeader, file: string): void {
  const fail: Problem = (key, problem) => {
    throw new KvstashError(
      'E_MODEL_FORMAT',
      `${file} has impossible metadata: '${key}' ${problem}. llama.cpp would abort the process on it, so ` +
        `kvstash refuses the file; convert or download the model again.`,
      { reason: `'${key}' ${problem}` },
    );
  };
  const meta = new Meta(header);
  validateVocabulary(meta, fail);
  const arch = meta.string('general.architecture');
  // A vocab-only file, or one without an architecture: llama.cpp refuses it with an exception.
  if (arch === undefined || header.tensors.length === 0) return;
  validateHyperParameters(meta, arch, fail);
}

/** Typed access to metadata: a value of another GGUF type than asked for reads as absent. */
class Meta {
  constructor(private readonly header: GgufHeader) {}

  has(key: string): boolean {
    return this.header.metadata.has(key);
  }

  private typed(key: string, type: GgufType): GgufValue | undefined {
    return this.header.metadataTypes.get(key)?.type === type ? this.header.metadata.get(key) : undefined;
  }

  u32(key: string): number | undefined {
    return this.typed(key, GgufType.UINT32) as number | undefined;
  }

  f32(key: string): number | undefined {
    return this.typed(key, GgufType.FLOAT32) as number | undefined;
  }

  bool(key: string): boolean | undefined {
    return this.typed(key, GgufType.BOOL) as boolean | undefined;
  }

  string(key: string): string | undefined {
    return this.typed(key, GgufType.STRING) as string | undefined;
  }

  /** An array's element type and length, or undefined when the key is absent or not an array. */
  array(key: string): { itemType: GgufType; length: number; value: GgufValue } | undefined {
    const types = this.header.metadataTypes.get(key);
    const value = this.header.metadata.get(key);
    if (types?.type !== GgufType.ARRAY || types.itemType === undefined || value === undefined) return undefined;
    return { itemType: types.itemType, length: (value as ArrayLike<unknown>).length, value };
  }

  /**
   * A per-layer value as llama.cpp's get_key_or_arr reads it: one u32 for every layer, or an
   * array of exactly one integer per layer (u32, i32 or bool; llama.cpp throws on any other).
   */
  perLayer(key: string, layers: number, fail: Problem): number[] | undefined {
    const scalar = this.u32(key);
    if (scalar !== undefined) return new Array<number>(layers).fill(scalar);
    const arr = this.array(key);
    if (arr === undefined) return undefined;
    const { itemType, length, value } = arr;
    if (itemType !== GgufType.UINT32 && itemType !== GgufType.INT32 && itemType !== GgufType.BOOL) return undefined;
    if (length !== layers) fail(key, `has ${length} entries, but the model has ${layers} layers`);
    const out = Array.from(value as ArrayLike<number | boolean>, (v) => Number(v));
    // An i32 array is reinterpreted as u32 by llama.cpp.
    return out.map((v) => (v < 0 ? v + 2 ** 32 : v));
  }
}

function validateHyperParameters(meta: Meta, arch: string, fail: Problem): void {
  const key = (name: string): string => `${arch}.${name}`;

  const layersKey = key('block_count');
  const layers = meta.u32(layersKey);
  if (layers === undefined) return; // required: llama.cpp throws "key not found"
  if (layers < 1 || layers > MAX_LAYERS) fail(layersKey, `is ${layers}; a model has 1 to ${MAX_LAYERS} layers`);

  const nextn = meta.u32(key('nextn_predict_layers'));
  if (nextn !== undefined && nextn > layers) fail(key('nextn_predict_layers'), `is ${nextn}, more than the ${layers} layers`);

  const contextKey = key('context_length');
  const context = meta.u32(contextKey);
  if (context !== undefined && context < 1) fail(contextKey, 'is 0; a model is trained on at least one position');

  const embdKey = key('embedding_length');
  const embd = meta.u32(embdKey);
  if (embd !== undefined && embd < 1) fail(embdKey, 'is 0');

  validateExperts(meta, arch, layers, fail);

  const ffKey = key('feed_forward_length');
  meta.perLayer(ffKey, layers, fail);

  const headKey = key('attention.head_count');
  const headKvKey = key('attention.head_count_kv');
  const heads = meta.perLayer(headKey, layers, fail);
  const headsKv = meta.perLayer(headKvKey, layers, fail) ?? heads;
  // llama.cpp takes layer 0's head count for the head size (hparams.n_head()).
  const nHead = heads?.[0] ?? 0;

  const ropeTypeKey = key('rope.scaling.type');
  const ropeType = meta.string(ropeTypeKey);
  if (ropeType !== undefined && !ROPE_SCALING_TYPES.has(ropeType)) {
    fail(ropeTypeKey, `is ${JSON.stringify(ropeType)}; llama.cpp knows ${[...ROPE_SCALING_TYPES].join(', ')}`);
  }
  for (const [name, min, inclusive] of [
    ['rope.freq_base', 0, false],
    ['rope.freq_base_swa', 0, false],
    ['rope.scaling.factor', 0, true],
    ['rope.scale_linear', 0, true],
    ['rope.scaling.attn_factor', 0, true],
    ['attention.layer_norm_epsilon', 0, true],
    ['attention.layer_norm_rms_epsilon', 0, true],
  ] as const) {
    const value = meta.f32(key(name));
    if (value === undefined) continue;
    if (!Number.isFinite(value) || value < min || (!inclusive && value === min)) {
      fail(key(name), `is ${value}; it must be a finite number ${inclusive ? 'of at least' : 'above'} ${min}`);
    }
  }

  if (heads === undefined || nHead === 0 || embd === undefined || embd === 0) return;
  const keyLengthKey = key('attention.key_length');
  const valueLengthKey = key('attention.value_length');
  const keyLength = meta.u32(keyLengthKey);
  const valueLength = meta.u32(valueLengthKey);
  if (keyLength === undefined || valueLength === undefined) {
    // The head size defaults to n_embd / n_head; the query projection's rows are then reshaped
    // into heads, which ggml asserts to be exact.
    if (embd % nHead !== 0) fail(headKey, `is ${nHead}, which does not divide ${embdKey} = ${embd}`);
  }
  for (let il = 0; il < layers; il++) {
    const h = heads[il]!;
    const hkv = headsKv![il]!;
    // n_gqa = n_head / n_head_kv, and attention broadcasts K/V heads over query heads: ggml's
    // matrix product asserts that one divides the other. No K/V heads marks a recurrent or
    // linear-attention layer in hybrid architectures (lfm2, deci, jamba), so it is refused only
    // where every layer is attention.
    if (h > 0 && hkv === 0 && EVERY_LAYER_ATTENDS.has(arch)) fail(headKvKey, `is 0 for layer ${il}, which has ${h} query heads`);
    if (hkv > 0 && h % hkv !== 0) fail(headKvKey, `is ${hkv} for layer ${il}, which does not divide its ${h} query heads`);
    // These architectures shape every layer's K/V tensors from layer 0's K/V head count, while
    // the KV cache sizes each layer by its own: a difference is an assert in ggml at the first
    // decode. (Their graphs take the query head count of layer 0 for every layer.)
    if (EVERY_LAYER_ATTENDS.has(arch) && hkv !== headsKv![0]) {
      fail(headKvKey, `is ${hkv} for layer ${il} but ${headsKv![0]} for layer 0; ${arch} needs the same on every layer`);
    }
  }

  const headK = keyLength ?? embd / nHead;
  const headV = valueLength ?? embd / nHead;
  if (headK < 1) fail(keyLengthKey, 'is 0');
  if (headV < 1) fail(valueLengthKey, 'is 0');
  const rotKey = key('rope.dimension_count');
  const rot = meta.u32(rotKey);
  if (rot !== undefined) {
    if (rot > headK) fail(rotKey, `is ${rot}, more than the head size ${headK}`);
    if (rot % 2 !== 0) fail(rotKey, `is ${rot}; rotary dimensions come in pairs`);
  }
  if (HEAD_SIZE_EQUALS_ROT.has(arch)) {
    if (headK !== headV) fail(valueLengthKey, `is ${headV}, but ${arch} needs it equal to the key length ${headK}`);
    if (rot !== undefined && rot !== headK) fail(rotKey, `is ${rot}, but ${arch} needs it equal to the head size ${headK}`);
  }
}

/** The expert checks of load_hparams, in its order. */
function validateExperts(meta: Meta, arch: string, layers: number, fail: Problem): void {
  const countKey = `${arch}.expert_count`;
  const usedKey = `${arch}.expert_used_count`;
  const groupsKey = `${arch}.expert_group_count`;
  const groupUsedKey = `${arch}.expert_group_used_count`;
  let experts = meta.u32(countKey) ?? 0;
  let used = meta.perLayer(usedKey, layers, fail) ?? [0];
  // llama.cpp turns a single expert into none for these two architectures.
  if ((arch === 'hunyuan-vl' || arch === 'hunyuan-dense') && experts <= 1) {
    experts = 0;
    used = [0];
  }
  const usedMax = Math.max(...used);
  const groups = meta.u32(groupsKey) ?? 0;
  const groupUsed = meta.u32(groupUsedKey) ?? 0;
  if (experts > MAX_EXPERTS) fail(countKey, `is ${experts}, more than llama.cpp's ${MAX_EXPERTS}`);
  if (usedMax > experts) fail(usedKey, `is ${usedMax}, more than ${countKey} = ${experts}`);
  if (experts > 0) {
    if (usedMax === 0) fail(usedKey, `is 0 (or absent), but the model has ${experts} experts`);
    if (groups >= experts) fail(groupsKey, `is ${groups}; it must be less than ${countKey} = ${experts}`);
    if (groups > 1) {
      if (experts % groups !== 0) fail(groupsKey, `is ${groups}, which does not divide ${countKey} = ${experts}`);
      if (groupUsed === 0) fail(groupUsedKey, `is 0 (or absent), but the experts are in ${groups} groups`);
      if (groupUsed >= groups) fail(groupUsedKey, `is ${groupUsed}; it must be less than ${groupsKey} = ${groups}`);
    }
  } else if (groups !== 0) {
    fail(groupsKey, `is ${groups}, but the model has no experts`);
  }
}

/** Special tokens whose absence is an assert when the tokenizer is told to add them. */
interface SpecialToken {
  idKey: string;
  addKey: string;
}
const BOS: SpecialToken = { idKey: 'tokenizer.ggml.bos_token_id', addKey: 'tokenizer.ggml.add_bos_token' };
const EOS: SpecialToken = { idKey: 'tokenizer.ggml.eos_token_id', addKey: 'tokenizer.ggml.add_eos_token' };
const SEP: SpecialToken = { idKey: 'tokenizer.ggml.seperator_token_id', addKey: 'tokenizer.ggml.add_sep_token' };

/**
 * Per tokenizer model (`tokenizer.ggml.model`), the default BOS/EOS/SEP ids and whether it adds
 * them by default (llama_vocab::impl::load). -1 is LLAMA_TOKEN_NULL.
 */
const TOKENIZER_DEFAULTS: Record<string, { bos: number; eos: number; sep: number; addBos: boolean; addEos: boolean; addSep: boolean }> = {
  llama: { bos: 1, eos: 2, sep: -1, addBos: true, addEos: false, addSep: false },
  bert: { bos: 101, eos: -1, sep: 102, addBos: true, addEos: false, addSep: true },
  gpt2: { bos: 11, eos: 11, sep: -1, addBos: false, addEos: false, addSep: false },
  hybriddna: { bos: 11, eos: 11, sep: -1, addBos: false, addEos: false, addSep: false },
  whitespace: { bos: 11, eos: 11, sep: -1, addBos: false, addEos: false, addSep: false },
  t5: { bos: -1, eos: 1, sep: -1, addBos: false, addEos: true, addSep: false },
  rwkv: { bos: -1, eos: -1, sep: -1, addBos: false, addEos: false, addSep: false },
  test: { bos: -1, eos: -1, sep: -1, addBos: false, addEos: false, addSep: false },
  plamo2: { bos: 1, eos: 2, sep: -1, addBos: false, addEos: false, addSep: false },
  gemma4: { bos: -1, eos: -1, sep: -1, addBos: true, addEos: false, addSep: false },
};
/** BPE pre-tokenizers that turn add_bos (or add_sep) on by default. */
const PRE_ADDS_BOS = new Set(['llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0', 'lfm2', 'jina-v5-nano', 'tekken', 'chameleon']);
const PRE_ADDS_SEP = new Set(['jina-v1-en', 'jina-v2-code', 'roberta-bpe']);

function validateVocabulary(meta: Meta, fail: Problem): void {
  const tokensKey = 'tokenizer.ggml.tokens';
  const tokens = meta.array(tokensKey);
  if (tokens === undefined || tokens.itemType !== GgufType.STRING) return; // llama.cpp throws
  const list = tokens.value as string[];
  const n = list.length;
  if (n > MAX_TOKENS) fail(tokensKey, `has ${n} tokens, more than a 32-bit token id can name`);

  // llama.cpp maps each string to its id and asserts that every id got its own entry. An empty
  // token is renamed "[EMPTY_<id>]" first, so that name can collide too.
  const texts = list.map((text, i) => (text.length === 0 ? `[EMPTY_${i}]` : text));
  const seen = new Set<string>();
  for (let i = 0; i < n; i++) {
    const text = texts[i]!;
    // The reader decodes invalid UTF-8 to U+FFFD, so two such tokens may be different bytes
    // (raw-byte vocabularies such as RWKV's have them): only exact text is a proven duplicate.
    if (seen.has(text) && !text.includes('\ufffd')) {
      fail(tokensKey, `has the token ${JSON.stringify(text)} twice (ids ${texts.indexOf(text)} and ${i}); every token string must be unique`);
    }
    seen.add(text);
  }

  for (const name of ['tokenizer.ggml.scores', 'tokenizer.ggml.token_type']) {
    const arr = meta.array(name);
    if (arr !== undefined && arr.length < n) fail(name, `has ${arr.length} entries for ${n} tokens`);
  }

  // Tokenizing with add_bos/add_eos/add_sep asserts that the token exists. llama.cpp keeps a
  // file's id only when it is in range, else the tokenizer's default if that is in range.
  const model = meta.string('tokenizer.ggml.model');
  const defaults = model === undefined ? undefined : TOKENIZER_DEFAULTS[model];
  if (defaults === undefined) return; // no vocabulary, or llama.cpp throws "unknown tokenizer"
  const pre = meta.string('tokenizer.ggml.pre') ?? '';
  const inRange = (id: number | undefined): boolean => id !== undefined && id >= 0 && id < n;
  const check = (token: SpecialToken, defaultId: number, addsByDefault: boolean, forced = false): void => {
    const add = forced || (meta.bool(token.addKey) ?? addsByDefault);
    if (!add || inRange(meta.u32(token.idKey)) || inRange(defaultId)) return;
    const id = meta.u32(token.idKey);
    fail(token.idKey, `${id === undefined ? 'is absent' : `is ${id}, outside the ${n} tokens`}, but the tokenizer is set to add that token`);
  };
  const gemma4 = model === 'gemma4' || pre === 'gemma4';
  check(BOS, defaults.bos, defaults.addBos || PRE_ADDS_BOS.has(pre), gemma4);
  check(EOS, defaults.eos, defaults.addEos);
  check(SEP, defaults.sep, defaults.addSep || PRE_ADDS_SEP.has(pre));
}
