// Impossible model metadata (issue 14, item 1): every hyper-parameter and vocabulary value that
// llama.cpp asserts on is refused before llama.cpp sees the file, with E_MODEL_FORMAT naming the
// key, and a fuzz of metadata values loaded in child processes never kills a child.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadModel } from '../lib/index.js';
import { GgufType, readGgufHeader, type GgufHeader } from '../lib/models/gguf.js';
import { validateModelMetadata } from '../lib/models/gguf-validate.js';
import { tinyModel } from './helpers/fixtures.js';
import {
  loadInChildren,
  metadataCases,
  randomCases,
  setKey,
  SMALL_VOCAB,
  smallModelMetadata,
  writeCases,
  writeSmallModel,
  type Metadata,
} from './helpers/metadata-fuzz.js';

const { UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY } = GgufType;
const u32 = (value: number) => ({ type: UINT32, value });

let base: Metadata;
t.before(async () => {
  base = await smallModelMetadata();
});

/** A header as the reader returns it, for the metadata alone (plus one tensor: a model, not a vocab file). */
function headerOf(metadata: Metadata): GgufHeader {
  return {
    version: 3,
    metadata: new Map(metadata.map(([k, v]) => [k, v.value as never])),
    metadataTypes: new Map(metadata.map(([k, v]) => [k, v.itemType === undefined ? { type: v.type } : { type: v.type, itemType: v.itemType }])),
    tensors: [{ name: 'token_embd.weight', dims: [64, SMALL_VOCAB], type: 0, offset: 0, byteLength: 64 * SMALL_VOCAB * 4 }],
    alignment: 32,
    dataOffset: 0,
    fileSize: 0,
  };
}

function tokensWith(edit: (tokens: string[]) => void): (m: Metadata) => Metadata {
  return (m) => {
    const tokens = [...(m.find(([k]) => k === 'tokenizer.ggml.tokens')![1].value as string[])];
    edit(tokens);
    return setKey('tokenizer.ggml.tokens', { type: ARRAY, itemType: STRING, value: tokens })(m);
  };
}

