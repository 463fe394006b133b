#!/usr/bin/env node
// A long-running assistant that survives being killed. It works through a queue of messages
// (one per line in a file), and keeps the conversation in a durable Session: kill it at any
// moment, start it again with the same command, and it carries on where it stopped — every
// answered message stays answered, and the KV state comes back from a checkpoint.
//
//   node examples/background-assistant.js --model model.gguf --dir ./assistant --inbox inbox.txt
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { loadModel, PromptCache, Session } = require('kvstash');

function parseArgs(argv) {
  const args = { dir: './assistant', maxTokens: 16 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--model') args.model = argv[++i];
    else if (argv[i] === '--dir') args.dir = argv[++i];
    else if (argv[i] === '--inbox') args.inbox = argv[++i];
    else if (argv[i] === '--max-tokens') args.maxTokens = Number(argv[++i]);
  }
  if (!args.model || !args.inbox) {
    process.stderr.write('usage: background-assistant.js --model m.gguf --inbox messages.txt [--dir state-dir]\n');
    process.exit(2);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const model = await loadModel(args.model);
  const context = await model.createContext({ contextSize: 4096 });
  const cache = new PromptCache({ dir: path.join(args.dir, 'prompt-cache') });
  const options = {
    dir: args.dir,
    id: 'assistant',
    context,
    cache,
    // A checkpoint after every answer, and on SIGTERM/SIGINT: a restart restores instead of re-reading.
    checkpoint: { everyTurns: 1, onExit: true },
    overflow: { policy: 'drop-oldest' },
  };
  let session;
  try {
    session = await Session.resume(options);
    const r = session.resumeReport;
    process.stdout.write(`${JSON.stringify({ event: 'resumed', turns: session.history.length / 2, path: r.path, restoredTokens: r.restoredTokens, evaluatedTokens: r.evaluatedTokens, ms: Math.round(r.ms) })}\n`);
  } catch (err) {
    if (err.code !== 'E_SESSION_NOT_FOUND') throw err;
    session = await Session.open({ ...options, system: 'You are a patient background assistant. Answer each message briefly.' });
    process.stdout.write(`${JSON.stringify({ event: 'started' })}\n`);
  }
  const inbox = fs.readFileSync(args.inbox, 'utf8').split('\n').filter((line) => line.trim() !== '');
  // The transcript says how far the queue got: messages already answered are not asked again.
  for (let i = session.history.filter((m) => m.role === 'user').length; i < inbox.length; i++) {
    const result = await session.send(inbox[i], { maxTokens: args.maxTokens }).result;
    process.stdout.write(`${JSON.stringify({ event: 'answered', index: i, message: inbox[i], reply: result.text, cachedTokens: result.cachedTokens })}\n`);
  }
  process.stdout.write(`${JSON.stringify({ event: 'idle', turns: session.history.length / 2, stats: session.stats() })}\n`);
  await session.close();
  await model.dispose();
}

main().catch((err) => {
  process.stderr.write(`${err.code ?? 'error'}: ${err.message}\n`);
  process.exit(1);
});
