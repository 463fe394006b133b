/**
 * GGUF v3 (and v2, which has the same layout) reader and streaming writer, little-endian only.
 *
 * Layout, as ggml/include/gguf.h describes it: magic "GGUF", u32 version, i64 tensor count,
 * i64 key-value count, the key-value pairs (string key, i32 value type, value; an array is an i32
 * element type, a u64 count and the elements), the tensor table (string name, u32 n_dims,
 * n_dims × i64 ne, i32 ggml type, u64 offset relative to the data section), padding to
 * `general.alignment` (default 32), then the tensor data, each tensor padded to the alignment.
 * Strings are a u64 byte length and UTF-8 bytes without a terminator.
 *
 * The reader checks what llama.cpp's loader checks, so a file it accepts is one llama.cpp will
 * parse, and a corrupt file is refused here with a message instead of an assert in native code.
 */
import { NotRegularFileError, openRegularFile } from '../util/regular-file.js';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';
import { KvstashError } from '../errors.js';

export const GgufType = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;
export type GgufType = (typeof GgufType)[keyof typeof GgufType];

/** ggml_type ids (ggml/include/ggml.h) of the types kvstash writes or names. */
export const GgmlType = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q8_0: 8,
  Q4_K: 12,
  Q5_K: 13,
  Q6_K: 14,
  BF16: 30,
} as const;

interface GgmlTypeTraits {
  readonly name: string;
  /** Elements per block. */
  readonly blockSize: number;
  /** Bytes per block. */
  readonly typeSize: number;
}

/** Every ggml type a GGUF may hold, by id; ids missing here were removed from ggml. */
export const GGML_TYPES: ReadonlyMap<number, GgmlTypeTraits> = new Map(
  (
    [
      [0, 'f32', 1, 4],
      [1, 'f16', 1, 2],
      [2, 'q4_0', 32, 18],
      [3, 'q4_1', 32, 20],
      [6, 'q5_0', 32, 22],
      [7, 'q5_1', 32, 24],
      [8, 'q8_0', 32, 34],
      [9, 'q8_1', 32, 36],
      [10, 'q2_K', 256, 84],
      [11, 'q3_K', 256, 110],
      [12, 'q4_K', 256, 144],
      [13, 'q5_K', 256, 176],
      [14, 'q6_K', 256, 210],
      [15, 'q8_K', 256, 292],
      [16, 'iq2_xxs', 256, 66],
      [17, 'iq2_xs', 256, 74],
      [18, 'iq3_xxs', 256, 98],
      [19, 'iq1_s', 256, 50],
      [20, 'iq4_nl', 32, 18],
      [21, 'iq3_s', 256, 110],
      [22, 'iq2_s', 256, 82],
      [23, 'iq4_xs', 256, 136],
      [24, 'i8', 1, 1],
      [25, 'i16', 1, 2],
      [26, 'i32', 1, 4],
      [27, 'i64', 1, 8],
      [28, 'f64', 1, 8],
      [29, 'iq1_m', 256, 56],
      [30, 'bf16', 1, 2],
      [34, 'tq1_0', 256, 54],
      [35, 'tq2_0', 256, 66],
      [39, 'mxfp4', 32, 17],
      [40, 'nvfp4', 64, 36],
      [41, 'q1_0', 128, 18],
      [42, 'q2_0', 64, 18],
    ] as const
  ).map(([id, name, blockSize, typeSize]) => [id, { name, blockSize, typeSize }]),
);

export const GGUF_DEFAULT_ALIGNMENT = 32;
/** ggml's GGML_MAX_DIMS. */
const MAX_DIMS = 4;
/** ggml's GGML_MAX_NAME, including the terminating NUL. */
const MAX_TENSOR_NAME_BYTES = 64;
const MAGIC = 0x46554747; // "GGUF" read as a little-endian u32

/** Values as read: 64-bit integers are bigint, numeric arrays are typed arrays of their own type. */
export type GgufArrayValue =
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Uint32Array
  | Int32Array
  | Float32Array
  | Float64Array
  | BigUint64Array
  | BigInt64Array
  | boolean[]
  | string[];
export type GgufValue = number | bigint | boolean | string | GgufArrayValue;

export interface GgufValueType {
  type: GgufType;
  /** The element type, present when `type` is ARRAY. */
  itemType?: GgufType;
}

/**
 * A value with the GGUF type to store it as. For writing, 64-bit integers may also be safe-integer
 * numbers, and numeric arrays any array-like of numbers (or bigints for 64-bit elements).
 */
