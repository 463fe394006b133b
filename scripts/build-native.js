#!/usr/bin/env node
// Builds the native addon from source: fetch the pinned llama.cpp, then compile it and binding/
// with cmake-js into build/Release/kvstash.node (where node-gyp-build finds a local build).
//
// Options (argv): --portable  build for a baseline CPU instead of this one (GGML_NATIVE off)
//                 --out DIR   cmake-js build directory (default build/)
// Every other argument is passed to cmake-js unchanged (e.g. --CDCMAKE_TOOLCHAIN_FILE=...).
'use strict';

const { spawnSync, execFileSync } = require('node:child_process');
const os = require('node:os');
const path = require('node:path');
const { fetchLlama } = require('./fetch-llama.js');

const root = path.resolve(__dirname, '..');

function hasCommand(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * The ccache namespace of a build for this CPU (GGML_NATIVE on). ccache hashes `-march=native` as
 * written, not the instruction sets it stands for (ccache issue 824), so a cache carried to another
 * machine would hand it objects with instructions that CPU lacks: SIGILL. What the compiler expands
 * `-march=native` to here names the CPU instead.
 */
function nativeCcacheNamespace() {
  let expansion;
  try {
    // -### prints the compiler's internal command lines, with -march=native spelt out, to stderr.
    const probe = spawnSync('c++', ['-march=native', '-###', '-E', '-x', 'c++', '-'], { input: '', encoding: 'utf8' });
    expansion = probe.status === 0 ? probe.stderr : undefined;
  } catch {
    expansion = undefined;
  }
  if (!expansion) {
    try {
      expansion = require('node:fs').readFileSync('/proc/cpuinfo', 'utf8').match(/^(flags|Features)\s*:.*$/m)?.[0];
    } catch {
      expansion = undefined;
    }
  }
  // Without either, a namespace of its own per build still keeps foreign objects out.
  expansion ??= `${os.hostname()} ${Date.now()}`;
  return `native-${require('node:crypto').createHash('sha256').update(expansion).digest('hex').slice(0, 16)}`;
}

/**
 * CMake arguments that keep llama.cpp's AMX kernels out of a native x64 build of llama.cpp's own
 * tools, as CMakeLists.txt keeps them out of the addon (it says why: they crash this pinned tree).
 */
function noAmxCmakeFlags() {
  if (process.arch !== 'x64') return [];
  const flags = '-mno-amx-tile -mno-amx-int8 -mno-amx-bf16';
  return [`-DCMAKE_C_FLAGS=${flags}`, `-DCMAKE_CXX_FLAGS=${flags}`];
}

/** The tools a source build needs that are not on PATH, as apt package names. */
function missingTools(argv) {
  const missing = [];
  if (!hasCommand('cmake')) missing.push('cmake');
  if (!hasCommand('git')) missing.push('git');
  // A cross build names its compilers in the toolchain file; a native one needs the host's.
  const cross = argv.some((a) => a.startsWith('--CDCMAKE_TOOLCHAIN_FILE='));
  if (!cross && !['c++', 'g++', 'clang++'].some(hasCommand)) missing.push('g++');
  return missing;
}

function buildNative(argv = []) {
  const missing = missingTools(argv);
  if (missing.length > 0) {
    throw new Error(`not on PATH: ${missing.join(', ')} (Debian/Ubuntu: apt-get install ${missing.join(' ')})`);
  }
  fetchLlama();
  const passThrough = argv.filter((a) => a !== '--portable');
  const args = [
    require.resolve('cmake-js/bin/cmake-js'),
    'compile',
    '--directory', root,
    '--parallel', String(Math.max(1, os.availableParallelism ? os.availableParallelism() : os.cpus().length)),
    `--CDKVSTASH_NATIVE=${argv.includes('--portable') ? 'OFF' : 'ON'}`,
  ];
  const env = { ...process.env };
  // A compiler cache makes rebuilds of llama.cpp (minutes on 2 cores) take seconds, also across
  // fresh clones in different directories: hence the base dir and no hashing of the cwd.
  if (hasCommand('ccache') && !process.env.KVSTASH_NO_CCACHE) {
    args.push('--CDCMAKE_C_COMPILER_LAUNCHER=ccache', '--CDCMAKE_CXX_COMPILER_LAUNCHER=ccache');
    env.CCACHE_BASEDIR = root;
    env.CCACHE_NOHASHDIR = '1';
    env.CCACHE_SLOPPINESS = 'time_macros,include_file_mtime,include_file_ctime';
    if (!argv.includes('--portable')) env.CCACHE_NAMESPACE = nativeCcacheNamespace();
  }
  args.push(...passThrough);
  const started = Date.now();
  const result = spawnSync(process.execPath, args, { cwd: root, env, stdio: 'inherit' });
  if (result.status !== 0) {
    throw new Error(`cmake-js exited with ${result.status ?? result.signal}; see the compiler output above`);
  }
  process.stderr.write(`[kvstash] native build finished in ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
}

module.exports = { buildNative, hasCommand, nativeCcacheNamespace, noAmxCmakeFlags };

if (require.main === module) {
  try {
    buildNative(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`[kvstash] native build failed: ${err.message}\n`);
    process.exit(1);
  }
}
