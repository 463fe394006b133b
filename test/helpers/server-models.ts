/** A models folder (`<dir>/tiny/model.gguf`, the synthetic tiny model) for server tests. */
import fs from 'node:fs';
import path from 'node:path';
import { readEntryFile } from '../../lib/index.js';
import { tinyModel } from './fixtures.js';

export async function modelsFolder(dir: string, id = 'tiny'): Promise<string> {
  const models = path.join(dir, 'models');
  fs.mkdirSync(path.join(models, id), { recursive: true });
  fs.copyFileSync(await tinyModel(), path.join(models, id, 'model.gguf'));
  return models;
}

/**
 * The KV payload (the state bytes, without the header's timestamps) of the entry in `dir` whose
 * label is `label`: two processes that computed the same cells have identical payloads.
 */
export async function entryPayload(dir: string, label: string): Promise<Buffer> {
  for (const name of fs.readdirSync(dir).filter((n) => n.endsWith('.kvstash'))) {
    const file = path.join(dir, name);
    const entry = await readEntryFile(file);
    if (entry.header.label !== label) continue;
    const bytes = fs.readFileSync(file);
    return bytes.subarray(entry.payloadOffset, entry.payloadOffset + entry.header.payloadBytes);
  }
  throw new Error(`no entry labelled ${label} in ${dir}`);
}
