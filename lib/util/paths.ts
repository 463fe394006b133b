import os from 'node:os';
import path from 'node:path';

/** The user's cache directory for kvstash: $XDG_CACHE_HOME/kvstash or ~/.cache/kvstash. */
export function userCacheDir(): string {
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'kvstash');
}
