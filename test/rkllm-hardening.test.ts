// Issue 20: a misbehaving or misdeclared RKLLM runtime never crashes or hangs the process. Each
// class of fault runs against the fake librkllmrt.so (test/rkllm/fake-runtime.c, its FAKE_RKLLM_*
// switches) in a child process, for both runtime ABIs (1.3.0 and 1.2.x): the child must end with
// exit code 0 and no signal, within a timeout that kills it (a hang fails the test, it does not
// stall the suite), and print what it saw, which is compared exactly.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import t, { type Test } from 'tap';
import { FAKE_VERSIONS, fakeModelFile, fakeRuntimeLibrary, type FakeVersion } from './helpers/fake-rkllm.js';

const root = t.testdir();
const modelPath = fakeModelFile(root);
const CHILD = path.resolve(__dirname, 'helpers/rkllm-fault-child.ts');
// Generous for the arm64 run under emulation; a child that takes longer is killed and fails.
const TIMEOUT_MS = 90_000;

interface Step {
  scenario: string;
  library: string;
  declared?: FakeVersion;
  cacheDir?: string;
}

/** Runs the steps in one child; returns what each saw, in order. */
function child(t: Test, steps: Step[]): any[] {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith('FAKE_RKLLM_')) delete env[key];
  const result = spawnSync(process.execPath, [...process.execArgv, '--expose-gc', CHILD, JSON.stringify(steps.map((step) => ({ model: modelPath, ...step })))], {
    encoding: 'utf8',
    timeout: TIMEOUT_MS,
    killSignal: 'SIGKILL',
    // Type-checking is the suite's job: the child only needs the code (seconds less per child).
    env: { ...env, TS_NODE_TRANSPILE_ONLY: '1' },
  });
  const detail = `(stderr: ${(result.stderr ?? '').slice(-600)})`;
  t.equal(result.signal, null, `no signal, not killed by the timeout ${detail}`);
  t.equal(result.status, 0, `exit code 0 ${detail}`);
  const seen: any[] = [];
  for (const line of (result.stdout ?? '').split('\n')) {
    if (line.startsWith('{"step":')) {
      const { step, seen: value } = JSON.parse(line) as { step: number; seen: unknown };
      seen[step] = value;
    }
  }
  t.equal(seen.length, steps.length, 'every step reported');
  return seen;
}

const other = (version: FakeVersion): FakeVersion => (version === '1.3.0' ? '1.2.1' : '1.3.0');
const escape = (version: string): string => version.replace(/\./g, '\\.');

t.test('every class of fault, both ABIs, in one child that must exit 0', async (t) => {
  const steps: Step[] = [];
  const expected: Array<(seen: any) => void> = [];
  for (const version of FAKE_VERSIONS) {
    const library = fakeRuntimeLibrary(version);
    // ABI read from the library: detected without a declaration, a contradicting one refused.
    steps.push({ scenario: 'abi', library });
    expected.push((seen) => t.same(seen, { version, tokens: 4 }, `${version} library, no runtimeVersion: detected`));
    steps.push({ scenario: 'abi', library, declared: version });
    expected.push((seen) => t.same(seen, { version, tokens: 4 }, `${version} library, declared ${version}`));
    steps.push({ scenario: 'abi', library, declared: other(version) });
    expected.push((seen) => {
      t.equal(seen?.code, 'E_RKLLM_VERSION', `${version} library declared ${other(version)}: refused, no segfault`);
      t.match(seen?.message, new RegExp(`runtimeVersion '${escape(other(version))}' was declared.*speaks the ${escape(version)}`, 's'));
    });
    // 1.2.1b1 (and 1.2.0, 1.1.x) lack rkllm_get_kv_cache_size: older than anything kvstash speaks.
    steps.push({ scenario: 'abi', library: fakeRuntimeLibrary(version, { omit: 'rkllm_get_kv_cache_size' }) });
    expected.push((seen) => {
      t.equal(seen?.code, 'E_RKLLM_UNAVAILABLE', `${version} without rkllm_get_kv_cache_size`);
      t.match(seen?.message, /older than runtime 1\.2\.1/);
    });

    steps.push({ scenario: 'abortFails', library });
    expected.push((seen) =>
      t.same(seen, { generation: 'E_ABORTED', run: 'E_ABORTED', saysWhy: true }, `${version}: a failing rkllm_abort under a signal rejects E_ABORTED`),
    );
    steps.push({ scenario: 'lateCallbacks', library });
    expected.push((seen) =>
      t.same(seen, { secondHasLate: false, secondTokens: version === '1.3.0' ? 5 : 3 }, `${version}: late callbacks dropped, harmless after dispose and GC`),
    );
    steps.push({ scenario: 'misc', library, cacheDir: path.join(root, `cache-${version}`) });
    expected.push((seen) => {
      t.same(
        seen?.split,
        {
          iterated: ['é', '☕', '😀'],
          onToken: ['é', '☕', '😀'],
          text: 'é☕😀',
          runChunks: ['', 'é', '', '☕', '😀'],
          runResultChunks: ['', 'é', '', '☕', '😀'],
          runText: 'é☕😀',
        },
        `${version}: whole characters only, in the stream and the chunks alike`,
      );
      t.same(seen?.finish, { afterSameText: true, afterTokens: 24, normalTokens: 24, noFinish: 'E_RKLLM_CALL' }, `${version}: tokens after FINISH dropped; no FINISH is an error`);
      t.same(seen?.queuedAbort, { code: 'E_ABORTED', whileFirstRunning: true }, `${version}: a queued generation leaves the queue when its signal fires`);
      t.same(
        seen?.cache,
        { uses: ['failed', 'failed', 'created'], problems: 1, hiddenBefore: 2, hiddenAfter: [], entries: 1 },
        `${version}: a failed cache stays 'failed'; late and orphaned temporary files are swept`,
      );
    });
  }
  // Last: runs that never return (both ABIs at once), then process.exit(0) with both stuck.
  for (const version of FAKE_VERSIONS) {
    steps.push({ scenario: 'neverReturns', library: fakeRuntimeLibrary(version) });
    expected.push((seen) =>
      t.same(seen, { after: 'E_DISPOSED', runAfter: 'E_DISPOSED', queued: 'E_DISPOSED', queuedRun: 'E_DISPOSED' }, `${version}: stuck run: calls after dispose() reject at once`),
    );
  }
  const seen = child(t, steps);
  expected.forEach((check, i) => check(seen[i]));
});

t.test('process.exit() with runs stuck in the runtime and no dispose(): exits 0', async (t) => {
  const steps = FAKE_VERSIONS.map((version) => ({ scenario: 'neverReturnsExit', library: fakeRuntimeLibrary(version) }));
  t.same(child(t, steps), [{ stuck: true }, { stuck: true }]);
});
