/**
 * The page cache, from the benchmark's side: how fast this machine reads a file it already holds in
 * memory, and how to make it forget one file so the next read comes from the disk.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import { median } from './measure.js';

export interface PageCacheRead {
  bytes: number;
  repetitions: number;
  /** Median time to read the whole file into one reused buffer, page cache warm. Unit: ms. */
  readMs: number;
  /** bytes / readMs. Unit: MB/s (10^6 bytes per second). */
  megabytesPerSecond: number;
}

/** Reads `file` whole into `buffer` (at least the file's size): the bytes read. No allocation, so
 * no garbage whose collection would land in the next timed step. */
export function readInto(file: string, buffer: Buffer): number {
  const fd = fs.openSync(file, 'r');
  try {
    let done = 0;
    for (let n; (n = fs.readSync(fd, buffer, done, buffer.length - done, done)) > 0; ) done += n;
    return done;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A buffer of `file`'s size into which the kernel reads `file` at full speed.
 *
 * Why: on AMD Zen 3 (measured, 2026-12-01) the kernel's copy out of the page cache runs 3-4 times
 * slower when the destination is not 64-byte aligned like the file offset, and a large malloc'd
 * buffer (Buffer.allocUnsafeSlow) starts 16 bytes into a page. JavaScript cannot see addresses, so
 * this reads the file into each 16-byte step of one 64-byte line of a slightly larger buffer and
 * keeps the fastest: the page-cache floor is the fastest way to read the bytes, and kvstash's own
 * restore reads into page-aligned memory.
 */
export function fastReadBuffer(file: string): Buffer {
  const size = fs.statSync(file).size;
  const backing = Buffer.allocUnsafeSlow(size + 64);
  readInto(file, backing.subarray(0, size));
  let best = { offset: 0, ms: Infinity };
  for (let trial = 0; trial < 2; trial++) {
    for (let offset = 0; offset < 64; offset += 16) {
      const start = performance.now();
      readInto(file, backing.subarray(offset, offset + size));
      const ms = performance.now() - start;
      if (ms < best.ms) best = { offset, ms };
    }
  }
  return backing.subarray(best.offset, best.offset + size);
}

/** Reads `file` once to warm it, then `repetitions` more times into the same buffer, timing each
 * whole-file read: the page cache's bandwidth, without allocation or page faults. */
export function measurePageCacheRead(file: string, repetitions: number): PageCacheRead {
  const buffer = fastReadBuffer(file);
  const times: number[] = [];
  let bytes = 0;
  for (let i = 0; i < repetitions; i++) {
    const start = performance.now();
    bytes = readInto(file, buffer);
    times.push(performance.now() - start);
  }
  const readMs = median(times);
  return { bytes, repetitions, readMs, megabytesPerSecond: bytes / 1e6 / (readMs / 1000) };
}

export type EvictionMethod = 'posix_fadvise' | 'drop_caches' | 'none';

export interface Evictor {
  method: EvictionMethod;
  /** Why the method was chosen, or why none works here. */
  note: string;
  /** Drops `file` from the page cache; returns the bytes of it still cached afterwards, when
   * that can be known (null otherwise). */
  evict(file: string): number | null;
}

/** An Evictor living in its own process (evict-helper.ts says why). */
export interface RemoteEvictor {
  method: EvictionMethod;
  note: string;
  evict(file: string): Promise<number | null>;
  close(): void;
}

/** The helper entry beside this file: dist/bench/evict-helper.js, or the .ts under a TypeScript
 * loader (which process.execArgv, passed on, carries). */
const EVICT_HELPER = path.join(__dirname, `evict-helper${path.extname(__filename)}`);

export async function startEvictor(probeFile: string): Promise<RemoteEvictor> {
  const child = spawn(process.execPath, [...process.execArgv, EVICT_HELPER, probeFile], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = readline.createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const next = async (): Promise<Record<string, unknown>> => {
    const { value, done } = await lines.next();
    if (done) throw new Error('the eviction helper exited');
    return JSON.parse(value as string) as Record<string, unknown>;
  };
  const hello = await next();
  return {
    method: hello.method as EvictionMethod,
    note: hello.note as string,
    async evict(file) {
      child.stdin!.write(`${file}\n`);
      return (await next()).left as number | null;
    },
    close: () => child.stdin!.end(),
  };
}

/**
 * Node cannot call posix_fadvise(POSIX_FADV_DONTNEED) itself. GNU dd can (`iflag=nocache
 * count=0` drops the whole file) and touches only that file; writing 1 to
 * /proc/sys/vm/drop_caches (root only) drops every clean page of the machine instead.
 */
export function findEvictor(probeFile: string): Evictor {
  const dd = (file: string): boolean => {
    writeBack(file);
    return spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], { stdio: 'ignore' }).status === 0;
  };
  fs.readFileSync(probeFile);
  if (dd(probeFile)) {
    const left = cachedBytes(probeFile);
    if (left === null || left === 0) {
      return {
        method: 'posix_fadvise',
        note: `per file, with GNU dd iflag=nocache (posix_fadvise DONTNEED)${left === null ? '; fincore is missing, so the eviction is not verified' : ', verified with fincore'}`,
        evict: (file) => (dd(file) ? cachedBytes(file) : null),
      };
    }
  }
  const dropCaches = (file: string): boolean => {
    try {
      writeBack(file);
      fs.writeFileSync('/proc/sys/vm/drop_caches', '1');
      return true;
    } catch {
      return false;
    }
  };
  if (dropCaches(probeFile)) {
    return { method: 'drop_caches', note: 'whole machine, by writing 1 to /proc/sys/vm/drop_caches', evict: (file) => (dropCaches(file) ? cachedBytes(file) : null) };
  }
  return { method: 'none', note: 'neither dd iflag=nocache nor /proc/sys/vm/drop_caches works here: the "evicted" rows read from the page cache', evict: () => null };
}

/** Bytes of `file` in the page cache, from util-linux fincore; null when fincore is unavailable. */
export function cachedBytes(file: string): number | null {
  const result = spawnSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' });
  if (result.status !== 0) return null;
  const value = Number(result.stdout.trim());
  return Number.isFinite(value) ? value : null;
}

/** Dirty pages cannot be dropped: writes back what a fresh file (one just saved, say) still holds. */
function writeBack(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
