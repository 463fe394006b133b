// The entry checksums (binding/common/Checksum.cpp, Crc32c.cpp) against second implementations
// written here in TypeScript from their definitions:
// - XXH64 (formats 1 and 2), with BigInt from the xxHash specification, on every length class (the
//   32-byte stripes, the 8/4/1-byte tails) and every seed; chunk i hashed with seed i;
// - CRC-32C (format 3), bit by bit from the polynomial, on lengths on both sides of the native
//   three-stream split and its remainders; chunk i is the CRC-32C of i (u64 LE) and the chunk.
// The native CRC-32C runs on a CPU instruction; a child process forced onto the portable table
// must give the same digests.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { native } from '../lib/binding.js';

const MASK = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;

const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & MASK;
const mul = (a: bigint, b: bigint): bigint => (a * b) & MASK;
const add = (a: bigint, b: bigint): bigint => (a + b) & MASK;
const round = (acc: bigint, lane: bigint): bigint => mul(rotl(add(acc, mul(lane, P2)), 31n), P1);

function referenceXxh64(bytes: Uint8Array, seed: bigint): bigint {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.length;
  let i = 0;
  let h: bigint;
  if (n >= 32) {
    let v1 = add(add(seed, P1), P2);
    let v2 = add(seed, P2);
    let v3 = seed;
    let v4 = (seed - P1) & MASK;
    for (; i + 32 <= n; i += 32) {
      v1 = round(v1, view.getBigUint64(i, true));
      v2 = round(v2, view.getBigUint64(i + 8, true));
      v3 = round(v3, view.getBigUint64(i + 16, true));
      v4 = round(v4, view.getBigUint64(i + 24, true));
    }
    h = add(add(rotl(v1, 1n), rotl(v2, 7n)), add(rotl(v3, 12n), rotl(v4, 18n)));
    for (const v of [v1, v2, v3, v4]) h = add(mul(h ^ round(0n, v), P1), P4);
  } else {
    h = add(seed, P5);
  }
  h = add(h, BigInt(n));
  for (; i + 8 <= n; i += 8) h = add(mul(rotl(h ^ round(0n, view.getBigUint64(i, true)), 27n), P1), P4);
  if (i + 4 <= n) {
    h = add(mul(rotl(h ^ mul(BigInt(view.getUint32(i, true)), P1), 23n), P2), P3);
    i += 4;
  }
  for (; i < n; i++) h = mul(rotl(h ^ mul(BigInt(bytes[i]!), P5), 11n), P1);
  h = mul(h ^ (h >> 33n), P2);
  h = mul(h ^ (h >> 29n), P3);
  return h ^ (h >> 32n);
}

