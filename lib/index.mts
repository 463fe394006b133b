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
  RedisStore,
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
  Memory,
  createServer,
} = kvstash;
export type * from './index.js';
// A class is a value and a type. The destructuring above exports only the value, and a local
// export hides the same name in `export type *`, so each class's instance type is named again.
type Cjs = typeof import('./index.js');
export type KvstashError = Cjs['KvstashError']['prototype'];
export type Model = Cjs['Model']['prototype'];
export type Context = Cjs['Context']['prototype'];
export type ContextMemory = Cjs['ContextMemory']['prototype'];
export type Sampler = Cjs['Sampler']['prototype'];
export type PromptCache = Cjs['PromptCache']['prototype'];
export type DirectoryStore = Cjs['DirectoryStore']['prototype'];
export type RedisStore = Cjs['RedisStore']['prototype'];
export type Generation = Cjs['Generation']['prototype'];
export type RkllmModel = Cjs['RkllmModel']['prototype'];
export type Memory = Cjs['Memory']['prototype'];
export type RkllmRuntime = Cjs['RkllmRuntime']['prototype'];
export type Session = Cjs['Session']['prototype'];
