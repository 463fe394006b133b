/**
 * The kvstash cache entry: a backend's state bytes wrapped with everything needed to decide,
 * before a single byte reaches the backend, whether they may be loaded here.
 *
 * Layout (all integers little-endian):
 *
 *   offset  size  field
 *   0       8     magic "KVSTASH\0"
 *   8       4     format version (u32, currently 1)
 *   12      4     header length H (u32)
 *   16      H     header: UTF-8 JSON (EntryHeader)
 *   16+H    pad   zero bytes up to the next multiple of 64 (the payload offset P)
 *   P       L     payload: L = header.payloadBytes state bytes
 *   P+L     8     XXH64 (seed 0) of bytes [0, P+L) (u64)
 *   P+L+8   8     trailer magic "KVSTEND\0"
 *
 * A file whose size is not exactly P+L+16, whose magics, version or header do not parse, or whose
 * checksum differs is corrupt (E_CACHE_CORRUPT). A well-formed entry made by another model or for
 * an incompatible context is a mismatch (E_CACHE_MISMATCH).
 */
import { createHash } from 'node:crypto';
import fsp from 'node:fs/promises';
import { native } from '../binding.js';
import { KvstashError } from '../errors.js';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';

export const ENTRY_MAGIC = Buffer.from('KVSTASH\0', 'latin1');
export const ENTRY_TRAILER = Buffer.from('KVSTEND\0', 'latin1');
export const ENTRY_VERSION = 1;
export const ENTRY_EXTENSION = '.kvstash';
const PREAMBLE_BYTES = 16;
const TRAILER_BYTES = 16;
const PAYLOAD_ALIGNMENT = 64;
/** Headers larger than this are corrupt: 64 MiB holds millions of tokens. */
const MAX_HEADER_BYTES = 64 << 20;

export type EntryPayloadKind = 'llama.cpp/sequence-state' | 'rkllm/prompt-cache';

/**
 * What changes the layout of the state bytes: entries load only into contexts that agree on every
 * field. Each kind has its own fields, all strings: llama.cpp sequence states have `kvType` and
 * `flashAttention`; RKLLM prompt caches have those of lib/rkllm/system-prompt-cache.ts.
 */
export interface EntryLayout {
  readonly [field: string]: string;
}

export interface EntryHeader {
  kind: EntryPayloadKind;
  backend: { name: string; version: string };
  model: {
    fingerprint: string;
    fingerprintScheme: string;
    name: string;
    architecture: string;
  };
  layout: EntryLayout;
  tokenCount: number;
  tokens: number[];
  label: string | null;
  createdAt: string;
  payloadBytes: number;
}

/** Where the parts of an entry file are, from its preamble, header and trailer. */
export interface EntryFile {
  header: EntryHeader;
  /** Identity of the entry: the same model, layout and tokens give the same key. */
  key: string;
  payloadOffset: number;
  /** Bytes covered by the checksum: [0, checkedLength). */
  checkedLength: number;
  checksum: bigint;
  fileSize: number;
}

/** The key of an entry: a hash of what makes two entries interchangeable. */
export function entryKey(header: Pick<EntryHeader, 'kind' | 'backend' | 'model' | 'layout' | 'tokens'>): string {
  const identity = JSON.stringify([header.kind, header.backend, header.model.fingerprint, header.layout, header.tokens]);
  return createHash('sha256').update(identity).digest('hex').slice(0, 32);
}

function corrupt(source: string, problem: string): KvstashError {
  return new KvstashError('E_CACHE_CORRUPT', `cache entry ${source} is corrupt: ${problem}; it will not be loaded`, { reason: problem });
}

function payloadOffsetFor(headerBytes: number): number {
  return Math.ceil((PREAMBLE_BYTES + headerBytes) / PAYLOAD_ALIGNMENT) * PAYLOAD_ALIGNMENT;
}

/** Encodes everything before the payload: preamble, header JSON, padding. */
function encodeHead(header: EntryHeader): Buffer {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const head = Buffer.alloc(payloadOffsetFor(json.length));
  ENTRY_MAGIC.copy(head, 0);
  head.writeUInt32LE(ENTRY_VERSION, 8);
  head.writeUInt32LE(json.length, 12);
  json.copy(head, PREAMBLE_BYTES);
  return head;
}

async function encodeTrailer(head: Uint8Array, payload: Uint8Array): Promise<Buffer> {
  const trailer = Buffer.alloc(TRAILER_BYTES);
  trailer.writeBigUInt64LE(await native().checksum([head, payload]), 0);
  ENTRY_TRAILER.copy(trailer, 8);
  return trailer;
}

/** The complete entry as one buffer (for remote stores). */
export async function encodeEntry(header: EntryHeader, payload: Uint8Array): Promise<Buffer> {
  const head = encodeHead(header);
  return Buffer.concat([head, payload, await encodeTrailer(head, payload)]);
}

/** Writes an entry file atomically: readers in any process see all of it or none of it. */
export async function writeEntry(file: string, header: EntryHeader, payload: Uint8Array): Promise<number> {
  if (header.payloadBytes !== payload.byteLength) throw new RangeError('payloadBytes must equal the payload length');
  const head = encodeHead(header);
  const trailer = await encodeTrailer(head, payload);
  await writeFileAtomic(file, async (handle) => {
    await writeFully(handle, head, 0);
    await writeFully(handle, payload, head.length);
    await writeFully(handle, trailer, head.length + payload.byteLength);
  });
  return head.length + payload.byteLength + trailer.length;
}

