// Lifecycle: work runs off the main thread, dispose() waits for it, and everything after dispose
// rejects with E_DISPOSED.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { loadModel, type Model } from '../lib/index.js';
import { largerModel, promptTokens, tinyModel, skipUnderEmulation } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

/** Counts event-loop turns until `work` settles. */
async function ticksDuring(work: Promise<unknown>): Promise<number> {
  let ticks = 0;
  let done = false;
  void work.finally(() => {
    done = true;
  });
  while (!done) {
    await new Promise((resolve) => setTimeout(resolve, 1));
    ticks++;
  }
  return ticks;
}

t.test('the event loop keeps ticking while a model loads and while a long decode runs', { skip: skipUnderEmulation('a 24-layer model; the same worker code is proven natively') }, async (t) => {
  // The bigger shape takes long enough to load that a blocked loop would show.
  const file = await largerModel();
  let loaded: Model | undefined;
  const started = Date.now();
  const loadTicks = await ticksDuring(loadModel(file, { useMmap: false }).then((m) => (loaded = m)));
  const loadMs = Date.now() - started;
  t.ok(loadTicks >= 5, `${loadTicks} ticks during a ${loadMs} ms model load`);

  const context = await loaded!.createContext({ contextSize: 1024 });
  const decodeStarted = Date.now();
  const decodeTicks = await ticksDuring(context.decode(promptTokens(loaded!, 512, 20)));
  t.ok(decodeTicks >= 5, `${decodeTicks} ticks during a ${Date.now() - decodeStarted} ms decode`);
  await loaded!.dispose();
});

t.test('dispose() during a decode waits for it', async (t) => {
  const context = await model.createContext({ contextSize: 4096 });
  let decoded = false;
  const decode = context.decode(promptTokens(model, 3000, 21)).then(() => (decoded = true));
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(context.pendingOperations, 1, 'the decode is running');
  await context.dispose();
  t.equal(decoded, true, 'dispose resolved only after the decode finished');
  await decode;
  await context.dispose();
  t.pass('a second dispose is a no-op');
});

t.test('everything rejects after dispose with E_DISPOSED', async (t) => {
  const context = await model.createContext({ contextSize: 256 });
  const tokens = promptTokens(model, 5, 22);
  await context.decode(tokens);
  const sampler = model.createSampler();
  await context.dispose();
  t.equal(context.isDisposed, true);
  const file = path.join(t.testdir(), 'x.state');
  const calls: Array<[string, () => unknown]> = [
    ['decode', () => context.decode(tokens)],
    ['logits', () => context.logits()],
    ['stateSize', () => context.stateSize()],
    ['saveState', () => context.saveState(file)],
    ['loadState', () => context.loadState(file)],
    ['exportState', () => context.exportState()],
    ['importState', () => context.importState(Buffer.alloc(8))],
    ['memory.copy', () => context.memory.copy(0, 0)],
    ['memory.remove', () => context.memory.remove(0)],
    ['memory.keep', () => context.memory.keep(0)],
    ['memory.clear', () => context.memory.clear()],
    ['memory.range', () => context.memory.range(0)],
    ['memory.shift', () => context.memory.shift(0, 1)],
    ['sampler.sample', () => sampler.sample(context)],
  ];
  for (const [name, call] of calls) {
    await t.rejects(Promise.resolve().then(call), { code: 'E_DISPOSED' }, name);
  }
});

t.test('model.dispose() disposes its contexts first, then rejects everything', async (t) => {
  const own = await loadModel(await tinyModel());
  const a = await own.createContext({ contextSize: 256 });
  const b = await own.createContext({ contextSize: 256 });
  const running = a.decode(promptTokens(own, 200, 23));
  await own.dispose();
  await running;
  t.equal(a.isDisposed, true);
  t.equal(b.isDisposed, true);
  for (const [name, call] of [
    ['tokenize', () => own.tokenize('x')],
    ['detokenize', () => own.detokenize([1])],
    ['applyChatTemplate', () => own.applyChatTemplate([])],
    ['createContext', () => own.createContext()],
    ['createSampler', () => own.createSampler()],
    ['metadata', () => own.metadata()],
  ] as const) {
    await t.rejects(Promise.resolve().then(call), { code: 'E_DISPOSED' }, name);
  }
  await own.dispose();
});

