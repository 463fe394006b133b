/**
 * "A thing a conversation runs on": what a Session (and the server and memory layers built on it)
 * needs from a backend, as one interface. A llama.cpp context sequence (LlamaSequenceBackend) and
 * an RKLLM model on the NPU (RkllmConversationBackend) implement it; conversationBackend() is the
 * one place that looks at which one it was given, so no code above it branches on the backend.
 *
 * The backend owns everything about the model's state: how messages are rendered and measured,
 * what its KV cache holds, how the held conversation is made to match a transcript, generation,
 * and checkpoints (one kvstash cache entry each). The session owns the transcript (the journal),
 * the overflow policy, when to checkpoint, and the checkpoint files' rotation.
 *
 * Units: `capacity`, `measure()` and the counts returned are the backend's units of context —
 * tokens for llama.cpp; for RKLLM, whose runtime gives kvstash no tokenizer, UTF-8 bytes of the
 * rendered text (an upper bound on its tokens).
 */
import type { GenerationResult } from '../generate/generate.js';
import type { ChatMessage } from '../llama/model.js';
import type { SamplingOptions } from '../llama/sampler.js';

export type OverflowPolicy = 'drop-oldest' | 'summarize' | 'shift';

/** How the conversation is framed; fixed when the session opens (its journal's first record). */
export interface ConversationSetup {
  system?: string;
  tools?: unknown;
  /** Chat template (text or built-in name) instead of the model's. llama.cpp only. */
  template?: string;
}

/** What one reply may do. */
export interface ReplyOptions {
  /** Most tokens to generate; undefined: the backend's default (256 for llama.cpp, the RKLLM model's
   * maxNewTokens). Unit: tokens. */
  maxTokens?: number;
  /** Default greedy. */
  sampling?: SamplingOptions;
  stop?: readonly string[];
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

/** A checkpoint as written: its entry file, its size in the backend's units and in bytes. */
export interface WrittenCheckpoint {
  path: string;
  tokens: number;
  bytes: number;
}

export interface ConversationBackend {
  /** Context the conversation may fill (system prefix, messages and the reply). */
  readonly capacity: number;
  /** What the overflow policy `policy` becomes here: the same, or a stand-in (llama.cpp without
   * position shifting applies 'drop-oldest' for 'shift'). Throws a coded KvstashError when the
   * policy cannot hold on this backend at all. Called once, before the session opens. */
  effectivePolicy(policy: OverflowPolicy): OverflowPolicy;
  /** The size of the system prefix followed by `messages` (and the assistant's header with
   * `addAssistant`). Without `withPrefix`, of `messages` alone. */
  measure(messages: readonly ChatMessage[], addAssistant: boolean, withPrefix?: boolean): number;
  /** Resolves the reply's default token limit and validates a given one (RangeError). */
  replyLimit(maxTokens: number | undefined): number;
  /** Makes the backend hold the system prefix and `messages` (the session's window). Resolves
   * with what came from a cache (prompt cache, loaded checkpoint) and what was evaluated for it
   * (or, where the backend defers the prefill to the next reply, what will be). */
  catchUp(messages: readonly ChatMessage[]): Promise<{ restored: number; evaluated: number }>;
  /** Generates the reply to `messages` (the window with the user's message last), streaming its
   * text through `emit`. Afterwards the backend knows what it holds, even on failure. */
  reply(messages: readonly ChatMessage[], options: ReplyOptions, emit: (chunk: string) => void): Promise<GenerationResult>;
  /** Removes the oldest `count` messages of `messages` from what the backend holds by shifting
   * the rest down instead of evaluating them again (only called when effectivePolicy kept 'shift'). */
  shiftOut(messages: readonly ChatMessage[], count: number): Promise<void>;
  /** Asks the model for a summary of `messages`. What the backend held is gone afterwards (the next
   * catchUp rebuilds it). */
  summarize(messages: readonly ChatMessage[]): Promise<string>;
  /** Writes a checkpoint of the system prefix and `messages` (what the backend holds after catchUp)
   * as one atomic, verified entry in `dir` (named `<stamp>-<key>.kvstash`, or `<key>.kvstash` when
   * the backend's checkpoints follow the cache directories' naming contract). */
  writeCheckpoint(dir: string, stamp: string, label: string, messages: readonly ChatMessage[]): Promise<WrittenCheckpoint>;
  /** Loads the checkpoint entry `file` when it is intact, was made by this model and backend, and
   * holds a prefix of `messages` (the transcript's window); resolves with its size. Rejects with
   * the reason it cannot be used, leaving the backend as it was. */
  restoreCheckpoint(file: string, messages: readonly ChatMessage[]): Promise<number>;
  /** Orders checkpoint files (given sorted by name, descending) newest first. */
  newestFirst<F extends { file: string; regular: boolean }>(files: F[]): Promise<F[]>;
  /** Forgets what the backend holds (the next catchUp starts from the prompt cache). */
  forget(): void;
  /** The transcript's messages that make up the system prefix. */
  systemMessages(): ChatMessage[];
}

/** What checkpoint entry files are called: stamp first, so names sort by age. */
export function checkpointFileName(stamp: string, key: string): string {
  return `${stamp}-${key.slice(0, 8)}.kvstash`;
}

/** The system message that system prompt and tools make (none without either). */
export function setupSystemMessages(setup: ConversationSetup): ChatMessage[] {
  const { system, tools } = setup;
  if (system === undefined && tools === undefined) return [];
  const toolText = tools === undefined ? '' : `${system ? '\n\n' : ''}# Tools\n\n${typeof tools === 'string' ? tools : JSON.stringify(tools, null, 2)}`;
  return [{ role: 'system', content: `${system ?? ''}${toolText}` }];
}