export interface GgufTypedValue extends GgufValueType {
  value: GgufValue | ArrayLike<number> | ArrayLike<bigint>;
}

export interface GgufTensorInfo {
  name: string;
  /** ne0 first, as stored. */
  dims: number[];
  /** ggml_type id. */
  type: number;
  /** Offset of the tensor's bytes from `dataOffset`. */
  offset: number;
  /** Bytes of tensor data, without the alignment padding. */
  byteLength: number;
}

export interface GgufHeader {
  version: number;
  /** In file order. Strings are decoded as UTF-8 (invalid sequences become U+FFFD). */
  metadata: Map<string, GgufValue>;
  metadataTypes: Map<string, GgufValueType>;
  tensors: GgufTensorInfo[];
  alignment: number;
  /** Absolute file offset where tensor data starts. */
  dataOffset: number;
  fileSize: number;
}

/** The tensor data size of a tensor of this shape and type, checking ne0 against the block size. */
export function ggmlTensorBytes(dims: readonly number[], type: number): number {
  const traits = GGML_TYPES.get(type);
  if (traits === undefined) throw new RangeError(`unknown ggml type ${type}`);
  if (dims.length > MAX_DIMS) throw new RangeError(`a tensor has at most ${MAX_DIMS} dimensions, got ${dims.length}`);
  let elements = 1;
  for (const ne of dims) {
    if (!Number.isSafeInteger(ne) || ne < 0) throw new RangeError(`tensor dimension ${ne} is not a non-negative integer`);
    elements *= ne;
  }
  const ne0 = dims[0] ?? 1;
  if (ne0 % traits.blockSize !== 0) {
    throw new RangeError(`ne0 = ${ne0} is not a multiple of the ${traits.name} block size ${traits.blockSize}`);
  }
  const bytes = (elements / traits.blockSize) * traits.typeSize;
  if (!Number.isSafeInteger(bytes)) throw new RangeError(`tensor of shape [${dims.join(', ')}] is too large`);
  return bytes;
}

export function alignUp(n: number, alignment: number): number {
  const rest = n % alignment;
  return rest === 0 ? n : n + alignment - rest;
}

// ---------------------------------------------------------------------------------------------
// Reading

/** Bytes per element of the fixed-size GGUF types; 0 for STRING and ARRAY. */
const ELEMENT_SIZE = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8];
const U32_LIMIT = 4294967296;
const INITIAL_HEADER_READ = 64 * 1024;

function assertLittleEndianHost(): void {
  // Typed arrays use the host byte order, and GGUF files here are little-endian.
  if (os.endianness() !== 'LE') throw new Error('kvstash reads GGUF files on little-endian hosts only');
}

function formatError(file: string, problem: string): KvstashError {
  return new KvstashError(
    'E_MODEL_FORMAT',
    `${file} is not a valid GGUF model: ${problem}. Check that the path names a complete .gguf file ` +
      `(download or convert it again if it was cut short).`,
  );
}

/** Thrown inside the synchronous parser when it needs bytes beyond what has been read so far. */
class NeedMoreBytes {
  /** `extrapolated`: upTo is an estimate of where a long array ends, not a short read's end. */
  constructor(
    readonly upTo: number,
    readonly extrapolated = false,
  ) {}
}

/**
 * Parses a header from the first `available` bytes of `buf`, which holds the start of a file of
 * `fileSize` bytes. Synchronous, so the loops over 150k-entry string arrays stay fast. When the
 * header runs past `available` it throws NeedMoreBytes, and the caller reads more and starts over.
 * With `decodeValues` false it only walks the structure (keys, tensor table, lengths), which is
 * several times cheaper than decoding every token string: the caller finds the header's extent
 * that way, then decodes it once.
 */
class HeaderParser {
  pos = 0;
  /** What is being read, for error messages. */
  context = 'the file header';
  /** Progress through a string array, so running out of bytes can ask for all of it at once. */
  private arrayStart = -1;
  private arrayIndex = 0;
  private arrayLength = 0;

  constructor(
    private readonly buf: Buffer,
    private readonly available: number,
    private readonly fileSize: number,
    private readonly file: string,
    private readonly decodeValues: boolean,
  ) {}

  fail(problem: string): KvstashError {
    return formatError(this.file, problem);
  }

