// The GGUF reader and writer: exact round trips of every value type, the real Qwen2 vocab file,
// and a coded E_MODEL_FORMAT (never a hang, a crash or a huge allocation) for every corruption.
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { isKvstashError } from '../lib/errors.js';
import {
  encodeGgufHeader,
  GgmlType,
  GgufType,
  readGgufHeader,
  typedMetadata,
  writeGguf,
  type GgufTensorSource,
  type GgufTypedValue,
} from '../lib/models/gguf.js';
import { qwen2VocabPath } from '../lib/models/vocab.js';

const { UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 } = GgufType;

/** One key per scalar type and one per array element type, with the edge values of each. */
const EVERY_TYPE: Array<[string, GgufTypedValue]> = [
  ['general.architecture', { type: STRING, value: 'test' }],
  ['s.u8', { type: UINT8, value: 255 }],
  ['s.i8', { type: INT8, value: -128 }],
  ['s.u16', { type: UINT16, value: 65535 }],
  ['s.i16', { type: INT16, value: -32768 }],
  ['s.u32', { type: UINT32, value: 4294967295 }],
  ['s.i32', { type: INT32, value: -2147483648 }],
  ['s.f32', { type: FLOAT32, value: Math.fround(-1.5e-7) }],
  ['s.bool.true', { type: BOOL, value: true }],
  ['s.bool.false', { type: BOOL, value: false }],
  ['s.str', { type: STRING, value: 'héllo wörld 🌍 <|im_start|>' }],
  ['s.str.empty', { type: STRING, value: '' }],
  ['s.u64', { type: UINT64, value: 2n ** 64n - 1n }],
  ['s.i64', { type: INT64, value: -(2n ** 63n) }],
  ['s.f64', { type: FLOAT64, value: Math.PI }],
  ['a.u8', { type: ARRAY, itemType: UINT8, value: Uint8Array.of(0, 1, 255) }],
  ['a.i8', { type: ARRAY, itemType: INT8, value: Int8Array.of(-128, 0, 127) }],
  ['a.u16', { type: ARRAY, itemType: UINT16, value: Uint16Array.of(0, 65535) }],
  ['a.i16', { type: ARRAY, itemType: INT16, value: Int16Array.of(-32768, 32767) }],
  ['a.u32', { type: ARRAY, itemType: UINT32, value: Uint32Array.of(0, 4294967295) }],
  ['a.i32', { type: ARRAY, itemType: INT32, value: Int32Array.of(-2147483648, 7, 2147483647) }],
  ['a.f32', { type: ARRAY, itemType: FLOAT32, value: Float32Array.of(1.5, -0.25, Infinity) }],
  ['a.bool', { type: ARRAY, itemType: BOOL, value: [true, false, true] }],
  ['a.str', { type: ARRAY, itemType: STRING, value: ['a', '', 'ü', 'Ġthe'] }],
  ['a.u64', { type: ARRAY, itemType: UINT64, value: BigUint64Array.of(0n, 2n ** 64n - 1n) }],
  ['a.i64', { type: ARRAY, itemType: INT64, value: BigInt64Array.of(-(2n ** 63n), 5n) }],
  ['a.f64', { type: ARRAY, itemType: FLOAT64, value: Float64Array.of(1e300, -5e-324) }],
  ['a.empty', { type: ARRAY, itemType: UINT32, value: new Uint32Array(0) }],
];

/** Bytes 0, 1, 2, … of the given length. */
function counting(length: number, salt = 0): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 7 + salt) & 0xff);
}

function tensor(name: string, dims: number[], type: number, salt = 0): GgufTensorSource & { bytes: Uint8Array } {
  const size = dims.reduce((a, b) => a * b, 1);
  const bytes = type === GgmlType.Q8_0 ? counting((size / 32) * 34, salt) : counting(size * (type === GgmlType.F16 ? 2 : 4), salt);
  return {
    name,
    dims,
    type,
    bytes,
    // Two chunks, to exercise a tensor arriving in pieces.
    *data() {
      yield bytes.subarray(0, 5);
      yield bytes.subarray(5);
    },
  };
}

