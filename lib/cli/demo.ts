/**
 * `kvstash demo`: the package's claim, measured on the user's machine. A long system prompt is
 * evaluated once (cold) and its KV state saved; three later questions restore that state from the
 * file and evaluate only their own tokens (warm). Warm 1 repeats the cold question, so its answer
 * must match the cold one token for token: the restore is checked, not assumed.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { KvstashError } from '../errors.js';
import type { Context } from '../llama/context.js';
import { defaultThreads, loadModel, type Model } from '../llama/model.js';
import type { Sampler } from '../llama/sampler.js';
import { writeSyntheticModel, type SyntheticShapeName, type SyntheticWeightType } from '../models/synthetic.js';
import { userCacheDir } from '../util/paths.js';
import { isProcessAlive } from '../util/process.js';
import { fmt, ms, printable, round, size, table, tildify, times } from './format.js';
import type { Command, FlagSpecs, Flags } from './main.js';
import { withStatus } from './progress.js';

const CONTEXT_SIZE = 4096;
const BATCH_SIZE = 512;
const SYNTHETIC = { shape: 'qwen2-0.5b', type: 'q4_k', seed: 1 } as const;
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

/** The questions asked after the system prompt. The cold run and warm 1 ask the first. */
export const DEMO_QUESTIONS: readonly string[] = [
  'My order #48213 arrived with a torn sleeve. Can I get a replacement before Friday?',
  'What is the return window for sale items bought in the EU?',
  'Please change the delivery address of order #50177 to 12 Harbour Road, Leith.',
];

export interface DemoPrompt {
  /** The system message: tool and policy text, trimmed to the requested token count. */
  system: string;
  /** The rendered system turn: the tokens cached and restored. */
  prefix: Int32Array;
  /** Per question, the rendered user turn and assistant header, tokenized on their own. Cold and
   * warm runs both evaluate prefix then suffix, so they see identical token sequences. */
  suffixes: Int32Array[];
}