t.test("the issue's examples are refused with E_MODEL_FORMAT naming the key, before llama.cpp", async (t) => {
  const dir = t.testdir();
  const examples: Array<[string, (m: Metadata) => Metadata, RegExp]> = [
    ['0 layers', setKey('qwen2.block_count', u32(0)), /'qwen2\.block_count' is 0; a model has 1 to 512 layers/],
    ['513 layers', setKey('qwen2.block_count', u32(513)), /'qwen2\.block_count' is 513; a model has 1 to 512 layers/],
    ['two identical tokens', tokensWith((tokens) => (tokens[5] = tokens[6]!)), /'tokenizer\.ggml\.tokens' has the token "'" twice \(ids 5 and 6\)/],
  ];
  for (const [name, edit, message] of examples) {
    const file = path.join(dir, `${name.replace(/\W+/g, '-')}.gguf`);
    await writeSmallModel(file, edit(base));
    await t.rejects(loadModel(file), { name: 'KvstashError', code: 'E_MODEL_FORMAT', message }, name);
    await t.rejects(loadModel(file), { message: new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')} has impossible metadata`) }, `${name}: the message names the file`);
  }
  const fine = path.join(dir, 'fine.gguf');
  await writeSmallModel(fine, base);
  const model = await loadModel(fine);
  t.equal(model.info.layers, 2, 'the unedited small model loads');
  t.equal(model.info.vocabSize, SMALL_VOCAB);
  await model.dispose();
});

t.test('each rule names its key', async (t) => {
  const rules: Array<[string, (m: Metadata) => Metadata, string, RegExp]> = [
    ['layers 512 is the maximum', setKey('qwen2.block_count', u32(512)), '', /^$/],
    ['nextn layers past the layers', setKey('qwen2.nextn_predict_layers', u32(3)), 'qwen2.nextn_predict_layers', /is 3, more than the 2 layers/],
    ['context length 0', setKey('qwen2.context_length', u32(0)), 'qwen2.context_length', /is 0/],
    ['embedding length 0', setKey('qwen2.embedding_length', u32(0)), 'qwen2.embedding_length', /is 0/],
    ['heads do not divide the embedding', setKey('qwen2.attention.head_count', u32(3)), 'qwen2.attention.head_count', /is 3, which does not divide qwen2\.embedding_length = 64/],
    ['kv heads do not divide the heads', setKey('qwen2.attention.head_count_kv', u32(3)), 'qwen2.attention.head_count_kv', /is 3 for layer 0, which does not divide its 4 query heads/],
    ['no kv heads', setKey('qwen2.attention.head_count_kv', u32(0)), 'qwen2.attention.head_count_kv', /is 0 for layer 0/],
    ['per-layer kv heads, layer 1 bad', setKey('qwen2.attention.head_count_kv', { type: ARRAY, itemType: UINT32, value: [2, 3] }), 'qwen2.attention.head_count_kv', /is 3 for layer 1/],
    ['per-layer array of the wrong length', setKey('qwen2.feed_forward_length', { type: ARRAY, itemType: INT32, value: [128] }), 'qwen2.feed_forward_length', /has 1 entries, but the model has 2 layers/],
    ['unknown rope scaling', setKey('qwen2.rope.scaling.type', { type: STRING, value: 'ntk' }), 'qwen2.rope.scaling.type', /is "ntk"/],
    ['NaN rms epsilon', setKey('qwen2.attention.layer_norm_rms_epsilon', { type: FLOAT32, value: NaN }), 'qwen2.attention.layer_norm_rms_epsilon', /is NaN/],
    ['negative rms epsilon', setKey('qwen2.attention.layer_norm_rms_epsilon', { type: FLOAT32, value: -1 }), 'qwen2.attention.layer_norm_rms_epsilon', /is -1/],
    ['zero rope base', setKey('qwen2.rope.freq_base', { type: FLOAT32, value: 0 }), 'qwen2.rope.freq_base', /is 0; it must be a finite number above 0/],
    ['infinite rope factor', setKey('qwen2.rope.scaling.factor', { type: FLOAT32, value: Infinity }), 'qwen2.rope.scaling.factor', /is Infinity/],
    ['rotary dimension past the head', setKey('qwen2.rope.dimension_count', u32(32)), 'qwen2.rope.dimension_count', /is 32, more than the head size 16/],
    ['odd rotary dimension', setKey('qwen2.rope.dimension_count', u32(15)), 'qwen2.rope.dimension_count', /is 15; rotary dimensions come in pairs/],
    ['qwen2 needs rot = head size', setKey('qwen2.rope.dimension_count', u32(8)), 'qwen2.rope.dimension_count', /is 8, but qwen2 needs it equal to the head size 16/],
    ['qwen2 needs value = key length', (m) => setKey('qwen2.attention.value_length', u32(8))(setKey('qwen2.attention.key_length', u32(16))(m)), 'qwen2.attention.value_length', /is 8, but qwen2 needs it equal to the key length 16/],
    ['key length 0', (m) => setKey('qwen2.attention.value_length', u32(0))(setKey('qwen2.attention.key_length', u32(0))(m)), 'qwen2.attention.key_length', /is 0/],
    ['too many experts', setKey('qwen2.expert_count', u32(1025)), 'qwen2.expert_count', /is 1025, more than llama\.cpp's 1024/],
    ['experts used past the experts', (m) => setKey('qwen2.expert_used_count', u32(9))(setKey('qwen2.expert_count', u32(8))(m)), 'qwen2.expert_used_count', /is 9, more than qwen2\.expert_count = 8/],
    ['experts but none used', setKey('qwen2.expert_count', u32(8)), 'qwen2.expert_used_count', /is 0 \(or absent\), but the model has 8 experts/],
    ['experts used without experts', setKey('qwen2.expert_used_count', u32(2)), 'qwen2.expert_used_count', /is 2, more than qwen2\.expert_count = 0/],
    ['expert groups without experts', setKey('qwen2.expert_group_count', u32(2)), 'qwen2.expert_group_count', /is 2, but the model has no experts/],
    ['groups that do not divide the experts', (m) => [['qwen2.expert_count', 8], ['qwen2.expert_used_count', 2], ['qwen2.expert_group_count', 3]].reduce((a, [k, v]) => setKey(k as string, u32(v as number))(a), m), 'qwen2.expert_group_count', /is 3, which does not divide/],
    ['groups used = groups', (m) => [['qwen2.expert_count', 8], ['qwen2.expert_used_count', 2], ['qwen2.expert_group_count', 4], ['qwen2.expert_group_used_count', 4]].reduce((a, [k, v]) => setKey(k as string, u32(v as number))(a), m), 'qwen2.expert_group_used_count', /is 4; it must be less than/],
    ['valid experts', (m) => [['qwen2.expert_count', 8], ['qwen2.expert_used_count', 2], ['qwen2.expert_group_count', 4], ['qwen2.expert_group_used_count', 2]].reduce((a, [k, v]) => setKey(k as string, u32(v as number))(a), m), '', /^$/],
    ['an empty token named like another', tokensWith((tokens) => { tokens[7] = ''; tokens[8] = '[EMPTY_7]'; }), 'tokenizer.ggml.tokens', /has the token "\[EMPTY_7\]" twice \(ids 7 and 8\)/],
    ['two empty tokens are distinct', tokensWith((tokens) => { tokens[7] = ''; tokens[9] = ''; }), '', /^$/],
    ['a duplicate far apart', tokensWith((tokens) => (tokens[SMALL_VOCAB - 1] = tokens[0]!)), 'tokenizer.ggml.tokens', /has the token "!" twice \(ids 0 and 402\)/],
    ['short token types', setKey('tokenizer.ggml.token_type', { type: ARRAY, itemType: INT32, value: [1, 1] }), 'tokenizer.ggml.token_type', /has 2 entries for 403 tokens/],
    ['short scores', setKey('tokenizer.ggml.scores', { type: ARRAY, itemType: FLOAT32, value: [0] }), 'tokenizer.ggml.scores', /has 1 entries for 403 tokens/],
    // t5's tokenizer has no default BOS to fall back on.
    ['add BOS with no BOS in range', (m) => [setKey('tokenizer.ggml.model', { type: STRING, value: 't5' }), setKey('tokenizer.ggml.bos_token_id', u32(SMALL_VOCAB)), setKey('tokenizer.ggml.add_bos_token', { type: BOOL, value: true })].reduce((a, f) => f(a), m), 'tokenizer.ggml.bos_token_id', /is 403, outside the 403 tokens, but the tokenizer is set to add that token/],
    ['add BOS with no BOS at all', (m) => [setKey('tokenizer.ggml.model', { type: STRING, value: 't5' }), (x: Metadata) => x.filter(([k]) => k !== 'tokenizer.ggml.bos_token_id'), setKey('tokenizer.ggml.add_bos_token', { type: BOOL, value: true })].reduce((a, f) => f(a), m), 'tokenizer.ggml.bos_token_id', /is absent, but the tokenizer is set to add that token/],
    ['t5 adds EOS by default', (m) => [setKey('tokenizer.ggml.model', { type: STRING, value: 't5' }), setKey('tokenizer.ggml.eos_token_id', u32(SMALL_VOCAB))].reduce((a, f) => f(a), m), '', /^$/],
    // gpt2's default BOS is token 11, in range: llama.cpp falls back to it.
    ['add BOS with the default in range', (m) => setKey('tokenizer.ggml.bos_token_id', u32(9999))(setKey('tokenizer.ggml.add_bos_token', { type: BOOL, value: true })(m)), '', /^$/],
    ['an out-of-range EOS that is not added', setKey('tokenizer.ggml.eos_token_id', u32(9999)), '', /^$/],
  ];
  for (const [name, edit, key, message] of rules) {
    const header = headerOf(edit(base));
    if (key === '') {
      t.doesNotThrow(() => validateModelMetadata(header, 'm.gguf'), name);
      continue;
    }
    t.throws(() => validateModelMetadata(header, 'm.gguf'), { code: 'E_MODEL_FORMAT', reason: new RegExp(`^'${key.replace(/\./g, '\\.')}' ${message.source.replace(/^\^/, '')}`) }, name);
  }
});

t.test('real vocabularies and the tiny model pass: nothing llama.cpp loads is refused', async (t) => {
  const models = path.resolve(__dirname, '../deps/llama.cpp/models');
  const files = fs.readdirSync(models).filter((f) => f.endsWith('.gguf')).map((f) => path.join(models, f));
  t.ok(files.length >= 10, `${files.length} vocab files from llama.cpp`);
  for (const file of [...files, await tinyModel()]) {
    const header = await readGgufHeader(file);
    t.doesNotThrow(() => validateModelMetadata(header, file), path.basename(file));
  }
});

t.test('fuzzed metadata values, each model loaded in a child: no child dies, every refusal is coded', async (t) => {
  const dir = t.testdir();
  const catalogue = metadataCases();
  // Every 6th catalogue case (the catalogue is grouped by key, so each key is hit) and random mixes.
  const picked = [{ name: 'unedited', key: '', edit: (m: Metadata) => m }, ...catalogue.filter((_, i) => i % 6 === 0), ...randomCases(catalogue, 40, 20261203)];
  const written = await writeCases(dir, base, picked);
  const outcomes = loadInChildren([...written.keys()], process.execArgv);
  t.equal(outcomes.length, written.size, 'every case has an outcome');
  const tally = { ok: 0, coded: 0, refusedHere: 0 };
  for (const o of outcomes) {
    const c = written.get(o.file)!;
    if (o.result === 'died') t.fail(`${c.name}: the child died (signal ${o.signal}, status ${o.status}): ${o.message}`);
    else if (o.result === 'uncoded') t.fail(`${c.name}: an uncoded error: ${o.message}`);
    else if (o.result === 'ok') tally.ok++;
    else {
      tally.coded++;
      if (o.code === 'E_MODEL_FORMAT') tally.refusedHere++;
    }
  }
  t.equal(outcomes[0]!.result, 'ok', 'the unedited model loads, decodes and tokenizes');
  t.ok(tally.ok > 10 && tally.refusedHere > 10, `of ${outcomes.length}: ${tally.ok} loaded, ${tally.coded} refused with a code (${tally.refusedHere} by the metadata check)`);
});

t.test('a vocabulary llama.cpp loads but cannot tokenize with is E_TOKENIZE, not a terminated process', async (t) => {
  // A SentencePiece tokenizer over a byte-level vocabulary: llama.cpp loads it, then throws
  // std::out_of_range from inside llama_tokenize on the first character it cannot place.
  const file = path.join(t.testdir(), 'spm-over-bpe.gguf');
  await writeSmallModel(file, setKey('tokenizer.ggml.model', { type: STRING, value: 'llama' })(base));
  const model = await loadModel(file);
  t.teardown(() => model.dispose());
  t.throws(() => model.tokenize('hello\nworld'), { code: 'E_TOKENIZE', message: /tokenization failed inside llama\.cpp/ });
  // Refused again the same way: the refusal left nothing behind in the vocabulary's state.
  t.throws(() => model.tokenize('hello'), { code: 'E_TOKENIZE' });
  t.equal(model.info.vocabSize, SMALL_VOCAB);
});
