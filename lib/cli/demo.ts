/**
 * `kvstash demo`: the package's claim, measured on the user's machine. A long system prompt is
 * evaluated once (cold) and its KV state saved; three later questions restore that state from the
 * file and evaluate only their own tokens (warm). Warm 1 repeats the cold question, so its answer
 * must match the cold one token for token: the restore is checked, not assumed.
 */
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { KvstashError } from '../errors.js';
import type { Context } from '../llama/context.js';
import { defaultThreads, loadModel, type Model } from '../llama/model.js';
import type { Sampler } from '../llama/sampler.js';
import { buildDemoPrompt, DEMO_QUESTIONS } from '../tools/demo-prompt.js';
import { median } from '../tools/stats.js';
import { DEMO_SYNTHETIC as SYNTHETIC, syntheticModelPath } from '../tools/synthetic-model.js';
import { sameTokens } from '../tools/tokens.js';
import { userCacheDir } from '../util/paths.js';
import { fmt, ms, printable, round, size, table, tildify, times } from './format.js';
import type { Command, FlagSpecs, Flags } from './main.js';
import { cliUi, withStatus } from './progress.js';

const CONTEXT_SIZE = 4096;
const BATCH_SIZE = 512;
const SYNTHETIC_NOTE = 'Its weights are random: the text it writes is gibberish. The compute, timings and KV sizes are real.';

const DEMO_FLAGS = {
  model: { type: 'string', value: 'path.gguf', help: 'Run this GGUF model instead of the synthetic one' },
  'cache-dir': {
    type: 'string',
    value: 'dir',
    help: 'Where the synthetic model is kept (in <dir>/models). Default $XDG_CACHE_HOME/kvstash or ~/.cache/kvstash',
  },
  'prefix-tokens': { type: 'integer', help: 'Length of the cached system prompt, tokens. Default 2000', min: 64, max: 3500 },
  tokens: { type: 'integer', help: 'Tokens to generate per answer. Default 16', min: 1, max: 256 },
  threads: { type: 'integer', help: 'Compute threads. Default: every core', min: 1, max: 1024 },
  json: { type: 'boolean', help: 'Print one JSON object with every number instead of the table' },
} as const satisfies FlagSpecs;

export const demoCommand: Command<typeof DEMO_FLAGS> = {
  summary: 'Time a first token with and without a saved KV cache of a long system prompt',
  flags: DEMO_FLAGS,
  run: runDemo,
};

export interface DemoRun {
  run: string;
  question: string;
  /** Tokens the answer is conditioned on: prefix + suffix. */
  promptTokens: number;
  suffixTokens: number;
  /** Tokens this run evaluated before its first sample. */
  evaluatedTokens: number;
  /** Clearing the sequence and loading the prefix state from the file; null for the cold run. ms. */
  restoreMs: number | null;
  /** Evaluating `evaluatedTokens`. ms. */
  prefillMs: number;
  /** Time to first token: restore + prefill + first sample. ms. */
  ttftMs: number;
  /** Cold TTFT / this TTFT. */
  speedup: number;
  /** Greedy tokens, the first included. */
  tokens: number[];
  text: string;
}

export interface DemoReport {
  model: {
    path: string;
    synthetic: boolean;
    /** Present for the synthetic model, saying what its numbers mean. */
    note?: string;
    name: string;
    parameters: number;
    sizeBytes: number;
  };
  context: { contextSize: number; batchSize: number; threads: number };
  prefix: {
    tokens: number;
    /** Bytes of the sequence's state in memory (exportState). */
    stateBytes: number;
    /** Bytes of the state file (saveState), with its token list. */
    fileBytes: number;
    exportMs: number;
    saveMs: number;
  };
  cold: DemoRun;
  warm: DemoRun[];
  /** Median warm speed-up. */
  warmSpeedup: number;
  /** Warm 1 generated exactly the cold run's tokens. */
  restoreExact: boolean;
}

