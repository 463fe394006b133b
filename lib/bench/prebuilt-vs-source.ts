/**
 * The prebuilt binary against a source build, in the same run: prompt processing of one batch, timed
 * for each. A process loads one kvstash addon, the one node-gyp-build picks for its environment, so
 * every measurement runs in a child process (prompt-speed.ts): with PREBUILDS_ONLY=1 node-gyp-build
 * skips build/Release and loads prebuilds/<platform>-<arch>/ (the CPU-variant loader); without it a
 * source build in build/Release comes first. Each child reports which addon it got, so a missing
 * build is noticed instead of being measured as the other one.
 *
 * Children of the two builds take turns (prebuilt, source, then source, prebuilt, …): a noisy
 * neighbour on the machine slows both alike, and a slow drift (a build starting beside us, the CPU
 * heating up) favours neither, as it would if one of them always went first.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { median, samples, type Samples } from './measure.js';

export const BUILDS = ['prebuilt', 'source'] as const;
export type Build = (typeof BUILDS)[number];

/** What one prompt-speed child measures. */
export interface PromptSpeedRequest {
  modelPath: string;
  /** Compute threads. */
  threads: number;
  /** Tokens of the batch timed. */
  tokens: number;
  /** Timed decodes of the batch. */
  repetitions: number;
}

/** The one JSON line a prompt-speed child prints. */
export interface PromptSpeedOutput {
  /** systemInfo().cpuVariant of the addon the child loaded: 'source' for build/Release. */
  cpuVariant: string;
  /** llama.cpp's report of the CPU features that addon uses. */
  cpuFeatures: string;
  tokens: number;
  /** One per timed decode, milliseconds. */
  samplesMs: number[];
}

/** Runs one child with `build`; rejects with the reason it could not measure. */
export type PromptSpeedRunner = (build: Build, request: PromptSpeedRequest, signal: AbortSignal) => Promise<PromptSpeedOutput>;

/** The addon a build's children loaded, or why they could not measure it. */
export type BuildOutcome = { cpuVariant: string; cpuFeatures: string } | { unavailable: string };

export interface PrebuiltVsSource {
  /** Tokens of the batch each child timed. */
  tokens: number;
  prebuilt: BuildOutcome;
  source: BuildOutcome;
}

export interface PrebuiltVsSourceMeasurement {
  details: PrebuiltVsSource;
  /** Tokens per second from the median of each build's decodes; null for a build that could not run. */
  tokensPerSecond: Record<Build, number | null>;
  /** Every timed decode (milliseconds) of each build that ran. */
  samples: Partial<Record<Build, Samples>>;
}

const USAGE = 'usage: prompt-speed <model.gguf> <threads> <tokens> <repetitions>';

