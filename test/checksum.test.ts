// The entry checksum (binding/common/Checksum.cpp) against a second XXH64, written here in
// TypeScript with BigInt from the xxHash specification: two implementations in two languages that
// must agree on every length class (the 32-byte stripes, the 8/4/1-byte tails) and every seed. The
// chunk digests of entry format 2 are XXH64 with seed = chunk index, hashed on several threads.
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

t.test('the reference agrees with the published test values', async (t) => {
  t.equal(referenceXxh64(Buffer.alloc(0), 0n), 0xef46db3751d8e999n, 'empty input');
  t.equal(referenceXxh64(Buffer.from('abc'), 0n), 0x44bc2cf5ad770999n, '"abc"');
});

t.test('checksum() equals the reference on every tail length and across part boundaries', async (t) => {
  const data = pseudoRandomBytes(4096 + 77, 7);
  for (const length of [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 65, 100, 255, 1000, 4096, 4096 + 77]) {
    const bytes = data.subarray(0, length);
    t.equal(await native().checksum([bytes]), referenceXxh64(bytes, 0n), `${length} bytes in one part`);
  }
  const whole = data.subarray(0, 1000);
  const parts = [whole.subarray(0, 5), whole.subarray(5, 37), whole.subarray(37, 38), whole.subarray(38)];
  t.equal(await native().checksum(parts), referenceXxh64(whole, 0n), 'split into parts at odd offsets');
});

t.test('chunkChecksums() hashes chunk i with seed i, on several threads, across parts', async (t) => {
  const chunk = 4096;
  const data = pseudoRandomBytes(chunk * 37 + 123, 11);
  const expected = Buffer.alloc(8 * 38);
  for (let i = 0; i < 38; i++) {
    expected.writeBigUInt64LE(referenceXxh64(data.subarray(i * chunk, (i + 1) * chunk), BigInt(i)), 8 * i);
  }
  t.same(await native().chunkChecksums([data], chunk), expected, '38 chunks, the last one short');
  const parts = [data.subarray(0, 100), data.subarray(100, chunk * 3 + 1), data.subarray(chunk * 3 + 1)];
  t.same(await native().chunkChecksums(parts, chunk), expected, 'parts that split chunks');
  const one = await native().chunkChecksums([data], 1 << 30);
  t.equal(one.readBigUInt64LE(0), referenceXxh64(data, 0n), 'one chunk is the plain XXH64 (format 1)');
  t.equal(one.length, 8);
  t.same(await native().chunkChecksums([Buffer.alloc(0)], chunk), Buffer.alloc(0), 'no bytes, no chunks');
  t.throws(() => native().chunkChecksums([data], 0), RangeError);
  t.throws(() => native().chunkChecksums([data], 1.5), RangeError);
  t.throws(() => native().chunkChecksums(['text' as unknown as Uint8Array], chunk), TypeError);
});