async function runDemo(flags: Flags<typeof DEMO_FLAGS>, { signal }: { signal: AbortSignal }): Promise<number> {
  const json = flags.json === true;
  const say = (line = ''): void => {
    if (!json) process.stdout.write(`${line}\n`);
  };
  const threads = flags.threads ?? defaultThreads();
  const synthetic = flags.model === undefined;
  const modelPath = synthetic ? await syntheticModelPath(flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']), signal, cliUi) : path.resolve(flags.model!);

  say('kvstash demo: reuse the saved KV cache of a long system prompt');
  say();
  if (synthetic) {
    say(`Model     synthetic ${SYNTHETIC.shape} (${SYNTHETIC.type}, seed ${SYNTHETIC.seed}): ${tildify(modelPath)}`);
    say(`          ${SYNTHETIC_NOTE}`);
    say('          Run a real model with: npm run demo -- --model path.gguf');
  } else {
    say(`Model     ${tildify(modelPath)}`);
  }

  const model = await withStatus('Loading the model', (progress) => loadModel(modelPath, { onProgress: (f) => progress(f, 1) }));
  let workDir: string | undefined;
  try {
    workDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'kvstash-demo-'));
    const context = await model.createContext({ contextSize: CONTEXT_SIZE, batchSize: BATCH_SIZE, threads });
    const sampler = model.createSampler(); // greedy, so cold and warm answers are comparable
    const prompt = buildDemoPrompt(model, flags['prefix-tokens'] ?? 2000);
    const generate = flags.tokens ?? 16;
    const stateFile = path.join(workDir, 'prefix.kvstate');
    const prefixLength = prompt.prefix.length;
    say(`Context   ${fmt(context.info.contextSize)} tokens, batch ${context.info.batchSize}, ${context.info.threads} threads`);
    say(`Prompt    a ${fmt(prefixLength)}-token system prompt (tool and policy text), then a short question`);
    say();

    // Cold: everything from scratch, as without a cache.
    say(`Cold: evaluate the system prompt and question 1, save the system prompt's KV state, answer.`);
    const prefixStart = performance.now();
    await withStatus('Prefill (cold)', (progress) => context.decode(prompt.prefix, { logits: 'none', signal, onProgress: progress }));
    const prefixMs = performance.now() - prefixStart;
    // Saving is not part of the cold TTFT: a server saves after it has answered.
    const exportStart = performance.now();
    const stateBytes = (await context.exportState({ sequence: 0 })).byteLength;
    const exportMs = performance.now() - exportStart;
    const saveStart = performance.now();
    const { bytes: fileBytes } = await context.saveState(stateFile, { sequence: 0, tokens: prompt.prefix });
    const saveMs = performance.now() - saveStart;
    const coldAnswer = await answer(context, sampler, model, prompt.suffixes[0]!, prefixLength, generate, signal);
    const cold = runResult('cold', 0, prefixLength, coldAnswer, { evaluated: prefixLength, restoreMs: null, ms: prefixMs }, 1);
    say(`Saved     the system prompt's KV state: ${size(stateBytes)} in memory (export ${ms(exportMs)} ms), ${size(fileBytes)} as a file (save ${ms(saveMs)} ms)`);
    say();

    say('Warm: for each question, clear the sequence, restore the system prompt from the file, evaluate only the question.');
    const warm: DemoRun[] = [];
    for (let i = 0; i < DEMO_QUESTIONS.length; i++) {
      signal.throwIfAborted();
      const start = performance.now();
      context.memory.remove(0);
      const restored = await context.loadState(stateFile, { sequence: 0 });
      const restoreMs = performance.now() - start;
      if (!sameTokens(restored, prompt.prefix)) {
        throw new KvstashError('E_CACHE_MISMATCH', 'the state file holds other tokens than the prompt it was saved for');
      }
      const result = await answer(context, sampler, model, prompt.suffixes[i]!, prefixLength, generate, signal);
      warm.push(runResult(`warm ${i + 1}`, i, prefixLength, result, { evaluated: 0, restoreMs, ms: 0 }, cold.ttftMs / (restoreMs + result.ttftMs)));
    }

    const report: DemoReport = {
      model: {
        path: modelPath,
        synthetic,
        ...(synthetic ? { note: SYNTHETIC_NOTE } : {}),
        name: model.info.name,
        parameters: model.info.parameters,
        sizeBytes: model.info.sizeBytes,
      },
      context: { contextSize: context.info.contextSize, batchSize: context.info.batchSize, threads: context.info.threads },
      prefix: { tokens: prefixLength, stateBytes, fileBytes, exportMs: round(exportMs), saveMs: round(saveMs) },
      cold,
      warm,
      warmSpeedup: round(median(warm.map((w) => w.speedup))),
      restoreExact: sameTokens(warm[0]!.tokens, cold.tokens),
    };
    if (json) process.stdout.write(`${JSON.stringify(report)}\n`);
    else printReport(report);
    if (!report.restoreExact) {
      process.stderr.write('kvstash: warm 1 answered differently from the cold run: the restored KV state is not exact (a bug; please report it)\n');
      return 1;
    }
    return 0;
  } finally {
    await model.dispose(); // waits for a decode an abort is unwinding, then frees its contexts
    if (workDir !== undefined) await fsp.rm(workDir, { recursive: true, force: true });
  }
}

