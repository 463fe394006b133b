import { native } from '../binding.js';
import type { Context } from '../llama/context.js';
import { FINGERPRINT_SCHEME } from '../models/fingerprint.js';
import type { EntryHeader } from './entry.js';

/** What an entry records about where its state came from: everything but the tokens. */
export type EntryIdentity = Pick<EntryHeader, 'kind' | 'backend' | 'model' | 'layout'>;

export function contextIdentity(context: Context): EntryIdentity {
  const model = context.model;
  return {
    kind: 'llama.cpp/sequence-state',
    backend: { name: 'llama.cpp', version: native().llamaCommit },
    model: {
      fingerprint: model.fingerprint,
      fingerprintScheme: FINGERPRINT_SCHEME,
      name: model.info.name,
      architecture: model.info.architecture,
    },
    layout: { kvType: context.info.kvType, flashAttention: context.info.flashAttention },
  };
}

/**
 * Why an entry may not load into a context with this identity, or null when it may. The model is
 * compared by fingerprint, so same-shaped weights never pass for each other; the backend version
 * too, because llama.cpp's state bytes carry no version of their own.
 */
export function mismatchReason(header: EntryIdentity, here: EntryIdentity): string | null {
  if (header.kind !== here.kind) return `it holds ${header.kind}, not ${here.kind}`;
  if (header.model.fingerprint !== here.model.fingerprint || header.model.fingerprintScheme !== here.model.fingerprintScheme) {
    return `it was made by another model (${header.model.name || 'unnamed'}, fingerprint ${header.model.fingerprint.slice(0, 12)}…), not this one (${here.model.fingerprint.slice(0, 12)}…)`;
  }
  if (header.backend.name !== here.backend.name || header.backend.version !== here.backend.version) {
    return `it was made by ${header.backend.name} ${header.backend.version}, this is ${here.backend.name} ${here.backend.version}`;
  }
  for (const key of Object.keys(here.layout) as Array<keyof typeof here.layout>) {
    if (header.layout[key] !== here.layout[key]) {
      return `its ${key} is ${String(header.layout[key])}, this context uses ${String(here.layout[key])}`;
    }
  }
  return null;
}
