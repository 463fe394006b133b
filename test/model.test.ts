// The model: what info() reports for a known shape, tokenization, chat templates, fingerprints,
// and that every synthetic weight type loads and computes.
import t from 'tap';
import { fingerprintModel, loadModel, SYNTHETIC_SHAPES, systemInfo, type Model } from '../lib/index.js';
import { maxAbsDiff, promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

t.test('info describes the tiny shape exactly', async (t) => {
  const shape = SYNTHETIC_SHAPES.tiny;
  t.match(model.info, {
    architecture: 'qwen2',
    embeddingSize: 64,
    layers: 2,
    heads: 4,
    kvHeads: 2,
    vocabSize: 151936,
    trainedContextSize: 4096,
    specialTokens: { eos: 151643, eot: 151645, addBos: false },
  });
  t.equal(model.info.layers, shape.layers);
  t.match(model.info.chatTemplate, /<\|im_start\|>/, 'the qwen2 vocabulary brings its chat template');
  t.equal(model.metadata()['general.architecture'], 'qwen2');
});

t.test('tokenize and detokenize', async (t) => {
  const text = 'Hello world, this is kvstash. Grüße — 日本語 🙂';
  const tokens = model.tokenize(text);
  t.type(tokens, Int32Array);
  t.same(Array.from(model.tokenize('Hello world')), [9707, 1879], 'the real qwen2 tokenizer');
  t.equal(model.detokenize(tokens), text, 'round trip, including multi-byte characters');
  const bytes = Buffer.concat(Array.from(tokens, (token) => model.tokenBytes(token)));
  t.equal(bytes.toString('utf8'), text, 'token bytes concatenate to the text');

  t.same(Array.from(model.tokenize('<|im_start|>', { special: true })), [151644], 'special: true parses control tokens');
  t.ok(model.tokenize('<|im_start|>').length > 1, 'by default control tokens in text stay text');
  t.equal(model.detokenize([151644], { special: true }), '<|im_start|>');
  t.equal(model.isEndOfGeneration(151645), true);
  t.equal(model.isEndOfGeneration(tokens[0]!), false);
  t.throws(() => model.detokenize([model.info.vocabSize]), { code: 'E_TOKEN_INVALID' });
  t.throws(() => model.tokenize(42 as never), TypeError);
});

t.test('chat templates', async (t) => {
  const messages = [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: 'Hi' },
  ];
  t.equal(
    model.applyChatTemplate(messages),
    '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
  );
  t.equal(
    model.applyChatTemplate(messages, { addAssistant: false }),
    '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n',
  );
  t.match(model.applyChatTemplate(messages, { template: 'llama2' }), /\[INST\]/, 'a built-in template by name');
  t.throws(() => model.applyChatTemplate(messages, { template: 'no such template {{' }), { code: 'E_CHAT_TEMPLATE' });
  t.throws(() => model.applyChatTemplate([{ role: 'user' }] as never), TypeError);
});

t.test('fingerprints tell weights apart, not files', async (t) => {
  const same = await fingerprintModel(await tinyModel());
  t.equal(model.fingerprint, same, 'stable for the same file');
  t.match(model.fingerprint, /^[0-9a-f]{64}$/);
  const other = await fingerprintModel(await tinyModel(2));
  t.not(other, same, 'another seed of the same shape has another fingerprint');
});

t.test('every synthetic weight type loads; quantized ones compute close to their f16 source', async (t) => {
  const prompt = promptTokens(model, 16, 30);
  const logitsOf = async (file: string) => {
    const m = await loadModel(file);
    const c = await m.createContext({ contextSize: 256 });
    await c.decode(prompt);
    const logits = c.logits();
    await m.dispose();
    return logits;
  };
  // f32 models draw their weights from another generator than f16 ones (see synthetic.ts), so
  // they only have to load and give finite logits.
  const f32 = await logitsOf(await tinyModel(1, 'f32'));
  t.ok(f32.every(Number.isFinite), 'f32 logits are finite');
  // q8_0 and q4_k are quantized from the f16 model of the same seed. Quantization error grows as
  // the bits shrink: measured 0.006 (q8_0) and 0.025 (q4_k) on O(1) logits; the bounds leave
  // room for other CPUs' kernels and stay below the > 0.1 change other weights cause.
  const reference = await logitsOf(await tinyModel(1, 'f16'));
  for (const [type, bound] of [['q8_0', 0.03], ['q4_k', 0.1]] as const) {
    const diff = maxAbsDiff(await logitsOf(await tinyModel(1, type)), reference);
    t.ok(diff < bound, `${type}: max |diff| vs f16 ${diff.toFixed(5)} < ${bound}`);
  }
  // On a CPU with AMX, the pinned llama.cpp's AMX kernels died on the first q8_0 matrix product
  // of several tokens (CMakeLists.txt): a native build must not compile them in.
  t.notMatch(systemInfo().cpuFeatures, /AMX_INT8 = 1/, 'no AMX kernels in the build');
  const otherWeights = maxAbsDiff(await logitsOf(await tinyModel(2, 'f16')), reference);
  t.ok(otherWeights > 0.1, `another seed moves the logits by ${otherWeights.toFixed(3)}`);
});
