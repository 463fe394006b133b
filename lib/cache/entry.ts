/**
 * The kvstash cache entry: a backend's state bytes wrapped with everything needed to decide,
 * before a single byte reaches the backend, whether they may be loaded here.
 *
 * Layout of format version 3, the one written (all integers little-endian):
 *
 *   offset    size  field
 *   0         8     magic "KVSTASH\0"
 *   8         4     format version (u32, 3)
 *   12        4     header length H (u32)
 *   16        H     header: UTF-8 JSON (EntryHeader; `checksumChunkBytes` = C)
 *   16+H      pad   zero bytes up to the next multiple of 64 (the payload offset P)
 *   P         L     payload: L = header.payloadBytes state bytes
 *   P+L       8N    chunk digests: N = ceil((P+L) / C); digest i is the CRC-32C of the chunk's index
 *                   i as 8 bytes (u64) followed by bytes [i*C, min((i+1)*C, P+L)) (u64 each, high
 *                   32 bits zero)
 *   P+L+8N    8     CRC-32C of the N digests (the 8N bytes): the entry's checksum (u64, high 32 bits zero)
 *   P+L+8N+8  8     trailer magic "KVSTEND\0"
 *
 * Why chunks: a restore checks chunks on two threads while llama.cpp imports the ones already
 * checked (binding/llama/StateReadGate.h), instead of one sequential pass before the import.
 * Writers use C = 64 KiB: llama.cpp reads a few bytes of every layer's header before it copies any
 * bulk, and each such read needs its whole chunk checked first. The index in each digest makes
 * chunks swapped along with their digests fail. Why CRC-32C: binding/common/Crc32c.h.
 *
 * Older formats, still read:
 * - Format 2: the same layout with XXH64 in place of CRC-32C: digest i is the XXH64 with seed i of
 *   chunk i (no index bytes), the checksum the XXH64 (seed 0) of the digests.
 * - Format 1: the same up to the payload, then one XXH64 (seed 0) of bytes [0, P+L) and the trailer
 *   magic, and no `checksumChunkBytes`: format 2's digest of a single chunk, verified by the same code.
 *
 * A file whose size is not exactly what its header describes, whose magics, version or header do
 * not parse (every header field of the wrong type or value, named), or whose checksums differ is
 * corrupt (E_CACHE_CORRUPT). A well-formed entry made by another model or for an incompatible
 * context is a mismatch (E_CACHE_MISMATCH). A path that names anything but a regular file (a FIFO,
 * a device, a socket, a directory, a symlink) is E_CACHE_NOT_FILE: it is never opened for reading
 * in a way that could block, and never deleted.
 *
 * Entry files are read from one open descriptor from start to end (openEntryFile): a file renamed
 * over the path meanwhile (another process re-saving the key) or removed (evicted) is never mixed
 * with the one whose header was read.
 */
import { createHash } from 'node:crypto';
import { native, type DigestScheme } from '../binding.js';
import { KvstashError } from '../errors.js';
import type { VerifiedRanges } from '../llama/context.js';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';
import { NotRegularFileError, openRegularFile, readExactly, type FileIdentity, type OpenedFile } from '../util/regular-file.js';

export const ENTRY_MAGIC = Buffer.from('KVSTASH\0', 'latin1');
export const ENTRY_TRAILER = Buffer.from('KVSTEND\0', 'latin1');
export const ENTRY_VERSION = 3;
/** How each format computes its digests (binding/common/Checksum.h). */
const DIGEST_SCHEMES: Record<number, DigestScheme> = { 1: 'xxh64', 2: 'xxh64', 3: 'crc32c' };
/** The chunk size writers use for the chunk digests. */
export const CHECKSUM_CHUNK_BYTES = 1 << 16;
export const ENTRY_EXTENSION = '.kvstash';
const PREAMBLE_BYTES = 16;
/** The trailer after the digests: the table's own checksum and the trailer magic. */
const TRAILER_BYTES = 16;
const DIGEST_BYTES = 8;
/** Bounds on a chunked entry's chunk size: powers of two, from a page to 1 GiB. */
const MIN_CHUNK_BYTES = 4096;
const MAX_CHUNK_BYTES = 1 << 30;
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
  /** Formats 2 and 3: the size of the checksummed chunks. Set by the writer (writeEntry, encodeEntry). */
  checksumChunkBytes?: number;
}

