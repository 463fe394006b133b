// A scripted conversation on an RKLLM model (the fake runtime) for test/session-rkllm-crash.test.ts,
// run as a child process on the compiled package (dist/): it opens or resumes session `chat` in
// `dir` and sends the scripted user messages the transcript does not hold yet, printing `ready`
// once the session is open and `done <n>` after each completed send().
// Usage: node session-rkllm-child.js <script.json>
// script.json: {model, libraryPath, cacheDir, dir, system, messages: string[], maxContextLen}
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { loadRkllmModel, Session } = require(path.join(__dirname, '..', '..', 'dist', 'index.js'));

async function main(scriptPath) {
  const script = JSON.parse(fs.readFileSync(scriptPath, 'utf8'));
  const model = await loadRkllmModel(script.model, {
    libraryPath: script.libraryPath,
    cacheDir: script.cacheDir,
    maxContextLen: script.maxContextLen,
    maxNewTokens: 6,
  });
  const options = { dir: script.dir, id: 'chat', context: model, checkpoint: { everyTurns: 1, everySeconds: 0, keep: 2 } };
  let session;
  try {
    session = await Session.resume(options);
  } catch (err) {
    if (err.code !== 'E_SESSION_NOT_FOUND') throw err;
    session = await Session.open({ ...options, system: script.system });
  }
  process.stdout.write('ready\n');
  for (let turn = session.history.length / 2; turn < script.messages.length; turn++) {
    await session.send(script.messages[turn]).result;
    process.stdout.write(`done ${turn + 1}\n`);
  }
  await session.close();
  await model.dispose();
}

main(process.argv[2]).catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