/** f32 [3, 2] (24 bytes), f16 [7] (14 bytes: not a multiple of 32, so the file ends in padding), q8_0 [64, 2]. */
function sampleTensors(): Array<GgufTensorSource & { bytes: Uint8Array }> {
  return [tensor('a.weight', [3, 2], GgmlType.F32, 1), tensor('q.weight', [64, 2], GgmlType.Q8_0, 2), tensor('b.bias', [7], GgmlType.F16, 3)];
}

async function rejectsFormat(t: Test, file: string, message: RegExp | string, what: string): Promise<void> {
  await t.rejects(readGgufHeader(file), { name: 'KvstashError', code: 'E_MODEL_FORMAT', message }, what);
}

t.test('every metadata type round-trips with its exact type', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'every-type.gguf');
  const tensors = sampleTensors();
  const { bytes } = await writeGguf(file, { metadata: EVERY_TYPE, tensors });
  t.equal(bytes, fs.statSync(file).size, 'writeGguf reports the file size');

  const header = await readGgufHeader(file);
  t.equal(header.version, 3);
  t.same([...header.metadata.keys()], EVERY_TYPE.map(([key]) => key), 'keys in file order');
  for (const [key, typed] of EVERY_TYPE) {
    const expectedType = typed.type === ARRAY ? { type: ARRAY, itemType: typed.itemType } : { type: typed.type };
    t.strictSame(header.metadataTypes.get(key), expectedType, `${key} type`);
    const value = header.metadata.get(key);
    if (ArrayBuffer.isView(typed.value)) {
      t.equal(value?.constructor, typed.value.constructor, `${key} is read as a ${typed.value.constructor.name}`);
      t.same(Array.from(value as ArrayLike<unknown>), Array.from(typed.value as ArrayLike<unknown>), `${key} value`);
    } else {
      t.strictSame(value, typed.value, `${key} value`);
    }
  }

  // Writing back what was read gives the same bytes: nothing about a value or its type is lost.
  const copy = path.join(dir, 'copy.gguf');
  await writeGguf(copy, { metadata: typedMetadata(header), tensors });
  t.ok(fs.readFileSync(copy).equals(fs.readFileSync(file)), 'rewrite is byte-identical');
});

t.test('plain arrays are accepted for numeric array types', async (t) => {
  const file = path.join(t.testdir(), 'plain.gguf');
  await writeGguf(file, {
    metadata: [
      ['i32', { type: ARRAY, itemType: INT32, value: [1, -2, 3] }],
      ['u64', { type: ARRAY, itemType: UINT64, value: [1, 2n] as unknown as ArrayLike<bigint> }],
      ['n64', { type: INT64, value: -5 }],
    ],
    tensors: [],
  });
  const header = await readGgufHeader(file);
  t.same(header.metadata.get('i32'), Int32Array.of(1, -2, 3));
  t.same(header.metadata.get('u64'), BigUint64Array.of(1n, 2n));
  t.equal(header.metadata.get('n64'), -5n);
});

t.test('tensor table, alignment and data placement', async (t) => {
  const dir = t.testdir();
  for (const alignment of [32, 64, 256]) {
    const file = path.join(dir, `aligned-${alignment}.gguf`);
    const tensors = sampleTensors();
    const metadata: Array<[string, GgufTypedValue]> = [['general.name', { type: STRING, value: 'x' }]];
    if (alignment !== 32) metadata.push(['general.alignment', { type: UINT32, value: alignment }]);
    await writeGguf(file, { metadata, tensors });
    const header = await readGgufHeader(file);
    const contents = fs.readFileSync(file);
    t.equal(header.alignment, alignment);
    t.equal(header.dataOffset % alignment, 0, 'data starts aligned');
    t.equal(header.fileSize, contents.length);
    t.same(
      header.tensors.map(({ name, dims, type }) => ({ name, dims, type })),
      tensors.map(({ name, dims, type }) => ({ name, dims, type })),
    );
    t.same(header.tensors.map((x) => x.byteLength), [24, 136, 14]);
    t.same(header.tensors.map((x) => x.offset), [0, alignment, alignment + Math.ceil(136 / alignment) * alignment]);
    for (const [i, info] of header.tensors.entries()) {
      const start = header.dataOffset + info.offset;
      t.ok(contents.subarray(start, start + info.byteLength).equals(tensors[i]!.bytes), `${info.name} data at its offset`);
    }
    const last = header.tensors[2]!;
    t.equal(contents.length, header.dataOffset + Math.ceil((last.offset + last.byteLength) / alignment) * alignment, 'the last tensor is padded too');
  }
});

