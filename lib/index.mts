// The ES module entry: the same objects as the CommonJS entry (one copy of the state), re-exported
// by name so `import { loadModel } from 'kvstash'` works in ESM and TypeScript alike.
import kvstash from './index.js';

export const {
  KvstashError,
  isKvstashError,
  loadModel,
  Model,
  Context,
  ContextMemory,
  Sampler,
  quantizeModel,
  writeSyntheticModel,
  SYNTHETIC_SHAPES,
  fingerprintModel,
  FINGERPRINT_SCHEME,
  PromptCache,
  commonPrefix,
  DirectoryStore,
  readEntryFile,
  readVerifiedEntry,
  ENTRY_VERSION,
  generate,
  Generation,
  loadRkllmModel,
  RkllmModel,
  RkllmRuntime,
  CHATML_TEMPLATE,
  Session,
  systemInfo,
} = kvstash;
export type * from './index.js';
