/**
 * A child process of the benchmark (prebuilt-vs-source.ts): times prompt processing of one batch with
 * whichever kvstash addon node-gyp-build picks in this process's environment.
 *
 *   node dist/bench/prompt-speed.js <model.gguf> <threads> <tokens> <repetitions>
 *
 * Prints one JSON line (PromptSpeedOutput); on failure, the reason on stderr and exit code 1.
 */
import { performance } from 'node:perf_hooks';
import { isKvstashError } from '../errors.js';
import { loadModel } from '../llama/model.js';
import { systemInfo } from '../system.js';
import { parsePromptSpeedArgs, type PromptSpeedOutput, type PromptSpeedRequest } from './prebuilt-vs-source.js';
import { buildBenchPrompt } from './prompt.js';

/** The first decode of a fresh process pays for faulting in the weights: not a prompt-processing time. */
const WARM_UP_TOKENS = 16;

async function measurePromptSpeed(request: PromptSpeedRequest): Promise<PromptSpeedOutput> {
  // The addon first, so that a build that cannot load is the error reported.
  const { cpuVariant, cpuFeatures } = systemInfo();
  const model = await loadModel(request.modelPath);
  try {
    const context = await model.createContext({ contextSize: request.tokens + WARM_UP_TOKENS, batchSize: request.tokens, threads: request.threads });
    // The opening of the benchmark's template: the text its cold prefill evaluates.
    const tokens = buildBenchPrompt(model, request.tokens, 0, 0).prefix;
    if (tokens.length !== request.tokens) throw new Error(`the benchmark prompt gave ${tokens.length} tokens, ${request.tokens} were asked for`);
    await context.decode(tokens.subarray(0, WARM_UP_TOKENS), { sequence: 0, start: 0, logits: 'none' });
    await context.exclusive(() => context.memory.clear());
    const samplesMs: number[] = [];
    for (let i = 0; i < request.repetitions; i++) {
      const start = performance.now();
      await context.decode(tokens, { sequence: 0, start: 0, logits: 'none' });
      samplesMs.push(performance.now() - start);
      await context.exclusive(() => context.memory.clear());
    }
    return { cpuVariant, cpuFeatures, tokens: tokens.length, samplesMs };
  } finally {
    await model.dispose();
  }
}

Promise.resolve()
  .then(() => measurePromptSpeed(parsePromptSpeedArgs(process.argv.slice(2))))
  .then(
    (output) => process.stdout.write(`${JSON.stringify(output)}\n`),
    (err: unknown) => {
      const text = isKvstashError(err) ? `${err.code}: ${err.message}` : err instanceof Error ? err.message : String(err);
      process.stderr.write(`kvstash prompt-speed: ${text}\n`);
      process.exitCode = 1;
    },
  );
