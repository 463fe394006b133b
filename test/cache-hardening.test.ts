// The prompt cache directory as an attacker or a second process leaves it: paths that are not
// regular files never block and are never deleted, header fields of the wrong type are corrupt
// (named), text from headers reaches a terminal escaped, labels keep their case, files that break
// the naming contract are not entries, and two processes sharing a directory see misses, never
// false corruption.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { encodeEntry, entryKey, verifiedRanges, writeEntry, type EntryHeader } from '../lib/cache/entry.js';
import { escaped } from '../lib/cli/format.js';
import { openRegularFile } from '../lib/util/regular-file.js';
import { DirectoryStore, loadModel, PromptCache, readEntryFile, readVerifiedEntry, type Model } from '../lib/index.js';
import { requireBuiltCli, runCli } from './helpers/cli.js';
import { promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  requireBuiltCli();
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

/** A well-formed header of a made-up model (no model is needed to list, find, verify or delete). */
function header(seed: number, fields: Partial<EntryHeader> = {}): EntryHeader {
  return {
    kind: 'llama.cpp/sequence-state',
    backend: { name: 'llama.cpp', version: 'test' },
    model: { fingerprint: 'f'.repeat(64), fingerprintScheme: 'test', name: 'synthetic', architecture: 'llama' },
    layout: { kvType: 'f16', flashAttention: 'false' },
    tokenCount: 3,
    tokens: [1, 2, seed],
    label: null,
    createdAt: new Date(Date.UTC(2026, 0, 1, 0, 0, seed)).toISOString(),
    payloadBytes: 100,
    ...fields,
  };
}

/** Writes a valid entry under its own key; returns its path. */
async function putEntry(dir: string, h: EntryHeader): Promise<string> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${entryKey(h)}.kvstash`);
  await writeEntry(file, h, Buffer.alloc(h.payloadBytes, 7));
  return file;
}

const KNOWN_CODES = /^E_(CACHE_CORRUPT|CACHE_NOT_FILE|CACHE_MISMATCH|STATE_LOAD|STATE_SAVE)$/;

// ---------------------------------------------------------------------------------------------
// Item 4: paths that are not regular files

/** Every kind of non-file that can sit under an entry's name; each maker returns a cleanup. */
function nonFiles(t: Test): Array<[kind: string, make: (file: string, good: string) => void]> {
  const kinds: Array<[string, (file: string, good: string) => void]> = [
    ['FIFO', (file) => execFileSync('mkfifo', [file])],
    ['symlink to a FIFO', (file) => {
      execFileSync('mkfifo', [`${file}.fifo`]);
      fs.symlinkSync(`${file}.fifo`, file);
    }],
    ['directory', (file) => fs.mkdirSync(file)],
    ['directory holding a file', (file) => {
      fs.mkdirSync(file);
      fs.writeFileSync(path.join(file, 'x'), 'x');
    }],
    ['symlink to a valid entry', (file, good) => fs.symlinkSync(good, file)],
    ['symlink to /dev/zero', (file) => fs.symlinkSync('/dev/zero', file)],
    ['dangling symlink', (file) => fs.symlinkSync(`${file}.nowhere`, file)],
    ['unix socket', (file) => {
      const server = net.createServer().listen(file);
      t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
    }],
  ];
  // mknod needs root; the CI container runs as root.
  if (process.getuid?.() === 0) kinds.push(['character device (null)', (file) => execFileSync('mknod', [file, 'c', '1', '3'])]);
  return kinds;
}

t.test('a path that is not a regular file is E_CACHE_NOT_FILE everywhere: never waited on, never deleted', async (t) => {
  const context = await model.createContext({ contextSize: 256 });
  t.teardown(() => context.dispose());
  for (const [kind, make] of nonFiles(t)) {
    // A socket's path must fit in 108 bytes, which the test directory's does not.
    const dir = kind === 'unix socket' ? fs.mkdtempSync(path.join(os.tmpdir(), 'kvs-')) : t.testdir();
    if (kind === 'unix socket') t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const good = await putEntry(dir, header(1, { label: 'good' }));
    const bad = path.join(dir, `${'0'.repeat(32)}.kvstash`);
    make(bad, good);
    // The socket appears once the server listens.
    while (!fs.existsSync(bad) && !fs.lstatSync(bad, { throwIfNoEntry: false })) await new Promise((r) => setTimeout(r, 5));

    await t.rejects(readEntryFile(bad), { code: 'E_CACHE_NOT_FILE' }, `${kind}: readEntryFile`);
    await t.rejects(readVerifiedEntry(bad), { code: 'E_CACHE_NOT_FILE' }, `${kind}: readVerifiedEntry`);
    await t.rejects(openRegularFile(bad), { name: 'NotRegularFileError' }, `${kind}: openRegularFile`);
    const goodEntry = await readEntryFile(good);
    // The session's checkpoint path: importVerifiedFile by path.
    await t.rejects(
      context.importVerifiedFile(bad, verifiedRanges(goodEntry), { sequence: 0 }),
      { code: 'E_CACHE_NOT_FILE' },
      `${kind}: importVerifiedFile by path`,
    );

    const cache = new PromptCache({ dir });
    const problems: Array<{ code: string }> = [];
    cache.on('problem', (p) => problems.push(p));
    t.same((await cache.list()).map((e) => e.label), ['good'], `${kind}: list() shows only the entry`);
    t.equal((await cache.get('good'))?.label, 'good', `${kind}: get()`);
    t.same(await cache.find('nothing'), [], `${kind}: find()`);
    const restored = await cache.restore(context, promptTokens(model, 40, 3));
    t.equal(restored.tier, null, `${kind}: restore() settles (a miss)`);
    t.same(problems.map((p) => p.code), ['E_CACHE_NOT_FILE'], `${kind}: restore() reports it once, coded`);
    for (const remove of [false, true]) {
      const verified = await cache.verify({ remove });
      t.equal(verified.ok, 1, `${kind}: verify(remove ${remove}) counts the entry`);
      t.match(verified.corrupt, [{ path: bad, code: 'E_CACHE_NOT_FILE', removed: false, reason: /not a regular file/ }], `${kind}: verify(remove ${remove}) lists it, coded`);
      t.equal(verified.corrupt.length, 1);
    }
    t.ok(fs.lstatSync(bad, { throwIfNoEntry: false }), `${kind}: still there after verify({remove: true})`);
    t.equal(await cache.delete('good'), 1, `${kind}: delete('good')`);
    await cache.clear();
    t.ok(fs.lstatSync(bad, { throwIfNoEntry: false }), `${kind}: still there after clear()`);
  }

  // The commands, as a user runs them, on one directory holding every kind at once (a child
  // process each: a command that waited on a FIFO would never exit).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvs-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const good = await putEntry(dir, header(2, { label: 'again' }));
  const kinds = nonFiles(t);
  kinds.forEach(([, make], i) => make(path.join(dir, `${String(i).padStart(32, '0')}.kvstash`), good));
  while (fs.readdirSync(dir).filter((n) => n.endsWith('.kvstash')).length < kinds.length + 1) await new Promise((r) => setTimeout(r, 5));
  const ls = await runCli(['ls', '--cache-dir', dir]);
  t.equal(ls.code, 0, 'kvstash ls exits 0');
  t.match(ls.stdout, /again/);
  const verify = await runCli(['verify', '--cache-dir', dir, '--remove', '--json']);
  t.equal(verify.code, 1, 'kvstash verify exits 1');
  const report = JSON.parse(verify.stdout) as { ok: number; corrupt: Array<{ code: string; removed: boolean }> };
  t.equal(report.ok, 1);
  t.same(report.corrupt.map((c) => [c.code, c.removed]), kinds.map(() => ['E_CACHE_NOT_FILE', false]), 'kvstash verify --remove lists each kind, coded, and removes none');
  t.equal(fs.readdirSync(dir).filter((n) => n.endsWith('.kvstash')).length, kinds.length + 1, 'all still there');
  const inspect = await runCli(['inspect', '--cache-dir', dir, path.join(dir, `${'0'.repeat(32)}.kvstash`)]);
  t.not(inspect.code, 0, 'kvstash inspect of a FIFO fails');
  t.notMatch(inspect.stderr, /at .*\.js:\d+/, 'kvstash inspect prints no stack');
});

// ---------------------------------------------------------------------------------------------
// Item 8: header field types

/** xorshift32: a fixed seed gives the same cases on every run. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

const ODD_VALUES: unknown[] = [5, -1, 0, 1.5, 2 ** 53, null, true, false, [], [1], {}, { a: 1 }, '', 'text', '\u001b[2J', '2026-01-01T00:00:00Z', undefined];

/** Which values each field accepts (the rest must be E_CACHE_CORRUPT naming the field). */
const FIELDS: Array<[field: string, accepts: (v: unknown) => boolean]> = [
  ['kind', () => false],
  ['backend', () => false],
  ['backend.name', (v) => typeof v === 'string'],
  ['backend.version', (v) => typeof v === 'string'],
  ['model', () => false],
  ['model.fingerprint', (v) => typeof v === 'string'],
  ['model.fingerprintScheme', (v) => typeof v === 'string'],
  ['model.name', (v) => typeof v === 'string'],
  ['model.architecture', (v) => typeof v === 'string'],
  ['layout', (v) => typeof v === 'object' && v !== null && !Array.isArray(v) && Object.values(v).every((x) => typeof x === 'string')],
  ['layout.kvType', (v) => v === undefined || typeof v === 'string'],
  ['tokens', () => false],
  ['tokenCount', () => false],
  ['label', (v) => v === null || typeof v === 'string'],
  ['createdAt', (v) => typeof v === 'string' && !Number.isNaN(Date.parse(v))],
  ['payloadBytes', () => false],
];

function withField(h: EntryHeader, field: string, value: unknown): EntryHeader {
  const copy = JSON.parse(JSON.stringify(h)) as Record<string, Record<string, unknown>>;
  const [outer, inner] = field.split('.') as [string, string | undefined];
  if (inner === undefined) copy[outer] = value as Record<string, unknown>;
  else copy[outer]![inner] = value;
  return copy as unknown as EntryHeader;
}

t.test('header fields of the wrong type are E_CACHE_CORRUPT naming the field (fuzzed), and nothing throws on them', async (t) => {
  const dir = t.testdir();
  const next = random(14);
  const tally = { cases: 0, refused: 0, accepted: 0 };
  const misses: string[] = [];
  for (let i = 0; i < 400; i++) {
    const [field, accepts] = FIELDS[Math.floor(next() * FIELDS.length)]!;
    const value = ODD_VALUES[Math.floor(next() * ODD_VALUES.length)];
    const h = withField(header(i % 250), field, value);
    // payloadBytes must stay the payload's length for the writer; a wrong one is written by hand.
    const bytes = await encodeEntry({ ...h, payloadBytes: 100 } as EntryHeader, Buffer.alloc(100, 1));
    const file = path.join(dir, `case-${i}.kvstash`);
    fs.writeFileSync(file, field === 'payloadBytes' ? patchPayloadBytes(bytes, value) : bytes);
    tally.cases++;
    const outcome = await readEntryFile(file).then(
      () => 'accepted',
      (err: { code?: string; reason?: string }) => (err.code === 'E_CACHE_CORRUPT' ? `refused: ${err.reason}` : `other: ${String(err.code)} ${String(err.reason)}`),
    );
    const expectAccepted = accepts(value);
    const top = field.split('.')[0]!;
    // A wrong payloadBytes may also show as a length that disagrees with the file.
    if (expectAccepted ? outcome !== 'accepted' : !(outcome.startsWith('refused') && (outcome.includes(top) || field === 'payloadBytes'))) {
      misses.push(`${field} = ${JSON.stringify(value)}: ${outcome}`);
    }
    if (outcome === 'accepted') tally.accepted++;
    else tally.refused++;
  }
  t.same(misses, [], `every case as expected (${tally.cases} cases: ${tally.refused} refused, ${tally.accepted} accepted)`);
  t.ok(tally.refused > 200 && tally.accepted > 20, 'both outcomes were exercised');

  // Bad headers next to a good entry: no API call throws, and the commands finish normally.
  await putEntry(dir, header(999, { label: 'good' }));
  const cache = new PromptCache({ dir });
  t.same((await cache.list()).map((e) => e.label), ['good'], 'list() skips what does not parse');
  t.equal((await cache.find('good')).length, 1, 'find()');
  t.equal((await cache.get('good'))?.label, 'good', 'get()');
  const verified = await cache.verify();
  t.equal(verified.ok, 1);
  t.equal(verified.corrupt.length, 400, 'verify() lists every case file: refused, or not named after its key');
  t.ok(verified.corrupt.every((c) => KNOWN_CODES.test(c.code)), 'every problem has a kvstash code');
  t.equal(await cache.delete('good'), 1, 'delete()');
  await t.resolves(cache.clear(), 'clear()');
  t.equal((await runCli(['ls', '--cache-dir', dir])).code, 0, 'kvstash ls exits 0');
  t.equal((await runCli(['verify', '--cache-dir', dir])).code, 1, 'kvstash verify exits 1 (problems found), without a crash');
});

/** The entry with its header's payloadBytes replaced (checksums recomputed cannot be: the field is
 * checked before them, so the old checksums are fine). */
function patchPayloadBytes(bytes: Buffer, value: unknown): Buffer {
  const length = bytes.readUInt32LE(12);
  const json = JSON.parse(bytes.subarray(16, 16 + length).toString('utf8')) as Record<string, unknown>;
  json.payloadBytes = value;
  const text = Buffer.from(JSON.stringify(json));
  const out = Buffer.alloc(bytes.length + text.length - length);
  bytes.copy(out, 0, 0, 16);
  out.writeUInt32LE(text.length, 12);
  text.copy(out, 16);
  bytes.copy(out, 16 + text.length, 16 + length);
  return out;
}

t.test('header text reaches the terminal escaped: labels, model names, file names', async (t) => {
  t.equal(escaped('plain label'), 'plain label');
  t.equal(escaped('a\u001b[31mred\u0007'), 'a\\u001b[31mred\\u0007', 'C0 controls');
  t.equal(escaped('\u009b2J\u007f'), '\\u009b2J\\u007f', 'C1 controls and DEL (JSON.stringify leaves them raw)');
  t.equal(escaped('line\nnext\u2028'), 'line\\nnext\\u2028', 'line breaks');
  t.equal(escaped('\u202eevil'), '\uFFFDevil', 'bidi overrides');
  const next = random(8);
  for (let i = 0; i < 2000; i++) {
    const text = String.fromCharCode(...Array.from({ length: 8 }, () => Math.floor(next() * 0x3000)));
    const out = escaped(text);
    if (/[\p{Cc}\p{Cf}\u2028\u2029]/u.test(out)) t.fail(`raw control in ${JSON.stringify(out)}`);
  }

  const dir = t.testdir();
  const label = '\u001b]0;pwned\u0007\u001b[31mred\u009b2J';
  await putEntry(dir, header(1, { label, model: { fingerprint: 'f'.repeat(64), fingerprintScheme: 'test', name: 'evil\u001b[1m', architecture: 'llama\u0007' } }));
  for (const args of [['ls'], ['inspect', label]]) {
    const run = await runCli([...args, '--cache-dir', dir]);
    t.equal(run.code, 0, `kvstash ${args[0]} exits 0`);
    t.notMatch(run.stdout, /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/, `kvstash ${args[0]}: no raw control character`);
    t.match(run.stdout, '\\u001b]0;pwned\\u0007\\u001b[31mred\\u009b2J', `kvstash ${args[0]}: the label, escaped`);
    t.match(run.stdout, 'evil\\u001b[1m', `kvstash ${args[0]}: the model name, escaped`);
  }
});

// ---------------------------------------------------------------------------------------------
// Item 7: labels keep their case

t.test('labels are matched exactly: rm and inspect of Prod never touch prod; keys match in either case', async (t) => {
  const dir = t.testdir();
  await putEntry(dir, header(1, { label: 'prod' }));
  await putEntry(dir, header(2, { label: 'Prod' }));
  await putEntry(dir, header(3, { label: 'PROD' }));
  const cache = new PromptCache({ dir });
  t.same((await cache.find('Prod')).map((e) => e.label), ['Prod']);
  const inspect = await runCli(['inspect', 'Prod', '--cache-dir', dir, '--json']);
  t.equal(inspect.code, 0);
  t.equal((JSON.parse(inspect.stdout) as { header: { label: string } }).header.label, 'Prod', 'inspect Prod shows Prod');
  const rm = await runCli(['rm', 'Prod', '--cache-dir', dir, '--json']);
  t.equal(rm.code, 0);
  t.equal((JSON.parse(rm.stdout) as { removed: number }).removed, 1);
  t.same((await cache.list()).map((e) => e.label).sort(), ['PROD', 'prod'], 'rm Prod removed Prod only');
  const key = entryKey(header(3));
  t.equal((await cache.get(key.slice(0, 8).toUpperCase()))?.label, 'PROD', 'a key start in capitals still names its entry');
  const rmKey = await runCli(['rm', key.slice(0, 10).toUpperCase(), '--cache-dir', dir]);
  t.equal(rmKey.code, 0);
  t.same((await cache.list()).map((e) => e.label), ['prod']);
});

// ---------------------------------------------------------------------------------------------
// Item 10: the naming contract; no raw errno as a code

t.test('a file not named <key>.kvstash is not an entry: never listed or counted as deleted; verify reports and removes it', async (t) => {
  const dir = t.testdir();
  const proper = await putEntry(dir, header(1, { label: 'proper' }));
  const misnamed = path.join(dir, 'copy.kvstash');
  fs.copyFileSync(proper, misnamed);
  const other = path.join(dir, `${'a'.repeat(32)}.kvstash`);
  await writeEntry(other, header(2, { label: 'renamed' }), Buffer.alloc(100, 7));
  const cache = new PromptCache({ dir });
  t.same((await cache.list()).map((e) => e.path), [proper], 'only the properly named file is listed');
  t.equal(await cache.delete('renamed'), 0, 'delete() of the misnamed entry\'s label reports 0');
  t.ok(fs.existsSync(other), 'and leaves it');
  t.equal(await cache.delete('proper'), 1, 'delete() of the proper one reports 1');
  t.notOk(fs.existsSync(proper), 'and removes it');
  t.ok(fs.existsSync(misnamed), 'not its copy');
  t.equal(await cache.delete('proper'), 0, 'a second delete() reports 0');
  const verified = await cache.verify({ remove: true });
  t.same(
    verified.corrupt.map((c) => [path.basename(c.path), c.code, c.removed, /file name is not its key/.test(c.reason)]).sort(),
    [[path.basename(other), 'E_CACHE_CORRUPT', true, true], ['copy.kvstash', 'E_CACHE_CORRUPT', true, true]],
  );
  t.same(fs.readdirSync(dir), [], 'verify({remove: true}) removed both');

  // A directory under an entry's name: coded, not removed, and no code is an errno.
  const dirEntry = path.join(dir, `${'b'.repeat(32)}.kvstash`);
  fs.mkdirSync(dirEntry);
  const again = await cache.verify({ remove: true });
  t.match(again.corrupt, [{ code: 'E_CACHE_NOT_FILE', removed: false }]);
  t.ok(fs.statSync(dirEntry).isDirectory(), 'the directory is still there');
  const store = new DirectoryStore(dir);
  await t.rejects(store.delete('b'.repeat(32)), { code: 'E_CACHE_NOT_FILE' }, 'DirectoryStore.delete() of a directory: coded');
});

t.test('a corrupt file is removed only while it is still the same file', async (t) => {
  const dir = t.testdir();
  const file = await putEntry(dir, header(1));
  const store = new DirectoryStore(dir);
  const name = path.basename(file);
  const old = await readEntryFile(file);
  // Another process re-saves the key: a new file renamed over the old one.
  await writeEntry(file, header(1, { createdAt: new Date().toISOString() }), Buffer.alloc(100, 7));
  const current = await readEntryFile(file);
  t.not(current.identity!.ino, old.identity!.ino, 'the re-saved file is another inode');
  t.equal(await store.removeIfSame(name, old.identity!), false, 'the old identity does not remove the new file');
  t.equal((await readEntryFile(file)).identity!.ino, current.identity!.ino, 'the new file is in place, unchanged');
  t.same(fs.readdirSync(dir), [name], 'nothing left aside');
  t.equal(await store.removeIfSame(name, current.identity!), true, 'its own identity removes it');
  t.same(fs.readdirSync(dir), []);
  t.equal(await store.removeIfSame(name, current.identity!), false, 'a file already gone: false');

  // A scanned entry replaced before the restore opens it is a miss (openEntry), not corruption.
  await putEntry(dir, header(2));
  const [scanned] = await store.scan();
  await writeEntry(path.join(dir, scanned!.name), header(2, { createdAt: new Date(Date.UTC(2027, 0, 1)).toISOString() }), Buffer.alloc(100, 7));
  t.equal(await store.openEntry(scanned!.name, scanned!.entry as never), undefined, 'replaced since the scan: undefined');
  const [rescanned] = await store.scan();
  const opened = await store.openEntry(rescanned!.name, rescanned!.entry as never);
  t.ok(opened, 'the next scan reads the new file, which opens');
  await opened!.handle.close();
  fs.rmSync(path.join(dir, scanned!.name));
  t.equal(await store.openEntry(rescanned!.name, rescanned!.entry as never), undefined, 'removed since the scan: undefined');
});

// ---------------------------------------------------------------------------------------------
// Item 11 (part): saveState to a directory

t.test('saveState(directory) is E_STATE_SAVE and writes nothing anywhere', async (t) => {
  const parent = t.testdir({ target: { 'inside.txt': 'x' } });
  const target = path.join(parent, 'target');
  const context = await model.createContext({ contextSize: 256 });
  t.teardown(() => context.dispose());
  await context.decode(promptTokens(model, 20, 1), { start: 0, logits: 'none' });
  await t.rejects(context.saveState(target, { sequence: 0 }), { code: 'E_STATE_SAVE', message: /is a directory/ });
  t.same(fs.readdirSync(parent), ['target'], 'no temporary file next to it');
  t.same(fs.readdirSync(target), ['inside.txt'], 'nothing inside it');
  execFileSync('mkfifo', [path.join(parent, 'fifo')]);
  await t.rejects(context.saveState(path.join(parent, 'fifo'), { sequence: 0 }), { code: 'E_STATE_SAVE', message: /not a regular file/ });
  t.same(fs.readdirSync(parent).sort(), ['fifo', 'target']);
  const saved = await context.saveState(path.join(parent, 'state.bin'), { sequence: 0 });
  t.ok(saved.bytes > 0, 'a file path still saves');
});

// ---------------------------------------------------------------------------------------------
// Item 5: two processes on one cache directory

const CHURN = `
const { DirectoryStore, readVerifiedEntry } = require(process.env.KVSTASH_DIST);
const { encodeEntry } = require(process.env.KVSTASH_DIST_ENTRY);
const fs = require('node:fs');
(async () => {
  const [dir, seconds] = [process.argv[1], Number(process.argv[2])];
  const store = new DirectoryStore(dir);
  const entries = [];
  for (const name of fs.readdirSync(dir)) entries.push({ name, ...(await readVerifiedEntry(dir + '/' + name)) });
  const present = new Set(entries.map((e) => e.name));
  const tally = { resaves: 0, evictions: 0, vanished: 0 };
  let x = 99;
  const until = Date.now() + seconds * 1000;
  while (Date.now() < until) {
    x = (x * 1103515245 + 12345) % 2147483648;
    const e = entries[x % entries.length];
    // A file this process wrote and did not evict that is gone was deleted by the other process.
    for (const name of present) if (!fs.existsSync(dir + '/' + name)) { tally.vanished++; present.delete(name); }
    if ((x >> 8) % 4 === 0) {
      await store.delete(e.entry.key);
      present.delete(e.name);
      tally.evictions++;
    } else {
      // A re-save of the same key: new bytes (createdAt), renamed over the old file.
      const header = { ...e.entry.header, createdAt: new Date(Date.now() + tally.resaves).toISOString() };
      await store.put(e.entry.key, await encodeEntry(header, e.payload));
      present.add(e.name);
      tally.resaves++;
    }
  }
  for (const e of entries) await store.put(e.entry.key, await encodeEntry(e.entry.header, e.payload));
  process.stdout.write(JSON.stringify(tally));
})();
`;

/** Restores in this process while a child re-saves and evicts the same keys; returns the tallies. */
async function shareDirectory(t: Test, seconds: number, keys: number) {
  const dir = t.testdir();
  const context = await model.createContext({ contextSize: 512 });
  const prompts = Array.from({ length: keys }, (_, i) => promptTokens(model, 64, 100 + i));
  const writer = new PromptCache({ dir });
  for (const prompt of prompts) await writer.warm(context, prompt);
  await writer.flush();
  const dist = path.resolve(__dirname, '..', 'dist');
  const child = spawn(process.execPath, ['-e', CHURN, dir, String(seconds)], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, KVSTASH_DIST: path.join(dist, 'index.js'), KVSTASH_DIST_ENTRY: path.join(dist, 'cache', 'entry.js') },
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (out += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  let running = true;
  void exited.then(() => (running = false));

  // RAM tier off: every hit comes from a file another process may be replacing.
  const reader = new PromptCache({ dir, maxRamBytes: 0 });
  const problems: Array<{ code: string; message: string }> = [];
  reader.on('problem', (p) => problems.push(p));
  const tally = { restores: 0, hits: 0, misses: 0, verifies: 0, verifyListed: 0 };
  for (let i = 0; running; i++) {
    // An emptied sequence: the resident tier holds nothing, the disk is asked each time.
    await context.exclusive(() => context.memory.clear());
    const result = await reader.restore(context, prompts[i % keys]!);
    tally.restores++;
    if (result.tier === 'disk') tally.hits++;
    else tally.misses++;
    if (i % 25 === 0) {
      const verified = await reader.verify();
      tally.verifies++;
      tally.verifyListed += verified.corrupt.length;
    }
  }
  const code = await exited;
  await context.dispose();
  const churn = JSON.parse(out) as { resaves: number; evictions: number; vanished: number };
  const final = await new PromptCache({ dir }).verify();
  return { code, churn, tally, problems, final };
}

t.test('two processes on one directory: re-saves and evictions are misses, never corruption; nothing healthy is deleted', async (t) => {
  // KVSTASH_CACHE_STRESS_SECONDS: a wider run by hand (the suite's is 12 s).
  const { code, churn, tally, problems, final } = await shareDirectory(t, Number(process.env.KVSTASH_CACHE_STRESS_SECONDS ?? 12), 4);
  t.comment(JSON.stringify({ churn, tally, problems: problems.length }));
  t.equal(code, 0, 'the writer process finished');
  t.same(problems, [], 'no problem reported by the reader (no false E_CACHE_CORRUPT)');
  t.equal(tally.verifyListed, 0, 'verify() listed nothing while the writer churned');
  t.equal(churn.vanished, 0, 'no file the writer kept was deleted by the reader');
  t.same(final, { ok: 4, corrupt: [] }, 'every entry is sound at the end');
  t.ok(tally.hits > 0 && tally.misses >= 0 && churn.resaves > 0 && churn.evictions > 0, 'restores hit while the writer re-saved and evicted');
});
