/**
 * POST /v1/chat/completions and POST /v1/completions: OpenAI's request shapes validated, turned
 * into one generation on a leased sequence, and OpenAI's response (or chunk stream) built from it.
 *
 * The prompt cache is automatic: generate() restores the longest cached prefix (the system/tools
 * template prefix is cached on first use), so `usage.prompt_tokens_details.cached_tokens` counts
 * what a request did not evaluate; the `kvstash` object adds where it came from and the timings.
 */
import { randomBytes } from 'node:crypto';
import { Generation, generate, preparePrompt, type FinishReason, type GenerateOptions } from '../generate/generate.js';
import type { ChatMessage, Model } from '../llama/model.js';
import type { SamplingOptions } from '../llama/sampler.js';
import type { RkllmModel, RkllmGenerateOptions } from '../rkllm/model.js';
import type { ConversationBackend } from '../session/backend.js';
import { conversationBackend } from '../session/backends.js';
import { ApiError, invalidField, rejectedArguments, type SseEvent } from './http.js';
import type { ServedModel } from './model-pool.js';

/** What one request asks the model for, in backend-neutral terms. */
export interface GenerationSpec {
  /** Raw prompt (completions), or the user's input with `system`/`messages`. */
  prompt?: string;
  messages?: ChatMessage[];
  system?: string;
  tools?: unknown;
  /** Default: what is left of the sequence's context. Unit: tokens. */
  maxTokens?: number;
  sampling: SamplingOptions;
  stop: string[];
}

/** How a finished generation went, in the figures the responses report. */
export interface RunResult {
  text: string;
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
  finishReason: 'stop' | 'length';
  /** Where the cached prefix came from: 'resident' | 'ram' | 'disk' | 'store' (llama.cpp), or the
   * RKLLM system-prompt cache use ('resident' | 'loaded' | 'created' | ...); null on a miss. */
  tier: string | null;
  restoreMs: number;
  ttftMs: number | null;
  totalMs: number;
}

export interface Run extends AsyncIterable<string> {
  readonly result: Promise<RunResult>;
}

/**
 * Starts a generation of `spec` on `sequence` of `served` (leased by the caller). Throws ApiError
 * 400 context_length_exceeded when the prompt (plus max tokens) cannot fit. Shared by every route
 * that generates, so both backends are handled in one place.
 */
export function startRun(served: ServedModel, sequence: number, spec: GenerationSpec, signal: AbortSignal): Run {
  if (served.kind === 'rkllm') return startRkllmRun(served.model as RkllmModel, spec, signal);
  const context = served.context!;
  const model = served.model as Model;
  // Rendered and tokenized once: generate() takes the tokens and where the cacheable prefix ends,
  // instead of rendering the messages again (about 0.8 ms of a 2,000-token system prompt).
  const prepared = preparePrompt(model, { prompt: spec.prompt, messages: spec.messages, system: spec.system, tools: spec.tools });
  const options: GenerateOptions = {
    prompt: prepared.tokens,
    prefixLength: prepared.prefixLength,
    cache: served.cache ?? undefined,
    sequence,
    sampling: spec.sampling,
    stop: spec.stop,
    signal,
  };
  const limit = context.info.sequenceContextSize;
  const promptTokens = prepared.tokens.length;
  if (promptTokens + (spec.maxTokens ?? 1) > limit) {
    throw new ApiError(
      400,
      `This model's maximum context length is ${limit} tokens. However, you requested ${promptTokens + (spec.maxTokens ?? 0)} tokens (${promptTokens} in the messages, ${spec.maxTokens ?? 0} in the completion). Please reduce the length of the messages or completion.`,
      { code: 'context_length_exceeded', param: 'messages', retryable: false },
    );
  }
  options.maxTokens = spec.maxTokens ?? limit - promptTokens;
  return runOf(generate(context, options));
}

