/**
 * The tokens of a conversation as the server's stored chains and named caches keep them.
 *
 * A conversation that is continued later must have tokens that only grow: the tokens of a
 * conversation are a prefix of the tokens of any conversation that extends it, so the KV state
 * saved after one turn is exactly the start of the next turn's prompt. Rendering the whole
 * conversation with the chat template and tokenizing it in one piece does not promise that (a
 * tokenizer may merge across a message boundary differently once more text follows), so each
 * message is rendered as the template's increment over the messages before it and tokenized on
 * its own: the rule Session follows for its sequence (lib/session/session.ts), here for
 * conversations that branch and that no single Session owns. The system prefix is tokenized as
 * generate()'s preparePrompt() does, so it is the very entry generate() caches for that system
 * prompt.
 */
import type { ChatMessage, Model } from '../llama/model.js';

export interface ConversationTokens {
  tokens: Int32Array;
  /** Tokens of the system message (0 without one): the prefix shared with other conversations. */
  prefixLength: number;
}

/**
 * `messages` (a leading system message is the prefix) rendered incrementally and tokenized piece
 * by piece; with `addAssistant`, followed by the template's assistant header.
 */
export function conversationTokens(model: Model, messages: readonly ChatMessage[], options: { addAssistant: boolean; template?: string }): ConversationTokens {
  const render = (list: readonly ChatMessage[], addAssistant: boolean) =>
    model.applyChatTemplate(list, { addAssistant, ...(options.template !== undefined ? { template: options.template } : {}) });
  const hasSystem = messages[0]?.role === 'system';
  const parts: Int32Array[] = [];
  let rendered = '';
  let prefixLength = 0;
  let first = true;
  const piece = (text: string) => {
    // The model's BOS (if it adds one) starts the conversation, never a later piece.
    parts.push(model.tokenize(text, { special: true, addSpecial: first ? undefined : false }));
    first = false;
  };
  for (let i = 0; i < messages.length; i++) {
    const next = render(messages.slice(0, i + 1), false);
    // A template that rewrites earlier messages once more follow cannot be split: one piece.
    if (!next.startsWith(rendered)) return whole(model, messages, options.addAssistant, render);
    piece(next.slice(rendered.length));
    rendered = next;
    if (i === 0 && hasSystem) prefixLength = parts[0]!.length;
  }
  if (options.addAssistant) {
    const withHeader = render(messages, true);
    if (!withHeader.startsWith(rendered)) return whole(model, messages, true, render);
    piece(withHeader.slice(rendered.length));
  }
  return { tokens: Int32Array.from(parts.flatMap((part) => Array.from(part))), prefixLength };
}

function whole(model: Model, messages: readonly ChatMessage[], addAssistant: boolean, render: (list: readonly ChatMessage[], addAssistant: boolean) => string): ConversationTokens {
  return { tokens: model.tokenize(render(messages, addAssistant), { special: true }), prefixLength: 0 };
}
