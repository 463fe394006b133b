/**
 * `kvstash warm`: evaluates a system prompt (and tools) once and stores its KV state in the prompt
 * cache, so every later generate() with that system prompt, in any process sharing the directory,
 * restores it instead of paying the prefill.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { CacheProblem, RestoreResult } from '../cache/prompt-cache.js';
import { KvstashError } from '../errors.js';
import { templateLabel, templatePrefix } from '../generate/generate.js';
import { defaultThreads, loadModel } from '../llama/model.js';
import { CACHE_FLAGS, openCache } from './cache-flags.js';
import { CommandFailure, UsageError } from './errors.js';
import { duration, fields, fmt, ms, round, size, tildify, times } from './format.js';
import type { Command, FlagSpecs, Flags } from './main.js';
import { withStatus } from './progress.js';

const WARM_FLAGS = {
  model: { type: 'string', value: 'path.gguf', help: 'The GGUF model (required)' },
  system: {
    type: 'string',
    value: 'prompt.txt',
    help: "The system prompt: the file's exact text, a final newline included, as generate() would get it in `system` (required)",
  },
  tools: { type: 'string', value: 'tools.json', help: 'Tool definitions, JSON, as generate() would get them in `tools`' },
  label: { type: 'string', value: 'name', help: 'Label of the entry. Default the label generate() gives a template prefix (template:<hash>)' },
  context: { type: 'integer', help: 'Context size, tokens. Default the prompt length rounded up to 256', min: 1, max: 1 << 24 },
  threads: { type: 'integer', help: 'Compute threads. Default: every core', min: 1, max: 1024 },
  ...CACHE_FLAGS,
} as const satisfies FlagSpecs;

export const warmCommand: Command<typeof WARM_FLAGS> = {
  summary: 'Evaluate a system prompt (and tools) once and store its KV cache for generate() to restore',
  flags: WARM_FLAGS,
  run: runWarm,
};

export interface WarmReport {
  key: string;
  label: string | null;
  /** Tokens of the rendered system prompt: the entry's token count. */
  tokenCount: number;
  /** Size of the entry file. Unit: bytes. */
  bytes: number;
  path: string;
  cacheDir: string;
  model: { path: string; name: string; fingerprint: string };
  context: { contextSize: number; threads: number; kvType: string; flashAttention: string };
  /** Tokens this run evaluated; fewer than tokenCount when the cache already held part or all of them. */
  evaluatedTokens: number;
  /** Tokens the warm itself restored from the cache instead of evaluating, and from where. */
  alreadyCached: { tokens: number; tier: RestoreResult['tier'] };
  /** Evaluating `evaluatedTokens` and taking the state. Unit: ms. */
  evaluateMs: number;
  /** Restoring the whole entry from its file into an emptied sequence, checksum included. Unit: ms. */
  restoreMs: number;
  /** evaluateMs / restoreMs when this run evaluated every token, else null. */
  speedup: number | null;
  /** The whole command, model loading included. Unit: ms. */
  totalMs: number;
}

