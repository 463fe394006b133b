// Sessions under damage and contention: a journal damaged anywhere keeps every intact record; the
// session lock is one kernel lock, taken atomically, by exactly one of many processes; symlinks,
// FIFOs and directories where a session keeps its files are refused, never followed or emptied;
// a full disk is a coded E_IO that loses no acknowledged turn.
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import t, { type Test } from 'tap';
import { loadModel, Session, type Context, type Model } from '../lib/index.js';
import { Journal, readJournal } from '../lib/session/journal.js';
import { acquireLock } from '../lib/session/lock.js';
import { skipUnderEmulation, tinyModel } from './helpers/fixtures.js';

// ---------------------------------------------------------------------------------------------
// The journal: damage at every byte position, of every kind.

type Rec = { type: string; n: number; text: string };
/** Six records of different lengths, like a transcript: open, exchanges, a tool result. */
const RECORDS: Rec[] = [
  { type: 'open', n: 0, text: 'system prompt' },
  { type: 'exchange', n: 1, text: 'a' },
  { type: 'exchange', n: 2, text: 'a longer message with "quotes" and {braces}' },
  { type: 'tool', n: 3, text: 'é'.repeat(20) },
  { type: 'exchange', n: 4, text: '' },
  { type: 'exchange', n: 5, text: 'last' },
];

async function writeJournal(file: string, records: Rec[]): Promise<void> {
  const { journal } = (await Journal.open<Rec>(file, { create: true }))!;
  for (const r of records) await journal.append(r);
  await journal.close();
}

/** [start, end) of each record in the journal's bytes (a record: 12 bytes of head, then JSON). */
function boundaries(records: Rec[]): Array<[number, number]> {
  let offset = 0;
  return records.map((r) => {
    const end = offset + 12 + Buffer.byteLength(JSON.stringify(r));
    const range: [number, number] = [offset, end];
    offset = end;
    return range;
  });
}

const ns = (records: Rec[]) => records.map((r) => r.n);

t.test('journal damage at every byte: only that record is lost, only a tail is cut', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'journal.kvj');
  await writeJournal(file, RECORDS);
  const whole = fs.readFileSync(file);
  const spans = boundaries(RECORDS);
  t.equal(whole.length, spans.at(-1)![1], 'the layout is what the test assumes');
  const last = RECORDS.length - 1;
  const recordOf = (p: number) => spans.findIndex(([s, e]) => p >= s && p < e);
  let cases = 0;

  // Flip and zero every byte: exactly the record holding it is lost. A record before the last is
  // skipped and reported as damage (its bytes kept); the last one is a tail and is cut.
  for (const kind of ['flip', 'zero'] as const) {
    for (let p = 0; p < whole.length; p++) {
      const bytes = Buffer.from(whole);
      bytes[p] = kind === 'flip' ? bytes[p]! ^ 0xff : 0;
      const changed = bytes[p] !== whole[p];
      const hit = recordOf(p);
      const got = readJournal<Rec>(bytes);
      const expected = changed ? RECORDS.filter((_, i) => i !== hit) : RECORDS;
      cases++;
      if (!changed || hit === last) {
        const ok = ns(got.records).join() === ns(expected).join() && got.damaged.length === 0 && got.end === (changed ? spans[last]![0] : whole.length);
        if (!ok) t.fail(`${kind} at ${p}: ${JSON.stringify({ records: ns(got.records), damaged: got.damaged, end: got.end })}`);
      } else {
        const [start, end] = spans[hit]!;
        const ok =
          ns(got.records).join() === ns(expected).join() &&
          got.damaged.length === 1 &&
          got.damaged[0]!.offset === start &&
          got.damaged[0]!.bytes === end - start &&
          got.end === whole.length;
        if (!ok) t.fail(`${kind} at ${p}: ${JSON.stringify({ records: ns(got.records), damaged: got.damaged, end: got.end })}`);
      }
    }
  }

  // Truncate at every length: the records wholly before the cut survive, the rest is a torn tail.
  for (let p = 0; p <= whole.length; p++) {
    const got = readJournal<Rec>(whole.subarray(0, p));
    const expected = RECORDS.filter((_, i) => spans[i]![1] <= p);
    const end = expected.length === 0 ? 0 : spans[expected.length - 1]![1];
    cases++;
    if (ns(got.records).join() !== ns(expected).join() || got.damaged.length !== 0 || got.end !== end) {
      t.fail(`truncated at ${p}: ${JSON.stringify({ records: ns(got.records), damaged: got.damaged, end: got.end })}`);
    }
  }

  // Insert garbage at every position: between records nothing is lost (the garbage is the damage);
  // inside a record that record is lost; after the last record the garbage is a tail.
  const garbage = Buffer.from([0xde, 0xad, 0x7b, 0x00, 0x7d, 0x20, 0xff]);
  for (let p = 0; p <= whole.length; p++) {
    const bytes = Buffer.concat([whole.subarray(0, p), garbage, whole.subarray(p)]);
    const got = readJournal<Rec>(bytes);
    const atBoundary = spans.findIndex(([s]) => s === p);
    const hit = recordOf(p);
    let expected: Rec[];
    let damaged: Array<{ offset: number; bytes: number }>;
    let end: number;
    if (p === whole.length) {
      [expected, damaged, end] = [RECORDS, [], whole.length];
    } else if (atBoundary >= 0) {
      [expected, damaged, end] = [RECORDS, [{ offset: p, bytes: garbage.length }], bytes.length];
    } else if (hit === last) {
      [expected, damaged, end] = [RECORDS.slice(0, last), [], spans[last]![0]];
    } else {
      const [start, recordEnd] = spans[hit]!;
      [expected, damaged, end] = [RECORDS.filter((_, i) => i !== hit), [{ offset: start, bytes: recordEnd - start + garbage.length }], bytes.length];
    }
    cases++;
    if (ns(got.records).join() !== ns(expected).join() || JSON.stringify(got.damaged) !== JSON.stringify(damaged) || got.end !== end) {
      t.fail(`garbage inserted at ${p}: ${JSON.stringify({ records: ns(got.records), damaged: got.damaged, end: got.end })}`);
    }
  }
  t.pass(`${cases} damaged journals read as expected`);
});

