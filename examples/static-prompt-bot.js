#!/usr/bin/env node
// A bot with a large static system prompt, evaluated once into a state file in a fixed directory.
// Every request then restores that file and evaluates only what changes (a running summary, the
// tool results so far, the user's message) at the position right after the system prompt. When
// the file is missing, damaged, or was made for another system prompt or another model (even one
// of the same shape), it falls back to a full prefill and writes a new one: the file is a kvstash
// entry, which records the model's fingerprint and is checksummed, unlike a raw llama.cpp state.
//
//   node examples/static-prompt-bot.js --model model.gguf --state ./bot-state "Weather in Oslo?"
//
// Prints one JSON line per request: the reply and how the system prompt was obtained.
'use strict';

const { loadModel, PromptCache } = require('kvstash');

const SYSTEM_PROMPT = [
  'You are WeatherBot, a terse assistant for travellers.',
  'Rules: answer in one sentence; quote temperatures in Celsius; never invent data;',
  'call the weather tool for every city you are asked about; refuse unrelated questions.',
  ...Array.from({ length: 40 }, (_, i) => `Policy ${i + 1}: keep answers short, factual and polite; cite the tool's data.`),
].join('\n');

function parseArgs(argv) {
  const args = { model: undefined, state: './bot-state', summary: '', tools: [], messages: [], maxTokens: 24 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--model') args.model = argv[++i];
    else if (arg === '--state') args.state = argv[++i];
    else if (arg === '--summary') args.summary = argv[++i];
    else if (arg === '--tool') args.tools.push(argv[++i]);
    else if (arg === '--max-tokens') args.maxTokens = Number(argv[++i]);
    else args.messages.push(arg);
  }
  if (!args.model || args.messages.length === 0) {
    process.stderr.write('usage: static-prompt-bot.js --model m.gguf [--state file] [--summary text] [--tool result]... "message"...\n');
    process.exit(2);
  }
  return args;
}

/** The system prompt's tokens in sequence 0: restored from the state directory, or evaluated and saved. */
async function systemPrompt(context, prefix, stateDir) {
  const cache = new PromptCache({ dir: stateDir, maxRamBytes: 0 });
  const problems = [];
  cache.on('problem', (problem) => problems.push(`${problem.code}: ${problem.message}`));
  const started = performance.now();
  const restored = await cache.restore(context, prefix, { sequence: 0 });
  if (restored.cachedTokens === prefix.length) {
    return { source: 'state file', ms: performance.now() - started, problems };
  }
  // Missing, stale (another prompt or model) or damaged: evaluate what is not there, and save it.
  await context.decode(prefix.subarray(restored.cachedTokens), { sequence: 0, start: restored.cachedTokens, logits: 'none' });
  await cache.save(context, prefix, { sequence: 0, label: 'system prompt' });
  await cache.flush();
  return { source: 'full prefill', ms: performance.now() - started, problems };
}

async function answer(model, context, prefix, request, maxTokens) {
  // The dynamic part: summary + tool history + the user's message, rendered by the chat template
  // after the system turn and evaluated at position prefix.length.
  const messages = [{ role: 'system', content: SYSTEM_PROMPT }];
  if (request.summary) messages.push({ role: 'system', content: `Conversation so far: ${request.summary}` });
  for (const tool of request.tools) messages.push({ role: 'tool', content: tool });
  messages.push({ role: 'user', content: request.message });
  const full = model.applyChatTemplate(messages);
  const systemText = model.applyChatTemplate(messages.slice(0, 1), { addAssistant: false });
  const dynamic = model.tokenize(full.slice(systemText.length), { special: true });

  await context.decode(dynamic, { sequence: 0, start: prefix.length });
  const sampler = model.createSampler({ temperature: 0 });
  const reply = [];
  for (let position = prefix.length + dynamic.length; reply.length < maxTokens; position++) {
    const token = sampler.sample(context);
    if (model.isEndOfGeneration(token)) break;
    reply.push(token);
    await context.decode([token], { sequence: 0, start: position });
  }
  sampler.dispose();
  // Back to the system prompt alone for the next request.
  await context.exclusive(() => context.memory.remove(0, prefix.length));
  return { text: model.detokenize(reply), tokens: reply, evaluated: dynamic.length };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const model = await loadModel(args.model);
  const context = await model.createContext({ contextSize: 4096 });
  const systemText = model.applyChatTemplate([{ role: 'system', content: SYSTEM_PROMPT }], { addAssistant: false });
  const prefix = model.tokenize(systemText, { special: true });
  const system = await systemPrompt(context, prefix, args.state);
  for (const message of args.messages) {
    const reply = await answer(model, context, prefix, { summary: args.summary, tools: args.tools, message }, args.maxTokens);
    process.stdout.write(`${JSON.stringify({ message, reply: reply.text, tokens: reply.tokens, systemTokens: prefix.length, evaluated: reply.evaluated, system })}\n`);
  }
  await model.dispose();
}

main().catch((err) => {
  process.stderr.write(`${err.code ?? 'error'}: ${err.message}\n`);
  process.exit(1);
});
