/**
 * One process at a time per session: a lock file created exclusively, holding the owner's pid.
 * A lock whose owner is gone (killed, crashed) is taken over, so a killed process never blocks
 * its own resume.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { KvstashError } from '../errors.js';
import { isProcessAlive } from '../util/process.js';

export interface Lock {
  release(): Promise<void>;
}


export async function acquireLock(dir: string): Promise<Lock> {
  const file = path.join(dir, 'lock');
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const handle = await fsp.open(file, 'wx');
      await handle.writeFile(String(process.pid));
      await handle.close();
      let released = false;
      return {
        async release() {
          if (released) return;
          released = true;
          await fsp.rm(file, { force: true });
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const owner = Number.parseInt(await fsp.readFile(file, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(owner) && owner !== process.pid && isProcessAlive(owner)) {
        throw new KvstashError('E_SESSION_LOCKED', `session ${path.basename(dir)} is open in process ${owner}; close it there first`);
      }
      if (owner === process.pid) {
        throw new KvstashError('E_SESSION_LOCKED', `session ${path.basename(dir)} is already open in this process`);
      }
      // The owner is gone (or the file is empty: it died between creating and writing it).
      await fsp.rm(file, { force: true });
    }
  }
  throw new KvstashError('E_SESSION_LOCKED', `could not lock session ${path.basename(dir)}`);
}
