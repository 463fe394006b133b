import fs from 'node:fs';
import path from 'node:path';
import { KvstashError } from '../errors.js';

// lib/models/ under ts-node/tsx and dist/models/ when compiled: both sit two levels below the root.
const packageRoot = path.resolve(__dirname, '..', '..');

/**
 * Path of the Qwen2 vocab-only GGUF that ships in the llama.cpp source tree (a real tokenizer
 * for synthetic models). Fetches llama.cpp into deps/ first when it is absent.
 */
export function qwen2VocabPath(): string {
  const vocab = path.join(packageRoot, 'deps', 'llama.cpp', 'models', 'ggml-vocab-qwen2.gguf');
  if (fs.existsSync(vocab)) return vocab;
  let fetchError: unknown;
  try {
    // A CommonJS build script, deliberately outside the TypeScript sources.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { fetchLlama } = require(path.join(packageRoot, 'scripts', 'fetch-llama.js')) as { fetchLlama(): string };
    fetchLlama();
  } catch (err) {
    fetchError = err;
  }
  if (fs.existsSync(vocab)) return vocab;
  const reason = fetchError instanceof Error ? ` (fetching llama.cpp failed: ${fetchError.message})` : '';
  throw new KvstashError(
    'E_MODEL_LOAD',
    `the Qwen2 vocab file ${vocab} is missing${reason}. Run \`node scripts/fetch-llama.js\` in the kvstash ` +
      `package (it needs the npm registry and git), or pass vocabPath: a GGUF that holds a tokenizer.`,
    { cause: fetchError },
  );
}
