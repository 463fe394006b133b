/**
 * An append-only journal of checksummed records: the durable transcript of a session.
 *
 * Record layout: u32 LE payload length, 8 bytes of SHA-256(payload), payload (UTF-8 JSON).
 * Every append is fsynced before it resolves. On open, records are read until the first one that
 * is incomplete or fails its checksum (a write torn by a crash); that tail is cut off, so the next
 * append starts on a clean boundary, and what was cut is reported.
 */
import { createHash } from 'node:crypto';
import fsp from 'node:fs/promises';
import { writeFully } from '../util/atomic-file.js';

const HEAD_BYTES = 12;
/** A length above this is garbage, not a record: no turn is 64 MiB of JSON. */
const MAX_RECORD_BYTES = 64 << 20;

function digest(payload: Uint8Array): Buffer {
  return createHash('sha256').update(payload).digest().subarray(0, 8);
}

export class Journal<R> {
  private constructor(
    private readonly handle: fsp.FileHandle,
    private size: number,
  ) {}

  /**
   * Opens (creating with `create`) a journal and reads its records. `droppedBytes` counts a torn
   * or corrupt tail that was cut off.
   */
  static async open<R>(file: string, options: { create: boolean }): Promise<{ journal: Journal<R>; records: R[]; droppedBytes: number }> {
    const handle = await fsp.open(file, options.create ? 'a+' : 'r+');
    try {
      const bytes = await handle.readFile();
      const records: R[] = [];
      let offset = 0;
      while (offset + HEAD_BYTES <= bytes.length) {
        const length = bytes.readUInt32LE(offset);
        const end = offset + HEAD_BYTES + length;
        if (length > MAX_RECORD_BYTES || end > bytes.length) break;
        const payload = bytes.subarray(offset + HEAD_BYTES, end);
        if (!digest(payload).equals(bytes.subarray(offset + 4, offset + HEAD_BYTES))) break;
        try {
          records.push(JSON.parse(payload.toString('utf8')) as R);
        } catch {
          break;
        }
        offset = end;
      }
      const droppedBytes = bytes.length - offset;
      if (droppedBytes > 0) {
        await handle.truncate(offset);
        await handle.sync();
      }
      return { journal: new Journal<R>(handle, offset), records, droppedBytes };
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Appends one record; resolves once it is on disk. */
  async append(record: R): Promise<void> {
    const payload = Buffer.from(JSON.stringify(record), 'utf8');
    const frame = Buffer.alloc(HEAD_BYTES + payload.length);
    frame.writeUInt32LE(payload.length, 0);
    digest(payload).copy(frame, 4);
    payload.copy(frame, HEAD_BYTES);
    await writeFully(this.handle, frame, this.size);
    await this.handle.datasync();
    this.size += frame.length;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