/** Where the parts of an entry file are, from its preamble, header and trailer. */
export interface EntryFile {
  header: EntryHeader;
  /** Identity of the entry: the same model, layout and tokens give the same key. */
  key: string;
  /** The format version the file was written in (1, 2 or 3). */
  version: number;
  /** How its digests and checksum are computed: 'crc32c' in format 3, 'xxh64' before. */
  digestScheme: DigestScheme;
  payloadOffset: number;
  /** Bytes covered by the chunk digests: [0, checkedLength). */
  checkedLength: number;
  /** The chunk size of the digests (format 1: checkedLength, one chunk). */
  chunkBytes: number;
  /** The chunk digests as stored: 8 bytes (u64 LE) per chunk. Format 1: its one checksum. */
  chunkDigests: Buffer;
  /** The entry's checksum: formats 2 and 3, that of the digests (verified); format 1, its one XXH64. */
  checksum: bigint;
  fileSize: number;
  /** The file it was read from (device and inode of the opened descriptor); absent for entries
   * decoded from memory. */
  identity?: FileIdentity;
}

export type { VerifiedRanges };

export function verifiedRanges(entry: EntryFile): VerifiedRanges {
  const { checkedLength, chunkBytes, chunkDigests, digestScheme, payloadOffset } = entry;
  return { checkedLength, chunkBytes, chunkDigests, digestScheme, payloadOffset, payloadBytes: entry.header.payloadBytes };
}

/** The key of an entry: a hash of what makes two entries interchangeable. */
export function entryKey(header: Pick<EntryHeader, 'kind' | 'backend' | 'model' | 'layout' | 'tokens'>): string {
  const identity = JSON.stringify([header.kind, header.backend, header.model.fingerprint, header.layout, header.tokens]);
  return createHash('sha256').update(identity).digest('hex').slice(0, 32);
}

function corrupt(source: string, problem: string): KvstashError {
  return new KvstashError('E_CACHE_CORRUPT', `cache entry ${source} is corrupt: ${problem}; it will not be loaded`, { reason: problem });
}

function notAFile(source: string, what: string): KvstashError {
  const problem = `it is ${what}, not a regular file`;
  return new KvstashError('E_CACHE_NOT_FILE', `cache entry ${source} was not opened: ${problem}; kvstash never writes one, remove it yourself`, {
    reason: problem,
  });
}

/**
 * Opens an entry file for reading (openRegularFile: never blocks, never follows a symlink, checks
 * the type on the descriptor). Undefined when nothing is there: another process may have evicted
 * it since the directory was listed, which is a miss, not a problem. Anything but a regular file
 * is E_CACHE_NOT_FILE; any other failure to open is E_CACHE_CORRUPT.
 */
export async function openEntryFile(file: string): Promise<OpenedFile | undefined> {
  try {
    return await openRegularFile(file);
  } catch (err) {
    if (err instanceof NotRegularFileError) throw notAFile(file, err.what);
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    throw corrupt(file, `it cannot be opened (${code ?? 'error'})`);
  }
}

/** Reads up to `into.length` bytes at `position` (fewer only at the end of the file); a read the
 * system refuses (EIO) is E_CACHE_CORRUPT. */
