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
const READ_FLAGS = fs.constants.O_RDONLY | (fs.constants.O_NONBLOCK ?? 0) | (fs.constants.O_NOFOLLOW ?? 0);

/**
 * Opens `file` for reading, never blocking and never following a symlink in its last component,
 * and checks on the opened descriptor (not the path, which may change meanwhile) that it is a
 * regular file. Throws NotRegularFileError for anything else (a FIFO, a device, a socket, a
 * directory, a symlink); other errors (ENOENT: nothing there) pass through as Node's.
 * Every file kvstash reads by path goes through here.
 */
export async function openRegularFile(file: string): Promise<OpenedFile> {
  let handle: FileHandle;
  try {
    handle = await fsp.open(file, READ_FLAGS);
  } catch (err) {
    // ELOOP: the last component is a symlink (O_NOFOLLOW).
    if ((err as NodeJS.ErrnoException).code === 'ELOOP') throw new NotRegularFileError(file, 'a symbolic link');
    // ENXIO: a unix socket (or a device without a driver), which open() cannot open at all.
    if ((err as NodeJS.ErrnoException).code === 'ENXIO') throw new NotRegularFileError(file, 'a socket or a device');
    throw err;
  }
  try {
    const stat = await handle.stat({ bigint: true });
    if (!stat.isFile()) throw new NotRegularFileError(file, describeType(stat));
    return { path: file, handle, dev: stat.dev, ino: stat.ino, size: Number(stat.size) };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

function describeType(stat: fs.BigIntStats): string {
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
