/**
 * `kvstash chat`: an interactive, durable chat. Every answered message is on disk before the next
 * prompt appears; kill the process at any moment and the same command carries on the conversation.
 * Lines come from stdin, so it also works in a pipe.
 */
import path from 'node:path';
import readline from 'node:readline';
import { defaultThreads, loadModel } from '../llama/model.js';
import { Session, type SessionOptions } from '../session/session.js';
import { syntheticModelPath } from '../tools/synthetic-model.js';
import { userCacheDir } from '../util/paths.js';
import { openCache } from './cache-flags.js';
import { UsageError } from './errors.js';
import { ms } from './format.js';
import { cliUi } from './progress.js';
import type { Command, CommandIo, FlagSpecs, Flags } from './main.js';

const CHAT_FLAGS = {
  model: { type: 'string', value: 'path.gguf', help: 'The model. Default: the synthetic model of `kvstash demo`' },
  session: { type: 'string', value: 'name', help: 'The conversation to start or continue' },
  system: { type: 'string', value: 'text', help: 'System prompt of a new conversation' },
  dir: { type: 'string', value: 'dir', help: 'Where sessions live. Default $XDG_CACHE_HOME/kvstash/sessions or ~/.cache/kvstash/sessions' },
  'cache-dir': { type: 'string', value: 'dir', help: 'The prompt cache directory (shares system prompts). Default: the standard one' },
  'max-tokens': { type: 'integer', help: 'Most tokens per reply. Default 256', min: 1, max: 32768 },
  context: { type: 'integer', help: 'Context size, tokens. Default 4096', min: 256, max: 1 << 20 },
  threads: { type: 'integer', help: 'Compute threads. Default: every core', min: 1, max: 1024 },
} as const satisfies FlagSpecs;

export const chatCommand: Command<typeof CHAT_FLAGS> = {
  summary: 'A durable chat: kill it at any moment, run the same command, and it carries on',
  flags: CHAT_FLAGS,
  run: runChat,
};

async function runChat(flags: Flags<typeof CHAT_FLAGS>, io: CommandIo): Promise<number> {
  if (flags.session === undefined) throw new UsageError('--session is required', 'chat');
  const root = userCacheDir();
  const modelPath = flags.model ?? (await syntheticModelPath(root, io.signal, cliUi));
  const model = await loadModel(modelPath);
  try {
    const context = await model.createContext({ contextSize: flags.context ?? 4096, threads: flags.threads ?? defaultThreads() });
    const options: SessionOptions = {
      dir: path.resolve(flags.dir ?? path.join(root, 'sessions')),
      id: flags.session,
      context,
      cache: openCache(flags),
      checkpoint: { everyTurns: 1, onExit: true },
    };
    let session: Session;
    try {
      session = await Session.resume(options);
      const report = session.resumeReport!;
      process.stderr.write(
        `Resumed "${flags.session}": ${session.history.length} messages, KV from ${report.path} ` +
          `(${report.restoredTokens} tokens restored, ${report.evaluatedTokens} evaluated, ${ms(report.ms)} ms)\n`,
      );
    } catch (err) {
      if ((err as { code?: string }).code !== 'E_SESSION_NOT_FOUND') throw err;
      session = await Session.open({ ...options, ...(flags.system !== undefined ? { system: flags.system } : {}) });
      process.stderr.write(`New conversation "${flags.session}". Ctrl-D ends it; it can be continued later.\n`);
    }
    const lines = readline.createInterface({ input: process.stdin, terminal: false });
    const prompt = () => process.stdin.isTTY && process.stdout.write('> ');
    prompt();
    for await (const line of lines) {
      if (io.signal.aborted) break;
      if (line.trim() === '') {
        prompt();
        continue;
      }
      const reply = session.send(line, { maxTokens: flags['max-tokens'] ?? 256, signal: io.signal });
      for await (const text of reply) process.stdout.write(text);
      await reply.result;
      process.stdout.write('\n');
      // In a pipe there is no prompt; a line on stderr tells a supervising program the turn is durable.
      if (!process.stdin.isTTY) process.stderr.write(`(saved: ${session.history.length} messages)\n`);
      prompt();
    }
    await session.close();
    return io.signal.aborted ? 130 : 0;
  } finally {
    await model.dispose();
  }
}