t.test('a file without tensors has no padding after its header', async (t) => {
  const file = path.join(t.testdir(), 'meta-only.gguf');
  const { bytes } = await writeGguf(file, { metadata: [['k', { type: UINT8, value: 1 }]], tensors: [] });
  const header = await readGgufHeader(file);
  t.equal(bytes, 4 + 4 + 8 + 8 + (8 + 1) + 4 + 1, "magic, version, counts, key, type, value");
  t.equal(header.dataOffset, bytes);
  t.equal(header.fileSize, bytes);
  t.same(header.tensors, []);
});

t.test('the qwen2 vocab file', async (t) => {
  const vocab = qwen2VocabPath();
  const header = await readGgufHeader(vocab);
  const tokens = header.metadata.get('tokenizer.ggml.tokens') as string[];
  t.equal(tokens.length, 151936, 'token count');
  t.equal(tokens[0], '!');
  t.equal(tokens[151643], '<|endoftext|>');
  t.strictSame(header.metadataTypes.get('tokenizer.ggml.tokens'), { type: ARRAY, itemType: STRING });
  t.equal((header.metadata.get('tokenizer.ggml.token_type') as Int32Array).length, 151936);
  t.equal((header.metadata.get('tokenizer.ggml.merges') as string[]).length, 151387);
  t.equal(header.metadata.get('general.architecture'), 'qwen2');
  t.equal(header.metadata.get('general.name'), 'qwen2');
  t.equal(header.metadata.get('tokenizer.ggml.model'), 'gpt2');
  t.equal(header.metadata.get('tokenizer.ggml.pre'), 'qwen2');
  t.equal(header.metadata.get('tokenizer.ggml.eos_token_id'), 151643);
  t.same(header.tensors, []);
  t.equal(header.dataOffset, header.fileSize, 'a vocab file is all header');

  // Written back, it is the same file, byte for byte: the reader loses nothing llama.cpp reads.
  const copy = path.join(t.testdir(), 'vocab-copy.gguf');
  await writeGguf(copy, { metadata: typedMetadata(header), tensors: [] });
  t.ok(fs.readFileSync(copy).equals(fs.readFileSync(vocab)), 'rewrite is byte-identical');
});

t.test('truncated files reject with E_MODEL_FORMAT', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'whole.gguf');
  await writeGguf(file, { metadata: EVERY_TYPE, tensors: sampleTensors() });
  const whole = fs.readFileSync(file);
  const header = await readGgufHeader(file);
  const last = header.tensors[header.tensors.length - 1]!;
  const dataEnd = header.dataOffset + last.offset + last.byteLength;
  const cuts = new Set([0, 1, 3, 4, 7, 8, 16, 23, 24, 31, 40, 100, 200, 400, header.dataOffset - 1, header.dataOffset, header.dataOffset + 10, dataEnd - 1]);
  for (let cut = 0; cut < header.dataOffset; cut += 37) cuts.add(cut);
  for (const cut of [...cuts].sort((a, b) => a - b)) {
    const cutFile = path.join(dir, `cut-${cut}.gguf`);
    fs.writeFileSync(cutFile, whole.subarray(0, cut));
    await rejectsFormat(t, cutFile, /truncated|starts with/, `cut at ${cut}`);
  }
  // The padding after the last tensor is optional, as in llama.cpp.
  const unpadded = path.join(dir, 'unpadded.gguf');
  fs.writeFileSync(unpadded, whole.subarray(0, dataEnd));
  t.equal((await readGgufHeader(unpadded)).fileSize, dataEnd, 'a file without trailing padding reads');
});

t.test('not a GGUF: E_MODEL_FORMAT naming the file and the problem', async (t) => {
  const dir = t.testdir({
    'text.gguf': 'This is not a model, just some text that is long enough.\n',
    'empty.gguf': '',
    'ggml.gguf': Buffer.from('ggjt\x03\x00\x00\x00' + '\x00'.repeat(64), 'latin1'),
  });
  await rejectsFormat(t, path.join(dir, 'text.gguf'), /text\.gguf is not a valid GGUF model: it starts with "This" instead of the magic "GGUF"/, 'text');
  await rejectsFormat(t, path.join(dir, 'empty.gguf'), /empty\.gguf .*truncated/, 'empty file');
  await rejectsFormat(t, path.join(dir, 'ggml.gguf'), /"ggjt" instead of the magic/, 'old ggml magic');
});

