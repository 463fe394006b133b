#!/usr/bin/env node
// llama.cpp's own batching ceiling on this machine, beside the bench's "8 concurrent sessions
// >= 3 x one after another" target (README, Benchmark). It builds llama.cpp's llama-batched-bench
// from the pinned tree in deps/llama.cpp (kvstash's edits change neither a generation step of 1 to
// 8 tokens nor the weights' kernels) into build-llama-tools/ and runs it on the synthetic
// qwen2-0.5b models with the bench's settings (FULL_CONFIG): a 2,000-token prompt shared by 1 and
// by 8 sequences, 32 generated tokens each, 2 threads, one unified KV cache. Generation speed with 8 sequences over
// generation speed with one is what batching gains llama.cpp itself on this CPU; kvstash's
// concurrent sessions run on the same kernels and cannot gain more while generating.
//
//   node scripts/batched-ceiling.js [type ...]    type: q8_0 or q4_k (default: both)
//
// Needs the TypeScript build (npm run build:ts) for the synthetic model writer.
'use strict';

const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { hasCommand, nativeCcacheNamespace, noAmxCmakeFlags } = require('./build-native.js');
const { fetchLlama } = require('./fetch-llama.js');

const root = path.resolve(__dirname, '..');
const buildDir = path.join(root, 'build-llama-tools');

function buildBatchedBench() {
  const source = fetchLlama();
  const launcher = hasCommand('ccache') ? ['-DCMAKE_C_COMPILER_LAUNCHER=ccache', '-DCMAKE_CXX_COMPILER_LAUNCHER=ccache'] : [];
  // Built for this CPU: its own ccache namespace (build-native.js says why).
  const env = { ...process.env, CCACHE_NAMESPACE: nativeCcacheNamespace() };
  // The same switches as kvstash's own build (CMakeLists.txt), plus llama.cpp's tools.
  execFileSync('cmake', ['-S', source, '-B', buildDir, ...(hasCommand('ninja') ? ['-G', 'Ninja'] : []), '-DCMAKE_BUILD_TYPE=Release',
    '-DLLAMA_BUILD_TOOLS=ON', '-DLLAMA_BUILD_EXAMPLES=OFF', '-DLLAMA_BUILD_TESTS=OFF', '-DLLAMA_BUILD_SERVER=OFF',
    '-DLLAMA_CURL=OFF', '-DLLAMA_OPENSSL=OFF', '-DGGML_OPENMP=OFF', '-DGGML_NATIVE=ON', ...noAmxCmakeFlags(), ...launcher], { env, stdio: 'inherit' });
  execFileSync('cmake', ['--build', buildDir, '--target', 'llama-batched-bench'], { env, stdio: 'inherit' });
  return path.join(buildDir, 'bin', 'llama-batched-bench');
}

/** Generated tokens per second for each batch size, from llama-batched-bench's table (S_TG column). */
function generationSpeeds(table) {
  const speeds = new Map();
  for (const line of table.split('\n')) {
    const cells = line.split('|').map((cell) => cell.trim()).filter(Boolean);
    if (cells.length === 10 && /^\d+$/.test(cells[2])) speeds.set(Number(cells[2]), Number(cells[7]));
  }
  return speeds;
}

/** llama-batched-bench's arguments for the bench's case (also used by `npm run bench -- --server`). */
function ceilingArgs(model, config) {
  return ['-m', model, '-c', String(config.contextSize), '-ub', String(config.batchSize),
    '-npp', String(config.prefixTokens), '-ntg', String(config.sessionTokens), '-npl', `1,${config.sessions}`, '-pps', '-kvu',
    '-t', String(config.threads)];
}

async function main() {
  const types = process.argv.slice(2).length > 0 ? process.argv.slice(2) : ['q8_0', 'q4_k'];
  const { syntheticModelPath } = require(path.join(root, 'dist/tools/synthetic-model.js'));
  const { cliUi } = require(path.join(root, 'dist/cli/progress.js'));
  const { userCacheDir } = require(path.join(root, 'dist/util/paths.js'));
  // The bench's own settings, so the two measure the same case.
  const { FULL_CONFIG: config } = require(path.join(root, 'dist/bench/bench.js'));
  const bench = buildBatchedBench();
  for (const type of types) {
    const model = await syntheticModelPath(userCacheDir(), new AbortController().signal, cliUi, { shape: config.shape, type, seed: config.seed });
    const table = execFileSync(bench, ceilingArgs(model, config), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    process.stdout.write(`${type}\n${table.trim()}\n`);
    const speeds = generationSpeeds(table);
    if (!speeds.has(1) || !speeds.has(config.sessions)) throw new Error(`no S_TG rows for batch sizes 1 and ${config.sessions} in llama-batched-bench's output`);
    const gain = speeds.get(config.sessions) / speeds.get(1);
    process.stdout.write(`${type}: generation with ${config.sessions} sequences at ${gain.toFixed(2)} x the tokens/s of one (llama.cpp's own ceiling)\n\n`);
  }
}

module.exports = { ceilingArgs, generationSpeeds };

if (require.main === module) {
  main().catch((err) => {
    console.error(err.message);
    process.exit(1);
  });
}