function pseudoRandomBytes(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

function referenceCrc32c(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = crc & 1 ? (crc >>> 1) ^ 0x82f63b78 : crc >>> 1;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

function indexBytes(index: number): Buffer {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64LE(BigInt(index));
  return bytes;
}

t.test('the references agree with the published test values', async (t) => {
  t.equal(referenceXxh64(Buffer.alloc(0), 0n), 0xef46db3751d8e999n, 'XXH64 of empty input');
  t.equal(referenceXxh64(Buffer.from('abc'), 0n), 0x44bc2cf5ad770999n, 'XXH64 of "abc"');
  t.equal(referenceCrc32c(Buffer.from('123456789')), 0xe3069283, 'CRC-32C check value of "123456789"');
  t.equal(referenceCrc32c(Buffer.alloc(32)), 0x8a9136aa, 'CRC-32C of 32 zero bytes (RFC 3720)');
  t.equal(referenceCrc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43, 'CRC-32C of 32 0xff bytes (RFC 3720)');
});

t.test('CRC-32C is computed by a CPU instruction on the machines we build for', async (t) => {
  const expected = process.arch === 'x64' ? 'sse4.2' : process.arch === 'arm64' ? 'armv8-crc' : 'table';
  t.equal(native().crc32cImplementation(), expected, `${process.arch}: ${expected}`);
});

t.test('checksum(crc32c) equals the reference on lengths around the three-stream split', async (t) => {
  const data = pseudoRandomBytes(70000, 3);
  for (const length of [0, 1, 7, 8, 9, 100, 2047, 2048, 2049, 2071, 2072, 4095, 4096, 65536, 65536 + 13, 70000]) {
    const bytes = data.subarray(0, length);
    t.equal(await native().checksum([bytes], 'crc32c'), BigInt(referenceCrc32c(bytes)), `${length} bytes`);
  }
  const odd = data.subarray(1, 9001);
  t.equal(await native().checksum([odd], 'crc32c'), BigInt(referenceCrc32c(odd)), 'input not 8-byte aligned');
  const parts = [data.subarray(0, 5), data.subarray(5, 3000), data.subarray(3000, 3001), data.subarray(3001, 70000)];
  t.equal(await native().checksum(parts, 'crc32c'), BigInt(referenceCrc32c(data)), 'split into parts at odd offsets');
});

t.test('checksum() equals the reference on every tail length and across part boundaries', async (t) => {
  const data = pseudoRandomBytes(4096 + 77, 7);
  for (const length of [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 65, 100, 255, 1000, 4096, 4096 + 77]) {
    const bytes = data.subarray(0, length);
    t.equal(await native().checksum([bytes], 'xxh64'), referenceXxh64(bytes, 0n), `${length} bytes in one part`);
  }
  const whole = data.subarray(0, 1000);
  const parts = [whole.subarray(0, 5), whole.subarray(5, 37), whole.subarray(37, 38), whole.subarray(38)];
  t.equal(await native().checksum(parts, 'xxh64'), referenceXxh64(whole, 0n), 'split into parts at odd offsets');
});

t.test('chunkChecksums(xxh64) hashes chunk i with seed i, on several threads, across parts', async (t) => {
  const chunk = 4096;
  const data = pseudoRandomBytes(chunk * 37 + 123, 11);
  const expected = Buffer.alloc(8 * 38);
  for (let i = 0; i < 38; i++) {
    expected.writeBigUInt64LE(referenceXxh64(data.subarray(i * chunk, (i + 1) * chunk), BigInt(i)), 8 * i);
  }
  t.same(await native().chunkChecksums([data], chunk, 'xxh64'), expected, '38 chunks, the last one short');
  const parts = [data.subarray(0, 100), data.subarray(100, chunk * 3 + 1), data.subarray(chunk * 3 + 1)];
  t.same(await native().chunkChecksums(parts, chunk, 'xxh64'), expected, 'parts that split chunks');
  const one = await native().chunkChecksums([data], 1 << 30, 'xxh64');
  t.equal(one.readBigUInt64LE(0), referenceXxh64(data, 0n), 'one chunk is the plain XXH64 (format 1)');
  t.equal(one.length, 8);
  t.same(await native().chunkChecksums([Buffer.alloc(0)], chunk, 'xxh64'), Buffer.alloc(0), 'no bytes, no chunks');
  t.throws(() => native().chunkChecksums([data], 0, 'xxh64'), RangeError);
  t.throws(() => native().chunkChecksums([data], 1.5, 'xxh64'), RangeError);
  t.throws(() => native().chunkChecksums(['text' as unknown as Uint8Array], chunk, 'xxh64'), TypeError);
  t.throws(() => native().chunkChecksums([data], chunk, 'md5' as 'xxh64'), { name: 'TypeError', message: /'xxh64' or 'crc32c'/ });
  t.throws(() => native().checksum([data], undefined as unknown as 'xxh64'), TypeError);
});

/** Format 3's digest table for `data` in chunks of `chunk` bytes, from the reference. */
function referenceCrcTable(data: Buffer, chunk: number): Buffer {
  const count = Math.ceil(data.length / chunk);
  const table = Buffer.alloc(8 * count);
  for (let i = 0; i < count; i++) {
    const digest = referenceCrc32c(Buffer.concat([indexBytes(i), data.subarray(i * chunk, (i + 1) * chunk)]));
    table.writeBigUInt64LE(BigInt(digest), 8 * i);
  }
  return table;
}

t.test('chunkChecksums(crc32c) digests the index and the chunk, on several threads, across parts', async (t) => {
  const chunk = 4096;
  const data = pseudoRandomBytes(chunk * 37 + 123, 13);
  const expected = referenceCrcTable(data, chunk);
  const digests = await native().chunkChecksums([data], chunk, 'crc32c');
  t.same(digests, expected, '38 chunks, the last one short');
  const parts = [data.subarray(0, 100), data.subarray(100, chunk * 3 + 1), data.subarray(chunk * 3 + 1)];
  t.same(await native().chunkChecksums(parts, chunk, 'crc32c'), expected, 'parts that split chunks');
  const twins = Buffer.concat([data.subarray(0, chunk), data.subarray(0, chunk)]);
  const [first, second] = [0, 1].map(async (i) => (await native().chunkChecksums([twins], chunk, 'crc32c')).readBigUInt64LE(8 * i));
  t.not(await first, await second, 'two equal chunks at different indexes have different digests');
  // Format 3 stores each 32-bit CRC in an 8-byte slot: the native table's high halves are zero.
  t.equal(digests.length, 8 * 38);
  for (let i = 0; i < 38; i++) t.equal(digests.readUInt32LE(8 * i + 4), 0, `digest ${i}: the high 32 bits are zero`);
});

t.test('the portable CRC-32C table gives the digests of the CPU instruction', async (t) => {
  const data = pseudoRandomBytes(65536 * 3 + 4097, 17);
  const script = `
    const { native } = require(${JSON.stringify(path.resolve(__dirname, '../lib/binding.ts'))});
    const data = require('node:fs').readFileSync(0);
    (async () => {
      const digests = await native().chunkChecksums([data], 65536, 'crc32c');
      const whole = await native().checksum([data], 'crc32c');
      process.stdout.write(JSON.stringify({ implementation: native().crc32cImplementation(), digests: digests.toString('hex'), whole: whole.toString() }));
    })();
  `;
  const result = spawnSync(process.execPath, [...process.execArgv, '-e', script], {
    input: data,
    encoding: 'utf8',
    timeout: 120_000,
    env: { ...process.env, KVSTASH_PORTABLE_CRC32C: '1' },
  });
  t.equal(result.status, 0, `the child ran (stderr: ${result.stderr.slice(-300)})`);
  const portable = JSON.parse(result.stdout) as { implementation: string; digests: string; whole: string };
  t.equal(portable.implementation, 'table', 'the child used the table');
  t.equal(portable.digests, (await native().chunkChecksums([data], 65536, 'crc32c')).toString('hex'), 'the same chunk digests');
  t.equal(portable.digests, referenceCrcTable(data, 65536).toString('hex'), 'and those of the reference');
  t.equal(BigInt(portable.whole), BigInt(referenceCrc32c(data)), 'the same whole checksum');
});
