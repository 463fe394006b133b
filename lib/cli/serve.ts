/**
 * `kvstash serve`: the OpenAI-compatible server over a models folder. Prints one line with the URL
 * on stdout once listening (tools parse it); the request log goes to stderr. SIGTERM or SIGINT:
 * stop accepting, finish running requests, flush caches, exit 0.
 */
import fs from 'node:fs';
import { createServer } from '../server/server.js';
import { UsageError } from './errors.js';
import type { Command, CommandIo, FlagSpecs, Flags } from './main.js';

const SERVE_FLAGS = {
  models: { type: 'string', value: 'dir', help: 'The models folder: <dir>/<name>/<file>.gguf or .rkllm (required)' },
  host: { type: 'string', value: 'host', help: 'Address to listen on. Default 127.0.0.1' },
  port: { type: 'integer', help: 'Port; 0 picks a free one. Default 8080', min: 0, max: 65535 },
  'api-key': { type: 'string', value: 'key', help: 'Bearer token clients must send. Default $KVSTASH_API_KEY, else none' },
  'cache-dir': { type: 'string', value: 'dir', help: 'Prompt caches, one folder per model. Default $XDG_CACHE_HOME/kvstash/server/cache' },
  'sessions-dir': { type: 'string', value: 'dir', help: 'Stored Responses chains. Default $XDG_CACHE_HOME/kvstash/server/sessions' },
  threads: { type: 'integer', help: 'Compute threads per model. Default: every core', min: 1, max: 1024 },
  'context-size': { type: 'integer', help: 'KV cells per model, shared by its sequences. Default min(trained, 4096)', min: 64, max: 1 << 22 },
  parallel: { type: 'integer', help: 'Sequences per model (requests generating together). Default 4', min: 1, max: 256 },
  'system-prompt-file': { type: 'string', value: 'file', help: 'System prompt warmed into each model\'s cache at load, used by requests without one' },
  'idle-unload': { type: 'integer', value: 's', help: 'Unload a model unused for this many seconds. Default: never', min: 1, max: 365 * 86400 },
  'memory-budget': { type: 'integer', value: 'MiB', help: 'Unload least recently used idle models past this estimate of loaded memory. Default: none', min: 1 },
  'max-queue': { type: 'integer', help: 'Requests waiting per model before 429. Default 64', min: 0, max: 1 << 20 },
} as const satisfies FlagSpecs;

export const serveCommand: Command<typeof SERVE_FLAGS> = {
  summary: 'An OpenAI-compatible HTTP server with automatic prompt caching (chat, completions, responses, /v1/cache)',
  flags: SERVE_FLAGS,
  run: runServe,
};

async function runServe(flags: Flags<typeof SERVE_FLAGS>, io: CommandIo): Promise<number> {
  if (flags.models === undefined) throw new UsageError('--models <dir> is required', 'serve');
  if (!fs.statSync(flags.models, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`--models ${flags.models} is not a directory`, 'serve');
  let systemPrompt: string | undefined;
  if (flags['system-prompt-file'] !== undefined) systemPrompt = fs.readFileSync(flags['system-prompt-file'], 'utf8').trim();
  const server = createServer({
    models: flags.models,
    apiKey: flags['api-key'] ?? (process.env.KVSTASH_API_KEY || undefined),
    cacheDir: flags['cache-dir'],
    sessionsDir: flags['sessions-dir'],
    threads: flags.threads,
    contextSize: flags['context-size'],
    parallel: flags.parallel,
    systemPrompt,
    idleUnloadSeconds: flags['idle-unload'],
    maxMemoryBytes: flags['memory-budget'] === undefined ? undefined : flags['memory-budget'] * 1024 * 1024,
    maxQueue: flags['max-queue'],
  });
  const url = await server.listen({ host: flags.host, port: flags.port ?? 8080 });
  process.stdout.write(`kvstash serve: listening on ${url}\n`);
  await new Promise<void>((resolve) => {
    const stop = (why: string) => {
      process.stderr.write(`kvstash serve: ${why}: finishing running requests, then exiting\n`);
      resolve();
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    if (io.signal.aborted) resolve();
    io.signal.addEventListener('abort', () => stop('SIGINT'), { once: true });
  });
  await server.close();
  process.stderr.write('kvstash serve: stopped\n');
  return 0;
}