/** A generation of the llama.cpp or conversation-backend path as a Run. */
function runOf(generation: Generation): Run {
  const result = generation.result.then(
    (r): RunResult => ({
      text: r.text,
      promptTokens: r.promptTokens,
      completionTokens: r.tokens.length,
      cachedTokens: r.cachedTokens,
      finishReason: finishReason(r.finishReason),
      tier: r.tier,
      restoreMs: r.restoreMs,
      ttftMs: r.ttftMs,
      totalMs: r.totalMs,
    }),
  );
  result.catch(() => undefined);
  return { result, [Symbol.asyncIterator]: () => generation[Symbol.asyncIterator]() };
}

function finishReason(reason: FinishReason): 'stop' | 'length' {
  return reason === 'length' ? 'length' : 'stop';
}

function startRkllmRun(model: RkllmModel, spec: GenerationSpec, signal: AbortSignal): Run {
  if (spec.stop.length > 0) throw invalidField('stop', 'stop sequences are not supported by RKLLM models');
  if (spec.tools !== undefined) throw invalidField('tools', 'tools are not supported by RKLLM models yet');
  // A conversation with earlier turns: the runtime templates one input per run, so it runs on the
  // backend RKLLM sessions use, which renders the turns itself.
  if (spec.messages !== undefined && spec.messages.length > 1) return startRkllmConversation(model, spec, signal);
  const options: RkllmGenerateOptions = { signal, system: spec.system };
  if (spec.messages) options.messages = spec.prompt === undefined ? spec.messages : [...spec.messages, { role: 'user', content: spec.prompt }];
  else options.prompt = spec.prompt;
  if (spec.maxTokens !== undefined) options.maxTokens = spec.maxTokens;
  const sampling = spec.sampling;
  if (sampling.temperature !== undefined || sampling.topP !== undefined || sampling.seed !== undefined) {
    if (model.runtime.version === '1.3.0') {
      options.sampling = {};
      if (sampling.temperature !== undefined) options.sampling.temperature = sampling.temperature;
      if (sampling.topP !== undefined) options.sampling.topP = sampling.topP;
    }
  }
  const generation = rejectedArguments(() => model.generate(options));
  const result = generation.result.then(
    (r): RunResult => ({
      text: r.text,
      // The runtime counts only what it prefilled; what its system-prompt cache held is not reported.
      promptTokens: r.prefillTokens,
      completionTokens: r.tokens.length,
      cachedTokens: 0,
      finishReason: r.finishReason === 'length' ? 'length' : 'stop',
      tier: r.systemPromptCache === 'resident' || r.systemPromptCache === 'loaded' ? r.systemPromptCache : null,
      restoreMs: 0,
      ttftMs: r.ttftMs,
      totalMs: r.totalMs,
    }),
  );
  result.catch(() => undefined);
  return { result, [Symbol.asyncIterator]: () => generation[Symbol.asyncIterator]() };
}

/**
 * The conversation backends of each RKLLM model, one per system prompt (least recently used go
 * first). Kept across requests because a backend knows what the runtime's history holds: a client
 * that sends its conversation again with one more turn, as chat clients do, has only that turn
 * prefilled, as long as no other conversation ran on the model in between (then the whole
 * conversation is prefilled from the system prompt's cache).
 */
const rkllmConversations = new WeakMap<RkllmModel, Map<string, ConversationBackend>>();
const RKLLM_CONVERSATIONS = 4;

function rkllmConversation(model: RkllmModel, system: string | undefined): ConversationBackend {
  let byPrompt = rkllmConversations.get(model);
  if (!byPrompt) rkllmConversations.set(model, (byPrompt = new Map()));
  const key = system ?? '';
  let backend = byPrompt.get(key);
  if (backend) byPrompt.delete(key);
  else backend = conversationBackend({ context: model }, system !== undefined ? { system } : {});
  byPrompt.set(key, backend);
  if (byPrompt.size > RKLLM_CONVERSATIONS) byPrompt.delete(byPrompt.keys().next().value!);
  return backend;
}