  need(n: number): void {
    const end = this.pos + n;
    if (end <= this.available) return;
    if (end > this.fileSize) {
      throw this.fail(`truncated: the file ends at byte ${this.fileSize} while reading ${this.context} at offset ${this.pos}`);
    }
    if (this.arrayStart < 0 || this.arrayIndex === 0) throw new NeedMoreBytes(end);
    // Extrapolate from the strings read so far (+25%), instead of doubling through a 150k array.
    const perItem = (this.pos - this.arrayStart) / this.arrayIndex;
    const estimate = Math.ceil(this.arrayStart + perItem * this.arrayLength * 1.25);
    throw new NeedMoreBytes(Math.min(this.fileSize, Math.max(end, estimate)), estimate > end);
  }

  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }

  i32(): number {
    this.need(4);
    const v = this.buf.readInt32LE(this.pos);
    this.pos += 4;
    return v;
  }

  /** A u64 (or non-negative i64) that must fit a safe integer: anything larger is corrupt here. */
  count(what: string): number {
    this.need(8);
    const lo = this.buf.readUInt32LE(this.pos);
    const hi = this.buf.readUInt32LE(this.pos + 4);
    if (hi > 0x1fffff) {
      const raw = this.buf.readBigUInt64LE(this.pos);
      throw this.fail(`${what} at offset ${this.pos} is ${raw} (as u64), which no file can hold`);
    }
    this.pos += 8;
    return hi * U32_LIMIT + lo;
  }

  /** Fails unless `n` units of `unitBytes` could still fit between here and the end of the file. */
  bound(n: number, unitBytes: number, what: string): void {
    const remaining = this.fileSize - this.pos;
    if (n * unitBytes > remaining) {
      throw this.fail(`${what} is ${n}, but only ${remaining} bytes follow offset ${this.pos}`);
    }
  }

  /** `what` names the string for error messages; kept a plain argument, as this runs per token. */
  string(what: string, decode = true): string {
    this.need(8);
    const lo = this.buf.readUInt32LE(this.pos);
    const hi = this.buf.readUInt32LE(this.pos + 4);
    const length = hi * U32_LIMIT + lo;
    if (length > this.fileSize - this.pos - 8) {
      throw this.fail(`the length of ${what} at offset ${this.pos} is ${this.buf.readBigUInt64LE(this.pos)}, more than the rest of the file`);
    }
    this.pos += 8;
    this.need(length);
    const s = decode ? this.buf.toString('utf8', this.pos, this.pos + length) : '';
    this.pos += length;
    return s;
  }

  scalar(type: number): GgufValue {
    const size = ELEMENT_SIZE[type] ?? 0;
    if (size > 0) this.need(size);
    const b = this.buf;
    const p = this.pos;
    this.pos += size;
    switch (type) {
      case GgufType.UINT8: return b.readUInt8(p);
      case GgufType.INT8: return b.readInt8(p);
      case GgufType.UINT16: return b.readUInt16LE(p);
      case GgufType.INT16: return b.readInt16LE(p);
      case GgufType.UINT32: return b.readUInt32LE(p);
      case GgufType.INT32: return b.readInt32LE(p);
      case GgufType.FLOAT32: return b.readFloatLE(p);
      case GgufType.BOOL: return b.readInt8(p) !== 0;
      case GgufType.UINT64: return b.readBigUInt64LE(p);
      case GgufType.INT64: return b.readBigInt64LE(p);
      case GgufType.FLOAT64: return b.readDoubleLE(p);
      case GgufType.STRING: return this.string(this.context, this.decodeValues);
      default: throw new Error(`unreachable: GGUF type ${type}`);
    }
  }

  array(itemType: number, n: number): GgufArrayValue {
    if (itemType === GgufType.STRING) {
      this.bound(n, 8, `element count of ${this.context}`);
      const out: string[] = [];
      this.arrayStart = this.pos;
      this.arrayLength = n;
      for (let i = 0; i < n; i++) {
        this.arrayIndex = i;
        if (this.decodeValues) out.push(this.string(this.context));
        else this.string(this.context, false);
      }
      this.arrayStart = -1;
      return out;
    }
    const size = ELEMENT_SIZE[itemType] ?? 0;
    this.bound(n, size, `element count of ${this.context}`);
    this.need(n * size);
    if (!this.decodeValues) {
      this.pos += n * size;
      return [];
    }
    // Copy into a fresh, aligned buffer: the header buffer is reused and may be unaligned.
    const bytes = new Uint8Array(n * size);
    bytes.set(this.buf.subarray(this.pos, this.pos + n * size));
    this.pos += n * size;
    const ab = bytes.buffer;
    switch (itemType) {
      case GgufType.UINT8: return bytes;
      case GgufType.INT8: return new Int8Array(ab);
      case GgufType.UINT16: return new Uint16Array(ab);
      case GgufType.INT16: return new Int16Array(ab);
      case GgufType.UINT32: return new Uint32Array(ab);
      case GgufType.INT32: return new Int32Array(ab);
      case GgufType.FLOAT32: return new Float32Array(ab);
      case GgufType.FLOAT64: return new Float64Array(ab);
      case GgufType.UINT64: return new BigUint64Array(ab);
      case GgufType.INT64: return new BigInt64Array(ab);
      case GgufType.BOOL: return Array.from(bytes, (v) => v !== 0);
      default: throw new Error(`unreachable: GGUF type ${itemType}`);
    }
  }

  parse(): GgufHeader {
    this.need(4);
    const magic = this.buf.readUInt32LE(0);
    if (magic !== MAGIC) {
      const shown = JSON.stringify(this.buf.toString('latin1', 0, 4));
      throw this.fail(`it starts with ${shown} instead of the magic "GGUF"`);
    }
    this.pos = 4;
    this.context = 'the version';
    const version = this.u32();
    if ((version & 0xffff) === 0 && version !== 0) {
      throw this.fail(`version field is ${version}: a big-endian GGUF, which kvstash does not read`);
    }
    if (version !== 2 && version !== 3) {
      throw this.fail(`GGUF version ${version} is not supported (only versions 2 and 3 are)`);
    }
    this.context = 'the tensor count';
    const tensorCount = this.count('tensor count');
    // The smallest tensor entry: 8-byte name length, 1-byte name, n_dims, type, offset.
    this.bound(tensorCount, 8 + 1 + 4 + 4 + 8, 'tensor count');
    this.context = 'the key-value count';
    const kvCount = this.count('key-value count');
    // The smallest key-value pair: 8-byte key length, 1-byte key, type, 1-byte value.
    this.bound(kvCount, 8 + 1 + 4 + 1, 'key-value count');

    const metadata = new Map<string, GgufValue>();
    const metadataTypes = new Map<string, GgufValueType>();
    for (let i = 0; i < kvCount; i++) {
      this.context = `key ${i}`;
      const key = this.string(`key ${i}`);
      if (key.length === 0) throw this.fail(`key ${i} is empty`);
      if (metadata.has(key)) throw this.fail(`key '${key}' appears twice`);
      this.context = `the value of '${key}'`;
      const type = this.i32();
      if (type === GgufType.ARRAY) {
        const itemType = this.i32();
        if (!isValueType(itemType) || itemType === GgufType.ARRAY) {
          throw this.fail(`key '${key}' is an array of invalid GGUF type ${itemType}`);
        }
        const n = this.count(`element count of '${key}'`);
        metadata.set(key, this.array(itemType, n));
        metadataTypes.set(key, { type, itemType });
      } else {
        if (!isValueType(type)) throw this.fail(`key '${key}' has invalid GGUF type ${type}`);
        metadata.set(key, this.scalar(type));
        metadataTypes.set(key, { type });
      }
    }

    let alignment = GGUF_DEFAULT_ALIGNMENT;
    if (metadata.has('general.alignment')) {
      const value = metadata.get('general.alignment');
      if (metadataTypes.get('general.alignment')?.type !== GgufType.UINT32 || typeof value !== 'number') {
        throw this.fail(`general.alignment must be a u32`);
      }
      if (value === 0 || (value & (value - 1)) !== 0) {
        throw this.fail(`general.alignment ${value} is not a power of two`);
      }
      alignment = value;
    }

    const tensors: GgufTensorInfo[] = [];
    const names = new Set<string>();
    for (let i = 0; i < tensorCount; i++) {
      this.context = `the name of tensor ${i}`;
      const name = this.string(`the name of tensor ${i}`);
      if (Buffer.byteLength(name) >= MAX_TENSOR_NAME_BYTES) {
        throw this.fail(`tensor name '${name}' is longer than ${MAX_TENSOR_NAME_BYTES - 1} bytes`);
      }
      if (names.has(name)) throw this.fail(`tensor '${name}' appears twice`);
      this.context = `the shape of tensor '${name}'`;
      const nDims = this.u32();
      if (nDims > MAX_DIMS) throw this.fail(`tensor '${name}' has ${nDims} dimensions (at most ${MAX_DIMS})`);
      const dims: number[] = [];
      for (let d = 0; d < nDims; d++) dims.push(this.count(`dimension ${d} of tensor '${name}'`));
      this.context = `the type of tensor '${name}'`;
      const type = this.i32();
      const traits = GGML_TYPES.get(type);
      if (traits === undefined) throw this.fail(`tensor '${name}' has unknown ggml type ${type}`);
      const ne0 = dims[0] ?? 1;
      if (ne0 % traits.blockSize !== 0) {
        throw this.fail(`tensor '${name}' has ${ne0} elements per row, not a multiple of the ${traits.name} block size ${traits.blockSize}`);
      }
      // In bigint: a corrupt shape can overflow a double long before the file-size check.
      const elements = dims.reduce((acc, ne) => acc * BigInt(ne), 1n);
      const bytes = (elements / BigInt(traits.blockSize)) * BigInt(traits.typeSize);
      if (bytes > BigInt(this.fileSize)) {
        throw this.fail(`tensor '${name}' of shape [${dims.join(', ')}] needs ${bytes} bytes, more than the whole file (${this.fileSize})`);
      }
      this.context = `the offset of tensor '${name}'`;
      const offset = this.count(`offset of tensor '${name}'`);
      names.add(name);
      tensors.push({ name, dims, type, offset, byteLength: Number(bytes) });
    }

    // The data section starts aligned, and only exists when there are tensors (as in ggml).
    const dataOffset = tensorCount > 0 ? alignUp(this.pos, alignment) : this.pos;
    this.context = 'the padding before the tensor data';
    this.need(dataOffset - this.pos);
    this.pos = dataOffset;

    // llama.cpp requires each tensor to start where the previous one (padded) ends.
    let expected = 0;
    for (const t of tensors) {
      if (t.offset !== expected) {
        throw this.fail(`tensor '${t.name}' has data offset ${t.offset}, expected ${expected}`);
      }
      const end = dataOffset + t.offset + t.byteLength;
      if (end > this.fileSize) {
        throw this.fail(`truncated: tensor '${t.name}' data ends at byte ${end} but the file has ${this.fileSize} bytes`);
      }
      expected = alignUp(t.offset + t.byteLength, alignment);
    }

    return { version, metadata, metadataTypes, tensors, alignment, dataOffset, fileSize: this.fileSize };
  }
}

