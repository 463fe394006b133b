// Scenarios of test/rkllm-hardening.test.ts, run in a child process because their failure mode is
// a crash or a hang: each prints one JSON line with what it saw; then the process ends with
// process.exit(0), which must not wait for runs stuck in the runtime. Several scenarios share one
// process (starting one costs seconds): a crash in any of them fails them all, as it should.
// Usage: node <loader flags> rkllm-fault-child.ts <json array of steps {scenario, library, ...}>
import fs from 'node:fs';
import path from 'node:path';
import { KvstashError, RkllmRuntime, loadRkllmModel } from '../../lib/index.js';

interface Args {
  scenario: string;
  library: string;
  model: string;
  declared?: '1.3.0' | '1.2.1';
  cacheDir?: string;
}

const steps = JSON.parse(process.argv[2]!) as Args[];
let args: Args;
const report = (value: unknown): void => {
  process.stdout.write(`${JSON.stringify({ step: steps.indexOf(args), seen: value })}\n`);
};
const codeOf = (err: unknown): string => (err as KvstashError)?.code ?? `not coded: ${String(err)}`;
const settle = <T>(p: Promise<T>): Promise<{ ok: T } | { code: string; message: string }> =>
  p.then(
    (ok) => ({ ok }),
    (err: unknown) => ({ code: codeOf(err), message: (err as Error).message }),
  );
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function firstToken(): { promise: Promise<void>; seen: () => void } {
  let seen!: () => void;
  const promise = new Promise<void>((resolve) => (seen = resolve));
  return { promise, seen };
}

