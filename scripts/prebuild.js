#!/usr/bin/env node
// `npm run prebuild [-- --arch x64|arm64]`: the prebuilt binaries that ship in the npm package,
// prebuilds/linux-x64/ (native build) and prebuilds/linux-arm64/ (cross build with Debian's aarch64
// toolchain), in prebuildify's layout, which node-gyp-build reads at run time. Each holds the
// loader kvstash.node and one kvstash-<variant>.so per CPU level (scripts/cpu-variants.js).
// prebuildify drives the build through scripts/prebuild-variants.js in place of node-gyp, in a
// staging directory of its own, so the source build in build/Release is left alone.
'use strict';

const { execFileSync, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const STRIP = { x64: 'strip', arm64: 'aarch64-linux-gnu-strip' };

function hasCommand(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/** The newest glibc symbol version a binary needs: the oldest glibc it loads on. */
function glibcFloor(file) {
  const text = execFileSync('readelf', ['--dyn-syms', '-W', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const versions = [...text.matchAll(/GLIBC_(\d+)\.(\d+)(?:\.(\d+))?/g)].map((m) => [+m[1], +m[2], +(m[3] || 0)]);
  versions.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);
  const top = versions.pop();
  return top ? top.filter((v, i) => i < 2 || v).join('.') : 'none';
}

function prebuild(arch) {
  if (arch === 'arm64' && !hasCommand('aarch64-linux-gnu-gcc')) {
    execFileSync('bash', [path.join(__dirname, 'arm64.sh'), 'toolchain'], { stdio: 'inherit' });
  }
  const out = path.join(root, 'prebuilds', `linux-${arch}`);
  const stage = path.join(root, 'build-prebuild', `stage-${arch}`);
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(stage, { recursive: true });
  const started = Date.now();
  const args = [
    require.resolve('prebuildify/bin.js'),
    '--napi', '--strip', '--strip-bin', STRIP[arch],
    '--name', 'kvstash', '--platform', 'linux', '--arch', arch,
    '--cwd', stage, '--out', root,
    '--node-gyp', path.join(__dirname, 'prebuild-variants.js'),
  ];
  const result = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  if (result.status !== 0) throw new Error(`prebuildify for linux-${arch} exited with ${result.status ?? result.signal}`);
  const files = fs.readdirSync(out).sort();
  for (const file of files) {
    const full = path.join(out, file);
    const size = (fs.statSync(full).size / 1e6).toFixed(1);
    process.stderr.write(`[kvstash]   ${path.relative(root, full)}  ${size} MB  needs glibc >= ${glibcFloor(full)}\n`);
  }
  process.stderr.write(`[kvstash] linux-${arch} prebuilds ready in ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
}

function main() {
  const argv = process.argv.slice(2);
  const at = argv.indexOf('--arch');
  const arches = at >= 0 ? [argv[at + 1]] : ['x64', 'arm64'];
  for (const arch of arches) {
    if (!STRIP[arch]) throw new Error(`unknown --arch ${arch}: expected x64 or arm64`);
    prebuild(arch);
  }
}

try {
  main();
} catch (err) {
  process.stderr.write(`[kvstash] prebuild failed: ${err.message}\n`);
  process.exit(1);
}