t.test('on disk: damage before the tail is kept, appends after it stay readable', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'journal.kvj');
  await writeJournal(file, RECORDS);
  const whole = fs.readFileSync(file);
  const spans = boundaries(RECORDS);
  // Damage each record in turn (its middle byte), open, append, reopen.
  for (let i = 0; i < RECORDS.length; i++) {
    const [start, end] = spans[i]!;
    const bytes = Buffer.from(whole);
    bytes[(start + end) >> 1] ^= 0x01;
    fs.writeFileSync(file, bytes);
    const first = (await Journal.open<Rec>(file, { create: false }))!;
    const survivors = RECORDS.filter((_, j) => j !== i);
    t.same(ns(first.records), ns(survivors), `record ${i} damaged: the others are recovered`);
    const isTail = i === RECORDS.length - 1;
    t.equal(first.droppedBytes, isTail ? end - start : 0, isTail ? 'the damaged last record is cut as a torn tail' : 'nothing is cut');
    t.same(first.damaged, isTail ? [] : [{ offset: start, bytes: end - start }]);
    const sizeAfterOpen = fs.statSync(file).size;
    t.equal(sizeAfterOpen, isTail ? start : whole.length, 'the file keeps every byte before the tail');
    t.same(fs.readFileSync(file).subarray(0, Math.min(sizeAfterOpen, bytes.length)), bytes.subarray(0, sizeAfterOpen), 'and they are unchanged');
    await first.journal.append({ type: 'exchange', n: 6, text: 'after the damage' });
    await first.journal.close();
    const second = (await Journal.open<Rec>(file, { create: false }))!;
    t.same(ns(second.records), [...ns(survivors), 6], 'the record appended after recovery is read back');
    t.same(second.damaged, first.damaged, 'the same damage, no more');
    t.equal(second.droppedBytes, 0);
    await second.journal.close();
  }
  // No intact record: a torn first write is cut (open() never completed); whole-looking garbage
  // is kept for the caller to report.
  fs.writeFileSync(file, whole.subarray(0, 30));
  const torn = (await Journal.open<Rec>(file, { create: false }))!;
  t.same([torn.records.length, torn.droppedBytes, torn.unreadableBytes, fs.statSync(file).size], [0, 30, 0, 0]);
  await torn.journal.close();
  const garbage = Buffer.from(whole.subarray(0, spans[0]![1]));
  garbage[20] ^= 0xff;
  fs.writeFileSync(file, garbage);
  const kept = (await Journal.open<Rec>(file, { create: false }))!;
  t.same([kept.records.length, kept.droppedBytes, kept.unreadableBytes, fs.statSync(file).size], [0, 0, garbage.length, garbage.length]);
  await kept.journal.close();
});

