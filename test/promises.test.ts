// Promises of the README that no other test held.
//
// "Nothing aborts the process": bad positions to the KV cache edits, bad batch/ubatch/thread counts,
// bad tokens to a sampler and to tokenBytes each get a coded error (KvstashError) or a RangeError/
// TypeError naming the argument, and the context is left exactly as it was. llama.cpp asserts on
// several of these (a GGML_ASSERT ends the process), so reaching the end of this file is part of
// the assertion too.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { PACKAGE_ROOT } from '../lib/binding.js';
import { preparePrompt } from '../lib/generate/generate.js';
import { generate, KvstashError, loadModel, Session, systemInfo, type ChatMessage, type Context, type Model } from '../lib/index.js';
import { bitIdentical, maxAbsDiff, prose, promptTokens, tinyModel } from './helpers/fixtures.js';
import { probeLogits } from './helpers/probe.js';

let model: Model;
let context: Context;
let reference: Float32Array;
const prompt: number[] = [];
const CONTEXT_SIZE = 256;

t.before(async () => {
  model = await loadModel(await tinyModel());
  context = await model.createContext({ contextSize: CONTEXT_SIZE, sequences: 2 });
  prompt.push(...promptTokens(model, 12, 21));
  await context.decode(prompt);
  reference = context.logits();
});
t.teardown(async () => {
  await context.dispose();
  await model.dispose();
});

/** The refusal left both sequences and the last logits as they were. */
function unchanged(t: Test, what: string): void {
  t.same(context.memory.range(0), { min: 0, max: prompt.length - 1 }, `${what}: sequence 0 unchanged`);
  t.same(context.memory.range(1), { min: -1, max: -1 }, `${what}: sequence 1 unchanged`);
  t.ok(bitIdentical(context.logits(), reference), `${what}: last logits unchanged`);
}

type Expected = { code: string } | typeof RangeError | typeof TypeError;

function refuses(t: Test, what: string, run: () => unknown, expected: Expected): void {
  let thrown: unknown;
  try {
    run();
  } catch (err) {
    thrown = err;
  }
  if (typeof expected === 'function') {
    t.type(thrown, expected, `${what}: ${expected.name}`);
  } else {
    t.type(thrown, KvstashError, `${what}: a KvstashError`);
    t.equal((thrown as KvstashError | undefined)?.code, expected.code, `${what}: ${expected.code}`);
  }
  t.ok(thrown instanceof Error && thrown.message.length > 15, `${what}: says why (${(thrown as Error | undefined)?.message})`);
  unchanged(t, what);
}

const POSITION = { code: 'E_POSITION_INVALID' };
const SEQUENCE = { code: 'E_SEQUENCE_INVALID' };
const TOKEN = { code: 'E_TOKEN_INVALID' };

t.test('bad positions to memory.remove/keep/shift/copy', async (t) => {
  const edits: Array<[string, () => unknown, Expected]> = [
    ['remove p0 = -2', () => context.memory.remove(0, -2), POSITION],
    ['remove p0 past the context', () => context.memory.remove(0, CONTEXT_SIZE + 1), POSITION],
    ['remove p1 = 2^31', () => context.memory.remove(0, 0, 2 ** 31), POSITION],
    ['remove p0 = NaN', () => context.memory.remove(0, NaN), TypeError],
    ['remove p0 = 1.5', () => context.memory.remove(0, 1.5), TypeError],
    ['remove p0 = -Infinity', () => context.memory.remove(0, -Infinity), TypeError],
    ['remove sequence 2 of 2', () => context.memory.remove(2, 0), SEQUENCE],
    ['keep sequence -2', () => context.memory.keep(-2), SEQUENCE],
    ['keep sequence 9', () => context.memory.keep(9), SEQUENCE],
    ['keep sequence 0.5', () => context.memory.keep(0.5), TypeError],
    ['shift p0 = -5', () => context.memory.shift(0, 1, -5), POSITION],
    ['shift p1 far past the context', () => context.memory.shift(0, 1, 0, 1e9), POSITION],
    ['shift by 2^31', () => context.memory.shift(0, 2 ** 31), RangeError],
    ['shift by 1.5', () => context.memory.shift(0, 1.5), TypeError],
    ['shift positions to the context end', () => context.memory.shift(0, CONTEXT_SIZE), POSITION],
    ['shift sequence -3', () => context.memory.shift(-3, 1), SEQUENCE],
    ['copy p0 = -7', () => context.memory.copy(0, 1, -7), POSITION],
    ['copy p1 past the context', () => context.memory.copy(0, 1, 0, CONTEXT_SIZE + 5), POSITION],
    ['copy to sequence 2 of 2', () => context.memory.copy(0, 2), SEQUENCE],
    ['copy from sequence -4', () => context.memory.copy(-4, 1), SEQUENCE],
    ['copy p0 = "3"', () => context.memory.copy(0, 1, '3' as unknown as number), TypeError],
  ];
  for (const [what, run, expected] of edits) refuses(t, what, run, expected);
});

