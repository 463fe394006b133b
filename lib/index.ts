/**
 * kvstash: durable, verified, reusable LLM KV caches for Node.js.
 * See README.md for the guide; every export below is documented where it is defined.
 */
export { KvstashError, isKvstashError, type KvstashErrorCode } from './errors.js';
export {
  loadModel,
  Model,
  type ModelInfo,
  type ChatMessage,
  type LoadModelOptions,
  type TokenizeOptions,
  type EmbedOptions,
  type EmbeddingPooling,
} from './llama/model.js';
export {
  Context,
  ContextMemory,
  type ContextOptions,
  type ContextInfo,
  type DecodeOptions,
  type KvType,
  type LogitsSelection,
  type SequenceOptions,
} from './llama/context.js';
export { Sampler, type SamplingOptions } from './llama/sampler.js';
export { quantizeModel, type QuantizeType } from './llama/quantize.js';
export { writeSyntheticModel, SYNTHETIC_SHAPES } from './models/synthetic.js';
export { fingerprintModel, FINGERPRINT_SCHEME } from './models/fingerprint.js';
export {
  PromptCache,
  commonPrefix,
  type PromptCacheOptions,
  type CacheEntryInfo,
  type CacheStats,
  type CacheTier,
  type CacheProblem,
  type RestoreResult,
} from './cache/prompt-cache.js';
export { DirectoryStore, type CacheStore, type StoredEntry } from './cache/store.js';
export { RedisStore, type RedisStoreOptions, type StoreProblem } from './cache/redis-store.js';
export { readEntryFile, readVerifiedEntry, ENTRY_VERSION, type EntryHeader, type EntryFile } from './cache/entry.js';
export { generate, Generation, type GenerateOptions, type GenerationResult, type FinishReason } from './generate/generate.js';
export {
  loadRkllmModel,
  RkllmModel,
  CHATML_TEMPLATE,
  type LoadRkllmModelOptions,
  type RkllmChatTemplate,
  type RkllmGenerateOptions,
  type RkllmGeneration,
  type RkllmGenerationResult,
  type RkllmCacheProblem,
  type SystemPromptCacheUse,
} from './rkllm/model.js';
export {
  RkllmRuntime,
  type OpenRkllmRuntimeOptions,
  type RkllmParams,
  type RkllmRunOptions,
  type RkllmRunResult,
  type RkllmRuntimeVersion,
  type RkllmInferMode,
  type RkllmSampling,
  type RkllmPerf,
} from './rkllm/runtime.js';
export {
  Session,
  type SessionOptions,
  type OpenOptions,
  type SendOptions,
  type CheckpointOptions,
  type OverflowOptions,
  type OverflowPolicy,
  type ResumeReport,
  type ResumePath,
  type SessionStats,
  type SessionReply,
} from './session/session.js';
export type { ConversationBackend } from './session/backend.js';
export type { SessionMemoryOptions, RecallOptions, ClearOptions, RetrievedMemory } from './session/memory-hook.js';
export { systemInfo, type SystemInfo } from './system.js';
export { createServer, type ServerOptions, type KvstashServer } from './server/server.js';
export {
  Memory,
  type EmbedFunction,
  type MemoryOpenOptions,
  type MemoryAddInput,
  type MemorySearchMode,
  type MemoryTier,
  type MemorySearchOptions,
  type MemoryHit,
  type MemorySummary,
  type CheckpointInput,
  type CheckpointRecord,
  type CheckpointCache,
  type MemoryPruneOptions,
  type MemoryForgetOptions,
  type MemoryRemoved,
  type MemoryStats,
} from './memory/memory.js';