// ---------------------------------------------------------------------------------------------
// Sessions on a damaged journal, symlinks and FIFOs in a session directory.

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model?.dispose());

async function withContext<T>(work: (context: Context) => Promise<T>): Promise<T> {
  const context = await model.createContext({ contextSize: 1024 });
  try {
    return await work(context);
  } finally {
    await context.dispose();
  }
}

const send = { maxTokens: 4 };

t.test('a session resumes around a damaged record; a damaged first record is E_SESSION_CORRUPT', async (t) => {
  const dir = t.testdir();
  const questions = ['q1', 'q2', 'q3', 'q4', 'q5'];
  await withContext(async (context) => {
    const session = await Session.open({ dir, id: 's', context, system: 'Be brief.', checkpoint: { everyTurns: 0, everySeconds: 0 } });
    for (const q of questions) await session.send(q, send).result;
    await session.close();
  });
  const file = path.join(dir, 's', 'journal.kvj');
  const whole = fs.readFileSync(file);
  const { records } = readJournal<{ type: string; user?: string }>(whole);
  t.equal(records.length, 6);
  // Find record 2 (the exchange of q2) and damage a byte in its payload.
  const at = whole.indexOf(Buffer.from('"user":"q2"')) + 3;
  const damaged = Buffer.from(whole);
  damaged[at] ^= 0x20;
  fs.writeFileSync(file, damaged);
  await withContext(async (context) => {
    const session = await Session.resume({ dir, id: 's', context });
    t.same(session.history.filter((m) => m.role === 'user').map((m) => m.content), ['q1', 'q3', 'q4', 'q5'], 'every intact turn is back');
    const report = session.resumeReport!;
    t.equal(report.journal.damaged.length, 1);
    t.ok(report.journal.damaged[0]!.offset < at && report.journal.lostBytes > 0, `${report.journal.lostBytes} bytes reported lost`);
    t.equal(report.droppedJournalBytes, 0);
    t.equal(fs.statSync(file).size, whole.length, 'nothing was cut');
    await session.send('q6', send).result;
    await session.close();
  });
  await withContext(async (context) => {
    const session = await Session.resume({ dir, id: 's', context });
    t.same(session.history.filter((m) => m.role === 'user').map((m) => m.content), ['q1', 'q3', 'q4', 'q5', 'q6'], 'the turn sent after the damage is kept');
    t.equal(session.resumeReport!.journal.damaged.length, 1, 'the same damage, reported again');
    await session.close();
  });
  // The first record (system prompt) damaged: the session exists, so never "not found".
  const now = fs.readFileSync(file);
  const broken = Buffer.from(now);
  broken[20] ^= 0x01;
  fs.writeFileSync(file, broken);
  await withContext(async (context) => {
    await t.rejects(Session.resume({ dir, id: 's', context }), { code: 'E_SESSION_CORRUPT', message: /first record/ });
    await t.rejects(Session.open({ dir, id: 's', context }), { code: 'E_SESSION_EXISTS' }, "the README's resume().catch(() => open()) cannot replace it");
  });
  t.same(fs.readFileSync(file), broken, 'the journal is left unchanged');
});

/** Makes `target` a FIFO. */
function mkfifo(target: string): void {
  const result = spawnSync('mkfifo', [target]);
  if (result.status !== 0) throw new Error(`mkfifo failed: ${result.stderr}`);
}

/** Named to sort before any checkpoint, so that rotation through a followed link would delete it. */
const VICTIM_ENTRY = '00000000-victim.kvstash';
type Kind = 'symlink to a file' | 'symlink to a directory' | 'symlink to a FIFO' | 'FIFO';
const KINDS: Kind[] = ['symlink to a file', 'symlink to a directory', 'symlink to a FIFO', 'FIFO'];

