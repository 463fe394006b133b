import fs from 'node:fs';
import fsp from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';

/** Which file is open: a path may name another file a moment later (another process renamed one
 * over it), a descriptor never does. */
export interface FileIdentity {
  dev: bigint;
  ino: bigint;
}

export interface OpenedFile extends FileIdentity {
  /** The path it was opened by (for messages; the file may no longer be there). */
  path: string;
  handle: FileHandle;
  /** Unit: bytes. */
  size: number;
}

/** What a path names when it is not a regular file, for messages ("a FIFO"). */
export class NotRegularFileError extends Error {
  constructor(
    readonly path: string,
    readonly what: string,
  ) {
    super(`${path} is ${what}, not a regular file`);
    this.name = 'NotRegularFileError';
  }
}

// O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever, on a thread-pool
// thread that even process.exit() then waits for. It changes nothing for a regular file.
// O_NOFOLLOW: a symlink is refused, not followed to wherever it points. Both are 0 on Windows,
// where neither a FIFO nor a symlink can take the place of a file this way.
const { O_RDONLY, O_NONBLOCK = 0, O_NOFOLLOW = 0 } = fs.constants;

export interface OpenRegularFileOptions {
  /** Open flags beside O_NONBLOCK/O_NOFOLLOW. Default O_RDONLY. */
  flags?: number;
  /** Mode of a file created (flags with O_CREAT). Default 0o644. */
  mode?: number;
  /** Follow a symlink in the last component (a model or state file the user names may be one, as
   * in Hugging Face's cache); the file it leads to is still checked. Default false: kvstash's own
   * files are never reached through a link. */
  followSymlinks?: boolean;
}

/**
 * Opens `file` (for reading unless `flags` says otherwise), never blocking and, unless asked, never
 * following a symlink in its last component, and checks on the opened descriptor (not the path,
 * which may change meanwhile) that it is a regular file. Throws NotRegularFileError for anything
 * else (a FIFO, a device, a socket, a directory, a symlink); callers map it to their own code.
 * Other errors (ENOENT: nothing there) pass through as Node's.
 * Every file kvstash opens by path goes through here.
 */
export async function openRegularFile(file: string, options: OpenRegularFileOptions = {}): Promise<OpenedFile> {
  const flags = (options.flags ?? O_RDONLY) | O_NONBLOCK | (options.followSymlinks ? 0 : O_NOFOLLOW);
  let handle: FileHandle;
  try {
    handle = await fsp.open(file, flags, options.mode ?? 0o644);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // ELOOP: the last component is a symlink (O_NOFOLLOW).
    if (code === 'ELOOP' && !options.followSymlinks) throw new NotRegularFileError(file, 'a symbolic link');
    // ENXIO: a unix socket (or a device without a driver), which open() cannot open at all.
    if (code === 'ENXIO') throw new NotRegularFileError(file, 'a socket or a device');
    // EISDIR: a directory opened for writing.
    if (code === 'EISDIR') throw new NotRegularFileError(file, 'a directory');
    throw err;
  }
  try {
    const stat = await handle.stat({ bigint: true });
    if (!stat.isFile()) throw new NotRegularFileError(file, describeFileType(stat));
    return { path: file, handle, dev: stat.dev, ino: stat.ino, size: Number(stat.size) };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/** What a non-regular file is, for messages ("a FIFO"); lstat's results name a symlink too. */
export function describeFileType(stat: fs.Stats | fs.BigIntStats): string {
  if (stat.isSymbolicLink()) return 'a symbolic link';
  if (stat.isDirectory()) return 'a directory';
  if (stat.isFIFO()) return 'a FIFO';
  if (stat.isCharacterDevice()) return 'a character device';
  if (stat.isBlockDevice()) return 'a block device';
  if (stat.isSocket()) return 'a socket';
  return 'not a regular file';
}

/** Reads exactly `length` bytes at `position`; a short read means the file ended early. */
export async function readExactly(opened: OpenedFile, into: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await opened.handle.read(into, done, into.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** The whole of a regular file (openRegularFile's checks and options), like fsp.readFile but never
 * waiting on a FIFO. A file that shrinks while read yields what was there. */
export async function readRegularFile(file: string, options: OpenRegularFileOptions = {}): Promise<Buffer> {
  const opened = await openRegularFile(file, options);
  try {
    const bytes = Buffer.alloc(opened.size);
    return bytes.subarray(0, await readExactly(opened, bytes, 0));
  } finally {
    await opened.handle.close();
  }
}
