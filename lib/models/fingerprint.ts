/**
 * Model fingerprints: what a cache entry records to prove it was made by the same model.
 * llama.cpp's own state files carry no model identity, so a same-shaped model would load another
 * model's state silently and answer wrongly.
 */
import { createHash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { KvstashError } from '../errors.js';
import { openModelFile, readGgufHeaderBytes } from './gguf.js';

/**
 * Names what a fingerprint hashes, so a cache can tell fingerprints of another scheme apart:
 * SHA-256 over this tag, the file size and the data offset (u64 LE each), the raw header bytes
 * [0, dataOffset) (metadata and tensor table), then the tensor-data samples of
 * fingerprintSamples(), in order. Changing any of that needs a new scheme name.
 */
export const FINGERPRINT_SCHEME = 'kvstash-fp-v1';

const SAMPLE_BYTES = 4096;
const EVENLY_SPACED_SAMPLES = 64;

/**
 * The byte ranges of tensor data a fingerprint reads: the first and last 4 KiB of the data
 * region and 64 blocks of 4 KiB evenly spaced between them; the whole region if it is smaller
 * than that. Offsets are absolute.
 */
export function fingerprintSamples(dataOffset: number, fileSize: number): Array<{ offset: number; length: number }> {
  const dataBytes = fileSize - dataOffset;
  if (dataBytes <= 0) return [];
  if (dataBytes <= (EVENLY_SPACED_SAMPLES + 2) * SAMPLE_BYTES) return [{ offset: dataOffset, length: dataBytes }];
  const lastStart = dataBytes - SAMPLE_BYTES;
  const samples = [{ offset: dataOffset, length: SAMPLE_BYTES }];
  for (let i = 1; i <= EVENLY_SPACED_SAMPLES; i++) {
    samples.push({ offset: dataOffset + Math.floor((i * lastStart) / (EVENLY_SPACED_SAMPLES + 1)), length: SAMPLE_BYTES });
  }
  samples.push({ offset: dataOffset + lastStart, length: SAMPLE_BYTES });
  return samples;
}

/**
 * Hex SHA-256 identifying a GGUF model by its header and sampled tensor data (scheme
 * FINGERPRINT_SCHEME). Reads the header and about 264 KiB of data, never the whole file.
 * Rejects with E_MODEL_FORMAT for a file that is not a valid GGUF, E_MODEL_LOAD if unreadable.
 */
export async function fingerprintModel(file: string): Promise<string> {
  const handle = await openModelFile(file);
  try {
    // Header and samples come from one open file, so a file replaced meanwhile cannot mix in.
    // The raw bytes are hashed, so the metadata values need no decoding.
    const { headerBytes, dataOffset, fileSize } = await readGgufHeaderBytes(handle, file);
    const hash = createHash('sha256');
    const sizes = Buffer.alloc(16);
    sizes.writeBigUInt64LE(BigInt(fileSize), 0);
    sizes.writeBigUInt64LE(BigInt(dataOffset), 8);
    hash.update(`${FINGERPRINT_SCHEME}\0`).update(sizes).update(headerBytes);
    const samples = fingerprintSamples(dataOffset, fileSize);
    const buf = Buffer.allocUnsafe(Math.max(SAMPLE_BYTES, ...samples.map((s) => s.length)));
    for (const { offset, length } of samples) {
      await readSample(handle, file, buf, offset, length);
      hash.update(buf.subarray(0, length));
    }
    return hash.digest('hex');
  } finally {
    await handle.close();
  }
}

async function readSample(handle: FileHandle, file: string, buf: Buffer, offset: number, length: number): Promise<void> {
  let done = 0;
  while (done < length) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await handle.read(buf, done, length - done, offset + done));
    } catch (err) {
      throw new KvstashError('E_MODEL_LOAD', `cannot read model file ${file}`, { cause: err });
    }
    if (bytesRead === 0) {
      throw new KvstashError('E_MODEL_FORMAT', `${file} is not a valid GGUF model: truncated: it ended at byte ${offset + done} while being fingerprinted (was it being written?)`);
    }
    done += bytesRead;
  }
}