/** Puts `kind` at `where`; the victims live in `victims` and are checked unchanged later. */
function plant(where: string, kind: Kind, victims: string): void {
  fs.mkdirSync(victims, { recursive: true });
  const victimFile = path.join(victims, 'precious.kvstash');
  const victimDir = path.join(victims, 'cache');
  const victimFifo = path.join(victims, 'fifo');
  if (!fs.existsSync(victimFile)) fs.writeFileSync(victimFile, 'someone else\'s bytes');
  fs.mkdirSync(victimDir, { recursive: true });
  if (!fs.existsSync(path.join(victimDir, VICTIM_ENTRY))) fs.writeFileSync(path.join(victimDir, VICTIM_ENTRY), 'an entry of another cache');
  if (!fs.existsSync(victimFifo)) mkfifo(victimFifo);
  fs.mkdirSync(path.dirname(where), { recursive: true });
  if (kind === 'symlink to a file') fs.symlinkSync(victimFile, where);
  else if (kind === 'symlink to a directory') fs.symlinkSync(victimDir, where);
  else if (kind === 'symlink to a FIFO') fs.symlinkSync(victimFifo, where);
  else mkfifo(where);
}

function victimsIntact(t: Test, victims: string): void {
  t.equal(fs.readFileSync(path.join(victims, 'precious.kvstash'), 'utf8'), 'someone else\'s bytes', 'the linked file is unchanged');
  t.same(fs.readdirSync(path.join(victims, 'cache')), [VICTIM_ENTRY], 'the linked directory keeps its entries');
  t.ok(fs.lstatSync(path.join(victims, 'fifo')).isFIFO());
}

t.test('journal.kvj and lock: anything but a regular file is E_SESSION_CORRUPT, and untouched', async (t) => {
  const root = t.testdir();
  let cases = 0;
  await withContext(async (context) => {
    for (const name of ['journal.kvj', 'lock']) {
      for (const kind of KINDS) {
        const dir = path.join(root, `${name}-${kind.replace(/ /g, '-')}`);
        const victims = path.join(root, 'victims');
        plant(path.join(dir, 's', name), kind, victims);
        await t.rejects(Session.open({ dir, id: 's', context, system: 'x' }), { code: 'E_SESSION_CORRUPT', message: new RegExp(name) }, `open: ${name} is a ${kind}`);
        await t.rejects(Session.resume({ dir, id: 's', context }), { code: name === 'lock' ? 'E_SESSION_NOT_FOUND' : 'E_SESSION_CORRUPT' }, `resume: ${name} is a ${kind}`);
        if (name === 'lock') {
          // A session that exists, with a planted lock: resume refuses it too.
          fs.writeFileSync(path.join(dir, 's', 'journal.kvj'), fs.readFileSync(await sessionJournal(root, context)));
          await t.rejects(Session.resume({ dir, id: 's', context }), { code: 'E_SESSION_CORRUPT', message: /lock/ }, `resume with a lock that is a ${kind}`);
        }
        t.ok(fs.lstatSync(path.join(dir, 's', name)).isSymbolicLink() || fs.lstatSync(path.join(dir, 's', name)).isFIFO(), 'left in place');
        victimsIntact(t, victims);
        cases++;
      }
    }
  });
  t.equal(cases, 8);
});

let sampleJournal: string | undefined;
/** A real session's journal, made once. */
async function sessionJournal(root: string, context: Context): Promise<string> {
  if (sampleJournal) return sampleJournal;
  const session = await Session.open({ dir: path.join(root, 'sample'), id: 's', context, system: 'x' });
  await session.close();
  sampleJournal = path.join(root, 'sample', 's', 'journal.kvj');
  return sampleJournal;
}

