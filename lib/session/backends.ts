/**
 * The one place that looks at what a session was given to run on, and picks the
 * ConversationBackend for it. Everything else talks to the interface.
 */
import { PromptCache } from '../cache/prompt-cache.js';
import type { Context } from '../llama/context.js';
import { RkllmModel } from '../rkllm/model.js';
import type { ConversationBackend, ConversationSetup, OverflowPolicy } from './backend.js';
import { LlamaSequenceBackend } from './llama-backend.js';
import { RkllmConversationBackend } from './rkllm-backend.js';

export interface BackendOptions {
  context: Context | RkllmModel;
  cache?: PromptCache;
  sequence?: number;
  overflow?: { policy?: OverflowPolicy };
}

/**
 * The backend for `options.context`: an RkllmModel runs the conversation on the NPU, anything else
 * is taken for a llama.cpp Context. Throws what the backend refuses of the options (a coded
 * KvstashError for an overflow policy that cannot hold on it) before the session writes anything.
 */
export function conversationBackend(options: BackendOptions, setup: ConversationSetup): ConversationBackend {
  const { context } = options;
  const backend: ConversationBackend =
    context instanceof RkllmModel
      ? new RkllmConversationBackend(context, setup, options)
      : new LlamaSequenceBackend(context, setup, options.cache ?? new PromptCache({ dir: null }), options.sequence ?? 0);
  backend.effectivePolicy(options.overflow?.policy ?? 'drop-oldest');
  return backend;
}
