/**
 * The page cache, from the benchmark's side: how fast this machine reads a file it already holds in
 * memory, and how to make it forget one file so the next read comes from the disk.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { median } from './measure.js';

export interface PageCacheRead {
  bytes: number;
  repetitions: number;
  /** Median time of fs.readFileSync of the whole file, page cache warm. Unit: ms. */
  readMs: number;
  /** bytes / readMs. Unit: MB/s (10^6 bytes per second). */
  megabytesPerSecond: number;
}

/** Reads `file` once to warm it, then `repetitions` more times, timing each whole-file read. */
export function measurePageCacheRead(file: string, repetitions: number): PageCacheRead {
  fs.readFileSync(file);
  const times: number[] = [];
  let bytes = 0;
  for (let i = 0; i < repetitions; i++) {
    const start = performance.now();
    bytes = fs.readFileSync(file).length;
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
  /** Drops `file` from the page cache; resolves with the bytes of it still cached afterwards, when
   * that can be known (null otherwise). */
  evict(file: string): number | null;
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
