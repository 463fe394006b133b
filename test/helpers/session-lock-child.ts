// A process that competes for a session lock, for test/session-hardening.test.ts. Run with the
// test's own execArgv (tap's TypeScript loader). Commands on stdin, one per line:
//   go       -> acquireLock(dir); prints `locked` or `refused <code> <message>`
//   release  -> releases the lock it holds; prints `released`
// It exits when stdin closes, releasing nothing explicitly (the kernel drops the lock).
import path from 'node:path';
import readline from 'node:readline';
import { acquireLock, type Lock } from '../../lib/session/lock.js';

const dir = path.resolve(process.argv[2]!);
let lock: Lock | undefined;

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  void (async () => {
    if (line === 'go') {
      try {
        lock = await acquireLock(dir);
        process.stdout.write('locked\n');
      } catch (err) {
        const e = err as { code?: string; message: string };
        process.stdout.write(`refused ${e.code ?? 'none'} ${e.message}\n`);
      }
    } else if (line === 'release') {
      await lock?.release();
      lock = undefined;
      process.stdout.write('released\n');
    }
  })();
});
lines.on('close', () => process.exit(0));
process.stdout.write('ready\n');
