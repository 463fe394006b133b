#!/usr/bin/env node
// Obtains the pinned llama.cpp source for kvstash's native build.
//
// No repository host is reachable from our build machines, but the npm registry is, and the npm
// package node-llama-cpp ships the complete llama.cpp tree as a git bundle. We fetch that tarball
// with the ordinary npm client, check it against the integrity the registry publishes (pinned here,
// so a changed tarball is refused), and clone the bundle into deps/llama.cpp.
//
// Idempotent: when deps/llama.cpp already holds the pinned commit, it returns at once (after making
// sure kvstash's source edits, below, are applied).
'use strict';

const { execFileSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const PIN = {
  package: 'node-llama-cpp',
  version: '3.22.1',
  integrity:
    'sha512-bltIipuWmc123H7tMIgDGKSsSrhmhlQYeVUC48XTjVW7XGJJiJJyCdlTMzQ/LiWoPkGDpcL4FviDpgw7qfTiDw==',
  commit: 'de3ff815',
  bundle: 'package/llama/gitRelease.bundle',
};

// kvstash's edits to the pinned tree, each one expression, applied after the clone and checked on
// every build. An edit whose search text is missing (another llama.cpp commit) stops the build
// rather than building something unmeasured.
const EDITS = [
  {
    // ggml's CPU flash attention uses its tiled (GEMM) kernel only for batches of at least
    // GGML_FA_TILE_Q = 64 query rows; smaller batches take the row-at-a-time kernel. The tiled
    // kernel's cost is nearly flat up to a full tile (it converts the K/V tiles once per query
    // tile), so it wins from about 32 rows: measured on the qwen2-0.5b shape after a 2,000-token
    // prefix, 2 threads, f16 KV (tiled/row-at-a-time): 16 rows 1.50x slower, 24 rows 1.17x slower,
    // 32 rows 0.97, 48 rows 0.78. kvstash's main case, a 50-token suffix after a restored prefix,
    // lands in that gap. Both kernels compute the same attention; only summation order differs.
    file: 'ggml/src/ggml-cpu/ops.cpp',
    find: 'neq1 >= Q_TILE_SZ);',
    replace: 'neq1 >= Q_TILE_SZ / 2); // kvstash: tiled from 32 query rows (scripts/fetch-llama.js)',
  },
  {
    // A verified restore checks every 64 KiB chunk of an entry against its digest before llama.cpp
    // reads it. Reading, checking and then importing are three passes one after the other; with
    // this gate llama.cpp imports the chunks already checked while kvstash reads and checks the
    // next ones on another thread (binding/llama/StateReadGate.h). llama_io_read_host is the
    // reader behind llama_state_set_data and llama_state_seq_set_data (host memory): every byte it
    // hands on goes through read() or through the tensor copies flushed in its destructor, so the
    // gate sits in those two places (this edit declares it; the next two call it). It is declared
    // weak: llama.cpp built without kvstash has no gate and reads as before. kvstash's definition
    // is binding/llama/StateReadGate.cpp.
    file: 'src/llama-context.cpp',
    find: 'class llama_io_read_host : public llama_io_read_i {',
    replace:
      '// kvstash: may llama.cpp read these state bytes yet? Waits until they are verified; false when\n' +
      '// they failed (scripts/fetch-llama.js).\n' +
      'extern "C" bool kvstash_state_read_gate(const void * data, size_t size) __attribute__((weak));\n\n' +
      'class llama_io_read_host : public llama_io_read_i {',
  },
  {
    // The gate, before the tensor copies the reader defers to its destructor (which must not throw:
    // it stops copying, and the import is failed by kvstash).
    file: 'src/llama-context.cpp',
    find: 'ggml_backend_tensor_set(rinfo.tensor, rinfo.ptr, rinfo.offset, rinfo.size);',
    replace:
      'if (kvstash_state_read_gate && !kvstash_state_read_gate(rinfo.ptr, rinfo.size)) break; // kvstash\n' +
      '            ggml_backend_tensor_set(rinfo.tensor, rinfo.ptr, rinfo.offset, rinfo.size);',
  },
  {
    // The gate, before read() copies fields out (the first memcpy after the class line: the
    // device reader below has the same line).
    file: 'src/llama-context.cpp',
    after: 'class llama_io_read_host : public llama_io_read_i {',
    find: 'memcpy(dst, ptr, size);',
    replace:
      'if (kvstash_state_read_gate && !kvstash_state_read_gate(ptr, size)) throw std::runtime_error("kvstash: the state bytes failed verification"); // kvstash\n' +
      '        memcpy(dst, ptr, size);',
  },
  {
    // The bulk of a state (the K and V rows) is copied by the destructor's flush, after llama.cpp
    // has read every layer's header. Through the gate alone, those bytes cross memory three times:
    // the file into the whole-entry buffer, the buffer through the hash, the buffer into the KV
    // cache. With this hook the gate is handed all the deferred copies at once and does them per
    // chunk: a chunk nobody has read yet is read into a small buffer that stays in the CPU cache,
    // checked there and copied into the KV cache on two threads (StateReadGate::FlushReads); only
    // verified bytes are copied. It is declared before the gate's declaration (edit 2), so that
    // edit's text stays whole. False from the hook (no verified restore running, or a tensor not in
    // host memory) leaves the flush as it was.
    file: 'src/llama-context.cpp',
    find: '// kvstash: may llama.cpp read these state bytes yet?',
    replace:
      '// kvstash: the deferred tensor copies of a verified restore, done by kvstash; false when it does\n' +
      '// not take them (scripts/fetch-llama.js). dst is null for a tensor outside host memory.\n' +
      'struct kvstash_tensor_read { const void * src; void * dst; size_t size; };\n' +
      'extern "C" bool kvstash_state_read_tensors(const kvstash_tensor_read * reads, size_t count) __attribute__((weak));\n\n' +
      '// kvstash: may llama.cpp read these state bytes yet?',
  },
  {
    file: 'src/llama-context.cpp',
    after: 'class llama_io_read_host : public llama_io_read_i {',
    find: '        // flush the reads\n',
    replace:
      '        // flush the reads\n' +
      '        if (kvstash_state_read_tensors && !rinfos.empty()) { // kvstash\n' +
      '            std::vector<kvstash_tensor_read> reads;\n' +
      '            reads.reserve(rinfos.size());\n' +
      '            for (const auto & rinfo : rinfos) {\n' +
      '                const bool host = rinfo.tensor->buffer != nullptr && ggml_backend_buffer_is_host(rinfo.tensor->buffer);\n' +
      '                reads.push_back({rinfo.ptr, host ? (uint8_t *) rinfo.tensor->data + rinfo.offset : nullptr, rinfo.size});\n' +
      '            }\n' +
      '            if (kvstash_state_read_tensors(reads.data(), reads.size())) return;\n' +
      '        }\n',
  },
];

const root = path.resolve(__dirname, '..');
const defaultTarget = path.join(root, 'deps', 'llama.cpp');

function log(msg) {
  process.stderr.write(`[kvstash] ${msg}\n`);
}

function headCommit(dir) {
  try {
    return execFileSync('git', ['-C', dir, 'rev-parse', 'HEAD'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return null;
  }
}

function isPresent(target) {
  const head = headCommit(target);
  return head !== null && head.startsWith(PIN.commit) && fs.existsSync(path.join(target, 'include', 'llama.h'));
}

function occurrences(text, needle) {
  return text.split(needle).length - 1;
}

function applyEdits(tree) {
  for (const edit of EDITS) {
    const file = path.join(tree, edit.file);
    const text = fs.readFileSync(file, 'utf8');
    if (occurrences(text, edit.replace) === 1) continue;
    // `after` (once in the file) narrows the search to its first `find` past it; without it,
    // `find` must occur exactly once.
    const from = edit.after === undefined ? 0 : text.indexOf(edit.after);
    const at = text.indexOf(edit.find, from);
    if ((edit.after !== undefined && occurrences(text, edit.after) !== 1) || at < 0 || (edit.after === undefined && occurrences(text, edit.find) !== 1)) {
      const where = edit.after === undefined ? 'exactly once' : `after "${edit.after}"`;
      throw new Error(`cannot apply kvstash's edit to ${edit.file}: expected "${edit.find}" ${where} (is this llama.cpp ${PIN.commit}?)`);
    }
    fs.writeFileSync(file, text.slice(0, at) + edit.replace + text.slice(at + edit.find.length));
  }
}

function integrityOf(file) {
  const digest = crypto.createHash('sha512').update(fs.readFileSync(file)).digest('base64');
  return `sha512-${digest}`;
}

/** npm pack the pinned package into `work`, check its integrity, extract the git bundle: its path. */
function fetchBundle(work) {
  const spec = `${PIN.package}@${PIN.version}`;
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
  execFileSync(npm, ['pack', spec, '--silent', '--pack-destination', work], { stdio: ['ignore', 'ignore', 'inherit'] });
  const tarball = fs.readdirSync(work).find((f) => f.endsWith('.tgz'));
  if (!tarball) throw new Error(`npm pack ${spec} produced no tarball`);
  const actual = integrityOf(path.join(work, tarball));
  if (actual !== PIN.integrity) {
    throw new Error(`integrity mismatch for ${spec}: expected ${PIN.integrity}, got ${actual}. Refusing to build from it.`);
  }
  execFileSync('tar', ['-xzf', tarball, PIN.bundle], { cwd: work, stdio: 'inherit' });
  return path.join(work, PIN.bundle);
}

function fetchLlama(target = defaultTarget) {
  if (isPresent(target)) {
    applyEdits(target);
    return target;
  }
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-llama-'));
  try {
    log(`fetching llama.cpp ${PIN.commit} from the npm package ${PIN.package}@${PIN.version}`);
    const bundle = fetchBundle(work);
    fs.rmSync(target, { recursive: true, force: true });
    fs.mkdirSync(path.dirname(target), { recursive: true });
    // Clone into a temporary sibling and rename, so an interrupted fetch never leaves a half tree
    // that isPresent() would accept.
    const partial = `${target}.partial-${process.pid}`;
    fs.rmSync(partial, { recursive: true, force: true });
    execFileSync('git', ['-c', 'advice.detachedHead=false', 'clone', '--quiet', bundle, partial], { stdio: 'inherit' });
    const head = headCommit(partial);
    if (!head || !head.startsWith(PIN.commit)) throw new Error(`bundle HEAD is ${head}, expected ${PIN.commit}`);
    applyEdits(partial);
    fs.renameSync(partial, target);
    log(`llama.cpp ready in ${path.relative(process.cwd(), target) || target}`);
    return target;
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

/**
 * One file of the pinned llama.cpp tree, without a checkout (a 6 MB vocab file instead of a 200 MB
 * tree in an installed package): the bundle is unpacked into a bare repository in a temporary
 * directory and the file read from the pinned commit. Written atomically to `destination`.
 */
function fetchLlamaFile(relative, destination) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-llama-'));
  try {
    log(`fetching ${relative} of llama.cpp ${PIN.commit} from the npm package ${PIN.package}@${PIN.version}`);
    const bundle = fetchBundle(work);
    const git = path.join(work, 'repository.git');
    execFileSync('git', ['init', '--quiet', '--bare', git], { stdio: 'inherit' });
    execFileSync('git', ['-C', git, 'bundle', 'unbundle', bundle], { stdio: ['ignore', 'ignore', 'inherit'] });
    const blob = execFileSync('git', ['-C', git, 'cat-file', 'blob', `${PIN.commit}:${relative}`], { maxBuffer: 1 << 30 });
    fs.mkdirSync(path.dirname(destination), { recursive: true });
    const partial = `${destination}.partial-${process.pid}`;
    fs.writeFileSync(partial, blob);
    fs.renameSync(partial, destination);
    return destination;
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

module.exports = { fetchLlama, fetchLlamaFile, PIN, EDITS, defaultTarget };

if (require.main === module) {
  try {
    fetchLlama(process.argv[2] ? path.resolve(process.argv[2]) : defaultTarget);
  } catch (err) {
    log(`could not obtain llama.cpp: ${err.message}`);
    process.exit(1);
  }
}
