// The benchmark's peer (lib/bench/peer.ts): node-llama-cpp installed on first need into a folder of
// its own, with only this platform's package and its postinstall skipped. npm is replaced by a fake
// (npm_execpath, which the installer prefers, as under `npm run`) that records what it was asked and
// writes what npm would, so these checks need no network; `npm run bench` exercises the real one.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { ensurePeer, peerDir, peerPlatformPackage, peerVersion } from '../lib/bench/peer.js';

t.test('the platform package: one per OS and architecture node-llama-cpp publishes', async (t) => {
  t.equal(peerPlatformPackage('linux', 'x64'), '@node-llama-cpp/linux-x64');
  t.equal(peerPlatformPackage('linux', 'arm64'), '@node-llama-cpp/linux-arm64');
  t.equal(peerPlatformPackage('linux', 'arm'), '@node-llama-cpp/linux-armv7l');
  t.equal(peerPlatformPackage('darwin', 'arm64'), '@node-llama-cpp/mac-arm64-metal');
  t.equal(peerPlatformPackage('win32', 'x64'), '@node-llama-cpp/win-x64');
  t.equal(peerPlatformPackage('linux', 'riscv64'), null);
  t.equal(peerPlatformPackage('freebsd', 'x64'), null);
});

t.test('the version is the one scripts/fetch-llama.js pins', async (t) => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  t.equal(peerVersion(), (require('../scripts/fetch-llama.js') as { PIN: { version: string } }).PIN.version);
  t.equal(peerVersion(), '3.22.1');
});

/** A fake npm: records its argv and environment, then writes node-llama-cpp's entry (or fails). */
function fakeNpm(dir: string, behaviour: 'install' | 'fail'): { script: string; log: string } {
  const log = path.join(dir, 'npm-calls.jsonl');
  const script = path.join(dir, 'fake-npm.js');
  fs.writeFileSync(
    script,
    `const fs = require('fs'), path = require('path');
const args = process.argv.slice(2);
const prefix = args[args.indexOf('--prefix') + 1];
const config = JSON.parse(fs.readFileSync(path.join(prefix, 'package.json'), 'utf8')).config;
fs.appendFileSync(${JSON.stringify(log)}, JSON.stringify({ args, config, postinstall: process.env.NODE_LLAMA_CPP_POSTINSTALL }) + '\\n');
if (${JSON.stringify(behaviour)} === 'fail') { console.error('npm error 404 Not Found - GET https://registry.example/node-llama-cpp'); process.exit(1); }
const pkg = path.join(prefix, 'node_modules', 'node-llama-cpp');
fs.mkdirSync(path.join(pkg, 'dist'), { recursive: true });
fs.writeFileSync(path.join(pkg, 'dist', 'index.js'), 'export const fake = true;\\n');
fs.writeFileSync(path.join(pkg, 'package.json'), '{"version":"3.22.1"}');
`,
  );
  return { script, log };
}

function withEnv(t: { teardown(fn: () => void): void }, env: Record<string, string>): void {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  t.teardown(() => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });
}

t.test('first run installs node-llama-cpp and this platform package only, postinstall skipped; later runs reuse it', async (t) => {
  const dir = t.testdir();
  const npm = fakeNpm(dir, 'install');
  withEnv(t, { KVSTASH_BENCH_PEER_DIR: path.join(dir, 'peers'), npm_execpath: npm.script });
  const expectedDir = path.join(dir, 'peers', `node-llama-cpp-3.22.1-${process.platform}-${process.arch}`);
  t.equal(peerDir(), expectedDir, 'KVSTASH_BENCH_PEER_DIR moves the peers; one folder per version and platform');

  const install = await ensurePeer();
  t.equal(install.dir, expectedDir);
  t.equal(install.entry, path.join(expectedDir, 'node_modules', 'node-llama-cpp', 'dist', 'index.js'));
  t.ok(fs.existsSync(install.entry), 'the entry point is in place');
  t.ok(fs.existsSync(path.join(expectedDir, 'kvstash-peer.json')), 'the install is marked finished');
  const calls = fs.readFileSync(npm.log, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { args: string[]; config: unknown; postinstall: string });
  t.equal(calls.length, 1, 'npm ran once');
  const [call] = calls;
  t.equal(call!.args[0], 'install');
  t.match(call!.args[call!.args.indexOf('--prefix') + 1], /[/\\]peers[/\\]\.installing-\d+-/, 'into a staging folder beside the final one');
  for (const flag of ['--no-save', '--omit=optional', '--no-package-lock']) t.ok(call!.args.includes(flag), `npm install ${flag}`);
  t.same(call!.args.filter((a) => !a.startsWith('-') && a !== 'install' && !a.includes('.installing-')), ['node-llama-cpp@3.22.1', `${peerPlatformPackage()}@3.22.1`], 'exactly two packages, pinned');
  t.same(call!.config, { nodeLlamaCppPostinstall: 'skip' }, "node-llama-cpp's postinstall reads skip from the folder's package.json");
  t.equal(call!.postinstall, 'skip', '... and from NODE_LLAMA_CPP_POSTINSTALL');
  t.same(fs.readdirSync(path.join(dir, 'peers')), [path.basename(expectedDir)], 'no staging folder left');

  const again = await ensurePeer();
  t.same(again, install, 'the second run finds it');
  t.equal(fs.readFileSync(npm.log, 'utf8').trim().split('\n').length, 1, 'without running npm again');
});

t.test('a failed npm install throws with npm output and leaves nothing that looks installed', async (t) => {
  const dir = t.testdir();
  const npm = fakeNpm(dir, 'fail');
  withEnv(t, { KVSTASH_BENCH_PEER_DIR: path.join(dir, 'peers'), npm_execpath: npm.script });
  await t.rejects(ensurePeer(), /npm install .*failed[^]*npm error 404 Not Found/);
  t.same(fs.readdirSync(path.join(dir, 'peers')), [], 'no staging folder and no peer folder');
});

t.test('an unfinished folder (no marker) and a dead installer\'s staging folder are replaced', async (t) => {
  const dir = t.testdir();
  const npm = fakeNpm(dir, 'install');
  withEnv(t, { KVSTASH_BENCH_PEER_DIR: path.join(dir, 'peers'), npm_execpath: npm.script });
  const final = peerDir();
  fs.mkdirSync(path.join(final, 'node_modules'), { recursive: true });
  // A pid that is not alive: the largest pid Linux hands out is below 2^22.
  fs.mkdirSync(path.join(dir, 'peers', '.installing-4194999-abc'), { recursive: true });
  const install = await ensurePeer();
  t.ok(fs.existsSync(path.join(install.dir, 'kvstash-peer.json')), 'installed over the unfinished folder');
  t.same(fs.readdirSync(path.join(dir, 'peers')), [path.basename(final)], "the dead installer's staging folder is gone");
});
