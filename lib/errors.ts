/**
 * Every failure a caller can cause or meet surfaces as a KvstashError with a stable `code`, so
 * programs can branch on `err.code` instead of parsing messages. Bad argument types and values that
 * are plainly programming errors stay TypeError/RangeError, as Node's own APIs do.
 */
export type KvstashErrorCode =
  | 'E_MODEL_LOAD' // the model file is missing, unreadable, or llama.cpp refused it
  | 'E_MODEL_FORMAT' // the file is not a GGUF, is truncated, or has metadata llama.cpp would abort on
  | 'E_CONTEXT_CREATE' // llama.cpp could not create a context (usually: not enough memory)
  | 'E_DECODE' // llama_decode failed inside llama.cpp
  | 'E_CONTEXT_FULL' // no free KV cells for the batch: remove tokens or use a larger context
  | 'E_TOKENIZE' // tokenization or detokenization failed
  | 'E_CHAT_TEMPLATE' // llama.cpp does not know the chat template
  | 'E_SAMPLE' // the sampler chain selected no token
  | 'E_SHIFT_UNSUPPORTED' // the model's memory cannot shift positions
  | 'E_TOKEN_INVALID' // a token id outside [0, vocab size)
  | 'E_POSITION_INVALID' // a position outside [0, context size)
  | 'E_SEQUENCE_INVALID' // a sequence id outside [0, sequences)
  | 'E_NO_LOGITS' // logits asked for an output that the last decode did not keep
  | 'E_STATE_LOAD' // a state file/buffer that llama.cpp cannot load into this context
  | 'E_STATE_SAVE' // writing state failed
  | 'E_CACHE_CORRUPT' // a cache entry failed its checksum, magic, version or length check
  | 'E_CACHE_MISMATCH' // a cache entry is from another model or an incompatible context
  | 'E_CACHE_NOT_FILE' // a cache entry's path names a FIFO, device, socket, directory or symlink: never opened, never deleted
  | 'E_DISPOSED' // the object was disposed
  | 'E_BUSY' // another operation holds the context and the caller asked not to wait
  | 'E_ABORTED' // an AbortSignal fired
  | 'E_QUANTIZE' // llama_model_quantize failed
  | 'E_SESSION_NOT_FOUND' // Session.resume of an id that has no transcript
  | 'E_SESSION_EXISTS' // Session.open of an id that already has one
  | 'E_SESSION_LOCKED' // the session is open in another (live) process
  | 'E_SESSION_CORRUPT' // a transcript damaged before its last record, or a session file that is a symlink or not a regular file
  | 'E_IO' // the file system refused a write or read (disk full, quota, file too large, I/O error); `cause` has the system error
  | 'E_NATIVE_UNAVAILABLE' // the native addon could not be loaded
  | 'E_NATIVE' // an unexpected failure inside the native layer (a bug: please report it)
  | 'E_RKLLM_UNAVAILABLE' // librkllmrt.so or one of its symbols is missing
  | 'E_RKLLM_CALL' // an RKLLM call returned an error
  | 'E_RKLLM_VERSION' // librkllmrt.so speaks another ABI than the declared runtimeVersion, or an unknown one
  | 'E_STORE_UNAVAILABLE' // a shared store (Redis) could not be reached or did not answer in time: the cache falls back to prefill
  | 'E_STORE_CLIENT_MISSING' // the optional client package a store needs (redis) is not installed
  | 'E_MEMORY_DRIVER_MISSING' // Memory's SQLite driver (the optional libsql package) is not installed for this platform
  | 'E_MEMORY_DB' // the memory database cannot be opened, is not one, is from a newer kvstash, or SQLite refused a read/write
  | 'E_MEMORY_EMBED'; // the embed function failed, returned vectors of the wrong count or dimension, or vector search has none

export class KvstashError extends Error {
  readonly code: KvstashErrorCode;
  /** The short cause, without the context the message adds (e.g. "its checksum does not match
   * its bytes"), when there is one. */
  readonly reason?: string;

  constructor(code: KvstashErrorCode, message: string, options?: { cause?: unknown; reason?: string }) {
    super(message, options);
    this.name = 'KvstashError';
    this.code = code;
    if (options?.reason !== undefined) this.reason = options.reason;
  }
}

export function isKvstashError(err: unknown, code?: KvstashErrorCode): err is KvstashError {
  return err instanceof KvstashError && (code === undefined || err.code === code);
}
