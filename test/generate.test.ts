// generate(): streaming, stops, template prefix caching, continuous batching, abort.
import t from 'tap';
import { rememberPrefixTokens, templatePrefix, TEMPLATE_LABEL_PREFIX } from '../lib/generate/generate.js';
import { promptGroupTokens, PROMPT_GROUP_MIN_TOKENS } from '../lib/generate/scheduler.js';
import { generate, loadModel, PromptCache, type Context, type Model } from '../lib/index.js';
import { prose, tinyModel } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

const system = prose(500, 7);

/** Counts the context's decode calls from now on. */
function countDecodes(context: Context): () => number {
  let decodes = 0;
  const decode = context.decode.bind(context);
  context.decode = (tokens, options) => {
    decodes++;
    return decode(tokens, options);
  };
  return () => decodes;
}

t.test('streams text chunks that add up to the result', async (t) => {
  const context = await model.createContext({ contextSize: 2048 });
  const generation = generate(context, { prompt: 'The cache of the prompt is', maxTokens: 12 });
  let streamed = '';
  for await (const chunk of generation) streamed += chunk;
  const result = await generation.result;
  t.equal(streamed, result.text);
  t.equal(result.tokens.length, 12);
  t.equal(result.finishReason, 'length');
  t.equal(model.detokenize(result.tokens), result.text);
  t.match(result, { cachedTokens: 0, tier: null, promptTokens: model.tokenize('The cache of the prompt is').length });
  t.ok(result.ttftMs > 0 && result.ttftMs <= result.totalMs);
  // Awaiting result alone runs the generation to its end too.
  const again = await generate(context, { prompt: 'The cache of the prompt is', maxTokens: 12 }).result;
  t.same(Array.from(again.tokens), Array.from(result.tokens), 'greedy is deterministic');
  await t.rejects(generate(context, { maxTokens: 3 }).result, TypeError, 'no prompt');
  await context.dispose();
});

t.test('stop strings end the text before them', async (t) => {
  const context = await model.createContext({ contextSize: 2048 });
  const full = await generate(context, { prompt: 'state of a', maxTokens: 16, sampling: { temperature: 1, seed: 3 } }).result;
  t.ok(full.text.length > 4, `sampled text: ${JSON.stringify(full.text)}`);
  const stop = full.text.slice(2, 4);
  const generation = generate(context, { prompt: 'state of a', maxTokens: 16, sampling: { temperature: 1, seed: 3 }, stop: [stop] });
  let streamed = '';
  for await (const chunk of generation) streamed += chunk;
  const stopped = await generation.result;
  t.equal(stopped.finishReason, 'stop');
  t.equal(stopped.text, full.text.slice(0, full.text.indexOf(stop)));
  t.equal(streamed, stopped.text, 'nothing of the stop string was streamed');
  await context.dispose();
});

t.test('a system prompt is cached once and restored by later calls, in this process or the next', async (t) => {
  const dir = t.testdir();
  const cache = new PromptCache({ dir });
  const context = await model.createContext({ contextSize: 4096, sequences: 2 });
  const ask = (cacheToUse: PromptCache, question: string, sequence = 0, ctx = context) =>
    generate(ctx, { system, messages: [{ role: 'user', content: question }], cache: cacheToUse, sequence, maxTokens: 6 }).result;
  const rendered = model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false });
  const prefixLength = model.tokenize(rendered, { special: true }).length;

  const first = await ask(cache, 'What is cached?');
  t.match(first, { cachedTokens: 0, tier: null });
  t.equal(first.evaluatedTokens, first.promptTokens);
  t.equal((await cache.list()).length, 1, 'the template prefix was saved');
  t.equal((await cache.list())[0]!.tokenCount, prefixLength);

  const second = await ask(cache, 'And what is not?', 1);
  t.equal(second.tier, 'resident');
  // Sequence 0 holds the whole first conversation, so the common prefix runs past the system
  // prompt into the user turn's opening tokens.
  const ownTokens = second.promptTokens - prefixLength;
  t.ok(second.cachedTokens >= prefixLength && second.evaluatedTokens <= ownTokens, `evaluated ${second.evaluatedTokens} of its own ${ownTokens} tokens`);

  await cache.flush();
  // "The next process": another cache object on the same directory and a fresh context.
  const nextCache = new PromptCache({ dir });
  const nextContext = await model.createContext({ contextSize: 4096 });
  // What a restarted server restores at load: the newest template prefix, with its tokens.
  const recent = await nextCache.recent(nextContext, { labelPrefix: TEMPLATE_LABEL_PREFIX });
  t.equal(recent.length, 1);
  t.same(Array.from(recent[0]!.tokens), Array.from(model.tokenize(rendered, { special: true })));
  t.same(await nextCache.recent(nextContext, { labelPrefix: 'named:' }), [], 'other labels are left out');
  t.ok(rememberPrefixTokens(model, recent[0]!.tokens), 'the rendered prefix reads back as the same tokens');
  // Tokens that read back as text tokenizing otherwise are not remembered under that text.
  const split = Int32Array.from([...model.tokenize('sys', { addSpecial: false }), ...model.tokenize('tem', { addSpecial: false })]);
  t.not(model.tokenize('system', { addSpecial: false }).length, split.length, 'the word is one token, not the two pieces');
  t.notOk(rememberPrefixTokens(model, split));
  const third = await ask(nextCache, 'What is cached?', 0, nextContext);
  t.match(third, { tier: 'disk', cachedTokens: prefixLength });
  t.same(Array.from(third.tokens), Array.from(first.tokens), 'the same answer as the cold call');
  await Promise.all([context.dispose(), nextContext.dispose()]);
});

