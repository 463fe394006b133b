/**
 * The files of a session directory are the session's own: journal.kvj, lock, checkpoints/ and its
 * entries. None of them is reached through a symbolic link, and none is a FIFO or a device: a link
 * would let the journal's tail cut truncate, or checkpoint rotation delete, a file that belongs to
 * someone else, and opening a FIFO waits forever. Anything else in their place is
 * E_SESSION_CORRUPT, and is left exactly as it is.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { KvstashError } from '../errors.js';
import { NotRegularFileError, describeFileType, openRegularFile } from '../util/regular-file.js';

const { O_RDWR, O_CREAT } = fs.constants;

function notOwn(file: string, what: string, kind: string): KvstashError {
  return new KvstashError(
    'E_SESSION_CORRUPT',
    `the session's ${what} ${file} is ${kind}, not a file the session wrote; kvstash leaves it untouched: move it away to use this session`,
    { reason: `${what} is ${kind}` },
  );
}

/**
 * Opens `file` for reading and writing (creating it with `create`) through the one opener
 * (openRegularFile: no symlink followed, no wait on a FIFO, the type checked on the descriptor);
 * anything but a regular file is E_SESSION_CORRUPT. Resolves undefined when the file is absent and
 * `create` is false.
 */
export async function openOwnFile(file: string, what: string, create: boolean): Promise<fsp.FileHandle | undefined> {
  try {
    return (await openRegularFile(file, { flags: O_RDWR | (create ? O_CREAT : 0) })).handle;
  } catch (err) {
    if (err instanceof NotRegularFileError) throw notOwn(file, what, err.what);
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !create) return undefined;
    // Some devices refuse O_RDWR with EACCES: look at what is there before calling it I/O.
    const stats = await fsp.lstat(file).catch(() => undefined);
    if (stats && !stats.isFile()) throw notOwn(file, what, describeFileType(stats));
    throw ioError(err, `open the session's ${what} ${file}`);
  }
}

/** Throws unless `dir` is absent or a directory itself (not a symlink to one). */
export async function requireOwnDirectory(dir: string, what: string): Promise<void> {
  const stats = await fsp.lstat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw ioError(err, `inspect the session's ${what} ${dir}`);
  });
  if (stats && !stats.isDirectory()) throw notOwn(dir, what, describeFileType(stats));
}

/** Whether `file` exists (without following a symlink); throws unless it is a regular file. */
export async function ownFileExists(file: string, what: string): Promise<fs.Stats | undefined> {
  const stats = await fsp.lstat(file).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw ioError(err, `inspect the session's ${what} ${file}`);
  });
  if (stats && !stats.isFile()) throw notOwn(file, what, describeFileType(stats));
  return stats;
}

const IO_ADVICE: Record<string, string> = {
  ENOSPC: 'the disk is full: free space and retry',
  EDQUOT: 'the disk quota is used up: free space and retry',
  EFBIG: 'the file would exceed the size limit (ulimit -f) of this process',
  EIO: 'the device reported an I/O error',
  EROFS: 'the file system is read-only',
  EACCES: 'permission denied',
  EPERM: 'permission denied',
};

/**
 * A failure of the file system as a coded E_IO, saying what could not be done and why; the system
 * error is kept as `cause`. A KvstashError passes through unchanged.
 */
export function ioError(err: unknown, doing: string): KvstashError {
  if (err instanceof KvstashError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const why = (code && IO_ADVICE[code]) ?? (err as Error | undefined)?.message ?? String(err);
  return new KvstashError('E_IO', `could not ${doing}: ${why}${code ? ` (${code})` : ''}`, { cause: err, reason: code ?? why });
}