interface Answer {
  suffixTokens: number;
  prefillMs: number;
  /** Suffix prefill + first sample. ms. */
  ttftMs: number;
  tokens: number[];
  text: string;
}

/** Evaluates a question's tokens after the prefix and greedily generates up to `count` tokens. */
async function answer(
  context: Context,
  sampler: Sampler,
  model: Model,
  suffix: Int32Array,
  prefixLength: number,
  count: number,
  signal: AbortSignal,
): Promise<Answer> {
  sampler.reset();
  const start = performance.now();
  await context.decode(suffix, { start: prefixLength, signal });
  const prefillMs = performance.now() - start;
  const tokens = [sampler.sample(context)];
  const ttftMs = performance.now() - start;
  while (tokens.length < count && !model.isEndOfGeneration(tokens[tokens.length - 1]!)) {
    await context.decode([tokens[tokens.length - 1]!], { signal });
    tokens.push(sampler.sample(context));
  }
  return { suffixTokens: suffix.length, prefillMs, ttftMs, tokens, text: model.detokenize(tokens) };
}

/** `before`: what the run did before its question: the prefix it evaluated (cold) or restored (warm). */
function runResult(
  run: string,
  question: number,
  prefixLength: number,
  result: Answer,
  before: { evaluated: number; restoreMs: number | null; ms: number },
  speedup: number,
): DemoRun {
  const beforeMs = before.ms + (before.restoreMs ?? 0);
  return {
    run,
    question: DEMO_QUESTIONS[question]!,
    promptTokens: prefixLength + result.suffixTokens,
    suffixTokens: result.suffixTokens,
    evaluatedTokens: before.evaluated + result.suffixTokens,
    restoreMs: before.restoreMs === null ? null : round(before.restoreMs),
    prefillMs: round(before.ms + result.prefillMs),
    ttftMs: round(beforeMs + result.ttftMs),
    speedup: round(speedup),
    tokens: result.tokens,
    text: result.text,
  };
}

function printReport(report: DemoReport): void {
  const header = ['run', 'prompt tokens', 'evaluated', 'restore ms', 'TTFT ms', 'speed-up'];
  const rows = [report.cold, ...report.warm].map((r) => [
    r.run,
    fmt(r.promptTokens),
    fmt(r.evaluatedTokens),
    r.restoreMs === null ? '-' : ms(r.restoreMs),
    ms(r.ttftMs),
    `${times(r.speedup)}`,
  ]);
  const out: string[] = ['', table(header, rows, ['left', ...header.slice(1).map(() => 'right' as const)]), ''];
  const shown = report.warm[0]!;
  out.push(`Question 1: ${shown.question}`);
  out.push(
    report.model.synthetic
      ? `Answer (gibberish: the synthetic model's weights are random), ${shown.tokens.length} tokens, cold and warm 1 alike:`
      : `Answer, ${shown.tokens.length} tokens, cold and warm 1 alike:`,
  );
  out.push(`  ${printable(shown.text)}`);
  out.push(
    report.restoreExact
      ? 'Warm 1 restored the saved state and generated exactly the cold run\'s tokens.'
      : 'Warm 1 generated other tokens than the cold run: the restore was NOT exact.',
  );
  out.push('');
  const medianWarm = median(report.warm.map((w) => w.ttftMs));
  out.push(`warm first token ${times(report.warmSpeedup)} faster than cold (median warm ${ms(medianWarm)} ms vs cold ${ms(report.cold.ttftMs)} ms)`);
  process.stdout.write(`${out.join('\n')}\n`);
}
