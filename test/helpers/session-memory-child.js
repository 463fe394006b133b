// The child of test/session-memory-crash.test.ts, run on the compiled package (dist/, built by
// `npm test`'s pretest step) as helpers/session-child.js is: it opens or resumes session `chat` in
// `dir` with a Memory on `db` and sends the scripted messages the transcript does not hold yet,
// printing `ready` once the session is open and `done <n>` after each completed send().
//
// The memory's embed function is where the kill lands. Retrieval is keyword-only, so the only
// texts embedded are a finished turn's, by Memory.addMany while it archives the turn: after the
// session appended the turn to its journal and before the archive's write transaction. The embed
// function prints `archiving <turn>` and then takes `embedMs` (a real embedding model's time; it
// widens the window random kills can hit), or, for the turn `pauseAtTurn`, waits for the kill.
// Its vectors are the texts' lengths (this test searches by keyword; the archive only needs some).
// Usage: node session-memory-child.js <script.json>
// script.json: {model, dir, db, system, messages: string[], context, send, embedMs, pauseAtTurn?}
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { loadModel, Memory, PromptCache, Session } = require(path.join(__dirname, '..', '..', 'dist', 'index.js'));

async function main(scriptPath) {
  const script = JSON.parse(fs.readFileSync(scriptPath, 'utf8'));
  const model = await loadModel(script.model);
  const context = await model.createContext(script.context);
  const embed = async (texts) => {
    const turn = script.messages.indexOf(texts[0]);
    process.stdout.write(`archiving ${turn}\n`);
    await new Promise((resolve) => setTimeout(resolve, turn === script.pauseAtTurn ? 60_000 : script.embedMs));
    return texts.map((text) => Float32Array.of(text.length, 1));
  };
  const memory = await Memory.open({ path: script.db, embed });
  const options = { dir: script.dir, id: 'chat', context, cache: new PromptCache({ dir: null }), memory: { memory, recall: { mode: 'keyword' } } };
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
    process.stdout.write(`done ${turn + 1}\n`);
  }
  await session.close();
  await memory.close();
  await context.dispose();
  await model.dispose();
}

main(process.argv[2]).catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
