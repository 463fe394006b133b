/** The options every cache command takes, and the cache they open. */
import path from 'node:path';
import { PromptCache, type PromptCacheOptions } from '../cache/prompt-cache.js';
import type { FlagSpecs } from './main.js';

export const CACHE_FLAGS = {
  'cache-dir': {
    type: 'string',
    value: 'dir',
    help: 'The prompt cache directory. Default $XDG_CACHE_HOME/kvstash/prompt-cache or ~/.cache/kvstash/prompt-cache',
  },
  json: { type: 'boolean', help: 'Print JSON instead of the table' },
} as const satisfies FlagSpecs;

/** The cache in --cache-dir (or the default directory, as `new PromptCache()` uses). */
export function openCache(flags: { 'cache-dir'?: string }, options: Omit<PromptCacheOptions, 'dir'> = {}): PromptCache {
  return new PromptCache({ ...options, ...(flags['cache-dir'] === undefined ? {} : { dir: path.resolve(flags['cache-dir']) }) });
}
