// Model fingerprints: stable for a file, sensitive to its header and sampled data, and cheap:
// a 1 GiB model costs a few hundred KiB of reads, never the whole file.
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { FINGERPRINT_SCHEME, fingerprintModel, fingerprintSamples } from '../lib/models/fingerprint.js';
import { encodeGgufHeader, GgmlType, GgufType, readGgufHeader, writeGguf } from '../lib/models/gguf.js';

const GiB = 1024 ** 3;

/** Counts the bytes read through FileHandle.read while `fn` runs. */
async function countBytesRead<T>(fn: () => Promise<T>): Promise<{ result: T; bytes: number; reads: number }> {
  const probe = await fsp.open(__filename, 'r');
  const proto = Object.getPrototypeOf(probe) as { read: (...args: unknown[]) => Promise<{ bytesRead: number }> };
  await probe.close();
  const read = proto.read;
  let bytes = 0;
  let reads = 0;
  proto.read = async function (this: unknown, ...args: unknown[]) {
    const r = await read.apply(this, args);
    bytes += r.bytesRead;
    reads++;
    return r;
  };
  try {
    return { result: await fn(), bytes, reads };
  } finally {
    proto.read = read;
  }
}

/** A model-shaped file of `dataBytes` of tensor data, sparse, so it costs no disk or time. */
async function sparseModel(file: string, dataBytes: number): Promise<void> {
  const ne0 = 16384;
  const layout = encodeGgufHeader({
    metadata: [['general.architecture', { type: GgufType.STRING, value: 'sparse' }]],
    tensors: [{ name: 'big.weight', dims: [ne0, dataBytes / 2 / ne0], type: GgmlType.F16 }],
  });
  const handle = await fsp.open(file, 'w');
  try {
    await handle.write(layout.header, 0, layout.header.length, 0);
    await handle.truncate(layout.fileSize);
  } finally {
    await handle.close();
  }
}

t.test('the scheme is named', async (t) => {
  t.equal(FINGERPRINT_SCHEME, 'kvstash-fp-v1');
});

t.test('sample plan', async (t) => {
  t.same(fingerprintSamples(1000, 1000), [], 'no data, no samples');
  t.same(fingerprintSamples(1000, 1000 + 66 * 4096), [{ offset: 1000, length: 66 * 4096 }], 'a small data region is hashed whole');
  const samples = fingerprintSamples(4096, 4096 + GiB);
  t.equal(samples.length, 66);
  t.ok(samples.every((s) => s.length === 4096));
  t.same(samples[0], { offset: 4096, length: 4096 }, 'the first 4 KiB of data');
  t.same(samples[65], { offset: 4096 + GiB - 4096, length: 4096 }, 'the last 4 KiB of data');
  t.ok(samples.every((s, i) => i === 0 || s.offset >= samples[i - 1]!.offset + 4096), 'in order, not overlapping');
  const gaps = samples.slice(1).map((s, i) => s.offset - samples[i]!.offset);
  t.ok(Math.max(...gaps) - Math.min(...gaps) <= 1, 'evenly spaced');
});

t.test('a 1 GiB model is fingerprinted from a few hundred KiB', async (t) => {
  const file = path.join(t.testdir(), 'sparse-1gib.gguf');
  await sparseModel(file, GiB);
  t.ok(fs.statSync(file).size > GiB);
  const { result, bytes, reads } = await countBytesRead(() => fingerprintModel(file));
  t.match(result, /^[0-9a-f]{64}$/);
  t.ok(bytes <= 400 * 1024, `read ${bytes} bytes in ${reads} reads`);
  t.ok(bytes >= 66 * 4096, 'every sample was read');
});

t.test('stable for a file and its copies, sensitive to header and sampled data', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'model.gguf');
  const dataBytes = 8 * 1024 * 1024;
  const data = Buffer.alloc(dataBytes);
  for (let i = 0; i < dataBytes; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  const write = (target: string, name: string, bytes: Buffer) =>
    writeGguf(target, {
      metadata: [['general.name', { type: GgufType.STRING, value: name }]],
      tensors: [{ name: 'w', dims: [dataBytes / 4], type: GgmlType.F32, *data() { yield bytes; } }],
    });
  await write(file, 'a', data);
  const fingerprint = await fingerprintModel(file);
  t.equal(await fingerprintModel(file), fingerprint, 'same file, same fingerprint');
  const copy = path.join(dir, 'copy.gguf');
  fs.copyFileSync(file, copy);
  t.equal(await fingerprintModel(copy), fingerprint, 'a copy elsewhere has the same fingerprint');

  await write(copy, 'b', data);
  t.not(await fingerprintModel(copy), fingerprint, 'one metadata byte changed');

  const { dataOffset, fileSize } = await readGgufHeader(file);
  const [, second] = fingerprintSamples(dataOffset, fileSize);
  const inSample = Buffer.from(data);
  inSample[second!.offset - dataOffset + 100]! ^= 1;
  await write(copy, 'a', inSample);
  t.not(await fingerprintModel(copy), fingerprint, 'one bit changed inside a sample');

  // The price of reading little: a change between samples goes unseen (the header, shape and
  // every sample being equal, such files are near-certainly the same model anyway).
  const betweenSamples = Buffer.from(data);
  betweenSamples[second!.offset - dataOffset + 4096 + 100]! ^= 1;
  await write(copy, 'a', betweenSamples);
  t.equal(await fingerprintModel(copy), fingerprint, 'a change between samples is not seen');
});

t.test('bad files get coded errors', async (t) => {
  const dir = t.testdir({ 'text.gguf': 'definitely not a model' });
  await t.rejects(fingerprintModel(path.join(dir, 'text.gguf')), { code: 'E_MODEL_FORMAT', message: /text\.gguf/ });
  await t.rejects(fingerprintModel(path.join(dir, 'missing.gguf')), { code: 'E_MODEL_LOAD' });
  const truncated = path.join(dir, 'truncated.gguf');
  await sparseModel(truncated, 1024 * 1024);
  await fsp.truncate(truncated, fs.statSync(truncated).size - 4096);
  await t.rejects(fingerprintModel(truncated), { code: 'E_MODEL_FORMAT', message: /truncated/ });
});
