import fsp from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { KvstashError, type KvstashErrorCode } from '../errors.js';

let tempCounter = 0;
/** Test-only (read once): when set, writeFully writes the first half of its bytes, then waits this
 * long before the rest, so a test can SIGKILL a writer while it is inside a write. Unit: ms. */
const TEST_WRITE_PAUSE_MS = Number(process.env.KVSTASH_TEST_WRITE_PAUSE_MS ?? 0);

/**
 * Makes `file` appear atomically: a reader sees either its previous contents or the complete new
 * ones, even when the process or the machine dies midway. `produce` writes a temporary file in the
 * same directory (a rename is atomic only within one file system), which is then fsynced, renamed
 * over the target, and the directory fsynced so that the rename itself survives a power cut. On
 * failure the temporary file is removed and the target is left as it was.
 *
 * `produce` gets the temporary path, so native writers (llama.cpp's state files, its quantizer)
 * can write it themselves.
 *
 * A `file` that names a directory (or a FIFO, a device, a socket) is refused with `code` before
 * anything is written: a rename could not replace it, and the temporary file would have been
 * written next to it for nothing.
 */
export async function replaceFileAtomic(
  file: string,
  produce: (temporaryPath: string) => Promise<void>,
  code: KvstashErrorCode = 'E_STATE_SAVE',
): Promise<void> {
  await refuseNonFile(file, code);
  // Hidden, and pid + counter: two writers in one process, or two processes, never share one.
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.tmp-${process.pid}-${tempCounter++}`);
  try {
    await produce(tmp);
    const handle = await fsp.open(tmp, 'r+');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsp.rename(tmp, file);
  } catch (err) {
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
    // A directory put there after the check above.
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === 'EISDIR' || errno === 'ENOTEMPTY' || errno === 'EEXIST') throw notAFile(file, 'a directory', code, err);
    throw err;
  }
  await syncDirectory(path.dirname(file));
}

async function refuseNonFile(file: string, code: KvstashErrorCode): Promise<void> {
  // lstat: a symlink is replaced by the rename itself, never followed.
  const stat = await fsp.lstat(file).catch(() => undefined);
  if (!stat || stat.isFile() || stat.isSymbolicLink()) return;
  throw notAFile(file, stat.isDirectory() ? 'a directory' : 'not a regular file', code);
}

function notAFile(file: string, what: string, code: KvstashErrorCode, cause?: unknown): KvstashError {
  return new KvstashError(code, `cannot write ${file}: it is ${what}; give the path of a file (existing or new)`, { reason: `it is ${what}`, cause });
}

/** replaceFileAtomic for bytes written from JS: `write` receives the open temporary file and may
 * write at any positions. */
export function writeFileAtomic(file: string, write: (handle: FileHandle) => Promise<void>): Promise<void> {
  return replaceFileAtomic(file, async (tmp) => {
    const handle = await fsp.open(tmp, 'w');
    try {
      await write(handle);
    } finally {
      await handle.close();
    }
  });
}

/** Writes all of `bytes` at `position`; a regular file may accept fewer bytes per call than asked. */
export async function writeFully(handle: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.byteLength) {
    const length = TEST_WRITE_PAUSE_MS > 0 && done === 0 ? Math.ceil(bytes.byteLength / 2) : bytes.byteLength - done;
    const { bytesWritten } = await handle.write(bytes, done, length, position + done);
    if (bytesWritten <= 0) throw new Error(`write returned ${bytesWritten} bytes at offset ${position + done}`);
    done += bytesWritten;
    if (TEST_WRITE_PAUSE_MS > 0 && done < bytes.byteLength) await new Promise((resolve) => setTimeout(resolve, TEST_WRITE_PAUSE_MS));
  }
}

async function syncDirectory(dir: string): Promise<void> {
  // Windows cannot open a directory for fsync, and NTFS journals renames itself.
  if (process.platform === 'win32') return;
  const handle = await fsp.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
