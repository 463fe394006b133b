// Runs a session on a file system that fills up, for test/session-hardening.test.ts. The test
// starts it as `unshare -Urm node <execArgv> session-disk-full.ts <mountpoint> <model>`: in a
// private mount namespace it mounts a small tmpfs over <mountpoint> (nothing outside sees it, and
// it vanishes with the process), so the writes meet a real ENOSPC. Prints one JSON line.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { loadModel, Session } from '../../lib/index.js';

async function main(): Promise<void> {
  const [mountpoint, modelPath] = process.argv.slice(2) as [string, string];
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'kvstash-test', mountpoint]);
  const model = await loadModel(modelPath);
  const context = await model.createContext({ contextSize: 4096 });
  const out: Record<string, unknown> = {};
  const options = { dir: mountpoint, id: 'full', context, checkpoint: { everyTurns: 0, everySeconds: 0 } };
  const session = await Session.open({ ...options, system: 'You are terse.' });
  const first = await session.send('first question', { maxTokens: 4 }).result;
  out.acknowledged = [first.text];
  // Fill the file system to the last byte: pages first, then what is left of them.
  const filler = fs.openSync(path.join(mountpoint, 'filler'), 'w');
  for (const size of [65536, 4096, 1]) {
    const chunk = Buffer.alloc(size, 0x61);
    try {
      for (;;) fs.writeSync(filler, chunk);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
    }
  }
  fs.closeSync(filler);
  // A message longer than a page: its record needs a new page, which a full tmpfs refuses.
  const long = 'why '.repeat(1100);
  const journalBefore = fs.statSync(path.join(mountpoint, 'full', 'journal.kvj')).size;
  out.send = await session.send(long, { maxTokens: 4 }).result.then(
    () => 'resolved',
    (err: { code?: string; name: string; message: string; cause?: { code?: string } }) => ({ name: err.name, code: err.code, cause: err.cause?.code, message: err.message }),
  );
  out.journalGrew = fs.statSync(path.join(mountpoint, 'full', 'journal.kvj')).size - journalBefore;
  out.checkpoint = await session.checkpoint().then(
    () => 'resolved',
    (err: { code?: string; name: string; cause?: { code?: string } }) => ({ name: err.name, code: err.code, cause: err.cause?.code }),
  );
  out.checkpointLeftovers = fs.existsSync(path.join(mountpoint, 'full', 'checkpoints')) ? fs.readdirSync(path.join(mountpoint, 'full', 'checkpoints')) : [];
  fs.rmSync(path.join(mountpoint, 'filler'));
  const second = await session.send('second question', { maxTokens: 4 }).result;
  (out.acknowledged as string[]).push(second.text);
  await session.close();
  const resumed = await Session.resume(options);
  out.history = resumed.history.map((m) => `${m.role}:${m.content}`);
  out.damaged = resumed.resumeReport!.journal.damaged.length;
  out.dropped = resumed.resumeReport!.droppedJournalBytes;
  await resumed.close();
  await context.dispose();
  await model.dispose();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`);
  process.exit(1);
});
