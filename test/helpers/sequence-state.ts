/**
 * Reads and writes llama_state_seq_get_data bytes of a plain KV cache (llama_context's magic and
 * source sequence, then llama_kv_cache::state_write, in the pinned llama.cpp) as fields, so tests can make states that lie in one field at a time.
 * Only what the tiny synthetic model writes: one cache, no cell extension, V rows present.
 */
import fs from 'node:fs';
import path from 'node:path';
import { entryKey, readVerifiedEntry, writeEntry, type EntryHeader } from '../../lib/cache/entry.js';

export interface StateCell {
  pos: number;
  /** The sequence ids as written (n_seq_id is their count unless `nSeqId` overrides it). */
  seqs: number[];
  nSeqId?: number;
}

export interface StateLayer {
  type: number;
  /** Row size as written (u64); `rows` holds the row bytes of every cell, in cell order. */
  rowBytes: bigint;
  rows: Buffer;
}

export interface SequenceState {
  /** llama_context::state_seq_get_data's prefix: io_magic and the source sequence. */
  magic: number;
  source: number;
  nStream: number;
  /** Cell count per stream as written; the cells belong to the one non-empty stream. */
  cellCounts: number[];
  cells: StateCell[];
  vTrans: number;
  nLayer: number;
  k: StateLayer[];
  v: StateLayer[];
  /** Bytes after the state (none in a real one). */
  trailing: Buffer;
}

export function parseState(bytes: Buffer): SequenceState {
  let at = 0;
  const u32 = () => ((at += 4), bytes.readUInt32LE(at - 4));
  const i32 = () => ((at += 4), bytes.readInt32LE(at - 4));
  const u64 = () => ((at += 8), bytes.readBigUInt64LE(at - 8));
  const magic = u32();
  const source = i32();
  const nStream = u32();
  const cellCounts: number[] = [];
  const cells: StateCell[] = [];
  let filled = 0;
  for (let s = 0; s < nStream; s++) {
    const count = u32();
    cellCounts.push(count);
    if (count > 0) filled = count;
    if (count === 0) continue;
    for (let i = 0; i < count; i++) {
      const pos = i32();
      const n = u32();
      const seqs: number[] = [];
      for (let j = 0; j < n; j++) seqs.push(i32());
      cells.push({ pos, seqs });
    }
  }
  const vTrans = u32();
  const nLayer = u32();
  const layer = (): StateLayer => {
    const type = i32();
    const rowBytes = u64();
    const size = Number(rowBytes) * filled;
    const rows = Buffer.from(bytes.subarray(at, at + size));
    at += size;
    return { type, rowBytes, rows };
  };
  const k = Array.from({ length: nLayer }, layer);
  if (vTrans !== 0) throw new Error('parseState reads V rows only untransposed (flash attention on)');
  const v = Array.from({ length: nLayer }, layer);
  return { magic, source, nStream, cellCounts, cells, vTrans, nLayer, k, v, trailing: Buffer.from(bytes.subarray(at)) };
}

export function serializeState(state: SequenceState): Buffer {
  const parts: Buffer[] = [];
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    parts.push(b);
  };
  const i32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v | 0);
    parts.push(b);
  };
  const u64 = (v: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt.asUintN(64, v));
    parts.push(b);
  };
  u32(state.magic);
  i32(state.source);
  u32(state.nStream);
  let written = false;
  for (const count of state.cellCounts) {
    u32(count);
    if (count === 0 || written) continue;
    written = true;
    for (const cell of state.cells) {
      i32(cell.pos);
      u32(cell.nSeqId ?? cell.seqs.length);
      for (const s of cell.seqs) i32(s);
    }
  }
  u32(state.vTrans);
  u32(state.nLayer);
  for (const layer of [...state.k, ...state.v]) {
    i32(layer.type);
    u64(layer.rowBytes);
    parts.push(layer.rows);
  }
  parts.push(state.trailing);
  return Buffer.concat(parts);
}

export function cloneState(state: SequenceState): SequenceState {
  return {
    ...state,
    cellCounts: [...state.cellCounts],
    cells: state.cells.map((c) => ({ ...c, seqs: [...c.seqs] })),
    k: state.k.map((l) => ({ ...l, rows: Buffer.from(l.rows) })),
    v: state.v.map((l) => ({ ...l, rows: Buffer.from(l.rows) })),
    trailing: Buffer.from(state.trailing),
  };
}

/** Keeps the first `count` cells and their rows: a smaller state that is still well formed. */
export function keepCells(state: SequenceState, count: number): SequenceState {
  const out = cloneState(state);
  const per = (l: StateLayer) => ({ ...l, rows: l.rows.subarray(0, Number(l.rowBytes) * count) });
  out.cells = out.cells.slice(0, count);
  out.cellCounts = out.cellCounts.map((c) => (c > 0 ? count : 0));
  out.k = out.k.map(per);
  out.v = out.v.map(per);
  return out;
}

/**
 * Rewrites the entry file `file` with `payload` and `header` changes, re-signed (valid chunk
 * digests and checksum), under the key its header now gives; returns the new file's path.
 */
export async function resignEntry(file: string, change: (header: EntryHeader, payload: Buffer) => { header: EntryHeader; payload: Buffer }): Promise<string> {
  const { entry, payload } = await readVerifiedEntry(file);
  const changed = change(structuredClone(entry.header), Buffer.from(payload));
  const header = { ...changed.header, payloadBytes: changed.payload.length, tokenCount: changed.header.tokens.length };
  const out = path.join(path.dirname(file), `${entryKey(header)}.kvstash`);
  fs.rmSync(file);
  await writeEntry(out, header, changed.payload);
  return out;
}