/** The child's command line (after the script), as `spawnPromptSpeed` writes it. */
export function parsePromptSpeedArgs(args: readonly string[]): PromptSpeedRequest {
  if (args.length !== 4 || args[0] === '') throw new RangeError(USAGE);
  const count = (text: string, name: string): number => {
    const value = Number(text);
    if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer, got '${text}' (${USAGE})`);
    return value;
  };
  return { modelPath: args[0]!, threads: count(args[1]!, 'threads'), tokens: count(args[2]!, 'tokens'), repetitions: count(args[3]!, 'repetitions') };
}

/** The child's report: the last line of its standard output. */
export function parsePromptSpeedOutput(stdout: string): PromptSpeedOutput {
  const line = stdout.trimEnd().split('\n').pop() ?? '';
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw new Error(`the prompt-speed child printed no JSON report: '${line.slice(0, 200)}'`);
  }
  const output = value as Partial<PromptSpeedOutput> | null;
  const valid =
    typeof output?.cpuVariant === 'string' &&
    typeof output.cpuFeatures === 'string' &&
    Number.isSafeInteger(output.tokens) &&
    Array.isArray(output.samplesMs) &&
    output.samplesMs.every((ms) => typeof ms === 'number' && Number.isFinite(ms) && ms > 0);
  if (!valid) throw new Error(`the prompt-speed child's report lacks cpuVariant, cpuFeatures, tokens or samplesMs: ${line.slice(0, 200)}`);
  return output as PromptSpeedOutput;
}

/**
 * A child's report, if it measured what was asked of the build it was meant to load; else throws why
 * not. Without PREBUILDS_ONLY node-gyp-build falls back to the prebuilt binary when build/Release is
 * missing, and a prebuilt addon without the CPU-variant loader reports no variant: neither may stand
 * for the other build.
 */
export function checkPromptSpeedOutput(build: Build, request: PromptSpeedRequest, output: PromptSpeedOutput): PromptSpeedOutput {
  if (build === 'source' && output.cpuVariant !== 'source') {
    throw new Error(`no source build in build/Release: without PREBUILDS_ONLY the child loaded the prebuilt binary (${output.cpuVariant})`);
  }
  if (build === 'prebuilt' && output.cpuVariant === 'source') {
    throw new Error(`the addon loaded with PREBUILDS_ONLY=1 reports no CPU variant: it is not the prebuilt CPU-variant loader`);
  }
  if (output.tokens !== request.tokens || output.samplesMs.length !== request.repetitions) {
    throw new Error(`asked for ${request.repetitions} decodes of ${request.tokens} tokens, the child reported ${output.samplesMs.length} of ${output.tokens}`);
  }
  return output;
}

/**
 * `rounds` rounds of one child per build, turns alternating. A build whose child fails is left out
 * from then on (its earlier samples too: a build that fails once is not measured); the other goes on.
 */
export async function measurePrebuiltVsSource(
  request: PromptSpeedRequest,
  rounds: number,
  signal: AbortSignal,
  run: PromptSpeedRunner = spawnPromptSpeed,
): Promise<PrebuiltVsSourceMeasurement> {
  const loaded: Partial<Record<Build, BuildOutcome>> = {};
  const samplesMs: Record<Build, number[]> = { prebuilt: [], source: [] };
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? BUILDS : [...BUILDS].reverse();
    for (const build of order) {
      const before = loaded[build];
      if (before && 'unavailable' in before) continue;
      signal.throwIfAborted();
      try {
        const output = checkPromptSpeedOutput(build, request, await run(build, request, signal));
        loaded[build] ??= { cpuVariant: output.cpuVariant, cpuFeatures: output.cpuFeatures };
        samplesMs[build].push(...output.samplesMs);
      } catch (err) {
        signal.throwIfAborted();
        loaded[build] = { unavailable: err instanceof Error ? err.message : String(err) };
        samplesMs[build] = [];
      }
    }
  }
  const outcome = (build: Build): BuildOutcome => loaded[build] ?? { unavailable: 'not run (no rounds)' };
  const rate = (build: Build): number | null => (samplesMs[build].length === 0 ? null : request.tokens / (median(samplesMs[build]) / 1000));
  const measured: Partial<Record<Build, Samples>> = {};
  for (const build of BUILDS) if (samplesMs[build].length > 0) measured[build] = samples(samplesMs[build]);
  return {
    details: { tokens: request.tokens, prebuilt: outcome('prebuilt'), source: outcome('source') },
    tokensPerSecond: { prebuilt: rate('prebuilt'), source: rate('source') },
    samples: measured,
  };
}

/** The child entry beside this file: dist/bench/prompt-speed.js, or the .ts under a TypeScript
 * loader (which process.execArgv, passed on, carries). */
const PROMPT_SPEED_ENTRY = path.join(__dirname, `prompt-speed${path.extname(__filename)}`);

/** One prompt-speed child, in this process's environment but for PREBUILDS_ONLY, which picks the build. */
export function spawnPromptSpeed(build: Build, request: PromptSpeedRequest, signal: AbortSignal): Promise<PromptSpeedOutput> {
  const env = { ...process.env };
  // node-gyp-build takes any non-empty value (even '0') as set: for the source build it must be absent.
  if (build === 'prebuilt') env.PREBUILDS_ONLY = '1';
  else delete env.PREBUILDS_ONLY;
  const args = [...process.execArgv, PROMPT_SPEED_ENTRY, request.modelPath, String(request.threads), String(request.tokens), String(request.repetitions)];
  return new Promise((resolve, reject) => {
    execFile(process.execPath, args, { env, signal, encoding: 'utf8', maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(stderr.trim().slice(-2000) || err.message));
        return;
      }
      try {
        resolve(parsePromptSpeedOutput(stdout));
      } catch (parseErr) {
        reject(parseErr);
      }
    });
  });
}
