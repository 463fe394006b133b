/**
 * One process at a time per session: an exclusive kernel advisory lock (F_OFD_SETLK, see
 * binding/common/FileLock.h) on `<session>/lock`, held for the session's life. Taking it is one
 * atomic step, so of any number of processes starting at once exactly one wins; the kernel drops it
 * when the holder closes the session or dies (killed, crashed), so a dead process never blocks a
 * resume and nothing needs to judge whether a lock is stale. The file itself is never deleted:
 * deleting it would let one process lock the old file and another a new one. The holder writes
 * its pid into it for people and error messages only; an empty or stale pid means nothing.
 */
import path from 'node:path';
import { native } from '../binding.js';
import { KvstashError } from '../errors.js';
import { writeFully } from '../util/atomic-file.js';
import { ioError, openOwnFile } from './files.js';

export interface Lock {
  /** Drops this lock (never another process's); idempotent. */
  release(): Promise<void>;
}

export async function acquireLock(dir: string): Promise<Lock> {
  const file = path.join(dir, 'lock');
  const handle = (await openOwnFile(file, 'lock file', true))!;
  try {
    let locked: boolean;
    try {
      locked = native().tryLockFile(handle.fd);
    } catch (err) {
      throw ioError(err, `lock the session ${path.basename(dir)} (${file})`);
    }
    if (!locked) {
      const owner = Number.parseInt(await handle.readFile('utf8').catch(() => ''), 10);
      const where =
        owner === process.pid ? 'is already open in this process' : Number.isInteger(owner) ? `is open in process ${owner}` : 'is open in another process';
      throw new KvstashError('E_SESSION_LOCKED', `session ${path.basename(dir)} ${where}; close it there first`);
    }
    // Ours now. The pid is only for people and messages, so a full disk does not stop the session.
    await handle.truncate(0).catch(() => undefined);
    await writeFully(handle, Buffer.from(`${process.pid}\n`), 0).catch(() => undefined);
  } catch (err) {
    await handle.close();
    throw err;
  }
  let released = false;
  return {
    async release() {
      if (released) return;
      released = true;
      try {
        await handle.truncate(0).catch(() => undefined);
        native().unlockFile(handle.fd);
      } finally {
        await handle.close();
      }
    },
  };
}
