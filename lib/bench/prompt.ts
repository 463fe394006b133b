/**
 * The benchmark's prompts, as tokens of exact lengths: a system turn of `prefixTokens` (the cached
 * template) and user turns of `suffixTokens` each (the new part). Exact lengths keep every row
 * comparable across models and runs; the text is the demo's support-assistant prompt.
 */
import type { Model } from '../llama/model.js';
import { buildDemoPrompt, DEMO_QUESTIONS } from '../tools/demo-prompt.js';

export interface BenchPrompt {
  /** The rendered system turn, cut to the requested length. */
  prefix: Int32Array;
  /** Distinct user turns (with the assistant header), each of the requested length, continuing the prefix. */
  suffixes: Int32Array[];
}

const SENTINEL = '\u0000kvstash-bench\u0000';

/**
 * Tokens of one chat turn of exactly `length` tokens: the template's head and tail around `body`,
 * with the body cut (or the whole turn, when head and tail alone are too long) to fit.
 */
function turn(model: Model, role: string, body: string, length: number, options: { first: boolean; addAssistant: boolean }): Int32Array {
  // A user turn is rendered after a system turn and cut off it: some templates add a default system
  // turn to a conversation that has none.
  const system = { role: 'system', content: 'S' };
  const before = options.first ? '' : model.applyChatTemplate([system], { addAssistant: false });
  const full = model.applyChatTemplate(options.first ? [{ role, content: SENTINEL }] : [system, { role, content: SENTINEL }], { addAssistant: options.addAssistant });
  const rendered = full.startsWith(before) ? full.slice(before.length) : full;
  const at = rendered.indexOf(SENTINEL);
  const head = model.tokenize(rendered.slice(0, at), { special: true, addSpecial: options.first });
  const tail = model.tokenize(rendered.slice(at + SENTINEL.length), { special: true, addSpecial: false });
  const text = model.tokenize(body, { addSpecial: false });
  const room = length - head.length - tail.length;
  if (room <= 0) return Int32Array.from([...head, ...tail]).slice(0, length);
  if (text.length < room) throw new RangeError(`the benchmark text has ${text.length} tokens, ${room} are needed`);
  return Int32Array.from([...head, ...text.subarray(0, room), ...tail]);
}

export function buildBenchPrompt(model: Model, prefixTokens: number, suffixTokens: number, suffixCount: number): BenchPrompt {
  // The demo's system text, a little longer than needed so the cut lands inside it.
  const system = buildDemoPrompt(model, prefixTokens + 64).system;
  const prefix = turn(model, 'system', system, prefixTokens, { first: true, addAssistant: false });
  const suffixes: Int32Array[] = [];
  for (let i = 0; i < suffixCount; i++) {
    // Each suffix opens with another question, so no two share more than the turn's header.
    let body = `Ticket ${1000 + i}. `;
    for (let q = 0; model.tokenize(body, { addSpecial: false }).length < suffixTokens; q++) body += `${DEMO_QUESTIONS[(i + q) % DEMO_QUESTIONS.length]} `;
    suffixes.push(turn(model, 'user', body, suffixTokens, { first: false, addAssistant: true }));
  }
  return { prefix, suffixes };
}