t.test('missing or unreadable files reject with E_MODEL_LOAD', async (t) => {
  const dir = t.testdir();
  await t.rejects(readGgufHeader(path.join(dir, 'absent.gguf')), { code: 'E_MODEL_LOAD', message: /absent\.gguf \(ENOENT\)/ });
  // Refused on the opened descriptor's type, before any read (a FIFO would otherwise block).
  await t.rejects(readGgufHeader(dir), { code: 'E_MODEL_LOAD', message: /is a directory, not a regular file; give the path of a \.gguf file/ }, 'a directory');
});

/** A valid small file plus the offsets of its fields, to corrupt one field at a time. */
async function corruptible(dir: string): Promise<{ bytes: Buffer; at: Record<string, number> }> {
  const file = path.join(dir, 'base.gguf');
  // The first key is 'k' (one byte), a string array, so the array header sits at known offsets.
  await writeGguf(file, {
    metadata: [
      ['k', { type: ARRAY, itemType: STRING, value: ['x', 'y'] }],
      ['general.alignment', { type: UINT32, value: 32 }],
    ],
    tensors: [tensor('t0', [4, 2], GgmlType.F32), tensor('t1', [64], GgmlType.F32)],
  });
  const bytes = fs.readFileSync(file);
  const t0 = bytes.indexOf('t0') - 8;
  const t1 = bytes.indexOf('t1') - 8;
  const alignmentKey = bytes.indexOf('general.alignment') - 8;
  return {
    bytes,
    at: {
      version: 4,
      tensorCount: 8,
      kvCount: 16,
      keyLength: 24,
      valueType: 33,
      itemType: 37,
      arrayCount: 41,
      firstStringLength: 49,
      alignmentType: alignmentKey + 8 + 17,
      alignmentValue: alignmentKey + 8 + 17 + 4,
      t0NameLength: t0,
      t0Dims: t0 + 8 + 2,
      t0Ne0: t0 + 8 + 2 + 4,
      t0Ne1: t0 + 8 + 2 + 4 + 8,
      t0Type: t0 + 8 + 2 + 4 + 16,
      t1Offset: t1 + 8 + 2 + 4 + 8 + 4,
    },
  };
}