/** Parses the parts of an entry, given its first bytes (at least the header) and its last 16 bytes. */
function parseEntry(source: string, start: Buffer, tail: Buffer, fileSize: number): EntryFile {
  if (fileSize < PREAMBLE_BYTES + TRAILER_BYTES) throw corrupt(source, `only ${fileSize} bytes long`);
  if (!start.subarray(0, 8).equals(ENTRY_MAGIC)) throw corrupt(source, 'it does not start with the kvstash magic');
  const version = start.readUInt32LE(8);
  if (version !== ENTRY_VERSION) throw corrupt(source, `format version ${version}, this kvstash reads version ${ENTRY_VERSION}`);
  const headerBytes = start.readUInt32LE(12);
  if (headerBytes > MAX_HEADER_BYTES || PREAMBLE_BYTES + headerBytes > fileSize) throw corrupt(source, 'its header length runs past the file');
  let header: EntryHeader;
  try {
    header = JSON.parse(start.subarray(PREAMBLE_BYTES, PREAMBLE_BYTES + headerBytes).toString('utf8')) as EntryHeader;
  } catch {
    throw corrupt(source, 'its header is not valid JSON');
  }
  const problem = headerProblem(header);
  if (problem) throw corrupt(source, problem);
  const payloadOffset = payloadOffsetFor(headerBytes);
  const checkedLength = payloadOffset + header.payloadBytes;
  if (checkedLength + TRAILER_BYTES !== fileSize) {
    throw corrupt(source, `it is ${fileSize} bytes long but its header describes ${checkedLength + TRAILER_BYTES} (truncated or extended)`);
  }
  if (!tail.subarray(8, 16).equals(ENTRY_TRAILER)) throw corrupt(source, 'the trailer magic is missing');
  return { header, key: entryKey(header), payloadOffset, checkedLength, checksum: tail.readBigUInt64LE(0), fileSize };
}

function headerProblem(h: EntryHeader): string | null {
  if (typeof h !== 'object' || h === null) return 'the header is not an object';
  if (h.kind !== 'llama.cpp/sequence-state' && h.kind !== 'rkllm/prompt-cache') return `unknown payload kind ${String(h.kind)}`;
  if (typeof h.backend?.name !== 'string' || typeof h.backend.version !== 'string') return 'the backend is missing';
  if (typeof h.model?.fingerprint !== 'string' || typeof h.model.fingerprintScheme !== 'string') return 'the model fingerprint is missing';
  if (typeof h.layout !== 'object' || h.layout === null) return 'the layout is missing';
  if (!Array.isArray(h.tokens) || !h.tokens.every((t) => Number.isInteger(t) && t >= 0 && t <= 0x7fffffff)) return 'the tokens are not token ids';
  if (h.tokenCount !== h.tokens.length) return 'tokenCount disagrees with the tokens';
  if (!Number.isSafeInteger(h.payloadBytes) || h.payloadBytes <= 0) return 'payloadBytes is not a positive integer';
  return null;
}

/** Reads and checks an entry file's structure (not its checksum: that needs every byte). */
export async function readEntryFile(file: string): Promise<EntryFile> {
  let handle: fsp.FileHandle;
  try {
    handle = await fsp.open(file, 'r');
  } catch (err) {
    throw corrupt(file, `it cannot be opened (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  try {
    const { size } = await handle.stat();
    const firstRead = Math.min(size, 64 << 10);
    let start = Buffer.alloc(firstRead);
    await handle.read(start, 0, firstRead, 0);
    if (size >= PREAMBLE_BYTES && start.subarray(0, 8).equals(ENTRY_MAGIC)) {
      const need = PREAMBLE_BYTES + start.readUInt32LE(12);
      if (need > firstRead && need <= size && need <= MAX_HEADER_BYTES + PREAMBLE_BYTES) {
        start = Buffer.alloc(need);
        await handle.read(start, 0, need, 0);
      }
    }
    const tail = Buffer.alloc(TRAILER_BYTES);
    if (size >= TRAILER_BYTES) await handle.read(tail, 0, TRAILER_BYTES, size - TRAILER_BYTES);
    return parseEntry(file, start, tail, size);
  } finally {
    await handle.close();
  }
}

/** Parses a whole entry held in memory and verifies its checksum; returns the payload view. */
export async function decodeEntry(source: string, bytes: Buffer): Promise<{ entry: EntryFile; payload: Buffer }> {
  const tail = bytes.length >= TRAILER_BYTES ? bytes.subarray(bytes.length - TRAILER_BYTES) : Buffer.alloc(TRAILER_BYTES);
  const entry = parseEntry(source, bytes, tail, bytes.length);
  const actual = await native().checksum([bytes.subarray(0, entry.checkedLength)]);
  if (actual !== entry.checksum) throw corrupt(source, 'its checksum does not match its bytes');
  return { entry, payload: bytes.subarray(entry.payloadOffset, entry.checkedLength) };
}

/** Reads a whole entry file and verifies it; returns its payload. */
export async function readVerifiedEntry(file: string): Promise<{ entry: EntryFile; payload: Buffer }> {
  let bytes: Buffer;
  try {
    bytes = await fsp.readFile(file);
  } catch (err) {
    throw corrupt(file, `it cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  return decodeEntry(file, bytes);
}
