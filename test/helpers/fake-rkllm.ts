/**
 * The fake RKLLM runtime (test/rkllm/fake-runtime.c), compiled at test time into a per-process
 * temporary directory, and a reader of the call log it writes. kvstash keeps librkllmrt.so mapped
 * once loaded (RTLD_NODELETE), so every variant gets a file of its own.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export type FakeVersion = '1.3.0' | '1.2.1';
export const FAKE_VERSIONS: readonly FakeVersion[] = ['1.3.0', '1.2.1'];

const SOURCE = path.resolve(__dirname, '../rkllm/fake-runtime.c');
let buildDir: string | undefined;
const built = new Map<string, string>();

/**
 * Path of a fake librkllmrt.so speaking `version`'s ABI. `omit` names an exported function to
 * leave out (it is renamed away at compile time).
 */
export function fakeRuntimeLibrary(version: FakeVersion, options: { omit?: string } = {}): string {
  const key = `${version}:${options.omit ?? ''}`;
  const cached = built.get(key);
  if (cached) return cached;
  if (!buildDir) {
    buildDir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-fake-rkllm-'));
    const dir = buildDir;
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  }
  const file = path.join(buildDir, `librkllmrt-${version.replace(/\./g, '')}${options.omit ? `-no-${options.omit}` : ''}.so`);
  const defines = [`-DFAKE_RKLLM_V=${version === '1.3.0' ? 130 : 121}`];
  if (options.omit) defines.push(`-D${options.omit}=fake_omitted_${options.omit}`);
  // KVSTASH_TEST_CC: the target's C compiler when the suite runs under emulation (scripts/arm64.sh).
  execFileSync(process.env.KVSTASH_TEST_CC || process.env.CC || 'cc', ['-shared', '-fPIC', '-O1', '-Wall', ...defines, '-o', file, SOURCE, '-lpthread', '-lm'], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  built.set(key, file);
  return file;
}

export interface FakeCall {
  fn: string;
  handle: number;
  live: number;
  status?: number;
  [field: string]: unknown;
}

/** The fake's call log (env FAKE_RKLLM_LOG), one JSON object per call. */
export class FakeLog {
  constructor(readonly file: string) {
    process.env.FAKE_RKLLM_LOG = file;
    this.clear();
  }

  clear(): void {
    fs.writeFileSync(this.file, '');
  }

  calls(fn?: string): FakeCall[] {
    const lines = fs.existsSync(this.file) ? fs.readFileSync(this.file, 'utf8').split('\n').filter(Boolean) : [];
    const all = lines.map((line) => JSON.parse(line) as FakeCall);
    return fn === undefined ? all : all.filter((call) => call.fn === fn);
  }

  last(fn: string): FakeCall {
    const calls = this.calls(fn);
    if (calls.length === 0) throw new Error(`the fake logged no ${fn} call`);
    return calls[calls.length - 1]!;
  }

  /** Function names in call order, without the bookkeeping lines. */
  sequence(): string[] {
    return this.calls()
      .map((call) => call.fn)
      .filter((fn) => fn !== 'rkllm_createDefaultParam');
  }

  /** Handles alive in the fake after the last logged call. */
  live(): number {
    const calls = this.calls();
    return calls.length === 0 ? 0 : calls[calls.length - 1]!.live;
  }
}

/** Runs `work` with FAKE_RKLLM_FAIL set to `what`. */
export async function failing<T>(what: string, work: () => Promise<T>): Promise<T> {
  process.env.FAKE_RKLLM_FAIL = what;
  try {
    return await work();
  } finally {
    delete process.env.FAKE_RKLLM_FAIL;
  }
}

/** A stand-in .rkllm file at `<dir>/models/<name>/<file>` (the fake only checks it opens). */
export function fakeModelFile(dir: string, name = 'qwen-fake', file = 'model-w8a8.rkllm'): string {
  const folder = path.join(dir, 'models', name);
  fs.mkdirSync(folder, { recursive: true });
  const target = path.join(folder, file);
  fs.writeFileSync(target, Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 31 + name.length) & 0xff)));
  return target;
}

/** Counts event-loop turns until `work` settles. */
export async function ticksDuring(work: Promise<unknown>): Promise<number> {
  let ticks = 0;
  let done = false;
  void work.then(
    () => (done = true),
    () => (done = true),
  );
  while (!done) {
    await new Promise((resolve) => setTimeout(resolve, 1));
    ticks++;
  }
  return ticks;
}
