// Issue 14, item 4 for the files a user names: a FIFO, a symlink to one, a directory or /dev/zero
// given to loadModel, Context.loadState or loadRkllmModel (and the RKLLM runtime's prompt-cache
// file) is refused with a coded error before anything opens it in a way that waits, and the
// process lives on. Each API runs in a child process with a timeout: a hang kills the child and
// fails the test, instead of hanging tap. Also: a queued decode aborted while another runs leaves
// the queue at once (issue 14's queue leftover).
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { loadModel, type KvstashError } from '../lib/index.js';
import { fakeRuntimeLibrary } from './helpers/fake-rkllm.js';
import { tinyModel } from './helpers/fixtures.js';

const CHILD = path.resolve(__dirname, 'helpers/non-regular-child.ts');
const root = t.testdir();
const fifo = path.join(root, 'model.fifo');
const linkToFifo = path.join(root, 'link-to-fifo');
const directory = path.join(root, 'a-directory');
execFileSync('mkfifo', [fifo]);
fs.symlinkSync(fifo, linkToFifo);
fs.mkdirSync(directory);
const TARGETS = [fifo, linkToFifo, directory, '/dev/zero'];
const KIND: Record<string, RegExp> = {
  [fifo]: /is a FIFO, not a regular file/,
  [linkToFifo]: /is a FIFO, not a regular file/,
  [directory]: /is a directory, not a regular file/,
  '/dev/zero': /is a character device, not a regular file/,
};

interface Seen {
  target: string;
  code: string;
  message: string;
}

function runChild(args: object): { seen: Seen[]; status: number | null; signal: string | null; stderr: string } {
  const result = spawnSync(process.execPath, [...process.execArgv, CHILD, JSON.stringify(args)], { encoding: 'utf8', timeout: 60_000 });
  const seen = result.stdout
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Seen);
  return { seen, status: result.status, signal: result.signal, stderr: result.stderr };
}

function checkRefusals(t: Test, args: object, code: string): Seen[] {
  const { seen, status, signal, stderr } = runChild(args);
  t.equal(signal, null, `the child was not killed by the timeout (a hang); stderr: ${stderr.slice(-500)}`);
  t.equal(status, 0, 'the child exited on its own');
  for (const target of TARGETS) {
    const got = seen.find((s) => s.target === target);
    t.ok(got, `${target}: answered`);
    t.equal(got?.code, code, `${target}: ${code}`);
    t.match(got?.message, KIND[target], `${target}: the message says what is there`);
  }
  return seen;
}

t.test('loadModel: anything but a regular file is E_MODEL_LOAD, before anything waits', (t) => {
  checkRefusals(t, { api: 'loadModel', targets: TARGETS }, 'E_MODEL_LOAD');
  t.end();
});

t.test('loadState: anything but a regular file is E_STATE_LOAD, and the context still works', async (t) => {
  const seen = checkRefusals(t, { api: 'loadState', targets: TARGETS, model: await tinyModel() }, 'E_STATE_LOAD');
  t.same(
    seen.find((s) => s.target === 'decode after'),
    { target: 'decode after', code: 'resolved', message: '2' },
    'a decode after the refusals holds positions 0..2',
  );
});

t.test('loadRkllmModel: anything but a regular file is E_MODEL_LOAD', (t) => {
  checkRefusals(t, { api: 'rkllmModel', targets: TARGETS, library: fakeRuntimeLibrary('1.3.0') }, 'E_MODEL_LOAD');
  t.end();
});

t.test("RKLLM: the runtime's prompt-cache file replaced by a FIFO, a directory or a link is refused, and no entry is made", (t) => {
  const cacheDir = path.join(root, 'rkllm-cache');
  const { seen, status, signal } = runChild({ api: 'rkllmPayload', targets: ['FIFO', 'directory', 'link'], cacheDir });
  t.equal(signal, null, 'not killed by the timeout');
  t.equal(status, 0);
  t.same(
    seen.map((s) => [s.target, s.code]),
    [
      ['FIFO', 'uncoded'],
      ['directory', 'uncoded'],
      ['link', 'uncoded'],
    ],
    'each refused (the model reports it as a cache problem)',
  );
  t.match(seen[0]?.message, /prompt cache .* is a FIFO, not a regular file/);
  t.match(seen[1]?.message, /prompt cache .* is a directory, not a regular file/);
  t.match(seen[2]?.message, /prompt cache .* is a symbolic link, not a regular file/);
  t.same(
    fs.readdirSync(cacheDir).filter((name) => name.endsWith('.kvstash')),
    [],
    'no entry was made',
  );
  t.end();
});

t.test('a symlink to a regular model file is followed (a Hugging Face cache holds links)', async (t) => {
  const link = path.join(root, 'linked.gguf');
  fs.symlinkSync(await tinyModel(), link);
  const model = await loadModel(link);
  t.equal(model.path, link);
  await model.dispose();
});

t.test('a queued decode aborted while another runs rejects before the running one finishes, and never runs', async (t) => {
  const model = await loadModel(await tinyModel());
  t.teardown(() => model.dispose());
  const context = await model.createContext({ contextSize: 256 });
  const events: string[] = [];
  const running = context.decode(Array.from({ length: 128 }, (_, i) => 1 + (i % 50)), { sequence: 0 }).then(() => events.push('running done'));
  const controller = new AbortController();
  const queued = context.decode([1, 2, 3], { sequence: 0, signal: controller.signal }).then(
    () => events.push('queued resolved'),
    (err: KvstashError) => events.push(`queued ${err.code}`),
  );
  controller.abort();
  await Promise.all([running, queued]);
  t.same(events, ['queued E_ABORTED', 'running done'], 'the waiting decode left the queue at once');
  t.same(context.memory.range(0), { min: 0, max: 127 }, 'the sequence holds the running decode only: the aborted one never ran');
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(context.pendingOperations, 0, 'nothing left in the queue');
});
