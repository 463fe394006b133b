// `kvstash demo` end to end, as a user runs it: the compiled CLI in a child process. The warm runs
// must answer exactly as a cold prefill of the same prompt does, which proves the restore exact.
import path from 'node:path';
import t from 'tap';
import type { DemoReport } from '../lib/cli/demo.js';
import { buildDemoPrompt, DEMO_QUESTIONS } from '../lib/tools/demo-prompt.js';
import { loadModel, writeSyntheticModel } from '../lib/index.js';
import { requireBuiltCli, runCli } from './helpers/cli.js';

const PREFIX_TOKENS = 300;
const GENERATED = 4;
const THREADS = 2;

t.before(requireBuiltCli);

t.test('demo: cold evaluates everything, warm only the question, and warm answers equal recompute', async (t) => {
  const modelPath = path.join(t.testdir(), 'tiny.gguf');
  await writeSyntheticModel({ shape: 'tiny', path: modelPath });
  const args = ['demo', '--model', modelPath, '--json', '--prefix-tokens', `${PREFIX_TOKENS}`, '--tokens', `${GENERATED}`, '--threads', `${THREADS}`];
  const { code, stdout, stderr } = await runCli(args);
  t.equal(code, 0, `exit 0 (stderr: ${stderr})`);
  const report = JSON.parse(stdout) as DemoReport;

  t.equal(report.model.path, modelPath);
  t.equal(report.model.synthetic, false, 'a model given with --model is not labelled synthetic');
  t.same(report.context, { contextSize: 4096, batchSize: 512, threads: THREADS });
  const prefix = report.prefix.tokens;
  t.ok(Math.abs(prefix - PREFIX_TOKENS) <= 50, `prefix of ${prefix} tokens is within 50 of ${PREFIX_TOKENS}`);
  t.ok(report.prefix.stateBytes > 0 && report.prefix.fileBytes > 0, 'the state was exported and saved');

  const { cold, warm } = report;
  t.equal(cold.question, DEMO_QUESTIONS[0]);
  t.equal(cold.evaluatedTokens, prefix + cold.suffixTokens, 'cold evaluates prefix and suffix');
  t.equal(cold.promptTokens, prefix + cold.suffixTokens);
  t.equal(cold.restoreMs, null);
  t.equal(cold.speedup, 1);
  t.equal(warm.length, 3);
  warm.forEach((run, i) => {
    t.equal(run.run, `warm ${i + 1}`);
    t.equal(run.question, DEMO_QUESTIONS[i]);
    t.equal(run.evaluatedTokens, run.suffixTokens, `${run.run} evaluates only its suffix`);
    t.equal(run.promptTokens, prefix + run.suffixTokens);
    t.ok(run.restoreMs! > 0, `${run.run} restore took ${run.restoreMs} ms`);
    t.ok(run.ttftMs >= run.restoreMs! + run.prefillMs - 0.02, 'TTFT includes restore and prefill');
    t.ok(run.tokens.length >= 1 && run.tokens.length <= GENERATED);
  });
  t.same(warm[0]!.tokens, cold.tokens, 'warm 1 (the cold question) generated the cold tokens');
  t.equal(report.restoreExact, true);

  // Recompute each warm prompt without any cache: prefix and suffix in one decode, fresh context.
  const model = await loadModel(modelPath);
  t.teardown(() => model.dispose());
  const prompt = buildDemoPrompt(model, PREFIX_TOKENS);
  t.equal(prompt.prefix.length, prefix, 'the prompt builder is deterministic');
  for (const [i, run] of warm.entries()) {
    const suffix = prompt.suffixes[i]!;
    t.equal(run.suffixTokens, suffix.length);
    const context = await model.createContext({ contextSize: 4096, batchSize: 512, threads: THREADS });
    const sampler = model.createSampler();
    await context.decode(Int32Array.from([...prompt.prefix, ...suffix]));
    const tokens = [sampler.sample(context)];
    t.equal(run.tokens[0], tokens[0], `${run.run}: first token equals a cold full prefill's`);
    while (tokens.length < run.tokens.length) {
      await context.decode([tokens[tokens.length - 1]!]);
      tokens.push(sampler.sample(context));
    }
    t.same(run.tokens, tokens, `${run.run}: every generated token equals the recomputed ones`);
    sampler.dispose();
    await context.dispose();
  }
});

t.test('an unknown command prints the usage on stderr and exits 2', async (t) => {
  const { code, stdout, stderr } = await runCli(['bogus']);
  t.equal(code, 2);
  t.equal(stdout, '');
  t.match(stderr, /^kvstash: unknown command 'bogus'\n/);
  t.match(stderr, /Usage: kvstash <command> \[options\]/);
  t.match(stderr, /\n {2}demo {2}/);
});

t.test('an unknown flag prints the command usage and exits 2', async (t) => {
  const { code, stderr } = await runCli(['demo', '--bogus']);
  t.equal(code, 2);
  t.match(stderr, /unknown option '--bogus'/);
  t.match(stderr, /Usage: kvstash demo \[options\]/);
});

t.test('a coded error is one line without a stack, exit 1', async (t) => {
  const missing = path.join(t.testdir(), 'missing.gguf');
  const { code, stderr } = await runCli(['demo', '--json', '--model', missing]);
  t.equal(code, 1);
  t.match(stderr, /\nkvstash: E_MODEL_LOAD: .*missing\.gguf.*\n$/);
  t.notMatch(stderr, /\n\s+at /, 'no stack trace');
});