function startRkllmConversation(model: RkllmModel, spec: GenerationSpec, signal: AbortSignal): Run {
  const messages = spec.prompt === undefined ? spec.messages! : [...spec.messages!, { role: 'user' as const, content: spec.prompt }];
  const last = messages[messages.length - 1]!;
  if (last.role !== 'user' && last.role !== 'tool') throw invalidField('messages', 'the last message must be the user (or tool) input');
  const backend = rkllmConversation(model, spec.system);
  const reply = rkllmReplyOptions(model, backend, messages, spec.maxTokens, spec.sampling, 'messages');
  return runOf(new Generation((emit) => backend.reply(messages, { ...reply, signal }, emit)));
}

/**
 * What a reply of the RKLLM conversation backend to `messages` may do, checked before it queues:
 * the token limit (the runtime's own when not given; a RangeError of the backend becomes a 400),
 * room for it in the context (400 context_length_exceeded, on `param`), and per-request sampling,
 * which only runtime 1.3.0 takes (older ones keep the model's).
 */
export function rkllmReplyOptions(
  model: RkllmModel,
  backend: ConversationBackend,
  messages: readonly ChatMessage[],
  maxTokens: number | undefined,
  sampling: Pick<SamplingOptions, 'temperature' | 'topP'>,
  param: string,
): { maxTokens: number; sampling?: Pick<SamplingOptions, 'temperature' | 'topP'> } {
  const limit = rejectedArguments(() => backend.replyLimit(maxTokens));
  const needed = backend.measure(messages, true) + limit;
  if (needed > backend.capacity) {
    throw new ApiError(400, `This model's maximum context length is ${backend.capacity} tokens; the messages and the reply need up to ${needed} (bytes of the rendered text, an upper bound on its tokens).`, {
      code: 'context_length_exceeded',
      param,
      retryable: false,
    });
  }
  const { temperature, topP } = sampling;
  const given = model.runtime.version === '1.3.0' && (temperature !== undefined || topP !== undefined);
  return { maxTokens: limit, ...(given ? { sampling: { temperature, topP } } : {}) };
}

// ---------------------------------------------------------------------------------------------
// Request validation

type Body = Record<string, unknown>;

export function requireObject(body: unknown): Body {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(400, 'the body must be a JSON object', { code: 'invalid_json', retryable: false });
  return body as Body;
}

export function requireModel(body: Body): string {
  const model = body.model;
  if (typeof model !== 'string' || model === '') throw invalidField('model', "'model' must be the id of a model from GET /v1/models");
  return model;
}

function optionalNumber(body: Body, name: string, min: number, max: number, integer = false): number | undefined {
  const value = body[name];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    throw invalidField(name, `'${name}' must be ${integer ? 'an integer' : 'a number'} from ${min} to ${max}`);
  }
  return value;
}

function optionalBoolean(body: Body, name: string): boolean {
  const value = body[name];
  if (value === undefined || value === null) return false;
  if (typeof value !== 'boolean') throw invalidField(name, `'${name}' must be a boolean`);
  return value;
}

/** Sampling, limits and stop strings, common to both routes. `defaultMax` applies when neither
 * max_tokens nor max_completion_tokens is given. */
export function commonSpec(body: Body, defaultMax?: number): Pick<GenerationSpec, 'maxTokens' | 'sampling' | 'stop'> {
  optionalNumber(body, 'n', 1, 1, true); // one choice per request
  // Refused rather than ignored: a client that asks for these relies on them.
  if (body.logprobs === true) throw invalidField('logprobs', "'logprobs' is not supported");
  const format = (body.response_format as Body | null | undefined)?.type;
  if (format !== undefined && format !== 'text') throw invalidField('response_format', "only 'response_format': {\"type\": \"text\"} is supported");
  const maxTokens = optionalNumber(body, 'max_completion_tokens', 1, 2 ** 31 - 1, true) ?? optionalNumber(body, 'max_tokens', 1, 2 ** 31 - 1, true) ?? defaultMax;
  const temperature = optionalNumber(body, 'temperature', 0, 2);
  const topP = optionalNumber(body, 'top_p', 0, 1);
  const seed = optionalNumber(body, 'seed', -(2 ** 53), 2 ** 53, true);
  const sampling: SamplingOptions = {};
  // OpenAI's default temperature is 1; 0 is greedy.
  sampling.temperature = temperature ?? 1;
  if (topP !== undefined) sampling.topP = topP;
  if (seed !== undefined) sampling.seed = seed >>> 0;
  const stopValue = body.stop;
  let stop: string[] = [];
  if (typeof stopValue === 'string') stop = [stopValue];
  else if (Array.isArray(stopValue)) {
    if (stopValue.length > 4 || !stopValue.every((s) => typeof s === 'string')) throw invalidField('stop', "'stop' must be a string or an array of at most 4 strings");
    stop = stopValue as string[];
  } else if (stopValue !== undefined && stopValue !== null) throw invalidField('stop', "'stop' must be a string or an array of at most 4 strings");
  return { maxTokens, sampling, stop: stop.filter((s) => s !== '') };
}