t.test('bad batchSize, ubatchSize and threads', async (t) => {
  const options: Array<[string, Parameters<Model['createContext']>[0], typeof RangeError | typeof TypeError]> = [
    ['batchSize 0', { batchSize: 0 }, RangeError],
    ['batchSize -1', { batchSize: -1 }, RangeError],
    ['batchSize 2^40', { batchSize: 2 ** 40 }, RangeError],
    ['batchSize 1.5', { batchSize: 1.5 }, TypeError],
    ['batchSize NaN', { batchSize: NaN }, TypeError],
    ['ubatchSize 0', { ubatchSize: 0 }, RangeError],
    ['ubatchSize larger than batchSize', { batchSize: 64, ubatchSize: 128 }, RangeError],
    ['ubatchSize 2^31', { ubatchSize: 2 ** 31 }, RangeError],
    ['threads 0', { threads: 0 }, RangeError],
    ['threads -2', { threads: -2 }, RangeError],
    ['threads 1e6', { threads: 1e6 }, RangeError],
    ['threads "4"', { threads: '4' as unknown as number }, TypeError],
  ];
  for (const [what, option, expected] of options) {
    await t.rejects(model.createContext({ contextSize: 64, ...option }), expected, what);
  }
  unchanged(t, 'after the refused contexts');
  // The edges are accepted: the check is not stricter than its promise.
  const edge = await model.createContext({ contextSize: 64, batchSize: 1, ubatchSize: 1, threads: 1 });
  await edge.decode(prompt.slice(0, 3));
  t.same(edge.memory.range(0), { min: 0, max: 2 }, 'batchSize 1, ubatchSize 1, threads 1 decode');
  await edge.dispose();
});

t.test('bad tokens to sampler.accept and tokenBytes', async (t) => {
  const vocab = model.info.vocabSize;
  const sampler = model.createSampler({ repeatPenalty: 1.3, repeatLastN: 16 });
  const before = sampler.sample(context);
  const cases: Array<[string, () => unknown, Expected]> = [
    ['accept [-1]', () => sampler.accept([-1]), TOKEN],
    ['accept [vocab size]', () => sampler.accept([vocab]), TOKEN],
    ['accept [1, 2^31 - 1]', () => sampler.accept([1, 2 ** 31 - 1]), TOKEN],
    ['accept Int32Array [-5]', () => sampler.accept(Int32Array.of(-5)), TOKEN],
    ['accept [1.5]', () => sampler.accept([1.5]), TypeError],
    ['accept ["7"]', () => sampler.accept(['7'] as unknown as number[]), TypeError],
    ['accept 7', () => sampler.accept(7 as unknown as number[]), TypeError],
    ['tokenBytes(-1)', () => model.tokenBytes(-1), TOKEN],
    ['tokenBytes(vocab size)', () => model.tokenBytes(vocab), TOKEN],
    ['tokenBytes(2^31)', () => model.tokenBytes(2 ** 31), TOKEN],
    ['tokenBytes(0.5)', () => model.tokenBytes(0.5), TypeError],
    ['tokenBytes(NaN)', () => model.tokenBytes(NaN), TypeError],
  ];
  for (const [what, run, expected] of cases) refuses(t, what, run, expected);
  // A refused accept() added nothing to the penalty window: the sampler picks as before.
  t.equal(sampler.sample(context), before, 'the sampler was not changed by the refused tokens');
  t.ok(model.tokenBytes(vocab - 1).length >= 0, 'the last token of the vocabulary has bytes');
  sampler.dispose();
});

