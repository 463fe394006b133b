// `npm run bench -- --quick` end to end, as a developer runs it: the compiled entry point in a child
// process, on the tiny model. It checks that every row and every target of the report is there with a
// number; it asserts no timing (the machine is shared, and the tiny model's timings mean little).
// The exception: a build that is absent (no prebuilds/ before `npm run prebuild`, no build/Release in an
// installed package) leaves its prompt-processing row and the prebuiltVsSource target unmeasured,
// with the exact reason in the report; a build that exists must be measured (test/helpers/builds.ts).
// CI runs this file after `npm run prebuild` with KVSTASH_EXPECT_PREBUILDS=1: there both must be.
import path from 'node:path';
import fs from 'node:fs';
import t from 'tap';
import { BENCH_TYPES, ROWS, type BenchReport, type RowId } from '../lib/bench/bench.js';
import type { Build } from '../lib/bench/prebuilt-vs-source.js';
import { TARGET_IDS } from '../lib/bench/targets.js';
import { absenceReason, builds } from './helpers/builds.js';
import { requireBuiltCli, runCli } from './helpers/cli.js';
import { skipUnderEmulation } from './helpers/fixtures.js';

// `npm run bench` is `kvstash bench` (package.json runs dist/cli/main.js bench): run it as the CLI.
const runBench = (args: string[]) => runCli(['bench', ...args]);

const BUILD_ROWS: Partial<Record<RowId, Build>> = { prebuiltPromptTokensPerSecond: 'prebuilt', sourcePromptTokensPerSecond: 'source' };

t.before(() => requireBuiltCli());

t.test('bench --quick: every row and every target, for every type, with numbers', { skip: skipUnderEmulation('timings under qemu mean nothing') }, async (t) => {
  const have = builds();
  if (have.expectPrebuilt) t.ok(have.prebuilt, 'KVSTASH_EXPECT_PREBUILDS=1: prebuilds/ exist (run this after npm run prebuild)');
  const dir = t.testdir();
  const out = path.join(dir, 'results');
  const { code, stdout, stderr } = await runBench(['--quick', '--json-only', '--repetitions', '2', '--out', out, '--cache-dir', dir]);
  t.equal(code, 0, `exit 0 (stderr: ${stderr.slice(-2000)})`);

  const files = fs.readdirSync(out).filter((f) => f.endsWith('.json'));
  t.equal(files.length, 1, 'one JSON report in --out');
  const report = JSON.parse(fs.readFileSync(path.join(out, files[0]!), 'utf8')) as BenchReport;
  t.same(JSON.parse(stdout), report, '--json-only prints the report it wrote');

  t.equal(report.format, 'kvstash-bench/1');
  t.equal(report.quick, true);
  t.equal(report.config.shape, 'tiny');
  t.equal(report.config.threads, 2);
  t.match(report.kvstash.cpuVariant, /./, `the addon the bench ran on is named (${report.kvstash.cpuVariant})`);
  t.ok('version' in report.nodeLlamaCpp, `node-llama-cpp was measured (${JSON.stringify(report.nodeLlamaCpp)})`);
  t.same(report.results.map((r) => r.type), [...BENCH_TYPES], 'both weight types');

  for (const result of report.results) {
    t.equal(result.prompt.prefixTokens, 300, `${result.type}: a 300-token prefix`);
    t.equal(result.prompt.suffixTokens, 50, `${result.type}: a 50-token suffix`);
    t.equal(result.prebuiltVsSource.tokens, 512, `${result.type}: prompt processing of a 512-token batch`);
    for (const build of ['prebuilt', 'source'] as const) {
      const outcome = result.prebuiltVsSource[build];
      if (!have[build]) t.match(outcome, { unavailable: absenceReason(build, have) }, `${result.type}: no ${build} build, and the report says why`);
      else if (build === 'source') t.match(outcome, { cpuVariant: 'source', cpuFeatures: String }, `${result.type}: the source build was measured`);
      else t.ok('cpuVariant' in outcome && have.variants.includes(outcome.cpuVariant), `${result.type}: a prebuilt CPU level was measured (${JSON.stringify(outcome)})`);
    }
    for (const [id] of ROWS) {
      const value = result.rows[id];
      const build = BUILD_ROWS[id];
      if (build !== undefined && !have[build]) {
        t.equal(value, null, `${result.type} ${id}: not measured`);
        continue;
      }
      t.ok(typeof value === 'number' && Number.isFinite(value) && value >= 0, `${result.type} ${id} is a number (${value})`);
    }
    t.same(result.sessions.tiers, Array(report.config.sessions).fill('resident'), `${result.type}: every session restored the template from the resident copy`);
    t.equal(result.sessions.kvBytesPerCellMeasured, result.sessions.kvBytesPerCellFromShape, `${result.type}: the state sizes give the KV bytes per cell of the shape`);
  }

  for (const type of BENCH_TYPES) {
    const targets = report.targets.filter((target) => target.type === type);
    t.same(targets.map((target) => target.id), [...TARGET_IDS], `${type}: every target, in order`);
    const result = report.results.find((r) => r.type === type)!;
    for (const target of targets) {
      if (target.id === 'prebuiltVsSource' && !(have.prebuilt && have.source)) {
        t.equal(target.met, null, `${type} ${target.id}: not measured without both builds`);
        continue;
      }
      t.ok(typeof target.value === 'number' && Number.isFinite(target.value), `${type} ${target.id}: measured ${target.value}`);
      t.equal(typeof target.met, 'boolean', `${type} ${target.id}: judged met or not met`);
    }
  }
});

t.test('bench rejects an unknown weight type with a usage error', async (t) => {
  const { code, stderr } = await runBench(['--quick', '--types', 'q3_k']);
  t.equal(code, 2);
  t.match(stderr, /--types takes q8_0, q4_k, got 'q3_k'/);
});