function streamOptions(body: Body): { stream: boolean; includeUsage: boolean } {
  const stream = optionalBoolean(body, 'stream');
  const options = body.stream_options;
  if (options === undefined || options === null) return { stream, includeUsage: false };
  if (typeof options !== 'object' || Array.isArray(options)) throw invalidField('stream_options', "'stream_options' must be an object");
  if (!stream) throw invalidField('stream_options', "'stream_options' is only allowed with 'stream': true");
  const include = (options as Body).include_usage;
  if (include !== undefined && typeof include !== 'boolean') throw invalidField('stream_options.include_usage', "'stream_options.include_usage' must be a boolean");
  return { stream, includeUsage: include === true };
}

/** The text of a message's content: a string, or an array of text parts. */
function contentText(content: unknown, param: string): string {
  if (content === null || content === undefined) return '';
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content
      .map((part, i) => {
        if (typeof part !== 'object' || part === null || (part as Body).type !== 'text' || typeof (part as Body).text !== 'string') {
          throw invalidField(`${param}[${i}]`, 'only text content parts ({"type": "text", "text": ...}) are supported');
        }
        return (part as Body).text as string;
      })
      .join('');
  }
  throw invalidField(param, 'content must be a string or an array of text parts');
}

/** Tools as the Qwen/ChatML templates expect them: an assistant call is `<tool_call>{json}</tool_call>`. */
function renderToolCalls(calls: unknown, param: string): string {
  if (!Array.isArray(calls)) throw invalidField(param, "'tool_calls' must be an array");
  return calls
    .map((call, i) => {
      const fn = (call as Body | null)?.function as Body | undefined;
      if (typeof fn?.name !== 'string') throw invalidField(`${param}[${i}].function.name`, 'a tool call needs function.name');
      let args: unknown = fn.arguments ?? {};
      if (typeof args === 'string') {
        try {
          args = JSON.parse(args);
        } catch {
          // Kept as the text the client sent: the model sees what it was given.
        }
      }
      return `<tool_call>\n${JSON.stringify({ name: fn.name, arguments: args })}\n</tool_call>`;
    })
    .join('\n');
}

interface ChatRequest {
  model: string;
  spec: GenerationSpec;
  stream: boolean;
  includeUsage: boolean;
  hasTools: boolean;
}