t.test('checkpoints/ and its entries: never followed, never deleted, never waited on', async (t) => {
  const root = t.testdir();
  await withContext(async (context) => {
    for (const kind of KINDS) {
      // checkpoints/ itself.
      const dir = path.join(root, `dir-${kind.replace(/ /g, '-')}`);
      const victims = path.join(root, 'victims');
      plant(path.join(dir, 's', 'checkpoints'), kind, victims);
      const session = await Session.open({ dir, id: 's', context, system: 'x', checkpoint: { everyTurns: 1, keep: 1 } });
      await session.send('hello', send).result;
      t.equal(session.stats().checkpointFailures, 1, `${kind}: the automatic checkpoint failed, the turn stands`);
      await t.rejects(session.checkpoint(), { code: 'E_SESSION_CORRUPT', message: /checkpoints/ }, `checkpoint() with checkpoints/ a ${kind}`);
      await session.close();
      const resumed = await Session.resume({ dir, id: 's', context });
      t.equal(resumed.history.length, 2);
      t.equal(resumed.resumeReport!.path, 'prefill');
      t.match(resumed.resumeReport!.skippedCheckpoints, [{ path: path.join(dir, 's', 'checkpoints'), reason: /checkpoints directory/ }]);
      await resumed.close();
      victimsIntact(t, victims);

      // An entry inside a real checkpoints/, named to sort newest (tried first, rotated first).
      const dir2 = path.join(root, `entry-${kind.replace(/ /g, '-')}`);
      const planted = path.join(dir2, 's', 'checkpoints', '99999999-0-planted.kvstash');
      plant(planted, kind, victims);
      const second = await Session.open({ dir: dir2, id: 's', context, system: 'x', checkpoint: { everyTurns: 1, keep: 1 } });
      await second.send('one', send).result;
      await second.send('two', send).result;
      t.equal(second.stats().checkpoints, 2);
      await second.close();
      const names = fs.readdirSync(path.join(dir2, 's', 'checkpoints')).sort();
      t.equal(names.length, 2, `${kind}: rotation kept one checkpoint and left the planted entry`);
      t.equal(names[1], '99999999-0-planted.kvstash');
      const resumed2 = await Session.resume({ dir: dir2, id: 's', context });
      t.equal(resumed2.resumeReport!.path, 'checkpoint', `the real checkpoint is used (${JSON.stringify(resumed2.resumeReport!.skippedCheckpoints)})`);
      t.match(resumed2.resumeReport!.skippedCheckpoints, [{ path: planted, reason: /not a regular file/ }]);
      await resumed2.close();
      victimsIntact(t, victims);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// The lock across real processes.

interface Child {
  process: ChildProcessWithoutNullStreams;
  next(): Promise<string>;
  send(line: string): void;
}

function startChild(dir: string): Child {
  const child = spawn(process.execPath, [...process.execArgv, path.join(__dirname, 'helpers', 'session-lock-child.ts'), dir], { stdio: ['pipe', 'pipe', 'pipe'] });
  const queue: string[] = [];
  const waiting: Array<(line: string) => void> = [];
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    const w = waiting.shift();
    if (w) w(line);
    else queue.push(line);
  });
  child.on('exit', (code, signal) => {
    for (const w of waiting.splice(0)) w(`exited ${code ?? signal} ${stderr}`);
  });
  return {
    process: child,
    next: () => (queue.length > 0 ? Promise.resolve(queue.shift()!) : new Promise((resolve) => waiting.push(resolve))),
    send: (line) => child.stdin.write(`${line}\n`),
  };
}

function deadPid(): number {
  const result = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(result.stdout);
}

t.test('lock: of five processes starting at once, exactly one holds the session', { skip: skipUnderEmulation('the lock is one fcntl call, proven on the native run') }, async (t) => {
  const dir = t.testdir();
  const children = Array.from({ length: 5 }, () => startChild(dir));
  t.teardown(() => children.forEach((c) => c.process.kill()));
  for (const c of children) t.equal(await c.next(), 'ready');
  const trials = 8;
  for (let trial = 0; trial < trials; trial++) {
    // What an earlier holder left: a dead process's pid, an empty file, or nothing.
    const lockFile = path.join(dir, 'lock');
    if (trial % 3 === 0) fs.writeFileSync(lockFile, `${deadPid()}\n`);
    else if (trial % 3 === 1) fs.writeFileSync(lockFile, '');
    else fs.rmSync(lockFile, { force: true });
    for (const c of children) c.send('go');
    const answers = await Promise.all(children.map((c) => c.next()));
    const holders = answers.map((a, i) => (a === 'locked' ? i : -1)).filter((i) => i >= 0);
    t.equal(holders.length, 1, `trial ${trial}: one holder (${answers.map((a) => a.split(' ')[0]).join(', ')})`);
    const refusals = answers.filter((a) => a !== 'locked');
    t.ok(refusals.every((a) => a.startsWith('refused E_SESSION_LOCKED')), 'the others get E_SESSION_LOCKED');
    const holder = children[holders[0]!]!;
    t.equal(fs.readFileSync(lockFile, 'utf8'), `${holder.process.pid}\n`, 'the lock file names the holder');
    holder.send('release');
    t.equal(await holder.next(), 'released');
    t.equal(fs.readFileSync(lockFile, 'utf8'), '', 'released: the file stays, empty');
  }
});

t.test('lock: refused while held, taken over from a killed holder, never released by another', { skip: skipUnderEmulation('the lock is one fcntl call, proven on the native run') }, async (t) => {
  const sessions = t.testdir();
  const dir = path.join(sessions, 's');
  fs.mkdirSync(dir);
  // This process held the lock once and released it; its Lock object lives on.
  const old = await acquireLock(dir);
  await old.release();
  const holder = startChild(dir);
  t.teardown(() => holder.process.kill('SIGKILL'));
  t.equal(await holder.next(), 'ready');
  holder.send('go');
  t.equal(await holder.next(), 'locked');
  await t.rejects(acquireLock(dir), { code: 'E_SESSION_LOCKED', message: new RegExp(`process ${holder.process.pid}`) });
  await old.release(); // releasing our old lock again must not touch the child's
  await t.rejects(acquireLock(dir), { code: 'E_SESSION_LOCKED' }, 'still held after another process released its own');
  t.equal(fs.readFileSync(path.join(dir, 'lock'), 'utf8'), `${holder.process.pid}\n`);
  // The real Session API across two processes.
  await withContext(async (context) => {
    await t.rejects(Session.open({ dir: sessions, id: 's', context, system: 'x' }), { code: 'E_SESSION_LOCKED', message: new RegExp(`process ${holder.process.pid}`) });
  });
  // Killed: the kernel drops its lock, whatever its file still says.
  const exited = new Promise((resolve) => holder.process.on('exit', resolve));
  holder.process.kill('SIGKILL');
  await exited;
  t.equal(fs.readFileSync(path.join(dir, 'lock'), 'utf8'), `${holder.process.pid}\n`, 'the dead holder\'s pid is still in the file');
  const mine = await acquireLock(dir);
  t.equal(fs.readFileSync(path.join(dir, 'lock'), 'utf8'), `${process.pid}\n`, 'taken over');
  await t.rejects(acquireLock(dir), { code: 'E_SESSION_LOCKED', message: /already open in this process/ });
  await mine.release();
});

// ---------------------------------------------------------------------------------------------
// A full disk.

/** Why a small tmpfs cannot be mounted in a private mount namespace here (false: it can). A
 * full tmpfs gives the real ENOSPC; RLIMIT_FSIZE would give EFBIG and SIGXFSZ instead. */
function cannotMountTmpfs(): string | false {
  const probe = spawnSync('unshare', ['-Urm', 'sh', '-c', 'mount -t tmpfs -o size=64k x "$1"', 'sh', os.tmpdir()], { encoding: 'utf8' });
  if (probe.status === 0) return false;
  return `no real full disk: cannot mount a small tmpfs in a private mount namespace here (unshare -Urm: ${probe.stderr?.trim() || probe.error?.message})`;
}

t.test('send() and checkpoint() on a full disk: E_IO, and no acknowledged turn is lost', { skip: cannotMountTmpfs() }, async (t) => {
  const root = t.testdir();
  const mountpoint = path.join(root, 'fs');
  fs.mkdirSync(mountpoint);
  const child = spawnSync('unshare', ['-Urm', process.execPath, ...process.execArgv, path.join(__dirname, 'helpers', 'session-disk-full.ts'), mountpoint, await tinyModel()], {
    encoding: 'utf8',
    timeout: 300_000,
  });
  t.equal(child.status, 0, child.stderr);
  const out = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as {
    acknowledged: string[];
    send: { name: string; code: string; cause: string; message: string };
    journalGrew: number;
    checkpoint: { name: string; code: string; cause: string };
    checkpointLeftovers: string[];
    history: string[];
    damaged: number;
    dropped: number;
  };
  t.match(out.send, { name: 'KvstashError', code: 'E_IO', cause: 'ENOSPC', message: /disk is full/ }, 'send() rejects with E_IO');
  t.equal(out.journalGrew, 0, 'the refused record left no bytes behind');
  t.match(out.checkpoint, { name: 'KvstashError', code: 'E_IO', cause: 'ENOSPC' }, 'checkpoint() rejects with E_IO');
  t.same(out.checkpointLeftovers, [], 'no temporary file is left');
  t.same(
    out.history,
    ['user:first question', `assistant:${out.acknowledged[0]}`, 'user:second question', `assistant:${out.acknowledged[1]}`],
    'after space is freed, the resumed session holds every acknowledged turn, and only those',
  );
  t.equal(out.damaged, 0);
  t.equal(out.dropped, 0);
});