const scenarios: Record<string, () => Promise<void>> = {
  // The ABI read from the library, with and without a declaration; then one generation.
  async abi() {
    const opened = await settle(RkllmRuntime.open(args.model, { libraryPath: args.library, runtimeVersion: args.declared, maxNewTokens: 4 }));
    if (!('ok' in opened)) return report({ code: opened.code, message: opened.message });
    const runtime = opened.ok;
    const run = await runtime.run({ prompt: 'hello' });
    report({ version: runtime.version, tokens: run.tokenIds.length });
    await runtime.dispose();
  },

  // rkllm_abort fails (FAKE_RKLLM_FAIL=abort) when the signal fires: coded rejections, no crash.
  async abortFails() {
    process.env.FAKE_RKLLM_FAIL = 'abort';
    process.env.FAKE_RKLLM_TOKEN_US = '20000';
    const model = await loadRkllmModel(args.model, { libraryPath: args.library, cacheDir: null, maxNewTokens: 200 });
    const controller = new AbortController();
    const generation = await settle(model.generate({ prompt: 'hi', signal: controller.signal, onToken: () => controller.abort() }).result);
    const second = new AbortController();
    const run = await settle(model.runtime.run({ prompt: 'again', signal: second.signal, onToken: () => second.abort() }));
    report({
      generation: 'code' in generation ? generation.code : 'resolved',
      run: 'code' in run ? run.code : 'resolved',
      saysWhy: 'message' in run && /rkllm_abort failed/.test(run.message),
    });
    await model.dispose();
  },

  // rkllm_run never returns (FAKE_RKLLM_NEVER_RETURN): calls after dispose() reject at once, and
  // process.exit() ends the process.
  async neverReturns() {
    process.env.FAKE_RKLLM_NEVER_RETURN = '1';
    const model = await loadRkllmModel(args.model, { libraryPath: args.library, cacheDir: null });
    const first = firstToken();
    const stuck = model.generate({ prompt: 'hang', onToken: first.seen });
    stuck.result.catch(() => undefined);
    const queued = settle(model.generate({ prompt: 'queued' }).result);
    await first.promise;
    const queuedRun = settle(model.runtime.run({ prompt: 'queued too' }));
    void model.dispose();
    const after = await settle(model.generate({ prompt: 'after dispose' }).result);
    const runAfter = await settle(model.runtime.run({ prompt: 'after dispose' }));
    const [q, qr] = await Promise.all([queued, queuedRun]);
    report({ after: codeOf(after), runAfter: codeOf(runAfter), queued: codeOf(q), queuedRun: codeOf(qr) });
  },

  // The same stuck runtime, without dispose(): process.exit() alone.
  async neverReturnsExit() {
    process.env.FAKE_RKLLM_NEVER_RETURN = '1';
    const runtime = await RkllmRuntime.open(args.model, { libraryPath: args.library });
    const first = firstToken();
    void runtime.run({ prompt: 'hang', onToken: first.seen }).catch(() => undefined);
    await first.promise;
    report({ stuck: true });
  },

  // Callbacks after their run returned (FAKE_RKLLM_LATE_CALLBACK=30 ms): never in the next run's
  // text, and harmless after dispose() and garbage collection.
  async lateCallbacks() {
    process.env.FAKE_RKLLM_LATE_CALLBACK = '30';
    process.env.FAKE_RKLLM_TOKEN_US = '0';
    let runtime: RkllmRuntime | undefined = await RkllmRuntime.open(args.model, { libraryPath: args.library, maxNewTokens: 3 });
    await runtime.run({ prompt: 'first' });
    // The next run is still generating when the first one's late call comes.
    process.env.FAKE_RKLLM_TOKEN_US = '40000';
    const second = await runtime.run({ prompt: 'second', maxNewTokens: runtime.version === '1.3.0' ? 5 : undefined });
    process.env.FAKE_RKLLM_TOKEN_US = '0';
    await runtime.run({ prompt: 'third' });
    await runtime.dispose(); // the third run's late call comes after rkllm_destroy
    runtime = undefined;
    for (let i = 0; i < 5; i++) {
      (globalThis as { gc?: () => void }).gc?.();
      await sleep(20);
    }
    report({ secondHasLate: second.text.includes('LATE') || second.tokenIds.includes(999), secondTokens: second.tokenIds.length });
  },

  // The smaller faults, none of which may crash: split characters, no FINISH, tokens after FINISH,
  // a queued generation's signal, a prompt cache written late.
  async misc() {
    const out: Record<string, unknown> = {};
    const model = await loadRkllmModel(args.model, { libraryPath: args.library, cacheDir: args.cacheDir!, maxNewTokens: 24 });

    process.env.FAKE_RKLLM_SPLIT_UTF8 = '1';
    const onToken: string[] = [];
    const generation = model.generate({ prompt: 'split', cache: false, onToken: (text) => onToken.push(text) });
    const iterated: string[] = [];
    for await (const chunk of generation) iterated.push(chunk);
    const runChunks: string[] = [];
    const run = await model.runtime.run({ prompt: 'split', onToken: (text) => runChunks.push(text) });
    out.split = { iterated, onToken, text: (await generation.result).text, runChunks, runResultChunks: run.chunks, runText: run.text };
    delete process.env.FAKE_RKLLM_SPLIT_UTF8;

    const normal = await model.generate({ prompt: 'finish', cache: false }).result;
    process.env.FAKE_RKLLM_AFTER_FINISH = '1';
    const after = await model.generate({ prompt: 'finish', cache: false }).result;
    delete process.env.FAKE_RKLLM_AFTER_FINISH;
    process.env.FAKE_RKLLM_NO_FINISH = '1';
    const noFinish = await settle(model.generate({ prompt: 'finish', cache: false }).result);
    delete process.env.FAKE_RKLLM_NO_FINISH;
    out.finish = {
      afterSameText: after.text === normal.text,
      afterTokens: after.tokens.length,
      normalTokens: normal.tokens.length,
      noFinish: 'code' in noFinish ? noFinish.code : 'resolved',
    };

    process.env.FAKE_RKLLM_TOKEN_US = '20000';
    const first = firstToken();
    let firstSettled = false;
    const running = model.generate({ prompt: 'long', cache: false, onToken: first.seen }).result.finally(() => (firstSettled = true));
    const controller = new AbortController();
    const queued = settle(model.generate({ prompt: 'queued', cache: false, signal: controller.signal }).result);
    await first.promise;
    controller.abort();
    const queuedResult = await queued;
    out.queuedAbort = { code: codeOf(queuedResult), whileFirstRunning: !firstSettled };
    await running;
    delete process.env.FAKE_RKLLM_TOKEN_US;

    process.env.FAKE_RKLLM_CACHE_LATE = '50';
    const uses: string[] = [];
    const problems: string[] = [];
    model.on('problem', (problem: { message: string }) => problems.push(problem.message));
    uses.push((await model.generate({ system: 'one', prompt: 'a' }).result).systemPromptCache);
    await sleep(300); // the late file is there now
    uses.push((await model.generate({ system: 'one', prompt: 'b' }).result).systemPromptCache);
    delete process.env.FAKE_RKLLM_CACHE_LATE;
    // A temporary left by a process that has ended (pid above Linux's largest pid_max).
    fs.writeFileSync(path.join(args.cacheDir!, '.rkllm-ab12-4194999-0.prompt-cache'), 'x');
    const hiddenBefore = fs.readdirSync(args.cacheDir!).filter((name) => name.startsWith('.rkllm-')).length;
    uses.push((await model.generate({ system: 'two', prompt: 'c' }).result).systemPromptCache);
    out.cache = {
      uses,
      problems: problems.length,
      hiddenBefore,
      hiddenAfter: fs.readdirSync(args.cacheDir!).filter((name) => name.startsWith('.rkllm-')),
      entries: fs.readdirSync(args.cacheDir!).filter((name) => name.endsWith('.kvstash')).length,
    };
    await model.dispose();
    report(out);
  },
};

async function main(): Promise<void> {
  for (const step of steps) {
    args = step;
    for (const key of Object.keys(process.env)) if (key.startsWith('FAKE_RKLLM_')) delete process.env[key];
    const scenario = scenarios[step.scenario];
    if (!scenario) throw new Error(`unknown scenario ${step.scenario}`);
    await scenario();
  }
  // Runs may still be stuck inside the runtime (neverReturns*): exit must not wait for them.
  process.exit(0);
}

void main().catch((err: unknown) => {
  process.stderr.write(`scenario ${args?.scenario} failed: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(3);
});