t.test('tools are part of the cached prefix', async (t) => {
  const cache = new PromptCache({ dir: t.testdir() });
  const context = await model.createContext({ contextSize: 4096 });
  const tools = [{ name: 'weather', description: 'Current weather for a city', parameters: { city: 'string' } }];
  const first = await generate(context, { system: 'You are a bot.', tools, prompt: 'Weather in Oslo?', cache, maxTokens: 3 }).result;
  const second = await generate(context, { system: 'You are a bot.', tools, prompt: 'Weather in Rome?', cache, maxTokens: 3 }).result;
  t.equal(first.cachedTokens, 0);
  t.ok(second.cachedTokens > 40, `the system prompt with its tools (${second.cachedTokens} tokens) was restored`);
  await context.dispose();
});

t.test('concurrent generations on 4 sequences give each the tokens it gets alone, in shared batches', async (t) => {
  const questions = ['one', 'two two', 'three three three', 'four'];
  const alone: number[][] = [];
  for (const [i, question] of questions.entries()) {
    const context = await model.createContext({ contextSize: 4096, sequences: 4 });
    alone.push(Array.from((await generate(context, { system, prompt: question, sequence: i, maxTokens: 8 }).result).tokens));
    await context.dispose();
  }
  const context = await model.createContext({ contextSize: 4096, sequences: 4 });
  const decodes = countDecodes(context);
  const together = await Promise.all(
    questions.map((question, i) => generate(context, { system, prompt: question, sequence: i, maxTokens: 8 }).result),
  );
  together.forEach((result, i) => t.same(Array.from(result.tokens), alone[i], `sequence ${i}: same tokens`));
  // Alone, each needs 2 prompt batches (its ~520 tokens in 512-token batches) + 7 steps = 9
  // decodes: 36 for four. Batched, the steps of all four share decodes.
  // The README's figure: 12 (the four ~520-token prompts share 5 batches of 512 tokens, then the
  // 7 generation steps are shared).
  t.ok(decodes() <= 12, `${decodes()} decodes for 4 concurrent generations (36 if serialized)`);
  await context.dispose();
});

