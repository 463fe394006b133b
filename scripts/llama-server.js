#!/usr/bin/env node
// llama.cpp's own OpenAI-compatible server, as a user would run it instead of `kvstash serve`: the
// pinned llama.cpp commit (scripts/fetch-llama.js) as it is published, without kvstash's edits,
// built with the same switches as kvstash's native build (as scripts/batched-ceiling.js builds
// llama-batched-bench) into the user's cache directory. `npm run bench -- --server` runs it beside
// kvstash's server (lib/bench/server.ts).
//
//   node scripts/llama-server.js            builds it (once) and prints the binaries' paths as JSON:
//                                           {"server": ..., "batchedBench": ..., "llamaBench": ...}
//
// llama-batched-bench and llama-bench come from the same build: the bench compares the servers'
// concurrency gain with llama.cpp's own batching gain, measured as scripts/batched-ceiling.js
// measures it, and a single client's TTFT with llama.cpp's own time to prefill its question.
//
// The pristine tree is a local clone of deps/llama.cpp's pinned commit: kvstash's edits live in
// that checkout's working tree only, never in a commit, so the clone holds the published files. The
// build refuses a tree in which any edit's text is found.
'use strict';

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { hasCommand, nativeCcacheNamespace, noAmxCmakeFlags } = require('./build-native.js');
const { fetchLlama, PIN, EDITS } = require('./fetch-llama.js');

function cacheRoot() {
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'kvstash', 'llama-server', PIN.commit);
}

/** A checkout of the pinned commit without kvstash's edits: its path. */
function pristineTree(root) {
  const tree = path.join(root, 'llama.cpp');
  const marker = path.join(tree, 'include', 'llama.h');
  if (!fs.existsSync(marker)) {
    const source = fetchLlama();
    const partial = `${tree}.partial-${process.pid}`;
    fs.rmSync(partial, { recursive: true, force: true });
    fs.mkdirSync(root, { recursive: true });
    execFileSync('git', ['-c', 'advice.detachedHead=false', 'clone', '--quiet', source, partial], { stdio: 'inherit' });
    fs.rmSync(tree, { recursive: true, force: true });
    fs.renameSync(partial, tree);
  }
  const head = execFileSync('git', ['-C', tree, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).trim();
  if (!head.startsWith(PIN.commit)) throw new Error(`${tree} is at ${head}, expected llama.cpp ${PIN.commit}`);
  for (const edit of EDITS) {
    if (fs.readFileSync(path.join(tree, edit.file), 'utf8').includes(edit.replace)) {
      throw new Error(`${tree} carries kvstash's edit to ${edit.file}; delete ${tree} and run again`);
    }
  }
  return tree;
}

/** Builds llama-server, llama-batched-bench and llama-bench (once per pinned commit): the binaries' paths. */
function buildLlamaServer() {
  const root = cacheRoot();
  const bin = path.join(root, 'build', 'bin');
  const tree = pristineTree(root);
  const buildDir = path.join(root, 'build');
  const launcher = hasCommand('ccache') ? ['-DCMAKE_C_COMPILER_LAUNCHER=ccache', '-DCMAKE_CXX_COMPILER_LAUNCHER=ccache'] : [];
  // Built for this CPU: its own ccache namespace (build-native.js says why).
  const env = { ...process.env, CCACHE_NAMESPACE: nativeCcacheNamespace() };
  // The same switches as kvstash's own build (CMakeLists.txt) and scripts/batched-ceiling.js, with
  // the server on.
  execFileSync('cmake', ['-S', tree, '-B', buildDir, ...(hasCommand('ninja') ? ['-G', 'Ninja'] : []), '-DCMAKE_BUILD_TYPE=Release',
    '-DLLAMA_BUILD_TOOLS=ON', '-DLLAMA_BUILD_EXAMPLES=OFF', '-DLLAMA_BUILD_TESTS=OFF', '-DLLAMA_BUILD_SERVER=ON',
    '-DLLAMA_CURL=OFF', '-DLLAMA_OPENSSL=OFF', '-DGGML_OPENMP=OFF', '-DGGML_NATIVE=ON', ...noAmxCmakeFlags(), ...launcher], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  execFileSync('cmake', ['--build', buildDir, '--target', 'llama-server', 'llama-batched-bench', 'llama-bench'], { env, stdio: ['ignore', process.stderr, 'inherit'] });
  const built = { server: path.join(bin, 'llama-server'), batchedBench: path.join(bin, 'llama-batched-bench'), llamaBench: path.join(bin, 'llama-bench') };
  for (const binary of Object.values(built)) if (!fs.existsSync(binary)) throw new Error(`the build finished without ${binary}`);
  return built;
}

module.exports = { buildLlamaServer };

if (require.main === module) {
  try {
    process.stdout.write(`${JSON.stringify(buildLlamaServer())}\n`);
  } catch (err) {
    process.stderr.write(`[kvstash] could not build llama-server: ${err.message}\n`);
    process.exit(1);
  }
}
