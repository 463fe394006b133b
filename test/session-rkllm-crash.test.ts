// Crash and resume on an RKLLM model (the fake runtime): a child process runs a scripted
// conversation (a checkpoint after every turn) and is SIGKILLed at random moments; in every third
// trial the newest checkpoint is then damaged on disk. Every resume keeps every turn whose send()
// had completed, skips exactly the damaged checkpoint (E_CACHE_CORRUPT), hands the runtime only an
// intact one — the newest intact — and the next turn prefills exactly what follows it.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { readEntryFile, readVerifiedEntry } from '../lib/cache/entry.js';
import { CHATML_TEMPLATE, loadRkllmModel, Session } from '../lib/index.js';
import { FakeLog, fakeModelFile, fakeRuntimeLibrary } from './helpers/fake-rkllm.js';
import { runChild } from './helpers/session-script.js';

const TURNS = 8;
// Under emulation 10 trials: the journal's and the entries' crash safety is JS, proven natively by 30+.
const TRIALS = Number(process.env.KVSTASH_CRASH_TRIALS ?? (process.env.KVSTASH_EMULATED === '1' ? 10 : 36));
const CHILD = path.join(__dirname, 'helpers', 'session-rkllm-child.js');
const SYSTEM = 'You are the assistant of a Rockchip board. Keep answers short and exact.';
const MESSAGES = Array.from({ length: TURNS }, (_, i) => `Turn ${i}: how do I configure item ${i * 13} of the NPU runtime?`);
const MAX_CONTEXT = 4096;

const root = t.testdir();
// The fake's prefill is a sleep per token: shorter, so that trials are quick, but long enough
// that a checkpoint's run (a whole window) is a window a kill can land in.
process.env.FAKE_RKLLM_PREFILL_US = '100';
const log = new FakeLog(path.join(root, 'fake-calls.jsonl'));
const modelPath = fakeModelFile(root, 'qwen-fake');
const libraryPath = fakeRuntimeLibrary('1.3.0');
const sys = CHATML_TEMPLATE.system.replace('{system}', SYSTEM);
const bytes = (text: string): number => Buffer.byteLength(text);

function writeScript(dir: string): string {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'script.json');
  fs.writeFileSync(file, JSON.stringify({ model: modelPath, libraryPath, cacheDir: path.join(dir, 'cache'), dir, system: SYSTEM, messages: MESSAGES, maxContextLen: MAX_CONTEXT }));
  return file;
}

/** The session's checkpoint entries, newest first (their stamps order them). */
async function checkpointsNewestFirst(dir: string): Promise<Array<{ file: string; stamp: string; conversationBytes: number }>> {
  const folder = path.join(dir, 'chat', 'checkpoints');
  if (!fs.existsSync(folder)) return [];
  const names = fs.readdirSync(folder).filter((n) => n.endsWith('.kvstash') && !n.startsWith('.'));
  const entries = await Promise.all(
    names.map(async (n) => {
      const header = (await readEntryFile(path.join(folder, n))).header;
      return { file: path.join(folder, n), stamp: header.layout.checkpointStamp!, conversationBytes: Number(header.layout.conversationBytes) };
    }),
  );
  return entries.sort((a, b) => (a.stamp < b.stamp ? 1 : -1));
}