t.test('corrupt fields: absurd lengths and invalid values', async (t) => {
  const dir = t.testdir();
  const { bytes, at } = await corruptible(dir);
  t.ok(await readGgufHeader(path.join(dir, 'base.gguf')), 'the uncorrupted file reads');
  const cases: Array<[string, number, 'u32' | 'u64' | 'i32', bigint | number, RegExp]> = [
    ['version 1', at.version!, 'u32', 1, /version 1 is not supported/],
    ['version 4', at.version!, 'u32', 4, /version 4 is not supported/],
    ['big-endian', at.version!, 'u32', 0x03000000, /big-endian/],
    ['tensor count 2^62', at.tensorCount!, 'u64', 2n ** 62n, /tensor count .* which no file can hold/],
    ['tensor count 2^40', at.tensorCount!, 'u64', 2n ** 40n, /tensor count is 1099511627776, but only/],
    ['negative kv count', at.kvCount!, 'u64', 2n ** 64n - 1n, /key-value count .* which no file can hold/],
    ['kv count 10^6', at.kvCount!, 'u64', 1000000, /key-value count is 1000000, but only/],
    ['key length 2^63', at.keyLength!, 'u64', 2n ** 63n, /length of key 0 .* more than the rest of the file/],
    ['key length 2^32', at.keyLength!, 'u64', 2n ** 32n, /length of key 0/],
    ['value type 13', at.valueType!, 'i32', 13, /key 'k' has invalid GGUF type 13/],
    ['value type -1', at.valueType!, 'i32', -1, /invalid GGUF type -1/],
    ['array of arrays', at.itemType!, 'i32', ARRAY, /array of invalid GGUF type 9/],
    ['array count 2^61', at.arrayCount!, 'u64', 2n ** 61n, /element count of 'k' .* which no file can hold/],
    ['array count 2^40', at.arrayCount!, 'u64', 2n ** 40n, /element count of the value of 'k' is 1099511627776, but only/],
    ['string length 2^50', at.firstStringLength!, 'u64', 2n ** 50n, /length of the value of 'k'/],
    ['alignment type', at.alignmentType!, 'i32', INT32, /general\.alignment must be a u32/],
    ['alignment 48', at.alignmentValue!, 'u32', 48, /alignment 48 is not a power of two/],
    ['alignment 0', at.alignmentValue!, 'u32', 0, /alignment 0 is not a power of two/],
    ['tensor name length 2^45', at.t0NameLength!, 'u64', 2n ** 45n, /the name of tensor 0/],
    ['5 dimensions', at.t0Dims!, 'u32', 5, /tensor 't0' has 5 dimensions/],
    ['negative dimension', at.t0Ne0!, 'u64', 2n ** 64n - 4n, /dimension 0 of tensor 't0'/],
    ['huge dimension', at.t0Ne1!, 'u64', 2n ** 50n, /tensor 't0' of shape \[4, 1125899906842624\] needs .* more than the whole file/],
    ['unknown ggml type', at.t0Type!, 'i32', 4, /unknown ggml type 4/],
    ['ggml type 1000', at.t0Type!, 'i32', 1000, /unknown ggml type 1000/],
    ['row not a whole block', at.t0Type!, 'i32', GgmlType.Q8_0, /4 elements per row, not a multiple of the q8_0 block size 32/],
    ['tensor offset gap', at.t1Offset!, 'u64', 64, /tensor 't1' has data offset 64, expected 32/],
    ['tensor offset past the end', at.t1Offset!, 'u64', 2n ** 60n, /offset of tensor 't1'/],
  ];
  for (const [name, offset, kind, value, message] of cases) {
    const copy = Buffer.from(bytes);
    if (kind === 'u32') copy.writeUInt32LE(Number(value), offset);
    else if (kind === 'i32') copy.writeInt32LE(Number(value), offset);
    else copy.writeBigUInt64LE(BigInt(value), offset);
    const file = path.join(dir, `${name.replace(/\W+/g, '-')}.gguf`);
    fs.writeFileSync(file, copy);
    await rejectsFormat(t, file, message, name);
  }
});

t.test('duplicate keys and tensor names are refused, as llama.cpp refuses them', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'dup.gguf');
  await writeGguf(file, {
    metadata: [['aa', { type: UINT8, value: 1 }], ['ab', { type: UINT8, value: 2 }]],
    tensors: [tensor('xa', [8], GgmlType.F32), tensor('xb', [8], GgmlType.F32)],
  });
  const bytes = fs.readFileSync(file);
  const dupKey = Buffer.from(bytes);
  dupKey.write('aa', bytes.indexOf('ab'), 'latin1');
  fs.writeFileSync(path.join(dir, 'dup-key.gguf'), dupKey);
  await rejectsFormat(t, path.join(dir, 'dup-key.gguf'), /key 'aa' appears twice/, 'duplicate key');
  const dupTensor = Buffer.from(bytes);
  dupTensor.write('xa', bytes.indexOf('xb'), 'latin1');
  fs.writeFileSync(path.join(dir, 'dup-tensor.gguf'), dupTensor);
  await rejectsFormat(t, path.join(dir, 'dup-tensor.gguf'), /tensor 'xa' appears twice/, 'duplicate tensor');
});

t.test('random corruption never escapes as anything but E_MODEL_FORMAT', async (t) => {
  const dir = t.testdir();
  const base = path.join(dir, 'base.gguf');
  await writeGguf(base, { metadata: EVERY_TYPE, tensors: sampleTensors() });
  const bytes = fs.readFileSync(base);
  const { dataOffset } = await readGgufHeader(base);
  let x = 12345;
  const next = (): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  let rejected = 0;
  const file = path.join(dir, 'fuzz.gguf');
  for (let i = 0; i < 400; i++) {
    const copy = Buffer.from(bytes);
    for (let k = 1 + (next() % 4); k > 0; k--) copy[next() % dataOffset] = next() & 0xff;
    fs.writeFileSync(file, copy);
    try {
      await readGgufHeader(file);
    } catch (err) {
      if (!isKvstashError(err, 'E_MODEL_FORMAT')) {
        t.fail(`mutation ${i} threw ${String(err)}`);
        return;
      }
      rejected++;
    }
  }
  t.ok(rejected > 100, `${rejected} of 400 mutations were refused, the others still parse`);
});

