// A scripted conversation for the crash tests and scripts/session-stress.js, run as a child
// process on the compiled package (dist/, built by `npm test`'s pretest step): it opens or resumes
// session `chat` in `dir` and sends the scripted user messages the transcript does not hold yet,
// printing `ready` once the session is open and `done <n>` after each completed send().
// With `probe` set (the uninterrupted reference run), it also writes what the sequence holds after
// each turn as probe logits to <dir>/probe-<n>.f32 (test/helpers/probe.ts's probe: next-token
// logits of ' cache' decoded after the sequence's last cell, which is removed again).
// Usage: node session-child.js <script.json>
// script.json: {model, dir, system, messages: string[], context: {...}, send: {...}, probe?: true}
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { loadModel, PromptCache, Session } = require(path.join(__dirname, '..', '..', 'dist', 'index.js'));

async function main(scriptPath) {
  const script = JSON.parse(fs.readFileSync(scriptPath, 'utf8'));
  const model = await loadModel(script.model);
  const context = await model.createContext(script.context);
  const cache = new PromptCache({ dir: path.join(script.dir, 'cache') });
  const options = { dir: script.dir, id: 'chat', context, cache, checkpoint: { everyTurns: 1 } };
  let session;
  try {
    session = await Session.resume(options);
  } catch (err) {
    if (err.code !== 'E_SESSION_NOT_FOUND') throw err;
    session = await Session.open({ ...options, system: script.system });
  }
  process.stdout.write('ready\n');
  for (let turn = session.history.length / 2; turn < script.messages.length; turn++) {
    await session.send(script.messages[turn], script.send).result;
    if (script.probe) fs.writeFileSync(path.join(script.dir, `probe-${turn + 1}.f32`), await probeLogits(model, context));
    process.stdout.write(`done ${turn + 1}\n`);
  }
  await session.close();
  await model.dispose();
}

async function probeLogits(model, context) {
  const end = (await context.exclusive(() => context.memory.range(0))).max + 1;
  await context.decode(model.tokenize(' cache', { addSpecial: false }), { start: end });
  const logits = context.logits();
  await context.exclusive(() => context.memory.remove(0, end));
  return Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength);
}

main(process.argv[2]).catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