export function parseChatRequest(raw: unknown, defaultSystem: string | undefined): ChatRequest {
  const body = requireObject(raw);
  const model = requireModel(body);
  if (!Array.isArray(body.messages) || body.messages.length === 0) throw invalidField('messages', "'messages' must be a non-empty array");
  const systemParts: string[] = [];
  const messages: ChatMessage[] = [];
  body.messages.forEach((m: unknown, i: number) => {
    const param = `messages[${i}]`;
    if (typeof m !== 'object' || m === null) throw invalidField(param, 'a message must be an object');
    const message = m as Body;
    const role = message.role;
    if (role === 'system' || role === 'developer') {
      // System turns before the conversation form the cached system prompt.
      if (messages.length > 0) throw invalidField(`${param}.role`, 'system messages must come before the conversation');
      systemParts.push(contentText(message.content, `${param}.content`));
    } else if (role === 'user' || role === 'tool') {
      messages.push({ role, content: contentText(message.content, `${param}.content`) });
    } else if (role === 'assistant') {
      const text = contentText(message.content, `${param}.content`);
      const calls = message.tool_calls === undefined || message.tool_calls === null ? '' : renderToolCalls(message.tool_calls, `${param}.tool_calls`);
      messages.push({ role, content: [text, calls].filter(Boolean).join('\n') });
    } else {
      throw invalidField(`${param}.role`, `unknown role ${JSON.stringify(role)}: use system, user, assistant or tool`);
    }
  });
  if (messages.length === 0) throw invalidField('messages', 'the messages need at least one user message');
  let tools: unknown;
  if (body.tools !== undefined && body.tools !== null) {
    if (!Array.isArray(body.tools)) throw invalidField('tools', "'tools' must be an array");
    body.tools.forEach((tool: unknown, i: number) => {
      const fn = (tool as Body | null)?.function as Body | undefined;
      if ((tool as Body | null)?.type !== 'function' || typeof fn?.name !== 'string') throw invalidField(`tools[${i}]`, 'a tool must be {"type": "function", "function": {"name", ...}}');
    });
    if (body.tools.length > 0 && body.tool_choice !== 'none') tools = body.tools;
  }
  const system = systemParts.length > 0 ? systemParts.join('\n\n') : defaultSystem;
  const { stream, includeUsage } = streamOptions(body);
  return { model, spec: { messages, system, tools, ...commonSpec(body) }, stream, includeUsage, hasTools: tools !== undefined };
}

interface CompletionRequest {
  model: string;
  spec: GenerationSpec;
  stream: boolean;
  includeUsage: boolean;
}

export function parseCompletionRequest(raw: unknown): CompletionRequest {
  const body = requireObject(raw);
  const model = requireModel(body);
  let prompt = body.prompt;
  if (Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === 'string') prompt = prompt[0];
  if (typeof prompt !== 'string' || prompt === '') throw invalidField('prompt', "'prompt' must be a non-empty string (one prompt per request)");
  const { stream, includeUsage } = streamOptions(body);
  // OpenAI's default for completions is 16 tokens.
  return { model, spec: { prompt, ...commonSpec(body, 16) }, stream, includeUsage };
}

// ---------------------------------------------------------------------------------------------
// Tool calls

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

const TOOL_CALL = /<tool_call>\s*([\s\S]*?)\s*<\/tool_call>/g;

/**
 * Qwen/ChatML tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the
 * text. Returns the calls and the text outside them (null when only calls); a block that is not
 * such JSON stays text, so nothing the model wrote is lost.
 */
export function parseToolCalls(text: string): { content: string | null; toolCalls: ToolCall[] } {
  const toolCalls: ToolCall[] = [];
  const content = text.replace(TOOL_CALL, (block, json: string) => {
    try {
      const call = JSON.parse(json) as Body;
      if (typeof call?.name !== 'string') return block;
      const args = call.arguments ?? call.parameters ?? {};
      toolCalls.push({ id: `call_${randomBytes(12).toString('hex')}`, type: 'function', function: { name: call.name, arguments: typeof args === 'string' ? args : JSON.stringify(args) } });
      return '';
    } catch {
      return block;
    }
  });
  const rest = content.trim();
  return { content: toolCalls.length > 0 && rest === '' ? null : toolCalls.length > 0 ? rest : text, toolCalls };
}

// ---------------------------------------------------------------------------------------------
// Responses

export function requestId(prefix: string): string {
  return `${prefix}-${randomBytes(12).toString('hex')}`;
}

export function usageOf(result: RunResult): object {
  return {
    prompt_tokens: result.promptTokens,
    completion_tokens: result.completionTokens,
    total_tokens: result.promptTokens + result.completionTokens,
    prompt_tokens_details: { cached_tokens: result.cachedTokens },
  };
}