function isValueType(type: number): type is GgufType {
  return Number.isInteger(type) && type >= 0 && type <= GgufType.FLOAT64;
}

/** Opens a model file for reading, mapping failures to E_MODEL_LOAD. Through the one opener: a
 * FIFO, device or directory under the model's name is refused before anything waits on it (a
 * symlink is followed, the file it leads to checked). */
export async function openModelFile(file: string): Promise<FileHandle> {
  try {
    return (await openRegularFile(file, { followSymlinks: true })).handle;
  } catch (err) {
    if (err instanceof NotRegularFileError) {
      throw new KvstashError('E_MODEL_LOAD', `cannot load model ${file}: ${err.message}; give the path of a .gguf file`, { cause: err });
    }
    const code = (err as NodeJS.ErrnoException).code ?? 'unknown error';
    throw new KvstashError('E_MODEL_LOAD', `cannot open model file ${file} (${code}): check the path and its permissions`, { cause: err });
  }
}

async function readExactly(handle: FileHandle, file: string, target: Buffer, start: number, end: number): Promise<void> {
  let pos = start;
  while (pos < end) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await handle.read(target, pos, end - pos, pos));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'unknown error';
      throw new KvstashError('E_MODEL_LOAD', `cannot read model file ${file} (${code})`, { cause: err });
    }
    // The file shrank after it was measured.
    if (bytesRead === 0) throw formatError(file, `truncated: the file ended at byte ${pos} while it was being read`);
    pos += bytesRead;
  }
}