t.test('everySeconds: a turn that completes that long after the last checkpoint writes one', async (t) => {
  // The session reads the clock through Date.now(): moving it forward stands for the time passing.
  const realNow = Date.now;
  let offset = 0;
  Date.now = () => realNow() + offset;
  t.teardown(() => {
    Date.now = realNow;
  });
  const dir = t.testdir();
  const own = await model.createContext({ contextSize: 1024 });
  const session = await Session.open({ dir, id: 'clock', context: own, system: 'Be brief.', checkpoint: { everyTurns: 0, everySeconds: 60 } });
  const checkpoints = () => session.stats().checkpoints;
  await session.send('one', { maxTokens: 2 }).result;
  t.equal(checkpoints(), 0, 'a turn within the minute: none');
  offset += 61_000;
  await session.send('two', { maxTokens: 2 }).result;
  t.equal(checkpoints(), 1, 'a turn 61 s after the open: one');
  await session.send('three', { maxTokens: 2 }).result;
  t.equal(checkpoints(), 1, 'the next turn, within the minute of that checkpoint: none');
  offset += 61_000;
  await session.send('four', { maxTokens: 2 }).result;
  t.equal(checkpoints(), 2, 'another 61 s later: a second one');
  t.equal(fs.readdirSync(path.join(dir, 'clock', 'checkpoints')).length, 2, 'both are on disk');
  await session.close();
  await own.dispose();
});

/** A child that opens a session with onExit checkpoints, completes one turn, then either idles (to
 * be signalled) or lets its event loop run dry (beforeExit). */
function exitChild(dir: string, modelPath: string, idle: boolean) {
  const script = `
    const { loadModel, Session } = require(${JSON.stringify(path.resolve(__dirname, '../lib/index.ts'))});
    (async () => {
      const model = await loadModel(${JSON.stringify(modelPath)});
      const context = await model.createContext({ contextSize: 1024 });
      const session = await Session.open({ dir: ${JSON.stringify(dir)}, id: 'exit', context, system: 'hi', checkpoint: { everyTurns: 0, everySeconds: 0, onExit: true } });
      await session.send('hello', { maxTokens: 2 }).result;
      process.stdout.write('ready\\n');
      ${idle ? 'setInterval(() => {}, 1000);' : ''}
    })();
  `;
  const child = spawn(process.execPath, [...process.execArgv, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<[number | null, string | null]>((resolve) => child.once('exit', (code, signal) => resolve([code, signal])));
  const ready = new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && resolve());
    void exited.then(([code, signal]) => reject(new Error(`the child ended before it was ready (${code ?? signal})`)));
  });
  return { child, ready, exited };
}

t.test('onExit: SIGINT checkpoints, then the process ends by SIGINT', async (t) => {
  const dir = t.testdir();
  const { child, ready, exited } = exitChild(dir, await tinyModel(), true);
  await ready;
  t.notOk(fs.existsSync(path.join(dir, 'exit', 'checkpoints')), 'no checkpoint before the signal');
  child.kill('SIGINT');
  const [code, signal] = await exited;
  t.equal(signal, 'SIGINT', `ended by the signal (code ${code})`);
  t.equal(fs.readdirSync(path.join(dir, 'exit', 'checkpoints')).length, 1, 'a checkpoint was written first');
});

t.test('onExit: beforeExit checkpoints, then the process exits normally', async (t) => {
  const dir = t.testdir();
  const { ready, exited } = exitChild(dir, await tinyModel(), false);
  await ready;
  const [code, signal] = await exited;
  t.same([code, signal], [0, null], 'exited with code 0');
  t.equal(fs.readdirSync(path.join(dir, 'exit', 'checkpoints')).length, 1, 'a checkpoint was written as the event loop ran dry');
});

