// Cases of test/non-regular-files.test.ts, run in a child process because the failure they guard
// against is a hang (a FIFO opened for reading waits for a writer, on a thread that even
// process.exit() waits for). Each case prints one JSON line with the code it got, so a hang shows
// as the missing line; the process then ends with process.exit(0), which a blocked open would hold.
// Usage: node <loader flags> non-regular-child.ts <json {api, targets, model?, library?, cacheDir?}>
import { loadModel, loadRkllmModel, type KvstashError } from '../../lib/index.js';
import { createSystemPromptCache } from '../../lib/rkllm/system-prompt-cache.js';
import { execFileSync } from 'node:child_process';

interface Args {
  api: 'loadModel' | 'loadState' | 'rkllmModel' | 'rkllmPayload';
  targets: string[];
  model?: string;
  library?: string;
  cacheDir?: string;
}

const args = JSON.parse(process.argv[2]!) as Args;
const outcome = async (work: () => Promise<unknown>): Promise<{ code: string; message: string }> => {
  try {
    await work();
    return { code: 'resolved', message: '' };
  } catch (err) {
    return { code: (err as KvstashError).code ?? 'uncoded', message: String((err as Error).message ?? err) };
  }
};
const report = (target: string, seen: { code: string; message: string }): void => {
  process.stdout.write(`${JSON.stringify({ target, ...seen })}\n`);
};

async function main(): Promise<void> {
  if (args.api === 'loadModel') {
    for (const target of args.targets) report(target, await outcome(() => loadModel(target)));
  } else if (args.api === 'loadState') {
    const model = await loadModel(args.model!);
    const context = await model.createContext({ contextSize: 64 });
    for (const target of args.targets) report(target, await outcome(() => context.loadState(target)));
    // The context still works after the refusals.
    await context.decode([1, 2, 3]);
    report('decode after', { code: 'resolved', message: String(context.memory.range(0).max) });
  } else if (args.api === 'rkllmModel') {
    for (const target of args.targets) {
      report(target, await outcome(() => loadRkllmModel(target, { libraryPath: args.library!, cacheDir: null })));
    }
  } else {
    // The runtime's prompt-cache file replaced by something else before kvstash reads it.
    for (const target of args.targets) {
      const key = { runtimeVersion: '1.3.0', modelIdentity: 'f'.repeat(64), modelName: 'm', systemPrompt: target, maxContextLen: 64, nBatch: 1 };
      report(
        target,
        await outcome(() =>
          createSystemPromptCache(args.cacheDir!, key, async (temporary) => {
            if (target === 'FIFO') execFileSync('mkfifo', [temporary]);
            else if (target === 'directory') execFileSync('mkdir', [temporary]);
            else execFileSync('ln', ['-s', '/dev/zero', temporary]);
          }),
        ),
      );
    }
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stdout.write(`${JSON.stringify({ target: 'main', code: 'crashed', message: String(err) })}\n`);
    process.exit(0);
  },
);