/**
 * Reads the header bytes [0, dataOffset) of an open GGUF file and checks its whole structure
 * (keys, types, lengths, tensor table), without decoding metadata values. Reads from the start of
 * the file in a growing window, never byte by byte, and never past the header by more than the
 * window's growth.
 */
export async function readGgufHeaderBytes(
  handle: FileHandle,
  file: string,
): Promise<{ headerBytes: Buffer; dataOffset: number; fileSize: number }> {
  assertLittleEndianHost();
  let fileSize: number;
  try {
    fileSize = (await handle.stat()).size;
  } catch (err) {
    throw new KvstashError('E_MODEL_LOAD', `cannot stat model file ${file}`, { cause: err });
  }
  let buf = Buffer.alloc(0);
  let available = 0;
  let want = Math.min(fileSize, INITIAL_HEADER_READ);
  for (;;) {
    if (want > available) {
      const grown = Buffer.allocUnsafe(want);
      buf.copy(grown, 0, 0, available);
      await readExactly(handle, file, grown, available, want);
      buf = grown;
      available = want;
    }
    try {
      // Each retry walks from the start; a walk without decoding is cheap to repeat.
      const { dataOffset } = new HeaderParser(buf, available, fileSize, file, false).parse();
      return { headerBytes: buf.subarray(0, dataOffset), dataOffset, fileSize };
    } catch (err) {
      if (!(err instanceof NeedMoreBytes)) throw err;
      // An extrapolated end already has slack; otherwise doubling keeps the number of walks small.
      want = Math.min(fileSize, err.extrapolated ? err.upTo : Math.max(err.upTo, available * 2));
    }
  }
}

