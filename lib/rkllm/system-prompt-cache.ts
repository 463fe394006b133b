/**
 * RKLLM prompt caches for system prompts, kept as kvstash cache entries: where they live, what they
 * are keyed by, and how the runtime's own file goes in and out of an entry. All of the file logic
 * of the RKLLM backend is here; the model code only asks for a cache and loads the path it gets.
 *
 * Each cache is `<cacheDir>/<key>.kvstash`, an ordinary entry (lib/cache/entry.ts) whose payload is
 * the exact bytes the runtime wrote with prompt_cache_params. So `new PromptCache({ dir: cacheDir })`
 * and `kvstash ls|inspect|verify|rm --cache-dir <cacheDir>` list, check and delete them like llama.cpp
 * entries; PromptCache.restore() never loads one into a llama.cpp context, because mismatchReason()
 * compares the kind first (and an RKLLM entry has no tokens, so it never even counts as a candidate
 * worth reporting).
 *
 * Header:
 *   kind     'rkllm/prompt-cache'
 *   backend  { name: 'rkllm', version: the runtime ABI version ('1.3.0', '1.2.1') }
 *   model    { fingerprint: rkllmModelIdentity(), fingerprintScheme: RKLLM_FINGERPRINT_SCHEME,
 *              name: the model's name, architecture: 'rkllm' }
 *   layout   { systemPromptSha256, maxContextLen, nBatch } (strings)
 *   tokens   [] (tokenCount 0)
 *   label    `rkllm-system-<first 12 hex digits of systemPromptSha256>`
 *
 * Why the tokens are empty: RKLLM caches are made from text (the runtime tokenizes inside; kvstash
 * never sees its token ids), and an RKLLM entry is never matched by prefix against a token list.
 * What the cache holds is named by the SHA-256 of the system prompt's UTF-8 text (chat template
 * applied), put in the layout so that it is part of the entry key and compared on load like every
 * other layout field; the label repeats its start so that `kvstash ls` tells caches apart and
 * `kvstash rm <label>` names one. maxContextLen and nBatch are in the layout because they size the
 * runtime's KV cache, and a cache made for another size is not guaranteed to load.
 *
 * Loading: the entry is read whole and verified (checksum over every byte) and its identity
 * checked, then its payload is written to a hidden temporary file beside it, which the caller hands
 * to rkllm_load_prompt_cache and removes afterwards (the runtime reads the file while loading).
 * A corrupt or mismatched entry is an error the caller reports before making the cache again.
 */
import { createHash } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { entryKey, readVerifiedEntry, type EntryHeader } from '../cache/entry.js';
import { mismatchReason, type EntryIdentity } from '../cache/identity.js';
import { DirectoryStore } from '../cache/store.js';
import { KvstashError } from '../errors.js';
import { userCacheDir } from '../util/paths.js';
import { isProcessAlive } from '../util/process.js';
import { NotRegularFileError, openRegularFile, readRegularFile } from '../util/regular-file.js';

export const RKLLM_PROMPT_CACHE_KIND = 'rkllm/prompt-cache' as const;
/** How rkllmModelIdentity() samples and hashes an .rkllm file. */
export const RKLLM_FINGERPRINT_SCHEME = 'kvstash-rkllm-fp-v1';

/** What every prompt cache of one model handle depends on (system prompts' and sessions' alike). */
export interface RkllmCacheOwner {
  /** RKLLM runtime version whose ABI wrote the file. */
  runtimeVersion: string;
  /** rkllmModelIdentity() of the .rkllm file. */
  modelIdentity: string;
  /** The model's name (shown by `kvstash ls`; not part of the identity). */
  modelName: string;
  /** The runtime's KV cache length and batch size (RKLLMParam max_context_len, n_batch). */
  maxContextLen: number;
  nBatch: number;
}

/** Everything a system-prompt cache depends on. */
export interface SystemPromptCacheKey extends RkllmCacheOwner {
  /** The system prompt exactly as given to rkllm_set_chat_template (template applied). */
  systemPrompt: string;
}