/** Builds the demo's prompt, deterministically: the same model and target give the same tokens. */
export function buildDemoPrompt(model: Model, targetTokens: number): DemoPrompt {
  const renderSystem = (system: string): string => model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false });
  const count = (system: string): number => model.tokenize(renderSystem(system), { special: true }).length;

  let text = SYSTEM_INTRO;
  for (let section = 0; count(text) < targetTokens; section++) text += systemSection(section);
  // Cut at a word boundary: the longest run of words whose rendered turn fits the target.
  const words = text.split(/(?<=\s)/);
  let low = 1;
  let high = words.length;
  while (low < high) {
    const mid = Math.ceil((low + high) / 2);
    if (count(words.slice(0, mid).join('').trimEnd()) <= targetTokens) low = mid;
    else high = mid - 1;
  }
  const system = words.slice(0, low).join('').trimEnd();

  const conversations = DEMO_QUESTIONS.map((question) =>
    model.applyChatTemplate([{ role: 'system', content: system }, { role: 'user', content: question }]),
  );
  let prefixText = renderSystem(system);
  // Some templates (Gemma's, Llama 2's) fold the system text into the first user turn, so the
  // system turn alone does not start the conversation; then cache what every conversation shares.
  if (!conversations.every((c) => c.startsWith(prefixText))) prefixText = commonPrefix(conversations);
  return {
    system,
    prefix: model.tokenize(prefixText, { special: true }),
    // No BOS here: these tokens continue the prefix.
    suffixes: conversations.map((c) => model.tokenize(c.slice(prefixText.length), { special: true, addSpecial: false })),
  };
}

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
  const modelPath = synthetic ? await syntheticModelPath(flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']), signal) : path.resolve(flags.model!);

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

// ---------------------------------------------------------------------------------------------
// The synthetic model

/** The cached synthetic model (by default the demo's), written on first use. */
export async function syntheticModelPath(
  root: string,
  signal: AbortSignal,
  model: { shape: SyntheticShapeName; type: SyntheticWeightType; seed: number } = SYNTHETIC,
): Promise<string> {
  const dir = path.join(root, 'models');
  const file = path.join(dir, `synthetic-${model.shape}-${model.type}-seed${model.seed}.gguf`);
  if (fs.existsSync(file)) return file;
  await fsp.mkdir(dir, { recursive: true });
  await removeAbandonedStaging(dir);
  process.stderr.write(
    `First run: writing the synthetic ${model.shape} model to ${tildify(file)}.\n` +
      `This happens once: about 1 GB of f16 weights are written, then quantized to ${model.type} (from under a minute to a few\n` +
      'minutes, depending on the machine). Later runs reuse the file.\n',
  );
  // Everything is written inside one staging directory, so an interrupt cleans up by removing it.
  const staging = await fsp.mkdtemp(path.join(dir, `.writing-${process.pid}-`));
  try {
    const staged = path.join(staging, path.basename(file));
    await withStatus('Writing the synthetic model', () =>
      // The writer cannot be cancelled; on SIGINT stop waiting for it (the process then exits).
      Promise.race([writeSyntheticModel({ ...model, path: staged }), rejectOnAbort(signal)]),
    );
    await fsp.rename(staged, file);
  } finally {
    await fsp.rm(staging, { recursive: true, force: true });
  }
  return file;
}

/** Removes staging directories of writers that died (SIGKILL, power loss): each holds up to 1 GB. */
async function removeAbandonedStaging(dir: string): Promise<void> {
  for (const name of await fsp.readdir(dir)) {
    const pid = /^\.writing-(\d+)-/.exec(name)?.[1];
    if (pid !== undefined && !isProcessAlive(Number(pid))) await fsp.rm(path.join(dir, name), { recursive: true, force: true });
  }
}


function rejectOnAbort(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
}

// ---------------------------------------------------------------------------------------------
// The system prompt: a support assistant's tool catalogue and policies, repeated as needed

const SYSTEM_INTRO =
  'You are Atlas, the customer support assistant of Northwind Outfitters, an online shop for clothing and outdoor gear. ' +
  "Answer in the customer's language, briefly and exactly, and call the tools below instead of guessing. " +
  'The tool catalogue and the policies that follow apply to every conversation.\n';

const TOOLS: ReadonlyArray<readonly [name: string, purpose: string, argumentsText: string]> = [
  ['search_orders', 'Finds orders by customer email, order number or date range; at most 20, newest first.', 'query (string), from (ISO date, optional), to (ISO date, optional)'],
  ['get_order', 'Returns one order with its lines, payments, shipments and notes.', 'order_id (string)'],
  ['refund_order', 'Refunds some or all lines of a delivered order to the original payment method.', 'order_id (string), lines (array of line ids), reason (string)'],
  ['replace_item', 'Ships a replacement for a damaged or wrong item at no cost to the customer.', 'order_id (string), line_id (string), size (string, optional)'],
  ['update_address', 'Changes the delivery address of an order that has not shipped yet.', 'order_id (string), address (street, city, postcode, country)'],
  ['track_shipment', 'Returns the carrier, tracking number and latest scan of a shipment.', 'shipment_id (string)'],
  ['check_inventory', 'Returns the stock of a product variant in each warehouse.', 'sku (string)'],
  ['get_customer', 'Returns the customer profile, loyalty tier and open tickets.', 'email (string)'],
  ['apply_voucher', 'Issues a one-time voucher as a goodwill gesture.', 'email (string), amount (number, at most 25), currency (string)'],
  ['create_ticket', 'Opens a ticket for the warehouse or the payments team.', 'team (warehouse or payments), summary (string), order_id (string, optional)'],
  ['escalate_to_human', 'Hands the conversation to a human agent with a summary.', 'summary (string), urgency (low, normal or high)'],
];

const POLICIES: readonly string[] = [
  'Confirm the order number with the customer before you change or refund anything.',
  'Refunds are allowed within 30 days of delivery, and within 14 days for sale items bought in the EU.',
  "Never share another customer's data, and never read out a full payment card number.",
  'Offer a replacement before a refund when the item is damaged and in stock.',
  'An address can change only before the order ships; after that, open a warehouse ticket.',
  'Vouchers are a last resort: at most one per customer per quarter.',
  'Escalate to a human when the customer asks for one, is upset twice, or mentions a legal claim.',
  'Quote delivery dates only from track_shipment, never from memory.',
];

function systemSection(index: number): string {
  const [name, purpose, argumentsText] = TOOLS[index % TOOLS.length]!;
  return `\n### ${index + 1}. Tool ${name}\n${purpose}\nArguments: ${argumentsText}.\nPolicy: ${POLICIES[index % POLICIES.length]!}\n`;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function commonPrefix(texts: readonly string[]): string {
  let end = 0;
  const first = texts[0]!;
  while (end < first.length && texts.every((t) => t[end] === first[end])) end++;
  return first.slice(0, end);
}

function sameTokens(a: ArrayLike<number>, b: ArrayLike<number>): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