async function readAt(opened: OpenedFile, into: Buffer, position: number): Promise<number> {
  try {
    return await readExactly(opened, into, position);
  } catch (err) {
    throw corrupt(opened.path, `it cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
}

/** openEntryFile for callers that need a file: nothing there is E_CACHE_CORRUPT. */
async function requireEntryFile(file: string): Promise<OpenedFile> {
  const opened = await openEntryFile(file);
  if (!opened) throw corrupt(file, 'it cannot be opened (ENOENT: no such file)');
  return opened;
}

function payloadOffsetFor(headerBytes: number): number {
  return Math.ceil((PREAMBLE_BYTES + headerBytes) / PAYLOAD_ALIGNMENT) * PAYLOAD_ALIGNMENT;
}

function chunkCount(checkedLength: number, chunkBytes: number): number {
  return Math.ceil(checkedLength / chunkBytes);
}

export interface WriteEntryOptions {
  /** The chunk size of the digests; CHECKSUM_CHUNK_BYTES unless a test needs many small chunks. */
  chunkBytes?: number;
}

/** The parts of an entry file in order: head (preamble, header, padding), payload, tail. */
async function encodeParts(header: EntryHeader, payload: Uint8Array, options: WriteEntryOptions): Promise<[Buffer, Uint8Array, Buffer]> {
  if (header.payloadBytes !== payload.byteLength) throw new RangeError('payloadBytes must equal the payload length');
  const chunkBytes = options.chunkBytes ?? CHECKSUM_CHUNK_BYTES;
  if (!isValidChunkSize(chunkBytes)) throw new RangeError(`chunkBytes must be a power of two from ${MIN_CHUNK_BYTES} to ${MAX_CHUNK_BYTES}`);
  const json = Buffer.from(JSON.stringify({ ...header, checksumChunkBytes: chunkBytes }), 'utf8');
  const head = Buffer.alloc(payloadOffsetFor(json.length));
  ENTRY_MAGIC.copy(head, 0);
  head.writeUInt32LE(ENTRY_VERSION, 8);
  head.writeUInt32LE(json.length, 12);
  json.copy(head, PREAMBLE_BYTES);
  const scheme = DIGEST_SCHEMES[ENTRY_VERSION]!;
  const digests = await native().chunkChecksums([head, payload], chunkBytes, scheme);
  const tail = Buffer.alloc(digests.length + TRAILER_BYTES);
  digests.copy(tail, 0);
  tail.writeBigUInt64LE(await native().checksum([digests], scheme), digests.length);
  ENTRY_TRAILER.copy(tail, digests.length + DIGEST_BYTES);
  return [head, payload, tail];
}

function isValidChunkSize(bytes: unknown): bytes is number {
  return Number.isInteger(bytes) && (bytes as number) >= MIN_CHUNK_BYTES && (bytes as number) <= MAX_CHUNK_BYTES && ((bytes as number) & ((bytes as number) - 1)) === 0;
}

/** The complete entry as one buffer (for remote stores). */
export async function encodeEntry(header: EntryHeader, payload: Uint8Array, options: WriteEntryOptions = {}): Promise<Buffer> {
  return Buffer.concat(await encodeParts(header, payload, options));
}

/** Writes an entry file atomically: readers in any process see all of it or none of it. */
export async function writeEntry(file: string, header: EntryHeader, payload: Uint8Array, options: WriteEntryOptions = {}): Promise<number> {
  const [head, , tail] = await encodeParts(header, payload, options);
  await writeFileAtomic(file, async (handle) => {
    await writeFully(handle, head, 0);
    await writeFully(handle, payload, head.length);
    await writeFully(handle, tail, head.length + payload.byteLength);
  });
  return head.length + payload.byteLength + tail.length;
}

/** What the head of an entry (preamble and header) says about the rest of the file. */
interface EntryLayoutFacts {
  version: number;
  header: EntryHeader;
  payloadOffset: number;
  checkedLength: number;
  chunkBytes: number;
  /** Bytes after the checked range: digests (formats 2 and 3) and trailer. */
  tailBytes: number;
}

/** Parses the preamble and header, given the file's first bytes (at least the header). */
function parseHead(source: string, start: Buffer, fileSize: number): EntryLayoutFacts {
  if (fileSize < PREAMBLE_BYTES + TRAILER_BYTES || start.length < PREAMBLE_BYTES) throw corrupt(source, `only ${fileSize} bytes long`);
  if (!start.subarray(0, 8).equals(ENTRY_MAGIC)) throw corrupt(source, 'it does not start with the kvstash magic');
  const version = start.readUInt32LE(8);
  if (!(version in DIGEST_SCHEMES)) throw corrupt(source, `format version ${version}, this kvstash reads versions 1 to ${ENTRY_VERSION}`);
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
  let chunkBytes = checkedLength;
  let tailBytes = TRAILER_BYTES;
  if (version >= 2) {
    if (!isValidChunkSize(header.checksumChunkBytes)) throw corrupt(source, 'its checksum chunk size is not a power of two from 4 KiB to 1 GiB');
    chunkBytes = header.checksumChunkBytes;
    tailBytes = DIGEST_BYTES * chunkCount(checkedLength, chunkBytes) + TRAILER_BYTES;
  }
  if (checkedLength + tailBytes !== fileSize) {
    throw corrupt(source, `it is ${fileSize} bytes long but its header describes ${checkedLength + tailBytes} (truncated or extended)`);
  }
  return { version, header, payloadOffset, checkedLength, chunkBytes, tailBytes };
}

/** Completes the parse with the file's last `facts.tailBytes` bytes; checks the digest table's own checksum. */
async function parseTail(source: string, facts: EntryLayoutFacts, tail: Buffer): Promise<EntryFile> {
  const digestBytes = facts.tailBytes - TRAILER_BYTES;
  if (!tail.subarray(digestBytes + DIGEST_BYTES).equals(ENTRY_TRAILER)) throw corrupt(source, 'the trailer magic is missing');
  const checksum = tail.readBigUInt64LE(digestBytes);
  // Copied: the digests outlive the buffer they were read into (which may be a whole entry).
  const chunkDigests = Buffer.from(facts.version === 1 ? tail.subarray(0, DIGEST_BYTES) : tail.subarray(0, digestBytes));
  const digestScheme = DIGEST_SCHEMES[facts.version]!;
  if (facts.version >= 2 && (await native().checksum([chunkDigests], digestScheme)) !== checksum) {
    throw corrupt(source, 'its checksum does not match its chunk digests');
  }
  const { version, header, payloadOffset, checkedLength, chunkBytes } = facts;
  return {
    header,
    key: entryKey(header),
    version,
    digestScheme,
    payloadOffset,
    checkedLength,
    chunkBytes,
    chunkDigests,
    checksum,
    fileSize: checkedLength + facts.tailBytes,
  };
}

/** What is wrong with a parsed header, naming the field, or null. Every field is checked for its
 * type: a header is data from a file, and the commands print and compare its fields. */
function headerProblem(h: EntryHeader): string | null {
  if (typeof h !== 'object' || h === null || Array.isArray(h)) return 'the header is not an object';
  if (h.kind !== 'llama.cpp/sequence-state' && h.kind !== 'rkllm/prompt-cache') return `unknown payload kind ${describeValue(h.kind)}`;
  const strings: Array<[string, unknown, unknown]> = [
    ['backend', h.backend, ['name', 'version']],
    ['model', h.model, ['fingerprint', 'fingerprintScheme', 'name', 'architecture']],
  ];
  for (const [field, value, names] of strings) {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return `header field ${field} is ${describeValue(value)}, not an object`;
    for (const name of names as string[]) {
      const inner = (value as Record<string, unknown>)[name];
      if (typeof inner !== 'string') return `header field ${field}.${name} is ${describeValue(inner)}, not a string`;
    }
  }
  if (typeof h.layout !== 'object' || h.layout === null || Array.isArray(h.layout)) return `header field layout is ${describeValue(h.layout)}, not an object`;
  for (const [name, value] of Object.entries(h.layout)) {
    if (typeof value !== 'string') return `header field layout.${name} is ${describeValue(value)}, not a string`;
  }
  if (!Array.isArray(h.tokens) || !h.tokens.every((t) => Number.isInteger(t) && t >= 0 && t <= 0x7fffffff)) return 'header field tokens is not a list of token ids';
  if (h.tokenCount !== h.tokens.length) return `header field tokenCount (${describeValue(h.tokenCount)}) disagrees with the ${h.tokens.length} tokens`;
  if (h.label !== null && typeof h.label !== 'string') return `header field label is ${describeValue(h.label)}, not a string or null`;
  if (typeof h.createdAt !== 'string' || Number.isNaN(Date.parse(h.createdAt))) return `header field createdAt is ${describeValue(h.createdAt)}, not a date`;
  if (!Number.isSafeInteger(h.payloadBytes) || h.payloadBytes <= 0) return `header field payloadBytes is ${describeValue(h.payloadBytes)}, not a positive integer`;
  return null;
}

/** A short, printable description of a header value for a message (never the raw text: it may hold
 * terminal escapes, and it may be long). */
function describeValue(value: unknown): string {
  if (value === undefined) return 'missing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'string') return 'a string';
  if (typeof value === 'number') return Number.isFinite(value) ? `the number ${value}` : 'a number';
  return `a ${typeof value}`;
}

/** Reads and checks an entry file's structure and digest table (not the chunks: that needs every byte). */
export async function readEntryFile(file: string): Promise<EntryFile> {
  const opened = await requireEntryFile(file);
  try {
    return await readEntryFrom(opened);
  } finally {
    await opened.handle.close();
  }
}

/** readEntryFile on a file already open (openEntryFile): what it returns is that file's, whatever
 * the path names by now. */
export async function readEntryFrom(opened: OpenedFile): Promise<EntryFile> {
  const { path: file, size } = opened;
  const firstRead = Math.min(size, 64 << 10);
  let start = Buffer.alloc(firstRead);
  start = start.subarray(0, await readAt(opened, start, 0));
  if (start.length >= PREAMBLE_BYTES && start.subarray(0, 8).equals(ENTRY_MAGIC)) {
    const need = PREAMBLE_BYTES + start.readUInt32LE(12);
    if (need > firstRead && need <= size && need <= MAX_HEADER_BYTES + PREAMBLE_BYTES) {
      start = Buffer.alloc(need);
      start = start.subarray(0, await readAt(opened, start, 0));
    }
  }
  const facts = parseHead(file, start, size);
  const tail = await readTail(opened, facts.tailBytes);
  return { ...(await parseTail(file, facts, tail)), identity: { dev: opened.dev, ino: opened.ino } };
}

/** The last `bytes` bytes of an open file; a file shorter than its size said is corrupt (it was
 * truncated in place: entries are only ever replaced whole). */
async function readTail(opened: OpenedFile, bytes: number): Promise<Buffer> {
  const tail = Buffer.alloc(bytes);
  if ((await readAt(opened, tail, opened.size - bytes)) !== bytes) throw corrupt(opened.path, 'it ended while it was read');
  return tail;
}

/**
 * True when the open file is still the entry `entry` was parsed from: the same size and the same
 * digest table, checksum and trailer. A file that another process renamed over the path since has
 * other digests (its header differs, at least in createdAt), even when it reuses the inode number;
 * bytes changed in place with the digests kept are caught by the verification of every chunk.
 */
export async function isSameEntry(opened: OpenedFile, entry: EntryFile): Promise<boolean> {
  if (opened.size !== entry.fileSize) return false;
  const tailBytes = entry.fileSize - entry.checkedLength;
  const tail = Buffer.alloc(tailBytes);
  if ((await readAt(opened, tail, entry.checkedLength)) !== tailBytes) return false;
  const digests = entry.version === 1 ? DIGEST_BYTES : tailBytes - TRAILER_BYTES;
  return tail.subarray(0, digests).equals(entry.chunkDigests.subarray(0, digests)) && tail.readBigUInt64LE(tailBytes - TRAILER_BYTES) === entry.checksum;
}

/** Parses a whole entry held in memory and verifies every chunk; returns the payload view. */
export async function decodeEntry(source: string, bytes: Buffer): Promise<{ entry: EntryFile; payload: Buffer }> {
  const facts = parseHead(source, bytes, bytes.length);
  const entry = await parseTail(source, facts, bytes.subarray(bytes.length - facts.tailBytes));
  const actual = await native().chunkChecksums([bytes.subarray(0, entry.checkedLength)], entry.chunkBytes, entry.digestScheme);
  if (!actual.equals(entry.chunkDigests)) throw corrupt(source, 'its checksum does not match its bytes');
  return { entry, payload: bytes.subarray(entry.payloadOffset, entry.checkedLength) };
}

/**
 * An entry's structure from its two ends, without its payload: `head` is bytes [0, payload offset)
 * (preamble, header, padding) and `tail` the bytes after the checked range (digests, checksum,
 * trailer) of an entry `fileSize` bytes long. For stores that keep them apart from the payload
 * (RedisStore's manifest); the digest table's own checksum is verified, the chunks are not.
 */
export async function readEntryEnds(source: string, head: Buffer, tail: Buffer, fileSize: number): Promise<EntryFile> {
  const facts = parseHead(source, head, fileSize);
  if (head.length !== facts.payloadOffset || tail.length !== facts.tailBytes) throw corrupt(source, 'its head or tail is not as long as its header describes');
  return parseTail(source, facts, tail);
}

/** Reads a whole entry file and verifies it; returns its payload. */
export async function readVerifiedEntry(file: string): Promise<{ entry: EntryFile; payload: Buffer }> {
  const opened = await requireEntryFile(file);
  try {
    return await readVerifiedEntryFrom(opened);
  } finally {
    await opened.handle.close();
  }
}

/** readVerifiedEntry on a file already open (openEntryFile). */
export async function readVerifiedEntryFrom(opened: OpenedFile): Promise<{ entry: EntryFile; payload: Buffer }> {
  const bytes = Buffer.allocUnsafe(opened.size);
  if ((await readAt(opened, bytes, 0)) !== opened.size) throw corrupt(opened.path, 'it ended while it was read');
  const { entry, payload } = await decodeEntry(opened.path, bytes);
  return { entry: { ...entry, identity: { dev: opened.dev, ino: opened.ino } }, payload };
}
