// Sessions remember (issue 17, tests): a SIGKILL between the journal's append and the archive's
// write loses no acknowledged turn. A child process (helpers/session-memory-child.js) runs a session
// with a Memory and is SIGKILLed (1) exactly in that gap: inside the memory's embed function, which
// Memory.addMany calls after the session journaled the turn and before the archive's transaction;
// (2) at random moments of the conversation. After each kill the session is resumed with its memory
// and the database must hold every turn of the journal (so every acknowledged one), each exactly
// once, in order: a turn the kill left out of the archive is archived at resume, none twice.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadModel, Memory, PromptCache, Session, type Model } from '../lib/index.js';
import { openDatabase } from '../lib/memory/driver.js';
import { prose, tinyModel } from './helpers/fixtures.js';

const CHILD = path.join(__dirname, 'helpers', 'session-memory-child.js');
const TURNS = 5;
const RANDOM_TRIALS = Number(process.env.KVSTASH_CRASH_TRIALS ?? 4);

let model: Model;
let modelPath: string;
t.before(async () => {
  modelPath = await tinyModel();
  model = await loadModel(modelPath);
});
t.teardown(() => model.dispose());

/** What helpers/session-memory-child.js runs. */
interface MemoryCrashScript {
  model: string;
  dir: string;
  db: string;
  system: string;
  messages: string[];
  context: { contextSize: number };
  send: { maxTokens: number };
  /** How long the child's embed function takes (ms). */
  embedMs: number;
  /** The turn whose archiving waits for the kill. */
  pauseAtTurn?: number;
}

/** The child's embed function: the texts' lengths (this test searches by keyword). */
const lengthEmbed = async (texts: string[]): Promise<Float32Array[]> => texts.map((text) => Float32Array.of(text.length, 1));

function writeScript(dir: string, extra: Partial<MemoryCrashScript> = {}): string {
  fs.mkdirSync(dir, { recursive: true });
  const script: MemoryCrashScript = {
    model: modelPath,
    dir,
    db: path.join(dir, 'memory.db'),
    system: prose(80, 7),
    messages: Array.from({ length: TURNS }, (_, turn) => `Question ${turn}: ${prose(6 + turn, turn)}?`),
    context: { contextSize: 1024 },
    send: { maxTokens: 4 },
    embedMs: 150,
    ...extra,
  };
  const file = path.join(dir, 'script.json');
  fs.writeFileSync(file, JSON.stringify(script));
  return file;
}

/**
 * Runs the child on `script`; SIGKILLs it when it prints `archiving <killAtArchive>`, or
 * `killAfter` ms after it printed `ready`. Resolves with the turns it reported done, whether it
 * was killed, and how long its conversation ran (from `ready` to the last `done`).
 */
function runChild(script: string, kill: { killAtArchive?: number; killAfter?: number } = {}): Promise<{ done: number; killed: boolean; conversationMs: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CHILD, script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let done = 0;
    let readyAt = 0;
    let doneAt = 0;
    let stdout = '';
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.setEncoding('utf8').on('data', (text: string) => {
      stdout += text;
      if (!readyAt && stdout.includes('ready\n')) {
        readyAt = Date.now();
        if (kill.killAfter !== undefined) timer = setTimeout(() => child.kill('SIGKILL'), kill.killAfter);
      }
      for (const match of text.matchAll(/done (\d+)/g)) {
        done = Number(match[1]);
        doneAt = Date.now();
      }
      if (kill.killAtArchive !== undefined && stdout.includes(`archiving ${kill.killAtArchive}\n`)) child.kill('SIGKILL');
    });
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (signal === 'SIGKILL' || code === 0) resolve({ done, killed: signal === 'SIGKILL', conversationMs: readyAt && doneAt ? doneAt - readyAt : 0 });
      else reject(new Error(`child exited with ${code ?? signal}: ${stderr}`));
    });
  });
}

/** The archived rows of session `chat`, in insertion order, as [turn, role, content]. */
function archivedRows(db: string): Array<[number, string, string]> {
  const database = openDatabase(db, 1000);
  try {
    return database
      .prepare("SELECT turn, role, content FROM entries WHERE session_id = ? AND kind = 'turn' ORDER BY id")
      .all('chat')
      .map((row) => [Number(row.turn), String(row.role), String(row.content)]);
  } finally {
    database.close();
  }
}