/** kvstash's own figures: which cache tier served the prefix, how long restoring and the first token took. */
export function kvstashOf(result: RunResult): object {
  return { tier: result.tier, cachedTokens: result.cachedTokens, restoreMs: round(result.restoreMs), ttftMs: result.ttftMs === null ? null : round(result.ttftMs), totalMs: round(result.totalMs) };
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/** The whole chat completion, once the run has ended. */
export async function chatCompletion(run: Run, model: string, hasTools: boolean): Promise<{ body: object; result: RunResult }> {
  const id = requestId('chatcmpl');
  const created = Math.floor(Date.now() / 1000);
  const result = await run.result;
  const { content, toolCalls } = hasTools ? parseToolCalls(result.text) : { content: result.text, toolCalls: [] };
  const message: Body = { role: 'assistant', content, refusal: null };
  if (toolCalls.length > 0) message.tool_calls = toolCalls;
  const body = {
    id,
    object: 'chat.completion',
    created,
    model,
    system_fingerprint: null,
    choices: [{ index: 0, message, logprobs: null, finish_reason: toolCalls.length > 0 ? 'tool_calls' : result.finishReason }],
    usage: usageOf(result),
    kvstash: kvstashOf(result),
  };
  return { body, result };
}

/**
 * Chat completion chunks. With tools, text that may be the start of a `<tool_call>` is held back
 * until it is known: a call goes out as one tool_calls delta, anything else as content.
 */
export async function* chatChunks(run: Run, model: string, hasTools: boolean, includeUsage: boolean, done: (result: RunResult) => void): AsyncGenerator<SseEvent> {
  const id = requestId('chatcmpl');
  const created = Math.floor(Date.now() / 1000);
  const chunk = (delta: Body, finish: string | null, extra: Body = {}): SseEvent => ({
    data: { id, object: 'chat.completion.chunk', created, model, system_fingerprint: null, choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...extra },
  });
  yield chunk({ role: 'assistant', content: '' }, null);
  let held = '';
  let holding = hasTools;
  for await (const text of run) {
    if (holding) {
      held += text;
      const start = held.trimStart();
      if ('<tool_call>'.startsWith(start) || start.startsWith('<tool_call>')) continue;
      holding = false;
      yield chunk({ content: held }, null);
      held = '';
      continue;
    }
    yield chunk({ content: text }, null);
  }
  const result = await run.result;
  done(result);
  let finish: string = result.finishReason;
  if (held !== '') {
    const { content, toolCalls } = parseToolCalls(held);
    if (toolCalls.length > 0) {
      finish = 'tool_calls';
      yield chunk({ tool_calls: toolCalls.map((call, index) => ({ index, ...call })) }, null);
    }
    if (content) yield chunk({ content }, null);
  }
  yield chunk({}, finish);
  if (includeUsage) yield { data: { id, object: 'chat.completion.chunk', created, model, system_fingerprint: null, choices: [], usage: usageOf(result), kvstash: kvstashOf(result) } };
}

export async function textCompletion(run: Run, model: string): Promise<{ body: object; result: RunResult }> {
  const id = requestId('cmpl');
  const created = Math.floor(Date.now() / 1000);
  const result = await run.result;
  const body = {
    id,
    object: 'text_completion',
    created,
    model,
    system_fingerprint: null,
    choices: [{ index: 0, text: result.text, logprobs: null, finish_reason: result.finishReason }],
    usage: usageOf(result),
    kvstash: kvstashOf(result),
  };
  return { body, result };
}

export async function* textChunks(run: Run, model: string, includeUsage: boolean, done: (result: RunResult) => void): AsyncGenerator<SseEvent> {
  const id = requestId('cmpl');
  const created = Math.floor(Date.now() / 1000);
  const chunk = (text: string, finish: string | null): SseEvent => ({ data: { id, object: 'text_completion', created, model, system_fingerprint: null, choices: [{ index: 0, text, logprobs: null, finish_reason: finish }] } });
  for await (const text of run) yield chunk(text, null);
  const result = await run.result;
  done(result);
  yield chunk('', result.finishReason);
  if (includeUsage) yield { data: { id, object: 'text_completion', created, model, system_fingerprint: null, choices: [], usage: usageOf(result), kvstash: kvstashOf(result) } };
}