t.test(`${TRIALS} SIGKILLs at random moments, a damaged newest checkpoint in every third`, async (t) => {
  const { conversationMs } = await runChild(writeScript(path.join(root, 'reference')), undefined, CHILD);
  const reference = await loadRkllmModel(modelPath, { libraryPath, cacheDir: path.join(root, 'reference', 'cache'), maxContextLen: MAX_CONTEXT, maxNewTokens: 6 });
  const referenceSession = await Session.resume({ dir: path.join(root, 'reference'), id: 'chat', context: reference });
  const expected = referenceSession.history.map((m) => m.content);
  t.same(expected.filter((_, i) => i % 2 === 0), MESSAGES, 'the uninterrupted run holds every turn');
  await referenceSession.close();
  await reference.dispose();

  let random = 4242;
  const nextRandom = () => (random = (random * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const paths: Record<string, number> = {};
  let damagedTrials = 0;
  let midTurnKills = 0;
  for (let trial = 0; trial < TRIALS; trial++) {
    const dir = path.join(root, `trial-${trial}`);
    const killAfter = Math.floor(nextRandom() * conversationMs);
    const { done } = await runChild(writeScript(dir), killAfter, CHILD);

    const before = await checkpointsNewestFirst(dir);
    let damaged: string | undefined;
    if (trial % 3 === 2 && before.length > 0) {
      damaged = before[0]!.file;
      const data = fs.readFileSync(damaged);
      data[data.length >> 1] ^= 0x5a;
      fs.writeFileSync(damaged, data);
      damagedTrials++;
    }
    const intact = before.filter((c) => c.file !== damaged);

    const model = await loadRkllmModel(modelPath, { libraryPath, cacheDir: path.join(dir, 'cache'), maxContextLen: MAX_CONTEXT, maxNewTokens: 6 });
    log.clear();
    const session = await Session.resume({ dir, id: 'chat', context: model });
    const report = session.resumeReport!;
    paths[report.path] = (paths[report.path] ?? 0) + 1;
    const turns = session.history.length / 2;
    if (turns > done) midTurnKills++;
    t.ok(turns >= done, `trial ${trial}, killed after ${killAfter} ms: ${turns} turns kept, ${done} reported done; resumed by ${report.path}`);
    t.same(session.history.map((m) => m.content), expected.slice(0, turns * 2), `trial ${trial}: the transcript is the uninterrupted one`);
    t.same(
      report.skippedCheckpoints.map((s) => [s.path, s.code]),
      damaged ? [[damaged, 'E_CACHE_CORRUPT']] : [],
      `trial ${trial}: ${damaged ? 'exactly the damaged checkpoint was skipped, as corrupt' : 'no checkpoint skipped (entries are written atomically)'}`,
    );
    // What reached the runtime: the newest intact checkpoint, verified, or the system prompt's cache.
    const loads = log.calls('rkllm_load_prompt_cache').map((c) => c.tokens);
    if (intact.length > 0) {
      await readVerifiedEntry(intact[0]!.file); // rejects if it is not intact
      t.match(report, { path: 'checkpoint', restoredTokens: intact[0]!.conversationBytes }, `trial ${trial}: the newest intact checkpoint`);
      t.same(loads, [intact[0]!.conversationBytes], `trial ${trial}: only that checkpoint was loaded into the runtime`);
    } else {
      t.match(report, { path: 'cache', restoredTokens: bytes(sys) }, `trial ${trial}: no intact checkpoint, the system prompt's cache`);
      t.same(loads, [bytes(sys)], `trial ${trial}: only the system prompt's cache was loaded`);
    }
    // Each completed send() wrote its checkpoint before it resolved.
    if (done > 0 && !damaged) t.equal(report.path, 'checkpoint', `trial ${trial}: a turn was done, so a checkpoint restored it`);
    if (turns < TURNS) {
      log.clear();
      await session.send(MESSAGES[turns]!).result;
      const end = log.last('rkllm_run:end');
      const prompt = (log.last('rkllm_run').input as { prompt: string }).prompt;
      t.match(end, { cached_tokens: report.restoredTokens, prefill_tokens: bytes(prompt) - report.restoredTokens, history_tokens: 0 }, `trial ${trial}: the next turn prefills only past what was restored`);
      t.equal(session.history[turns * 2]!.content, MESSAGES[turns]);
    }
    await session.close();
    await model.dispose();
  }
  t.comment(`resume paths: ${JSON.stringify(paths)}; ${damagedTrials} trials with a damaged newest checkpoint; ${midTurnKills} kills between a turn's journal record and its acknowledgement`);
  t.ok((paths.checkpoint ?? 0) > 0, 'some trials resumed from a checkpoint');
  t.ok(damagedTrials > 0, 'some trials damaged a checkpoint');
});