t.test('worker threads: one terminated in the middle of a decode and one left with an idle context both end cleanly', async (t) => {
  // A context settles its operations through a thread-safe function that the environment's
  // teardown closes while the context's own thread may still be decoding (OperationThread.cpp).
  // Each worker runs in a child process, so that a crash fails this test instead of the runner. The
  // worker loads the compiled package (dist/, built by pretest): workers do not get tap's TS hooks.
  const modelPath = await tinyModel();
  const script = (terminate: boolean) => `
    const { Worker } = require('node:worker_threads');
    const code = \`
      const { parentPort } = require('node:worker_threads');
      const { loadModel } = require(${JSON.stringify(path.resolve(__dirname, '../dist/index.js'))});
      (async () => {
        const model = await loadModel(${JSON.stringify(modelPath)});
        const context = await model.createContext({ contextSize: 4096 });
        await context.decode(new Int32Array(8).fill(11));
        ${terminate ? 'void context.decode(new Int32Array(3000).fill(11), { start: 8 }); parentPort.postMessage(\'decoding\');' : 'parentPort.postMessage(\'idle\');'}
      })();
    \`;
    const worker = new Worker(code, { eval: true });
    worker.on('message', (m) => { console.log(m); if (m === 'decoding') setTimeout(() => worker.terminate(), 20); });
    worker.on('error', (e) => { console.error(e); process.exit(3); });
    worker.on('exit', (code) => { console.log('worker exit ' + code); });
  `;
  for (const terminate of [true, false]) {
    const result = spawnSync(process.execPath, [...process.execArgv, '-e', script(terminate)], { encoding: 'utf8', timeout: 60_000 });
    const name = terminate ? 'terminated mid-decode' : 'idle context';
    t.equal(result.signal, null, `${name}: no crash signal (stderr: ${result.stderr.slice(-300)})`);
    t.equal(result.status, 0, `${name}: the process ended by itself, exit code 0`);
    t.same(result.stdout.trim().split('\n'), terminate ? ['decoding', 'worker exit 1'] : ['idle', 'worker exit 0'], `${name}: the worker ran and ended`);
  }
});

// process.exit() does not wait for a context's own operation thread. A decode left running there
// met exit()'s teardown and crashed the process under qemu: 23 of 30 runs exiting 0-200 ms into
// the first batch, none after the first batch's progress report. The library now aborts and waits
// on 'exit' (lib/util/stop-at-exit.ts); each moment is tried.
t.test('a process that exits in the middle of a decode exits cleanly', async (t) => {
  const modelPath = await tinyModel();
  const script = (when: string): string => `
    const { loadModel } = require(${JSON.stringify(path.resolve(__dirname, '../lib/index.ts'))});
    (async () => {
      const model = await loadModel(${JSON.stringify(modelPath)});
      const context = await model.createContext({ contextSize: 4096, batchSize: 512 });
      void context.decode(new Int32Array(3000).fill(11), {
        onProgress: (done, total) => {
          if (${JSON.stringify(when)} !== 'progress') return;
          console.log('progress ' + done + '/' + total);
          if (done < total) process.exit(7);
        },
      });
      if (${JSON.stringify(when)} !== 'progress') setTimeout(() => process.exit(7), Number(${JSON.stringify(when)}));
    })();
  `;
  for (const when of ['0', '100', 'progress']) {
    const result = spawnSync(process.execPath, [...process.execArgv, '-e', script(when)], { encoding: 'utf8', timeout: 60_000 });
    t.equal(result.signal, null, `exit at ${when}: no crash signal (stderr: ${result.stderr.slice(-300)})`);
    t.equal(result.status, 7, `exit at ${when}: the exit code the process chose`);
    if (when === 'progress') {
      t.equal(result.stdout, 'progress 512/3000\n', 'the exit came after the first batch, with the decode in flight');
    }
  }
});