t.test('overflow summarize without a summarizer: the session\'s model summarises the dropped turn', async (t) => {
  const dir = t.testdir();
  const own = await model.createContext({ contextSize: 256 });
  const session = await Session.open({ dir, id: 'summary', context: own, system: 'Be brief.', checkpoint: { everyTurns: 0, everySeconds: 0 }, overflow: { policy: 'summarize' } });
  // Every token the session's context evaluates, in order. The real decode runs; this only
  // watches, because the tiny model's greedy answer is the same newlines whatever the transcript
  // (its tied embeddings echo the prompt's last token), so the summary text cannot show which
  // messages the summarizer was given, while the tokens it asked the model about can.
  const decoded: number[] = [];
  const decode = own.decode.bind(own);
  own.decode = (tokens, options) => (decoded.push(...tokens), decode(tokens, options));
  const asked: string[] = [];
  const replies: string[] = [];
  let decodedBeforeSummary = 0;
  for (let turn = 0; session.stats().summaries === 0 && turn < 12; turn++) {
    decodedBeforeSummary = decoded.length;
    asked.push(`Turn ${turn}: ${prose(25, turn)}`);
    replies.push((await session.send(asked[turn]!, { maxTokens: 12 }).result).text);
  }
  t.equal(session.stats().summaries, 1, 'the conversation overflowed into one summary');
  const summary = session.messages[0]!;
  t.equal(summary.role, 'system');
  t.match(summary.content, /^Summary of the earlier conversation:\n/);
  const request = (transcript: string): ChatMessage[] => [
    { role: 'system', content: 'Summarise the conversation below in a few sentences, keeping names, facts and open questions.' },
    { role: 'user', content: transcript },
  ];
  // The summary request the model was asked during the overflowing turn: exactly the dropped
  // first exchange (not another turn, not the whole window, not the user's message alone).
  const asText = (tokens: ArrayLike<number>) => `,${Array.from(tokens).join(',')},`;
  const overflowingTurn = asText(decoded.slice(decodedBeforeSummary));
  const askedAbout = (transcript: string) => overflowingTurn.includes(asText(preparePrompt(model, { messages: request(transcript) }).tokens));
  t.ok(askedAbout(`user: ${asked[0]}\nassistant: ${replies[0]}`), 'the model was asked to summarise exactly the dropped first exchange');
  t.notOk(askedAbout(`user: ${asked[1]}\nassistant: ${replies[1]}`), 'and not the second');
  // What the model itself answers to the summary request for the first turn, in a fresh context.
  const fresh = await model.createContext({ contextSize: 256 });
  const expected = await generate(fresh, { messages: request(`user: ${asked[0]}\nassistant: ${replies[0]}`), maxTokens: 32 }).result;
  await fresh.dispose();
  t.equal(summary.content, `Summary of the earlier conversation:\n${expected.text.trim()}`, 'the summary is the model\'s own answer to the summary request');
  await session.close();
  await own.dispose();
});

t.test('a long session resumed midway continues exactly as the uninterrupted one', async (t) => {
  // 10 turns through a 256-token context, interrupted after turn 5 (a checkpoint was written
  // after turn 4): the resumed half overflows (drop-oldest) three times, as the uninterrupted run
  // does, so the resume must also carry the overflow state exactly.
  const questions = Array.from({ length: 10 }, (_, turn) => `Question ${turn}: ${prose(12 + (turn % 4), 50 + turn)}?`);
  const options = { system: prose(20, 99), checkpoint: { everyTurns: 2, everySeconds: 0 } };
  const send = { maxTokens: 10 };
  const run = async (dir: string, stopAfter: number, from = 0): Promise<{ texts: string[]; probe: Float32Array }> => {
    const own = await model.createContext({ contextSize: 256 });
    const session = from === 0 ? await Session.open({ dir, id: 'long', context: own, ...options }) : await Session.resume({ dir, id: 'long', context: own, checkpoint: options.checkpoint });
    if (from > 0) t.equal(session.resumeReport!.path, 'checkpoint', `resumed from a checkpoint (${session.resumeReport!.restoredTokens} tokens)`);
    const texts: string[] = [];
    for (let turn = from; turn < stopAfter; turn++) texts.push((await session.send(questions[turn]!, send).result).text);
    const clears = session.stats().clears;
    const probe = await probeLogits(model, own);
    await session.close();
    await own.dispose();
    t.comment(`turns ${from}-${stopAfter - 1}: ${clears} overflow clears`);
    return { texts, probe };
  };
  const uninterrupted = await run(t.testdir(), 10);
  const dir = path.join(t.testdir(), 'interrupted');
  const before = await run(dir, 5);
  const after = await run(dir, 10, 5);
  t.same([...before.texts, ...after.texts], uninterrupted.texts, 'every reply equals the uninterrupted run\'s');
  // The replies of the tiny model say little (see probeLogits); the cells must match too.
  const diff = maxAbsDiff(after.probe, uninterrupted.probe);
  t.ok(diff < 1e-3, `the sequence ends holding what the uninterrupted run's holds (max logit difference ${diff})`);
});