/** A cache ready to load: its entry, and its payload extracted to a temporary file. */
export interface PreparedSystemPromptCache {
  /** The `<key>.kvstash` entry file. */
  entryPath: string;
  /** The runtime's cache file, for rkllm_load_prompt_cache; remove it once loaded. */
  payloadPath: string;
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
 * Reads about 1 MiB, never the whole multi-GB file. Scheme RKLLM_FINGERPRINT_SCHEME.
 */
export async function rkllmModelIdentity(modelPath: string): Promise<string> {
  // The one opener: a FIFO or device under the model's name is refused, never waited on (the
  // caller maps the error to E_MODEL_LOAD); a symlink is followed, its target checked.
  const { handle, size } = await openRegularFile(modelPath, { followSymlinks: true });
  try {
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

/** Hex SHA-256 of the system prompt's UTF-8 text. */
export function systemPromptSha256(systemPrompt: string): string {
  return createHash('sha256').update(systemPrompt, 'utf8').digest('hex');
}

/** The label of a system prompt's cache entry. */
export function systemPromptCacheLabel(systemPrompt: string): string {
  return `rkllm-system-${systemPromptSha256(systemPrompt).slice(0, 12)}`;
}

/**
 * The identity of an RKLLM prompt cache of `owner`, with `what` (the fields naming what the cache
 * holds) first in its layout. mismatchReason() compares the layout fields of the identity it is
 * given, so the identity of `owner` alone checks everything but what the cache holds.
 */
export function rkllmCacheIdentity(owner: RkllmCacheOwner, what: Record<string, string> = {}): EntryIdentity {
  return {
    kind: RKLLM_PROMPT_CACHE_KIND,
    backend: { name: 'rkllm', version: owner.runtimeVersion },
    model: { fingerprint: owner.modelIdentity, fingerprintScheme: RKLLM_FINGERPRINT_SCHEME, name: owner.modelName, architecture: 'rkllm' },
    layout: { ...what, maxContextLen: String(owner.maxContextLen), nBatch: String(owner.nBatch) },
  };
}

/** The header fields that must match for a cache to load. */
export function systemPromptCacheIdentity(key: SystemPromptCacheKey): EntryIdentity {
  return rkllmCacheIdentity(key, { systemPromptSha256: systemPromptSha256(key.systemPrompt) });
}

/** The entry key of a system prompt's cache (as `kvstash ls` shows it). */
export function systemPromptCacheKey(key: SystemPromptCacheKey): string {
  return entryKey({ ...systemPromptCacheIdentity(key), tokens: [] });
}

/** The entry file of a system prompt's cache: `<cacheDir>/<key>.kvstash`. */
export function systemPromptCachePath(cacheDir: string, key: SystemPromptCacheKey): string {
  return new DirectoryStore(cacheDir).pathOf(systemPromptCacheKey(key));
}

let temporaryCounter = 0;
/** This process's temporary files still in use (being written by the runtime, or to be loaded). */
const temporariesInUse = new Set<string>();
const TEMPORARY_NAME = /^\.rkllm-[0-9a-f]+-(\d+)-\d+\.prompt-cache$/;

/** A hidden file beside the entries, never taken for one (PromptCache lists `*.kvstash` only). */
function temporaryPayloadPath(cacheDir: string, key: string): string {
  const file = path.join(cacheDir, `.rkllm-${key}-${process.pid}-${temporaryCounter++}.prompt-cache`);
  temporariesInUse.add(file);
  return file;
}

/** Removes a temporary file and forgets it. */
export async function removeTemporaryPayload(file: string): Promise<void> {
  temporariesInUse.delete(file);
  await fsp.rm(file, { force: true }).catch(() => undefined);
}

/**
 * Removes the temporary files nobody uses any more: this process's that are no longer in use, and
 * those of processes that have ended. A runtime may write its prompt cache after rkllm_run returned
 * (then the entry was not made and the file came too late), and a process may die between writing
 * and removing one: without this they would stay in the cache folder for ever. Files of other live
 * processes are theirs.
 */
export async function sweepTemporaryPayloads(cacheDir: string): Promise<number> {
  let names: string[];
  try {
    names = await fsp.readdir(cacheDir);
  } catch {
    return 0;
  }
  let removed = 0;
  for (const name of names) {
    const match = TEMPORARY_NAME.exec(name);
    if (!match) continue;
    const file = path.join(cacheDir, name);
    const pid = Number(match[1]);
    const ours = pid === process.pid;
    if ((ours && temporariesInUse.has(file)) || (!ours && isProcessAlive(pid))) continue;
    await fsp.rm(file, { force: true }).catch(() => undefined);
    removed++;
  }
  return removed;
}

/**
 * The cache ready to load when its entry exists, else undefined. Rejects with E_CACHE_CORRUPT (the
 * entry fails its checks) or E_CACHE_MISMATCH (it was made for another model, runtime, system
 * prompt or KV size): the caller reports that and makes the cache again.
 */
export async function prepareSystemPromptCache(cacheDir: string, key: SystemPromptCacheKey): Promise<PreparedSystemPromptCache | undefined> {
  const entryPath = systemPromptCachePath(cacheDir, key);
  try {
    await fsp.stat(entryPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const { entry, payload } = await readVerifiedEntry(entryPath);
  const reason = mismatchReason(entry.header, systemPromptCacheIdentity(key)) ?? (entry.header.tokenCount !== 0 ? 'it holds tokens, not an RKLLM text prefix' : null);
  if (reason) {
    throw new KvstashError('E_CACHE_MISMATCH', `cache entry ${entryPath} was not loaded: ${reason}`, { reason });
  }
  return { entryPath, payloadPath: await extractRuntimePromptCache(cacheDir, entry.key, payload) };
}

/**
 * Writes a verified entry's payload to a hidden temporary file in `dir` for
 * rkllm_load_prompt_cache; the caller removes it (removeTemporaryPayload) once loaded.
 */
export async function extractRuntimePromptCache(dir: string, key: string, payload: Uint8Array): Promise<string> {
  await sweepTemporaryPayloads(dir);
  const payloadPath = temporaryPayloadPath(dir, key);
  try {
    await fsp.writeFile(payloadPath, payload);
  } catch (err) {
    await removeTemporaryPayload(payloadPath);
    throw err;
  }
  return payloadPath;
}

/**
 * Has the runtime write a prompt cache file (`write(temporaryPath)`) to a hidden temporary file in
 * `dir`, and reads its bytes. The file is kept for the caller to load (and remove); on failure it
 * is removed. Rejects when the runtime wrote nothing, or something that is not a regular file.
 */
export async function captureRuntimePromptCache(
  dir: string,
  key: string,
  write: (temporaryPath: string) => Promise<void>,
): Promise<{ payload: Buffer; payloadPath: string }> {
  await fsp.mkdir(dir, { recursive: true });
  await sweepTemporaryPayloads(dir);
  const payloadPath = temporaryPayloadPath(dir, key);
  try {
    await write(payloadPath);
    let payload: Buffer;
    try {
      // Not fsp.readFile: a FIFO in the runtime's place would block this process for good.
      payload = await readRegularFile(payloadPath);
    } catch (err) {
      if (err instanceof NotRegularFileError) throw new Error(`the runtime's prompt cache ${err.message}`);
      throw new Error('the runtime wrote no prompt cache file (some models refuse to save one; see its log)');
    }
    if (payload.length === 0) throw new Error('the runtime wrote an empty prompt cache file');
    return { payload, payloadPath };
  } catch (err) {
    await removeTemporaryPayload(payloadPath);
    throw err;
  }
}

/**
 * Makes the cache: `write(temporaryPath)` has the runtime write its file beside the entries; its
 * bytes become the payload of the entry, which appears atomically under its name. The runtime's
 * file is kept for the caller to load (and remove); on failure it is removed. Rejects when the
 * runtime wrote nothing.
 */
export async function createSystemPromptCache(
  cacheDir: string,
  key: SystemPromptCacheKey,
  write: (temporaryPath: string) => Promise<void>,
): Promise<PreparedSystemPromptCache> {
  const identity = systemPromptCacheIdentity(key);
  const store = new DirectoryStore(cacheDir);
  const entryKeyHex = systemPromptCacheKey(key);
  const { payload, payloadPath } = await captureRuntimePromptCache(cacheDir, entryKeyHex, write);
  try {
    const header: EntryHeader = {
      ...identity,
      tokenCount: 0,
      tokens: [],
      label: systemPromptCacheLabel(key.systemPrompt),
      createdAt: new Date().toISOString(),
      payloadBytes: payload.length,
    };
    await store.write(entryKeyHex, header, payload);
    return { entryPath: store.pathOf(entryKeyHex), payloadPath };
  } catch (err) {
    await removeTemporaryPayload(payloadPath);
    throw err;
  }
}

/** Removes a cache's entry (one that is corrupt, or that the runtime refused to load). */
export async function removeSystemPromptCache(entryPath: string): Promise<void> {
  await fsp.rm(entryPath, { force: true });
}
