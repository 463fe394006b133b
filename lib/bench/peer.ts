/**
 * The benchmark's peer, node-llama-cpp, installed on first need into a folder of its own, not as a
 * devDependency: as one, every `npm install` of a checkout pulled its optional packages for every
 * platform and GPU (669 of the 861 MB of node_modules) although only `kvstash bench` uses it. Here
 * it gets node-llama-cpp and the one prebuilt package for this platform (about 85 MB), once per
 * version, in the user's cache directory.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { isProcessAlive } from '../util/process.js';
import type { Ui } from '../tools/status.js';
import { userCacheDir } from '../util/paths.js';

// lib/bench/ under tap and dist/bench/ when compiled: both sit two levels below the package root.
const packageRoot = path.resolve(__dirname, '..', '..');

/**
 * The version measured: the node-llama-cpp release whose llama.cpp tree kvstash builds from
 * (scripts/fetch-llama.js pins it), so both sides of every row run the same llama.cpp commit.
 */
export function peerVersion(): string {
  // A CommonJS build script, deliberately outside the TypeScript sources; it ships in the package.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (require(path.join(packageRoot, 'scripts', 'fetch-llama.js')) as { PIN: { version: string } }).PIN.version;
}

/** node-llama-cpp's prebuilt package for this machine ('@node-llama-cpp/linux-x64'), or null when it publishes none. */
export function peerPlatformPackage(platform: string = process.platform, arch: string = process.arch): string | null {
  const os = ({ linux: 'linux', darwin: 'mac', win32: 'win' } as Record<string, string>)[platform];
  const known = ['linux-x64', 'linux-arm64', 'linux-armv7l', 'mac-x64', 'win-x64', 'win-arm64'];
  if (os === undefined) return null;
  // Its Apple-silicon package is named for Metal; the others for their architecture alone.
  const name = os === 'mac' && arch === 'arm64' ? 'mac-arm64-metal' : `${os}-${arch === 'arm' ? 'armv7l' : arch}`;
  return name === 'mac-arm64-metal' || known.includes(name) ? `@node-llama-cpp/${name}` : null;
}

/** Where the peer of `version` lives: $KVSTASH_BENCH_PEER_DIR or <user cache>/bench-peer, one folder per version and platform. */
export function peerDir(version: string = peerVersion()): string {
  const root = process.env.KVSTASH_BENCH_PEER_DIR || path.join(userCacheDir(), 'bench-peer');
  return path.join(root, `node-llama-cpp-${version}-${process.platform}-${process.arch}`);
}

/** Written last: a folder without it is an install that did not finish, and is redone. */
const DONE = 'kvstash-peer.json';

export interface PeerInstall {
  dir: string;
  version: string;
  /** Path of node-llama-cpp's ESM entry point, for import(). */
  entry: string;
}

/**
 * The installed peer, installing it first when missing: `npm install` of node-llama-cpp and this
 * platform's package alone (--omit=optional drops its other platforms and GPU builds), its
 * postinstall skipped (it would download or build llama.cpp: the benchmark uses the prebuilt
 * binary only). The install is staged in a sibling folder and renamed into place, so an interrupted
 * one leaves nothing that looks installed, and two first runs at once both end with one whole copy.
 * The download runs under `ui`'s status line. Throws (with npm's output) when npm fails.
 */
export async function ensurePeer(options: { signal?: AbortSignal; ui?: Ui } = {}): Promise<PeerInstall> {
  const version = peerVersion();
  const dir = peerDir(version);
  const installed = describe(dir, version);
  if (fs.existsSync(path.join(dir, DONE))) return installed;
  const platformPackage = peerPlatformPackage();
  if (platformPackage === null) throw new Error(`node-llama-cpp publishes no prebuilt package for ${process.platform}-${process.arch}`);
  const packages = [`node-llama-cpp@${version}`, `${platformPackage}@${version}`];

  const parent = path.dirname(dir);
  await fsp.mkdir(parent, { recursive: true });
  await removeAbandoned(parent);
  const staging = await fsp.mkdtemp(path.join(parent, `.installing-${process.pid}-`));
  try {
    // node-llama-cpp's postinstall reads config.nodeLlamaCppPostinstall from the package.json files
    // above its own folder (and NODE_LLAMA_CPP_POSTINSTALL from the environment): both say skip.
    await fsp.writeFile(
      path.join(staging, 'package.json'),
      `${JSON.stringify({ name: 'kvstash-bench-peer', private: true, config: { nodeLlamaCppPostinstall: 'skip' } }, null, 2)}\n`,
    );
    const npmInstall = (): Promise<void> =>
      runNpm(['install', '--prefix', staging, '--no-save', '--no-package-lock', '--omit=optional', '--no-audit', '--no-fund', ...packages], options.signal);
    const ui = options.ui;
    if (ui === undefined) await npmInstall();
    else await ui.status(`First run: installing ${packages.join(' and ')} (the benchmark's peer) into ${ui.showPath(dir)}`, npmInstall);
    const staged = describe(staging, version);
    if (!fs.existsSync(staged.entry)) throw new Error(`npm install ended without ${staged.entry}`);
    await fsp.writeFile(path.join(staging, DONE), `${JSON.stringify({ packages, installedAt: new Date().toISOString() })}\n`);
    try {
      await fsp.rename(staging, dir);
    } catch (err) {
      if (fs.existsSync(path.join(dir, DONE))) {
        // Another first run finished first; its copy is whole (DONE is written before the rename).
      } else if (fs.existsSync(dir)) {
        // A folder at the final path without DONE was not made here: replace it.
        await fsp.rm(dir, { recursive: true, force: true });
        await fsp.rename(staging, dir);
      } else {
        throw err;
      }
    }
  } finally {
    await fsp.rm(staging, { recursive: true, force: true });
  }
  return installed;
}

function describe(dir: string, version: string): PeerInstall {
  return { dir, version, entry: path.join(dir, 'node_modules', 'node-llama-cpp', 'dist', 'index.js') };
}

/** Imports the installed peer's ESM entry point (a file URL: it is outside this package's node_modules). */
export async function importPeer<T>(install: PeerInstall): Promise<T> {
  return (await import(pathToFileURL(install.entry).href)) as T;
}

function runNpm(args: string[], signal: AbortSignal | undefined): Promise<void> {
  // Under `npm run`, the npm that runs us; else the one on PATH.
  const npmCli = process.env.npm_execpath;
  const [file, argv] = npmCli !== undefined && npmCli.endsWith('.js') ? [process.execPath, [npmCli, ...args]] : ['npm', args];
  return new Promise((resolve, reject) => {
    execFile(
      file,
      argv,
      { signal, maxBuffer: 16 << 20, env: { ...process.env, NODE_LLAMA_CPP_POSTINSTALL: 'skip' } },
      (err, stdout, stderr) => {
        if (err === null) return resolve();
        if ((err as Error).name === 'AbortError') return reject(err);
        const output = `${stderr}${stdout}`.trim().split('\n').slice(-15).join('\n');
        reject(new Error(`npm ${args.join(' ')} failed (${err.message.split('\n')[0]})${output ? `:\n${output}` : ''}`));
      },
    );
  });
}

/** Staging folders of installs whose process died (SIGKILL, power loss): each holds up to 85 MB. */
async function removeAbandoned(parent: string): Promise<void> {
  for (const name of await fsp.readdir(parent)) {
    const pid = /^\.installing-(\d+)-/.exec(name)?.[1];
    if (pid !== undefined && !isProcessAlive(Number(pid))) await fsp.rm(path.join(parent, name), { recursive: true, force: true });
  }
}