t.test('requests that arrive together restore from the cache and share one prompt batch', async (t) => {
  const cache = new PromptCache({ dir: t.testdir() });
  const context = await model.createContext({ contextSize: 4096, sequences: 4 });
  await generate(context, { system, prompt: 'warm', cache, sequence: 0, maxTokens: 1 }).result;
  // No sequence lends the prefix: every request imports it from RAM, a native operation each, and
  // the first import ends (and its prompt is submitted) while the other three still wait their turn.
  cache.setResident(context, 0, new Int32Array(0));
  const decodes = countDecodes(context);
  const questions = ['one', 'two two', 'three three three', 'four'];
  // "Together" means their imports are queued together: the context is held until all four are.
  // Left to timing, a request still in its lookup when another's import ended got a prompt batch
  // of its own (under qemu, 1 run in 8).
  let release!: () => void;
  const held = context.exclusive(() => new Promise<void>((resolve) => (release = resolve)));
  const running = questions.map((question, i) => generate(context, { system, prompt: question, cache, sequence: i, maxTokens: 4 }).result);
  for (let waited = 0; context.pendingOperations < 1 + questions.length; waited += 10) {
    if (waited > 30_000) throw new Error(`only ${context.pendingOperations - 1} imports were queued`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  t.equal(context.pendingOperations, 1 + questions.length, 'four imports queued behind the hold');
  release();
  await held;
  const results = await Promise.all(running);
  t.same(results.map((r) => r.tier), ['ram', 'ram', 'ram', 'ram']);
  // The first prompt's batch waits for the imports already queued on the context, so all four
  // prompts go in one batch, then 3 shared steps.
  t.equal(decodes(), 4, 'one prompt batch and 3 steps');
  await context.dispose();
});

t.test('prompts that arrive together are prefilled in halves, not all in one batch', async (t) => {
  t.same([promptGroupTokens(0), promptGroupTokens(100), promptGroupTokens(840), promptGroupTokens(841)], [PROMPT_GROUP_MIN_TOKENS, PROMPT_GROUP_MIN_TOKENS, 420, 421]);
  const cache = new PromptCache({ dir: null });
  const context = await model.createContext({ contextSize: 8192, sequences: 8 });
  await generate(context, { system, prompt: 'warm', cache, sequence: 0, maxTokens: 1 }).result;
  const questions = Array.from({ length: 8 }, (_, i) => prose(100, 20 + i));
  const own = await model.createContext({ contextSize: 4096 });
  const alone = [];
  for (const question of questions) alone.push(Array.from((await generate(own, { system, prompt: question, maxTokens: 3 }).result).tokens));
  await own.dispose();
  // Per decode: the prompt tokens of each sequence that had more than one token in it.
  const batches: number[][] = [];
  const decode = context.decode.bind(context);
  context.decode = (tokens, options) => {
    const counts = new Map<number, number>();
    for (const s of options!.sequence as Int32Array) counts.set(s, (counts.get(s) ?? 0) + 1);
    batches.push([...counts.values()].filter((n) => n > 1));
    return decode(tokens, options);
  };
  const results = await Promise.all(questions.map((question, i) => generate(context, { system, prompt: question, cache, sequence: i, maxTokens: 3 }).result));
  results.forEach((r, i) => t.same(Array.from(r.tokens), alone[i], `sequence ${i}: the same tokens as alone`));
  t.ok(results.every((r) => r.tier === 'resident' && r.evaluatedTokens > 90), 'each evaluated its own question after the resident prefix');
  const promptBatches = batches.filter((b) => b.length > 0);
  const sum = (b: number[]) => b.reduce((a, n) => a + n, 0);
  // 8 prompts of about 105 tokens: 4, then 2 of the 4 left, then 1 and 1.
  t.same(promptBatches.map((b) => b.length), [4, 2, 1, 1], `the 8 prompts went in batches of ${JSON.stringify(promptBatches)}`);
  let waiting = sum(promptBatches.flat());
  for (const [i, b] of promptBatches.entries()) {
    const group = promptGroupTokens(waiting);
    t.ok(sum(b) >= group || i === promptBatches.length - 1, `batch ${i}: ${JSON.stringify(b)} holds half of the ${waiting} prompt tokens waiting`);
    t.ok(sum(b) - b.at(-1)! < group, `batch ${i}: and took no prompt after reaching ${group}`);
    waiting -= sum(b);
  }
  // The first half's first tokens came before the others' prompts were evaluated.
  const ttfts = results.map((r) => r.ttftMs).sort((a, b) => a - b);
  t.ok(ttfts[3]! < ttfts[4]!, `first token times ${ttfts.map((x) => x.toFixed(1)).join(', ')} ms`);
  await context.dispose();
});

t.test('a streamed chunk reaches its reader before the next step is decoded', async (t) => {
  // A decode started in the same microtask run as the chunk's delivery took the cores from the
  // main thread, which then wrote the chunk to its socket only 2-3 ms later.
  const context = await model.createContext({ contextSize: 2048 });
  let inFlight = 0;
  const decode = context.decode.bind(context);
  context.decode = (tokens, options) => {
    inFlight++;
    return decode(tokens, options).finally(() => inFlight--);
  };
  const busy: number[] = [];
  for await (const chunk of generate(context, { prompt: 'The cache of the prompt is', maxTokens: 24 })) {
    void chunk;
    busy.push(inFlight);
  }
  t.ok(busy.length >= 10, `${busy.length} chunks`);
  t.same(busy, busy.map(() => 0), 'no decode was running when a chunk was read');
  await context.dispose();
});

t.test('a generation still running lends its restored prefix to the next one: shared KV cells, not another copy', async (t) => {
  const cache = new PromptCache({ dir: t.testdir() });
  const context = await model.createContext({ contextSize: 4096, sequences: 3 });
  const alone = async (question: string) => {
    const own = await model.createContext({ contextSize: 4096 });
    const tokens = Array.from((await generate(own, { system, prompt: question, maxTokens: 6 }).result).tokens);
    await own.dispose();
    return tokens;
  };
  const expected = { b: await alone('second question'), c: await alone('third question') };
  // The first call evaluates the system prefix and saves it (RAM tier); it keeps sequence 0
  // busy, generating, while the others start.
  const first = generate(context, { system, prompt: 'first question', cache, sequence: 0, maxTokens: 40 });
  const iterator = first[Symbol.asyncIterator]();
  await iterator.next();
  const second = await generate(context, { system, prompt: 'second question', cache, sequence: 1, maxTokens: 6 }).result;
  t.equal(second.tier, 'resident', 'copied from sequence 0 while it generates, not imported from RAM');
  t.ok(second.cachedTokens >= templatePrefix(model, { system })!.length, `${second.cachedTokens} tokens restored`);
  t.same(Array.from(second.tokens), expected.b, 'the same tokens as alone');
  for (;;) if ((await iterator.next()).done) break;
  await first.result;

  // Behind the cache's back, sequence 0 loses its tail and sequence 1 is cleared: neither record
  // may be used, and the restore falls back to the RAM entry with the same answer.
  await context.exclusive(() => {
    context.memory.remove(0, 10);
    context.memory.remove(1);
  });
  const third = await generate(context, { system, prompt: 'third question', cache, sequence: 2, maxTokens: 6 }).result;
  t.equal(third.tier, 'ram', 'an edited sequence is never copied from');
  t.same(Array.from(third.tokens), expected.c, 'the same tokens as alone');
  await context.dispose();
});

t.test('an aborted generation leaves the context usable and the cache intact', async (t) => {
  const dir = t.testdir();
  const cache = new PromptCache({ dir });
  const context = await model.createContext({ contextSize: 4096, batchSize: 64 });
  const reference = await generate(context, { system, prompt: 'reference', cache, maxTokens: 6 }).result;

  // Mid-prefill: a long user message, aborted during its evaluation.
  const mid = new AbortController();
  let restoredBeforeAbort = -1;
  cache.once('hit', (hit: { cachedTokens: number }) => (restoredBeforeAbort = hit.cachedTokens));
  const long = prose(1500, 9);
  const prefill = generate(context, { system, prompt: long, cache, maxTokens: 6, signal: mid.signal, onProgress: (done) => done >= 128 && mid.abort() });
  await t.rejects(prefill.result, { code: 'E_ABORTED' });
  // What the cache restored (the system prefix and the user turn's opening tokens the reference
  // left resident) stays; the aborted message's evaluated batches are gone again.
  const prefixLength = templatePrefix(model, { system })!.length;
  t.ok(restoredBeforeAbort >= prefixLength && restoredBeforeAbort < prefixLength + 10, `the restore reused the ${prefixLength}-token prefix (${restoredBeforeAbort} tokens)`);
  t.same(await context.exclusive(() => context.memory.range(0)), { min: 0, max: restoredBeforeAbort - 1 }, 'mid-prefill: the sequence holds what was restored and nothing more');

  // Mid-generation: aborted after the second chunk.
  const late = new AbortController();
  const generating = generate(context, { system, prompt: 'reference', cache, maxTokens: 50, signal: late.signal });
  let chunks = 0;
  await t.rejects(
    (async () => {
      for await (const chunk of generating) {
        void chunk;
        if (++chunks === 2) late.abort();
      }
    })(),
    { code: 'E_ABORTED' },
  );
  // Two chunks were streamed, so the whole prompt and at least the first generated token were
  // evaluated; the 50th generated token never is (the last sampled token is not decoded).
  const range = await context.exclusive(() => context.memory.range(0));
  t.equal(range.min, 0, 'mid-generation: the sequence starts at position 0');
  t.ok(range.max + 1 > reference.promptTokens && range.max + 1 < reference.promptTokens + 50, `and holds the prompt and some generated tokens (${range.max + 1 - reference.promptTokens})`);

  const after = await generate(context, { system, prompt: 'reference', cache, maxTokens: 6 }).result;
  t.same(Array.from(after.tokens), Array.from(reference.tokens), 'the same answer as before the aborts');
  t.ok(after.cachedTokens > 0);
  const verified = await cache.verify();
  t.same(verified.corrupt, []);
  t.equal(verified.ok, 1);
  await context.dispose();
});
