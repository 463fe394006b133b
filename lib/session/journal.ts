/**
 * An append-only journal of checksummed records: the durable transcript of a session.
 *
 * Record layout: u32 LE payload length, 8 bytes of SHA-256(payload), payload (UTF-8 JSON of an
 * object, so it starts with `{` and ends with `}`). Every append is fsynced before it resolves.
 *
 * Reading recovers every intact record, wherever damage is:
 * - a record that fails its checks is skipped by scanning forward, byte by byte, for the next
 *   offset where a whole record with a matching checksum starts (a false match needs a 64-bit
 *   checksum collision). The damaged bytes stay on disk and are reported on every open: they may
 *   be all that is left of an acknowledged turn, and cutting them would also cut what follows.
 * - only the tail after the last intact record is cut: a write torn by a crash leaves exactly
 *   that, and the next append must start on a record boundary. A last record damaged in place
 *   cannot be told apart from a torn write, so it goes the same way and is reported as cut. With
 *   no intact record at all, the tail is cut only when it is an incomplete record (a torn first
 *   write); bytes that look complete but fail their checks are left alone for the caller to report.
 */
import { createHash } from 'node:crypto';
import type fsp from 'node:fs/promises';
import { ioError, openOwnFile } from './files.js';
import { writeFully } from '../util/atomic-file.js';

const HEAD_BYTES = 12;
/** A length above this is garbage, not a record: no turn is 64 MiB of JSON. */
const MAX_RECORD_BYTES = 64 << 20;
const OPEN_BRACE = 0x7b;
const CLOSE_BRACE = 0x7d;

function digest(payload: Uint8Array): Buffer {
  return createHash('sha256').update(payload).digest().subarray(0, 8);
}

/** Bytes the reader skipped: they failed their checks and an intact record follows them. */
export interface JournalDamage {
  offset: number;
  bytes: number;
}

export interface JournalRead<R> {
  records: R[];
  /** Damaged ranges before the last intact record, oldest first (kept on disk). */
  damaged: JournalDamage[];
  /** Where the intact part ends: bytes after it are a torn or damaged tail. */
  end: number;
  /** Whether the tail (if any) may be cut: it follows an intact record, or is an incomplete one. */
  tailIsTorn: boolean;
}

/** The record starting at `offset`, if a whole one with a matching checksum is there. */
function recordAt(bytes: Buffer, offset: number): { value: unknown; end: number } | undefined {
  if (offset + HEAD_BYTES > bytes.length) return undefined;
  const length = bytes.readUInt32LE(offset);
  const end = offset + HEAD_BYTES + length;
  if (length < 2 || length > MAX_RECORD_BYTES || end > bytes.length) return undefined;
  // Cheap filters first: while resynchronising, most offsets fail here without hashing.
  if (bytes[offset + HEAD_BYTES] !== OPEN_BRACE || bytes[end - 1] !== CLOSE_BRACE) return undefined;
  const payload = bytes.subarray(offset + HEAD_BYTES, end);
  if (!digest(payload).equals(bytes.subarray(offset + 4, offset + HEAD_BYTES))) return undefined;
  try {
    return { value: JSON.parse(payload.toString('utf8')), end };
  } catch {
    return undefined;
  }
}

/** Parses journal bytes (see the module comment); pure, so tests can damage bytes at will. */
export function readJournal<R>(bytes: Buffer): JournalRead<R> {
  const records: R[] = [];
  const damaged: JournalDamage[] = [];
  let offset = 0;
  let end = 0;
  let damageStart = -1;
  while (offset < bytes.length) {
    const record = recordAt(bytes, offset);
    if (!record) {
      if (damageStart < 0) damageStart = offset;
      offset++;
      continue;
    }
    if (damageStart >= 0) damaged.push({ offset: damageStart, bytes: offset - damageStart });
    damageStart = -1;
    records.push(record.value as R);
    offset = end = record.end;
  }
  let tailIsTorn = true;
  if (records.length === 0 && bytes.length > 0) {
    const declared = bytes.length >= HEAD_BYTES ? HEAD_BYTES + bytes.readUInt32LE(0) : Infinity;
    tailIsTorn = declared > bytes.length;
  }
  return { records, damaged, end, tailIsTorn };
}

export class Journal<R> {
  private constructor(
    private readonly handle: fsp.FileHandle,
    private size: number,
  ) {}

  /**
   * Opens (creating with `create`) a journal and reads its records. `droppedBytes` counts a torn
   * tail that was cut off; `damaged` lists what was skipped before the last intact record, and
   * `unreadableBytes` counts bytes left on disk that hold no intact record at all.
   * Resolves undefined when the file is absent and `create` is false; rejects with
   * E_SESSION_CORRUPT when it is a symlink or not a regular file.
   */
  static async open<R>(
    file: string,
    options: { create: boolean },
  ): Promise<{ journal: Journal<R>; records: R[]; droppedBytes: number; damaged: JournalDamage[]; unreadableBytes: number } | undefined> {
    const handle = await openOwnFile(file, 'journal', options.create);
    if (!handle) return undefined;
    try {
      const bytes = await handle.readFile().catch((err: unknown) => {
        throw ioError(err, `read the session journal ${file}`);
      });
      const { records, damaged, end, tailIsTorn } = readJournal<R>(bytes);
      let droppedBytes = 0;
      let size = bytes.length;
      if (end < bytes.length && tailIsTorn) {
        droppedBytes = bytes.length - end;
        size = end;
        await handle.truncate(end).catch((err: unknown) => {
          throw ioError(err, `cut the torn tail of the session journal ${file}`);
        });
        await handle.sync();
      }
      return { journal: new Journal<R>(handle, size), records, droppedBytes, damaged, unreadableBytes: size - end };
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /**
   * Appends one record; resolves once it is on disk. Rejects with E_IO when the file system
   * refuses (disk full, ...): then the bytes written of this record are cut again, so the next
   * append starts where this one did and the journal holds no half record.
   */
  async append(record: R): Promise<void> {
    const payload = Buffer.from(JSON.stringify(record), 'utf8');
    const frame = Buffer.alloc(HEAD_BYTES + payload.length);
    frame.writeUInt32LE(payload.length, 0);
    digest(payload).copy(frame, 4);
    payload.copy(frame, HEAD_BYTES);
    try {
      // Positional writes (the file is not opened O_APPEND): a failed append is overwritten by
      // the next one even if cutting it below fails.
      await writeFully(this.handle, frame, this.size);
      await this.handle.datasync();
    } catch (err) {
      // Shrinking a file needs no free space.
      await this.handle.truncate(this.size).catch(() => undefined);
      throw ioError(err, 'write the session journal');
    }
    this.size += frame.length;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