t.test('writer: argument errors, atomicity and byte counts', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'out.gguf');
  const ok: Array<[string, GgufTypedValue]> = [['k', { type: UINT8, value: 1 }]];

  await t.rejects(writeGguf(file, { metadata: [['k', { type: UINT8, value: 256 }]], tensors: [] }), RangeError, 'u8 out of range');
  await t.rejects(writeGguf(file, { metadata: [['k', { type: UINT32, value: 1.5 }]], tensors: [] }), TypeError, 'non-integer');
  await t.rejects(writeGguf(file, { metadata: [['k', { type: STRING, value: 5 }]], tensors: [] }), TypeError, 'string type, number value');
  await t.rejects(writeGguf(file, { metadata: [['k', { type: 42 as GgufType, value: 5 }]], tensors: [] }), TypeError, 'invalid type');
  await t.rejects(writeGguf(file, { metadata: [['k', { type: ARRAY, value: [1] }]], tensors: [] }), TypeError, 'array without itemType');
  await t.rejects(writeGguf(file, { metadata: [...ok, ...ok], tensors: [] }), RangeError, 'duplicate key');
  await t.rejects(writeGguf(file, { metadata: [['general.alignment', { type: UINT32, value: 24 }]], tensors: [] }), RangeError, 'alignment');
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [tensor('t', [33], GgmlType.F32), tensor('t', [1], GgmlType.F32)] }), RangeError, 'duplicate tensor');
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [{ ...tensor('t', [32], GgmlType.F32), type: GgmlType.Q8_0, dims: [33] }] }), RangeError, 'row not a whole block');
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [tensor('n'.repeat(64), [1], GgmlType.F32)] }), RangeError, 'name too long');
  t.notOk(fs.existsSync(file), 'nothing was written');

  // A producer that yields too few or too many bytes, or fails, leaves the old file in place.
  fs.writeFileSync(file, 'previous contents');
  const short: GgufTensorSource = { name: 't', dims: [8], type: GgmlType.F32, *data() { yield new Uint8Array(31); } };
  const long: GgufTensorSource = { name: 't', dims: [8], type: GgmlType.F32, *data() { yield new Uint8Array(33); } };
  const failing: GgufTensorSource = {
    name: 't',
    dims: [8],
    type: GgmlType.F32,
    async *data() {
      yield new Uint8Array(16);
      throw new Error('producer failed');
    },
  };
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [short] }), { name: 'RangeError', message: /yielded 31 bytes, expected 32/ });
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [long] }), { name: 'RangeError', message: /more than 32 bytes/ });
  await t.rejects(writeGguf(file, { metadata: ok, tensors: [failing] }), { message: 'producer failed' });
  t.equal(fs.readFileSync(file, 'utf8'), 'previous contents', 'the target is untouched');
  t.same(fs.readdirSync(dir), ['out.gguf'], 'no temporary file is left behind');

  await writeGguf(file, { metadata: ok, tensors: [tensor('t', [8], GgmlType.F32)] });
  t.equal((await readGgufHeader(file)).tensors[0]!.name, 't', 'a successful write replaces the target');
  t.same(fs.readdirSync(dir), ['out.gguf']);
});

t.test('encodeGgufHeader lays out the data section', async (t) => {
  const layout = encodeGgufHeader({
    metadata: [['general.alignment', { type: UINT32, value: 64 }]],
    tensors: [
      { name: 'a', dims: [10], type: GgmlType.F32 },
      { name: 'b', dims: [256, 2], type: GgmlType.Q4_K },
    ],
  });
  t.equal(layout.alignment, 64);
  t.equal(layout.header.length % 64, 0);
  t.same(layout.tensors, [
    { offset: 0, byteLength: 40 },
    { offset: 64, byteLength: 288 },
  ]);
  t.equal(layout.fileSize, layout.header.length + 64 + 320);
});
