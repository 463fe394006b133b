// The benchmark's prebuilt-vs-source comparison: children that report the wrong build or fail leave
// their row null with the reason (and never fail the bench), turns alternate, rates are medians; the
// target is the ratio of the two rows. Fake children cover the logic; one real child per build, on
// the tiny model, checks the entry point and the PREBUILDS_ONLY switch: it must measure each build
// the tree has and fail with the exact reason for each it lacks (test/helpers/builds.ts). CI runs it
// after `npm run prebuild` with KVSTASH_EXPECT_PREBUILDS=1, so there the prebuilt path must work.
import path from 'node:path';
import t from 'tap';
import {
  checkPromptSpeedOutput,
  measurePrebuiltVsSource,
  parsePromptSpeedArgs,
  parsePromptSpeedOutput,
  spawnPromptSpeed,
  type Build,
  type PromptSpeedOutput,
  type PromptSpeedRequest,
  type PromptSpeedRunner,
} from '../lib/bench/prebuilt-vs-source.js';
import { evaluateTargets } from '../lib/bench/targets.js';
import { ROWS, type Rows } from '../lib/bench/bench.js';
import { absenceReason, builds } from './helpers/builds.js';
import { skipUnderEmulation, tinyModel } from './helpers/fixtures.js';

const request: PromptSpeedRequest = { modelPath: '/models/m.gguf', threads: 2, tokens: 512, repetitions: 2 };
const never = new AbortController().signal;

/** A fake child per build: each call returns the next of its outputs (an Error is thrown). */
function fakeChildren(outputs: Record<Build, Array<Partial<PromptSpeedOutput> | Error>>): { run: PromptSpeedRunner; calls: Build[] } {
  const calls: Build[] = [];
  const run: PromptSpeedRunner = async (build, req) => {
    calls.push(build);
    const next = outputs[build][calls.filter((b) => b === build).length - 1];
    if (next instanceof Error) throw next;
    return { cpuVariant: build === 'source' ? 'source' : 'x86-64-v3', cpuFeatures: `${build} features`, tokens: req.tokens, samplesMs: [1000, 1000], ...next };
  };
  return { run, calls };
}

t.test('parsePromptSpeedArgs takes a model path and three positive integers', async (t) => {
  t.same(parsePromptSpeedArgs(['/m.gguf', '2', '512', '3']), { modelPath: '/m.gguf', threads: 2, tokens: 512, repetitions: 3 });
  t.throws(() => parsePromptSpeedArgs(['/m.gguf', '2', '512']), RangeError, 'three arguments');
  t.throws(() => parsePromptSpeedArgs(['/m.gguf', '2', '0', '3']), { name: 'RangeError', message: /tokens must be a positive integer, got '0'/ });
  t.throws(() => parsePromptSpeedArgs(['/m.gguf', '2.5', '512', '3']), { message: /threads must be a positive integer/ });
  t.throws(() => parsePromptSpeedArgs(['/m.gguf', '2', '512', '1e3']), { message: /repetitions must be a positive integer/ });
});

t.test("parsePromptSpeedOutput reads the child's last line and checks its fields", async (t) => {
  const line = JSON.stringify({ cpuVariant: 'source', cpuFeatures: 'CPU : AVX2 = 1', tokens: 512, samplesMs: [5.5, 6] });
  t.same(parsePromptSpeedOutput(`noise\n${line}\n`), JSON.parse(line));
  t.throws(() => parsePromptSpeedOutput(''), { message: /printed no JSON report/ });
  t.throws(() => parsePromptSpeedOutput('{"cpuVariant":"source","tokens":512,"samplesMs":[1]}'), { message: /lacks/ });
  t.throws(() => parsePromptSpeedOutput(JSON.stringify({ cpuVariant: 'source', cpuFeatures: '', tokens: 512, samplesMs: [0] })), { message: /lacks/ });
});

t.test('both builds measured: turns alternate, each rate from the median of all its decodes', async (t) => {
  const { run, calls } = fakeChildren({
    prebuilt: [{ samplesMs: [1000, 2000] }, { samplesMs: [2000, 9000] }],
    source: [{ samplesMs: [1000, 1000] }, { samplesMs: [1000, 1000] }],
  });
  const measured = await measurePrebuiltVsSource(request, 2, never, run);
  t.same(calls, ['prebuilt', 'source', 'source', 'prebuilt'], 'the build that went first in one round goes last in the next');
  t.same(measured.details, {
    tokens: 512,
    prebuilt: { cpuVariant: 'x86-64-v3', cpuFeatures: 'prebuilt features' },
    source: { cpuVariant: 'source', cpuFeatures: 'source features' },
  });
  t.equal(measured.tokensPerSecond.prebuilt, 512 / 2, 'median 2000 ms of [1000, 2000, 2000, 9000]');
  t.equal(measured.tokensPerSecond.source, 512);
  t.same(measured.samples.prebuilt?.values, [1000, 2000, 2000, 9000], 'every decode kept, in order');
});