async function runWarm(flags: Flags<typeof WARM_FLAGS>, { signal }: { signal: AbortSignal }): Promise<number> {
  if (flags.model === undefined) throw new UsageError('--model is required', 'warm');
  if (flags.system === undefined) throw new UsageError('--system is required', 'warm');
  const started = performance.now();
  const system = await fsp.readFile(path.resolve(flags.system), 'utf8');
  const tools = flags.tools === undefined ? undefined : await readTools(path.resolve(flags.tools));
  const modelPath = path.resolve(flags.model);
  const cache = openCache(flags);
  const problems: CacheProblem[] = [];
  cache.on('problem', (problem: CacheProblem) => problems.push(problem));

  const model = await withStatus('Loading the model', (progress) => loadModel(modelPath, { onProgress: (f) => progress(f, 1) }));
  try {
    const prefix = templatePrefix(model, { system, tools });
    if (prefix === null) {
      throw new CommandFailure(
        "this model's chat template renders the system message differently once a conversation follows it, so generate() caches no template prefix for it",
      );
    }
    if (prefix.length < cache.minTokens) {
      throw new CommandFailure(`the rendered system prompt is ${prefix.length} tokens; the cache neither saves nor restores prefixes shorter than ${cache.minTokens}`);
    }
    const contextSize = flags.context ?? Math.ceil(prefix.length / 256) * 256;
    if (prefix.length > contextSize) {
      throw new CommandFailure(`the rendered system prompt is ${fmt(prefix.length)} tokens, more than the context (--context ${contextSize})`);
    }
    const context = await model.createContext({ contextSize, threads: flags.threads ?? defaultThreads() });

    const evaluateStart = performance.now();
    const entry = await withStatus(`Evaluating the system prompt (${fmt(prefix.length)} tokens)`, (progress) =>
      cache.warm(context, prefix, { label: flags.label ?? templateLabel(prefix), onProgress: progress, signal }),
    );
    const evaluateMs = performance.now() - evaluateStart;
    await cache.flush();
    const file = (await cache.get(entry.key))?.path;
    if (file === undefined) {
      const saveProblem = problems.find((p) => p.code === 'E_STATE_SAVE');
      throw new KvstashError('E_STATE_SAVE', saveProblem?.message ?? `entry ${entry.key} is not in ${cache.dir ?? 'the cache'} after saving it`);
    }

    // Restore as a later process would: a cache with no RAM tier and no record of what this context
    // holds, so the entry comes from its file and is verified on the way in.
    await context.exclusive(() => context.memory.remove(0));
    const restore = await openCache(flags, { maxRamBytes: 0 }).restore(context, prefix);
    if (restore.tier !== 'disk' || restore.cachedTokens !== prefix.length) {
      const reason = problems.at(-1)?.message ?? `it restored ${restore.cachedTokens} tokens from ${restore.tier ?? 'nowhere'}`;
      throw new KvstashError('E_STATE_LOAD', `the entry was saved but did not restore: ${reason}`);
    }

    const everyToken = entry.evaluatedTokens === prefix.length;
    const report: WarmReport = {
      key: entry.key,
      label: entry.label,
      tokenCount: entry.tokenCount,
      bytes: (await fsp.stat(file)).size,
      path: file,
      cacheDir: cache.dir!,
      model: { path: modelPath, name: model.info.name, fingerprint: model.fingerprint },
      context: {
        contextSize: context.info.contextSize,
        threads: context.info.threads,
        kvType: context.info.kvType,
        flashAttention: context.info.flashAttention,
      },
      evaluatedTokens: entry.evaluatedTokens,
      alreadyCached: { tokens: entry.restore.cachedTokens, tier: entry.restore.tier },
      evaluateMs: round(evaluateMs),
      restoreMs: round(restore.restoreMs),
      speedup: everyToken ? round(evaluateMs / restore.restoreMs) : null,
      totalMs: round(performance.now() - started),
    };
    if (flags.json === true) process.stdout.write(`${JSON.stringify(report)}\n`);
    else printWarm(report);
    return 0;
  } finally {
    await model.dispose(); // waits for a decode an abort is unwinding
  }
}

async function readTools(file: string): Promise<unknown> {
  const text = await fsp.readFile(file, 'utf8');
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new CommandFailure(`--tools ${tildify(file)} is not JSON: ${(err as Error).message}`);
  }
}

function printWarm(r: WarmReport): void {
  // A rate only for a pure evaluation: a partial restore's time would drag it down.
  const rate = r.alreadyCached.tokens === 0 ? ` (${fmt(Math.round(r.evaluatedTokens / (r.evaluateMs / 1000)))} tokens/s)` : '';
  let evaluated = `${fmt(r.evaluatedTokens)} tokens in ${duration(r.evaluateMs)}${rate}`;
  if (r.alreadyCached.tokens > 0) {
    evaluated += `; ${fmt(r.alreadyCached.tokens)} were already cached (${r.alreadyCached.tier}) and restored instead`;
  }
  const restored = `${ms(r.restoreMs)} ms from the entry file, checksum included${r.speedup === null ? '' : ` (${times(r.speedup)} faster than evaluating)`}`;
  const out = fields([
    ['Label', r.label ?? '-'],
    ['Key', r.key],
    ['Tokens', fmt(r.tokenCount)],
    ['Entry', `${size(r.bytes)}  ${tildify(r.path)}`],
    ['Model', `${r.model.name || 'unnamed'}  ${tildify(r.model.path)}`],
    ['Context', `${fmt(r.context.contextSize)} tokens, ${r.context.threads} threads, KV ${r.context.kvType}, flash attention ${r.context.flashAttention}`],
    ['Evaluated', evaluated],
    ['Restore', restored],
    ['Total', duration(r.totalMs)],
  ]);
  process.stdout.write(`${out}\n`);
}