/** Resumes session `chat` of `dir` in this process with its memory; returns the transcript's turns,
 * how many turns the resume archived, and the archive's last turn before it. */
async function resumeWithMemory(dir: string): Promise<{ turns: number; repaired: number; lastBefore: number | undefined; history: Array<[number, string, string]> }> {
  const memory = await Memory.open({ path: path.join(dir, 'memory.db'), embed: lengthEmbed });
  const context = await model.createContext({ contextSize: 1024 });
  try {
    const lastBefore = await memory.lastTurn('chat');
    const session = await Session.resume({ dir, id: 'chat', context, cache: new PromptCache({ dir: null }), memory });
    const history = session.history.map((m, i): [number, string, string] => [Math.floor(i / 2), m.role, m.content]);
    const result = { turns: session.history.length / 2, repaired: session.stats().archived, lastBefore, history };
    await session.close();
    return result;
  } finally {
    await context.dispose();
    await memory.close();
  }
}

t.test('killed between the journal append and the archive write: the turn is archived at resume, once', async (t) => {
  const root = t.testdir();
  for (const turn of [0, 2, TURNS - 1]) {
    const dir = path.join(root, `gap-${turn}`);
    const script = writeScript(dir, { pauseAtTurn: turn });
    const run = await runChild(script, { killAtArchive: turn });
    t.ok(run.killed, `turn ${turn}: the child was killed while archiving`);
    t.equal(run.done, turn, `turn ${turn}: its send() never resolved, the ones before it did`);
    const resumed = await resumeWithMemory(dir);
    t.equal(resumed.lastBefore, turn === 0 ? undefined : turn - 1, `turn ${turn}: the archive lacked it after the kill`);
    t.equal(resumed.turns, turn + 1, `turn ${turn}: the journal held it`);
    t.equal(resumed.repaired, 1, `turn ${turn}: the resume archived it`);
    t.same(archivedRows(path.join(dir, 'memory.db')), resumed.history, `turn ${turn}: every journaled turn archived exactly once, in order`);

    if (turn === TURNS - 1) continue;
    // The child resumes and finishes the conversation: nothing archived twice then either.
    const rest = await runChild(script);
    t.notOk(rest.killed, `turn ${turn}: the resumed child ran to the end`);
    t.equal(rest.done, TURNS, `turn ${turn}: and sent the turns after it`);
    const final = await resumeWithMemory(dir);
    t.equal(final.turns, TURNS);
    t.equal(final.repaired, 0, 'nothing left to repair');
    t.same(archivedRows(path.join(dir, 'memory.db')), final.history, `turn ${turn}: after the conversation finished, each of its ${TURNS} turns archived once`);
  }
});

t.test(`${RANDOM_TRIALS} SIGKILLs at random moments: every acknowledged turn is archived exactly once after resume`, async (t) => {
  const root = t.testdir();
  const { conversationMs } = await runChild(writeScript(path.join(root, 'reference')));
  let random = 4242;
  const nextRandom = () => (random = (random * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  let inGap = 0;
  for (let trial = 0; trial < RANDOM_TRIALS; trial++) {
    const dir = path.join(root, `trial-${trial}`);
    const killAfter = Math.floor(nextRandom() * conversationMs);
    const run = await runChild(writeScript(dir), { killAfter });
    const resumed = await resumeWithMemory(dir);
    const archivedBefore = resumed.lastBefore === undefined ? 0 : resumed.lastBefore + 1;
    if (resumed.turns > archivedBefore) inGap++;
    t.ok(resumed.turns >= run.done, `trial ${trial}, killed after ${killAfter} ms: ${resumed.turns} turns journaled, ${run.done} acknowledged, ${archivedBefore} archived before the resume`);
    t.equal(resumed.repaired, resumed.turns - archivedBefore, `trial ${trial}: the resume archived exactly the turns the archive lacked`);
    t.same(archivedRows(path.join(dir, 'memory.db')), resumed.history, `trial ${trial}: every journaled turn archived exactly once, in order`);
  }
  t.comment(`${inGap} of ${RANDOM_TRIALS} random kills fell between a turn's journal append and its archive write`);
});