t.test('a build missing from its place is not measured as the other one', async (t) => {
  t.test('no build/Release: without PREBUILDS_ONLY the child loads the prebuilt binary', async (t) => {
    const { run, calls } = fakeChildren({ prebuilt: [{}, {}], source: [{ cpuVariant: 'x86-64-v3' }] });
    const measured = await measurePrebuiltVsSource(request, 2, never, run);
    t.match(measured.details.source, { unavailable: /no source build in build\/Release.*x86-64-v3/ });
    t.equal(measured.tokensPerSecond.source, null);
    t.equal(measured.samples.source, undefined);
    t.equal(measured.tokensPerSecond.prebuilt, 512, 'the prebuilt binary is still measured');
    t.same(calls, ['prebuilt', 'source', 'prebuilt'], 'the unavailable build is not tried again');
  });
  t.test('a prebuilt addon without the variant loader reports no variant', async (t) => {
    const { run } = fakeChildren({ prebuilt: [{ cpuVariant: 'source' }], source: [{}, {}] });
    const measured = await measurePrebuiltVsSource(request, 2, never, run);
    t.match(measured.details.prebuilt, { unavailable: /reports no CPU variant/ });
    t.equal(measured.tokensPerSecond.prebuilt, null);
  });
  t.test('no prebuilds/ for this platform: the child fails, its reason is kept', async (t) => {
    const { run } = fakeChildren({ prebuilt: [new Error('kvstash prompt-speed: E_NATIVE_UNAVAILABLE: no prebuilt binary')], source: [{}, {}] });
    const measured = await measurePrebuiltVsSource(request, 2, never, run);
    t.same(measured.details.prebuilt, { unavailable: 'kvstash prompt-speed: E_NATIVE_UNAVAILABLE: no prebuilt binary' });
  });
  t.test('a child that fails in a later round drops the samples of its build', async (t) => {
    const { run } = fakeChildren({ prebuilt: [{}, new Error('crashed')], source: [{}, {}] });
    const measured = await measurePrebuiltVsSource(request, 2, never, run);
    t.same(measured.details.prebuilt, { unavailable: 'crashed' });
    t.equal(measured.tokensPerSecond.prebuilt, null);
    t.equal(measured.samples.prebuilt, undefined);
  });
  t.test('a child that reports another batch than asked for', async (t) => {
    const { run } = fakeChildren({ prebuilt: [{ tokens: 500 }], source: [{ samplesMs: [1] }] });
    const measured = await measurePrebuiltVsSource(request, 1, never, run);
    t.match(measured.details.prebuilt, { unavailable: /asked for 2 decodes of 512 tokens, the child reported 2 of 500/ });
    t.match(measured.details.source, { unavailable: /the child reported 1 of 512/ });
  });
});

t.test('an abort stops the comparison instead of marking a build unavailable', async (t) => {
  const controller = new AbortController();
  const run: PromptSpeedRunner = async () => {
    controller.abort();
    throw new Error('killed');
  };
  await t.rejects(measurePrebuiltVsSource(request, 2, controller.signal, run), { name: 'AbortError' });
});

t.test('the prebuiltVsSource target is the ratio of the two rows, unmeasured when one is missing', async (t) => {
  const rows = Object.fromEntries(ROWS.map(([id]) => [id, null])) as Rows;
  const target = (prebuilt: number | null, source: number | null) =>
    evaluateTargets({ type: 'q8_0', rows: { ...rows, prebuiltPromptTokensPerSecond: prebuilt, sourcePromptTokensPerSecond: source } }).find((x) => x.id === 'prebuiltVsSource')!;
  t.match(target(95, 100), { value: 0.95, met: true, op: '>=', limit: 0.9, unit: '×', formula: 'prebuiltPromptTokensPerSecond / (sourcePromptTokensPerSecond)' });
  t.match(target(85, 100), { value: 0.85, met: false });
  t.match(target(null, 100), { value: null, met: null });
});

t.test('real children on the tiny model: each build loads what PREBUILDS_ONLY picks', { skip: skipUnderEmulation('two more addon loads') }, async (t) => {
  const modelPath = await tinyModel(1, 'q8_0');
  const tiny = { modelPath, threads: 1, tokens: 64, repetitions: 2 };
  const have = builds();
  if (have.expectPrebuilt) t.ok(have.prebuilt, 'KVSTASH_EXPECT_PREBUILDS=1: prebuilds/ exist (run this after npm run prebuild)');

  // Each child must measure what it was asked to, or fail with the reason its build is absent:
  // checkPromptSpeedOutput, the bench's own judge, decides which build a child really ran.
  for (const build of ['source', 'prebuilt'] as const) {
    const child = spawnPromptSpeed(build, tiny, never).then((output) => checkPromptSpeedOutput(build, tiny, output));
    if (!have[build]) {
      await t.rejects(child, absenceReason(build, have), `no ${build} build: the child fails with why`);
      continue;
    }
    const output = await child;
    t.equal(output.tokens, 64, `${build}: 64 tokens`);
    t.equal(output.samplesMs.length, 2, `${build}: 2 timed decodes`);
    if (build === 'source') t.equal(output.cpuVariant, 'source', 'build/Release without PREBUILDS_ONLY');
    else t.ok(have.variants.includes(output.cpuVariant), `PREBUILDS_ONLY=1 loads a prebuilt CPU level (${output.cpuVariant} of ${have.variants.join(', ')})`);
  }

  await t.rejects(spawnPromptSpeed('source', { ...tiny, modelPath: path.join(t.testdir(), 'missing.gguf') }, never), /E_MODEL_LOAD/, 'a child error carries its stderr');
});
