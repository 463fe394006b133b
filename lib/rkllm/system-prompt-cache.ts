/**
 * RKLLM prompt-cache files for system prompts: where they live, what they are keyed by, and the
 * small JSON record beside each that says what it holds. All of the file logic of the RKLLM
 * backend is here, so that it can move behind the kvstash cache entry format (verified header,
 * fingerprint, listing, eviction) without touching the model code.
 *
 * Layout: `<cacheDir>/system-<key>.prompt-cache` is the runtime's own file (written by rkllm_run
 * with prompt_cache_params, read by rkllm_load_prompt_cache); `<same>.json` is the record. A cache
 * counts only when its record matches (same model identity, runtime version and system text) and
 * the cache file has the recorded size; anything else is treated as absent and made again.
 */
import { createHash } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { replaceFileAtomic, writeFileAtomic } from '../util/atomic-file.js';
import { userCacheDir } from '../util/paths.js';

export const SYSTEM_PROMPT_CACHE_FORMAT = 'kvstash-rkllm-system-prompt-v1';

export interface SystemPromptCacheRecord {
  format: typeof SYSTEM_PROMPT_CACHE_FORMAT;
  /** RKLLM runtime version whose ABI wrote the file. */
  runtimeVersion: string;
  /** rkllmModelIdentity() of the .rkllm file. */
  modelIdentity: string;
  /** The system prompt exactly as given to rkllm_set_chat_template (template applied). */
  systemPrompt: string;
  /** Size of the cache file. Unit: bytes. */
  bytes: number;
  createdAt: string;
}

export interface SystemPromptCacheKey {
  runtimeVersion: string;
  modelIdentity: string;
  systemPrompt: string;
}

/**
 * The name RK3588 users give a model: the folder name for `models/<name>/<file>.rkllm`, else the
 * file name without its extension.
 */
export function rkllmModelName(modelPath: string): string {
  const resolved = path.resolve(modelPath);
  const folder = path.dirname(resolved);
  if (path.basename(path.dirname(folder)) === 'models') return path.basename(folder);
  return path.basename(resolved).replace(/\.rkllm$/i, '');
}

/** `<user cache dir>/kvstash/rkllm/<model name>`. */
export function defaultRkllmCacheDir(modelPath: string): string {
  return path.join(userCacheDir(), 'rkllm', rkllmModelName(modelPath));
}

const IDENTITY_SAMPLE = 64 * 1024;
const IDENTITY_SAMPLES = 16;

/**
 * Hex SHA-256 over the file size and 18 samples of 64 KiB (first, last, 16 evenly spaced): a
 * replaced or re-converted model gets another identity, so its old caches are never loaded.
 * Reads about 1 MiB, never the whole multi-GB file.
 */
export async function rkllmModelIdentity(modelPath: string): Promise<string> {
  const handle = await fsp.open(modelPath, 'r');
  try {
    const { size } = await handle.stat();
    const hash = createHash('sha256').update(`kvstash-rkllm-id-v1\0${size}\0`);
    const offsets = new Set<number>([0, Math.max(0, size - IDENTITY_SAMPLE)]);
    for (let i = 1; i <= IDENTITY_SAMPLES; i++) offsets.add(Math.floor((i * Math.max(0, size - IDENTITY_SAMPLE)) / (IDENTITY_SAMPLES + 1)));
    const buffer = Buffer.alloc(IDENTITY_SAMPLE);
    for (const offset of [...offsets].sort((a, b) => a - b)) {
      const { bytesRead } = await handle.read(buffer, 0, Math.min(IDENTITY_SAMPLE, size - offset), offset);
      hash.update(buffer.subarray(0, bytesRead));
    }
    return hash.digest('hex');
  } finally {
    await handle.close();
  }
}

/** The cache file for a system prompt (and its record at `<file>.json`). */
export function systemPromptCachePath(cacheDir: string, key: SystemPromptCacheKey): string {
  const digest = createHash('sha256')
    .update(JSON.stringify([SYSTEM_PROMPT_CACHE_FORMAT, key.runtimeVersion, key.modelIdentity, key.systemPrompt]))
    .digest('hex')
    .slice(0, 32);
  return path.join(cacheDir, `system-${digest}.prompt-cache`);
}

/** The cache file when a usable one exists, else undefined. */
export async function findSystemPromptCache(cacheDir: string, key: SystemPromptCacheKey): Promise<string | undefined> {
  const file = systemPromptCachePath(cacheDir, key);
  try {
    const record = JSON.parse(await fsp.readFile(`${file}.json`, 'utf8')) as Partial<SystemPromptCacheRecord>;
    const { size } = await fsp.stat(file);
    const matches =
      record.format === SYSTEM_PROMPT_CACHE_FORMAT &&
      record.runtimeVersion === key.runtimeVersion &&
      record.modelIdentity === key.modelIdentity &&
      record.systemPrompt === key.systemPrompt &&
      record.bytes === size;
    return matches ? file : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Makes the cache file: `write(temporaryPath)` has the runtime write it; it then appears
 * atomically under its name, followed by its record (a crash in between leaves a cache without a
 * record, which findSystemPromptCache() ignores). Rejects when the runtime wrote nothing.
 */
export async function createSystemPromptCache(
  cacheDir: string,
  key: SystemPromptCacheKey,
  write: (temporaryPath: string) => Promise<void>,
): Promise<string> {
  await fsp.mkdir(cacheDir, { recursive: true });
  const file = systemPromptCachePath(cacheDir, key);
  await replaceFileAtomic(file, async (temporary) => {
    await write(temporary);
    try {
      await fsp.access(temporary);
    } catch {
      throw new Error('the runtime wrote no prompt cache file (some models refuse to save one; see its log)');
    }
  });
  const { size } = await fsp.stat(file);
  const record: SystemPromptCacheRecord = { format: SYSTEM_PROMPT_CACHE_FORMAT, ...key, bytes: size, createdAt: new Date().toISOString() };
  await writeFileAtomic(`${file}.json`, async (handle) => {
    await handle.writeFile(`${JSON.stringify(record, null, 2)}\n`);
  });
  return file;
}

/** Removes a cache and its record (a cache the runtime refused to load). */
export async function removeSystemPromptCache(file: string): Promise<void> {
  await Promise.all([fsp.rm(file, { force: true }), fsp.rm(`${file}.json`, { force: true })]);
}