/** readGgufHeader on an open file. */
export async function readGgufHeaderFromHandle(handle: FileHandle, file: string): Promise<GgufHeader> {
  const { headerBytes, fileSize } = await readGgufHeaderBytes(handle, file);
  return new HeaderParser(headerBytes, headerBytes.length, fileSize, file, true).parse();
}

/**
 * Reads and checks a GGUF file's header (metadata and tensor table) without reading tensor data.
 * Rejects with E_MODEL_FORMAT when the file is not a complete, well-formed GGUF, and with
 * E_MODEL_LOAD when it cannot be opened or read.
 */
export async function readGgufHeader(file: string): Promise<GgufHeader> {
  const handle = await openModelFile(file);
  try {
    return await readGgufHeaderFromHandle(handle, file);
  } finally {
    await handle.close();
  }
}

/** The header's metadata in file order, each value with its exact type, ready for writeGguf. */
export function typedMetadata(header: GgufHeader): Array<[string, GgufTypedValue]> {
  const out: Array<[string, GgufTypedValue]> = [];
  for (const [key, value] of header.metadata) {
    const types = header.metadataTypes.get(key);
    if (types === undefined) throw new Error(`metadata key '${key}' has no recorded type`);
    out.push([key, { ...types, value }]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing

/** A tensor for writeGguf. Its data is produced in chunks so a large file never sits in memory. */
export interface GgufTensorSource {
  name: string;
  /** ne0 first. */
  dims: readonly number[];
  /** ggml_type id. */
  type: number;
  /**
   * Yields the tensor's bytes in order, exactly ggmlTensorBytes(dims, type) in total. The writer
   * has finished with a chunk before it asks for the next one, so a producer may reuse one buffer.
   */
  data(): Iterable<Uint8Array> | AsyncIterable<Uint8Array>;
}

export interface GgufWriteInput {
  /** Written in this order. `general.alignment`, if present, must be a u32 power of two. */
  metadata: ReadonlyArray<readonly [string, GgufTypedValue]>;
  /** Written in this order, each padded to the alignment. */
  tensors: ReadonlyArray<Pick<GgufTensorSource, 'name' | 'dims' | 'type'>>;
}

export interface GgufLayout {
  /** Header bytes, including the padding up to the data section when there are tensors. */
  header: Buffer;
  alignment: number;
  /** Per tensor, in input order: offset from the data section, and unpadded byte length. */
  tensors: Array<{ offset: number; byteLength: number }>;
  /** Total file size. */
  fileSize: number;
}

/** Growable little-endian byte buffer for building a header. */
class ByteWriter {
  private buf = Buffer.allocUnsafe(64 * 1024);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(grown, 0, 0, this.length);
    this.buf = grown;
  }

  u8(v: number): void { this.reserve(1); this.buf.writeUInt8(v, this.length); this.length += 1; }
  i8(v: number): void { this.reserve(1); this.buf.writeInt8(v, this.length); this.length += 1; }
  u16(v: number): void { this.reserve(2); this.buf.writeUInt16LE(v, this.length); this.length += 2; }
  i16(v: number): void { this.reserve(2); this.buf.writeInt16LE(v, this.length); this.length += 2; }
  u32(v: number): void { this.reserve(4); this.buf.writeUInt32LE(v, this.length); this.length += 4; }
  i32(v: number): void { this.reserve(4); this.buf.writeInt32LE(v, this.length); this.length += 4; }
  f32(v: number): void { this.reserve(4); this.buf.writeFloatLE(v, this.length); this.length += 4; }
  f64(v: number): void { this.reserve(8); this.buf.writeDoubleLE(v, this.length); this.length += 8; }
  u64(v: bigint): void { this.reserve(8); this.buf.writeBigUInt64LE(v, this.length); this.length += 8; }
  i64(v: bigint): void { this.reserve(8); this.buf.writeBigInt64LE(v, this.length); this.length += 8; }

  string(s: string): void {
    const n = Buffer.byteLength(s, 'utf8');
    this.u64(BigInt(n));
    this.reserve(n);
    this.buf.write(s, this.length, n, 'utf8');
    this.length += n;
  }

  bytes(b: Uint8Array): void {
    this.reserve(b.byteLength);
    this.buf.set(b, this.length);
    this.length += b.byteLength;
  }

  zeros(n: number): void {
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }

  result(): Buffer {
    return this.buf.subarray(0, this.length);
  }
}

const INT_RANGES: Partial<Record<GgufType, readonly [number, number]>> = {
  [GgufType.UINT8]: [0, 0xff],
  [GgufType.INT8]: [-0x80, 0x7f],
  [GgufType.UINT16]: [0, 0xffff],
  [GgufType.INT16]: [-0x8000, 0x7fff],
  [GgufType.UINT32]: [0, 0xffffffff],
  [GgufType.INT32]: [-0x80000000, 0x7fffffff],
};

const TYPED_ARRAY_OF: Partial<Record<GgufType, abstract new (...args: never[]) => ArrayBufferView>> = {
  [GgufType.UINT8]: Uint8Array,
  [GgufType.INT8]: Int8Array,
  [GgufType.UINT16]: Uint16Array,
  [GgufType.INT16]: Int16Array,
  [GgufType.UINT32]: Uint32Array,
  [GgufType.INT32]: Int32Array,
  [GgufType.FLOAT32]: Float32Array,
  [GgufType.FLOAT64]: Float64Array,
  [GgufType.UINT64]: BigUint64Array,
  [GgufType.INT64]: BigInt64Array,
};

function writeScalar(w: ByteWriter, key: string, type: GgufType, value: unknown): void {
  const bad = (expected: string): never => {
    throw new TypeError(`metadata '${key}': expected ${expected}, got ${typeof value === 'bigint' ? `${value}n` : JSON.stringify(value)}`);
  };
  const range = INT_RANGES[type];
  if (range !== undefined) {
    if (typeof value !== 'number' || !Number.isInteger(value)) return bad('an integer');
    if (value < range[0] || value > range[1]) throw new RangeError(`metadata '${key}': ${value} is out of range for its type`);
  }
  switch (type) {
    case GgufType.UINT8: return w.u8(value as number);
    case GgufType.INT8: return w.i8(value as number);
    case GgufType.UINT16: return w.u16(value as number);
    case GgufType.INT16: return w.i16(value as number);
    case GgufType.UINT32: return w.u32(value as number);
    case GgufType.INT32: return w.i32(value as number);
    case GgufType.FLOAT32:
    case GgufType.FLOAT64:
      if (typeof value !== 'number') return bad('a number');
      return type === GgufType.FLOAT32 ? w.f32(value) : w.f64(value);
    case GgufType.BOOL:
      if (typeof value !== 'boolean') return bad('a boolean');
      return w.i8(value ? 1 : 0);
    case GgufType.STRING:
      if (typeof value !== 'string') return bad('a string');
      return w.string(value);
    case GgufType.UINT64:
    case GgufType.INT64: {
      if (typeof value === 'number' && !Number.isSafeInteger(value)) return bad('a safe integer or a bigint');
      if (typeof value !== 'number' && typeof value !== 'bigint') return bad('a bigint');
      const big = BigInt(value);
      const [min, max] = type === GgufType.UINT64 ? [0n, 2n ** 64n - 1n] : [-(2n ** 63n), 2n ** 63n - 1n];
      if (big < min || big > max) throw new RangeError(`metadata '${key}': ${big} is out of range for its type`);
      return type === GgufType.UINT64 ? w.u64(big) : w.i64(big);
    }
    default:
      throw new TypeError(`metadata '${key}': invalid GGUF type ${type}`);
  }
}

function writeArray(w: ByteWriter, key: string, itemType: GgufType, value: unknown): void {
  const ctor = TYPED_ARRAY_OF[itemType];
  if (ctor !== undefined && value instanceof ctor) {
    // Already in its exact binary form: copy the bytes.
    const view = value as Uint8Array;
    w.u64(BigInt(view.length));
    w.bytes(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
    return;
  }
  if (typeof value !== 'object' || value === null || typeof (value as ArrayLike<unknown>).length !== 'number') {
    throw new TypeError(`metadata '${key}': expected an array`);
  }
  const items = value as ArrayLike<unknown>;
  w.u64(BigInt(items.length));
  for (let i = 0; i < items.length; i++) writeScalar(w, `${key}[${i}]`, itemType, items[i]);
}

/**
 * Builds the header of a GGUF file and computes where each tensor's data goes. Throws
 * TypeError/RangeError for values that do not match their types, and for invalid tensors.
 */
export function encodeGgufHeader(input: GgufWriteInput): GgufLayout {
  const w = new ByteWriter();
  w.u32(MAGIC);
  w.u32(3);
  w.u64(BigInt(input.tensors.length));
  w.u64(BigInt(input.metadata.length));

  let alignment = GGUF_DEFAULT_ALIGNMENT;
  const keys = new Set<string>();
  for (const [key, typed] of input.metadata) {
    if (typeof key !== 'string' || key.length === 0) throw new TypeError('metadata keys must be non-empty strings');
    if (keys.has(key)) throw new RangeError(`metadata key '${key}' appears twice`);
    keys.add(key);
    w.string(key);
    if (typed.type === GgufType.ARRAY) {
      const itemType = typed.itemType;
      if (itemType === undefined || !isValueType(itemType) || itemType === GgufType.ARRAY) {
        throw new TypeError(`metadata '${key}': an array needs an itemType that is a non-array GGUF type`);
      }
      w.i32(GgufType.ARRAY);
      w.i32(itemType);
      writeArray(w, key, itemType, typed.value);
    } else {
      if (!isValueType(typed.type)) throw new TypeError(`metadata '${key}': invalid GGUF type ${typed.type}`);
      w.i32(typed.type);
      writeScalar(w, key, typed.type, typed.value);
    }
    if (key === 'general.alignment') {
      const v = typed.value;
      if (typed.type !== GgufType.UINT32 || typeof v !== 'number' || v === 0 || (v & (v - 1)) !== 0) {
        throw new RangeError('general.alignment must be a u32 power of two');
      }
      alignment = v;
    }
  }

  const names = new Set<string>();
  const placed: Array<{ offset: number; byteLength: number }> = [];
  let dataSize = 0;
  for (const t of input.tensors) {
    if (typeof t.name !== 'string' || t.name.length === 0) throw new TypeError('tensor names must be non-empty strings');
    if (Buffer.byteLength(t.name) >= MAX_TENSOR_NAME_BYTES) {
      throw new RangeError(`tensor name '${t.name}' is longer than ${MAX_TENSOR_NAME_BYTES - 1} bytes`);
    }
    if (names.has(t.name)) throw new RangeError(`tensor '${t.name}' appears twice`);
    names.add(t.name);
    const byteLength = ggmlTensorBytes(t.dims, t.type);
    w.string(t.name);
    w.u32(t.dims.length);
    for (const ne of t.dims) w.u64(BigInt(ne));
    w.i32(t.type);
    w.u64(BigInt(dataSize));
    placed.push({ offset: dataSize, byteLength });
    dataSize = alignUp(dataSize + byteLength, alignment);
  }
  if (input.tensors.length > 0) w.zeros(alignUp(w.length, alignment) - w.length);
  const header = w.result();
  return { header, alignment, tensors: placed, fileSize: header.length + dataSize };
}

/**
 * Writes a GGUF file atomically (temporary file, fsync, rename, fsync of the directory), streaming
 * each tensor's data from its producer. Resolves with the file size in bytes. A producer that
 * yields more or fewer bytes than its tensor needs fails the write with a RangeError, and the
 * target is left untouched.
 */
export async function writeGguf(
  file: string,
  input: { metadata: GgufWriteInput['metadata']; tensors: readonly GgufTensorSource[] },
): Promise<{ bytes: number }> {
  assertLittleEndianHost();
  const layout = encodeGgufHeader(input);
  await writeFileAtomic(file, async (handle) => {
    await writeFully(handle, layout.header, 0);
    const zeros = new Uint8Array(layout.alignment);
    for (let i = 0; i < input.tensors.length; i++) {
      const tensor = input.tensors[i]!;
      const { offset, byteLength } = layout.tensors[i]!;
      const start = layout.header.length + offset;
      let written = 0;
      for await (const chunk of tensor.data()) {
        if (written + chunk.byteLength > byteLength) {
          throw new RangeError(`tensor '${tensor.name}': its data producer yielded more than ${byteLength} bytes`);
        }
        await writeFully(handle, chunk, start + written);
        written += chunk.byteLength;
      }
      if (written !== byteLength) {
        throw new RangeError(`tensor '${tensor.name}': its data producer yielded ${written} bytes, expected ${byteLength}`);
      }
      const padding = alignUp(byteLength, layout.alignment) - byteLength;
      if (padding > 0) await writeFully(handle, zeros.subarray(0, padding), start + byteLength);
    }
  });
  return { bytes: layout.fileSize };
}