const VARIANTS: Record<string, string[]> = {
  x64: ['x86-64-v4+vnni', 'x86-64-v4', 'x86-64-v3', 'x86-64-v2'],
  arm64: ['armv8.2-a+dotprod+fp16', 'armv8-a'],
};
const hasCompiler = spawnSync('cc', ['--version']).status === 0;

t.test('systemInfo().cpuVariant: "source" for a source build; in a prebuild, the variant KVSTASH_CPU_VARIANT forced', {
  skip: !VARIANTS[process.arch] ? `no CPU variants for ${process.arch}` : !hasCompiler ? 'needs a C compiler (cc) to build the loader' : false,
}, async (t) => {
  t.equal(systemInfo().cpuVariant, 'source', 'this (source) build says so');
  // A prebuild's layout, made here: the loader (scripts/cpu-variant-loader.c, compiled as
  // scripts/prebuild-variants.js does) as build/Release/kvstash.node, and this source build standing
  // in for every variant it may pick, kvstash-<variant>.so next to it.
  const root = t.testdir();
  const release = path.join(root, 'build', 'Release');
  fs.mkdirSync(release, { recursive: true });
  fs.cpSync(path.join(PACKAGE_ROOT, 'lib'), path.join(root, 'lib'), { recursive: true });
  fs.copyFileSync(path.join(PACKAGE_ROOT, 'package.json'), path.join(root, 'package.json'));
  fs.symlinkSync(path.join(PACKAGE_ROOT, 'node_modules'), path.join(root, 'node_modules'));
  execFileSync('cc', [
    '-std=c11', '-O2', '-fPIC', '-shared',
    '-I', path.join(path.dirname(require.resolve('node-api-headers/package.json')), 'include'),
    path.join(PACKAGE_ROOT, 'scripts', 'cpu-variant-loader.c'),
    '-o', path.join(release, 'kvstash.node'), '-ldl', '-lpthread',
  ]);
  const variants = VARIANTS[process.arch]!;
  const standIn = variants[variants.length - 1]!;
  fs.symlinkSync(path.join(PACKAGE_ROOT, 'build', 'Release', 'kvstash.node'), path.join(release, `kvstash-${standIn}.so`));
  const load = (env: Record<string, string>) => {
    const script = `
      const { systemInfo } = require(${JSON.stringify(path.join(root, 'lib', 'index.ts'))});
      try { process.stdout.write(JSON.stringify({ variant: systemInfo().cpuVariant })); }
      catch (err) { process.stdout.write(JSON.stringify({ code: err.code, message: err.message })); }
    `;
    const child = spawnSync(process.execPath, [...process.execArgv, '-e', script], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, ...env } });
    t.equal(child.status, 0, `the child ran (stderr: ${child.stderr.slice(-300)})`);
    return JSON.parse(child.stdout) as { variant?: string; code?: string; message?: string };
  };
  t.same(load({ KVSTASH_CPU_VARIANT: standIn }), { variant: standIn }, `KVSTASH_CPU_VARIANT=${standIn} loads that build and says so`);
  const missing = variants[0]!;
  const refused = load({ KVSTASH_CPU_VARIANT: missing });
  t.equal(refused.code, 'E_NATIVE_UNAVAILABLE', `a forced variant that is not there (${missing}) is E_NATIVE_UNAVAILABLE`);
  t.match(refused.message, new RegExp(`cannot load the ${missing.replace(/[+]/g, '\\+')} build`), 'and says which build it could not load');
});

t.test('the process is alive and the context still decodes', async (t) => {
  await context.decode([prompt[0]!], { start: prompt.length });
  t.same(context.memory.range(0), { min: 0, max: prompt.length });
});
