import fsp from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';

let tempCounter = 0;

/**
 * Makes `file` appear atomically: a reader sees either its previous contents or the complete new
 * ones, even when the process or the machine dies midway. `produce` writes a temporary file in the
 * same directory (a rename is atomic only within one file system), which is then fsynced, renamed
 * over the target, and the directory fsynced so that the rename itself survives a power cut. On
 * failure the temporary file is removed and the target is left as it was.
 *
 * `produce` gets the temporary path, so native writers (llama.cpp's state files, its quantizer)
 * can write it themselves.
 */
export async function replaceFileAtomic(file: string, produce: (temporaryPath: string) => Promise<void>): Promise<void> {
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
    throw err;
  }
  await syncDirectory(path.dirname(file));
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
    const { bytesWritten } = await handle.write(bytes, done, bytes.byteLength - done, position + done);
    if (bytesWritten <= 0) throw new Error(`write returned ${bytesWritten} bytes at offset ${position + done}`);
    done += bytesWritten;
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
