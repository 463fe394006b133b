#!/usr/bin/env bash
# The pack-and-install check (`npm run pack-check`, run by CI after `npm run prebuild`): what a user
# gets from `npm install kvstash` works without a compiler, on both architectures.
#
#  1. npm pack; the tarball holds compiled JS and .d.ts, both prebuilds, the sources and scripts of
#     the source build, the licences and the Qwen2 vocab (the synthetic models' tokenizer), and
#     nothing else (no tests, other models, deps/ or build/).
#  2. PATH without any C/C++ compiler, cmake, make, ninja or git (a directory of links to every
#     other command), checked by asking for them.
#  3. linux-x64: install the tarball into a new project; a CommonJS consumer (require) and an ES
#     module consumer written in TypeScript (import, `tsc --strict` clean) each write the tiny
#     synthetic model, decode, and generate greedily; both must print the same answer, from the
#     prebuilt binary the loader picks for this CPU.
#  4. The x64 CPU levels under qemu-x86_64: a Nehalem (SSE4.2, no AVX) gets x86-64-v2, a Haswell
#     gets x86-64-v3, both give the same answer as step 3; the AVX2 build forced onto the Nehalem
#     dies with SIGILL, which proves the levels really differ.
#  5. --build-from-source with no compiler fails with the one error that lists every cause.
#  6. linux-arm64: the same install and consumers with the arm64 Node under qemu (cortex-a76 gets
#     the dotprod+fp16 build; the answer matches within float tolerance of another ISA's kernels).
#  7. The fallback: the tarball installs with --build-from-source where compilers are on PATH, and
#     the consumers run on that source build.
#
# Needs: prebuilds/linux-x64 and prebuilds/linux-arm64 (npm run prebuild), and scripts/arm64.sh
# setup (qemu, the arm64 Node, binfmt_misc). Environment: KVSTASH_PACK_KEEP=1 keeps the work dir.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
say() { echo "pack-check: $*" >&2; }
die() { say "FAIL: $*"; exit 1; }

for arch in x64 arm64; do
  [ -f "prebuilds/linux-$arch/kvstash.node" ] || die "no prebuilds/linux-$arch: run npm run prebuild first"
done
arm64_node="$(bash scripts/arm64.sh node-path)"
[ -x "$arm64_node" ] || die "no arm64 node: run scripts/arm64.sh setup"
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
# Versions the TypeScript consumer installs: the ones this repository builds with.
ts_version="$(node -p "require('./node_modules/typescript/package.json').version")"
types_version="$(node -p "require('./node_modules/@types/node/package.json').version")"
# npm's own script, run by the arm64 node for the arm64 install.
npm_cli="$(readlink -f "$(command -v npm)")"

work="$(mktemp -d "${TMPDIR:-/tmp}/kvstash-pack-check-XXXXXX")"
if [ "${KVSTASH_PACK_KEEP:-}" != 1 ]; then trap 'rm -rf "$work"' EXIT; fi
started=$SECONDS

# 1. the tarball -----------------------------------------------------------------------------
npm pack --pack-destination "$work" --json --silent >"$work/pack.json"
tarball="$work/$(node -p "require(process.argv[1])[0].filename" "$work/pack.json")"
node - "$work/pack.json" <<'EOF'
const [info] = require(process.argv[2]);
const files = info.files.map((f) => f.path);
const required = [
  'package.json', 'README.md', 'LICENSE', 'THIRD_PARTY_NOTICES',
  'dist/index.js', 'dist/index.d.ts', 'dist/index.mjs', 'dist/index.d.mts', 'dist/cli/main.js',
  'prebuilds/linux-x64/kvstash.node', 'prebuilds/linux-x64/kvstash-x86-64-v2.so', 'prebuilds/linux-x64/kvstash-x86-64-v3.so',
  'prebuilds/linux-x64/kvstash-x86-64-v4.so', 'prebuilds/linux-x64/kvstash-x86-64-v4+vnni.so',
  'prebuilds/linux-arm64/kvstash.node', 'prebuilds/linux-arm64/kvstash-armv8-a.so', 'prebuilds/linux-arm64/kvstash-armv8.2-a+dotprod+fp16.so',
  'CMakeLists.txt', 'cmake/aarch64-linux-gnu.cmake', 'binding/addon.cpp', 'scripts/install.js', 'scripts/build-native.js', 'scripts/fetch-llama.js',
  'models/ggml-vocab-qwen2.gguf',
];
const forbidden = [/^test\//, /^deps\//, /^build/, /^node_modules\//, /\.gguf$/, /^scratch\//, /^bench-results\//, /\.map$/, /^lib\//, /^\.ci\//, /\.tgz$/];
const missing = required.filter((f) => !files.includes(f));
// The one GGUF shipped: the vocab of the synthetic models (scripts/vocab.js).
const extra = files.filter((f) => f !== 'models/ggml-vocab-qwen2.gguf' && forbidden.some((re) => re.test(f)));
const notices = require('fs').readFileSync('THIRD_PARTY_NOTICES', 'utf8');
if (missing.length) throw new Error(`the tarball lacks ${missing.join(', ')}`);
if (extra.length) throw new Error(`the tarball must not hold ${extra.slice(0, 10).join(', ')}`);
if (!/llama\.cpp/.test(notices) || !/MIT License/.test(notices)) throw new Error('THIRD_PARTY_NOTICES lacks the llama.cpp licence');
const mb = (n) => (n / 1e6).toFixed(1);
console.error(`pack-check: ${info.filename}: ${mb(info.size)} MB packed, ${mb(info.unpackedSize)} MB unpacked, ${info.entryCount} files; contents as required`);
EOF

# 2. a PATH without compilers ------------------------------------------------------------------
nocc="$work/bin-no-compilers"
mkdir -p "$nocc"
# git too: the installed package must get its synthetic models' tokenizer without it (issue 21).
hidden='^(git|cc|c\+\+|c89|c99|cpp|gcc|g\+\+|clang|clang\+\+|tcc|cmake|ctest|cpack|ccmake|make|gmake|ninja|ccache|ld|ld\..*|as|(.*-)?(gcc|g\+\+|cpp|c\+\+|cc)(-[0-9.]+)?|clang.*|.*-linux-gnu-.*)$'
IFS=: read -r -a path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
  [ -d "$dir" ] || continue
  for exe in "$dir"/*; do
    name="${exe##*/}"
    [ -x "$exe" ] && [ ! -d "$exe" ] || continue
    [[ "$name" =~ $hidden ]] && continue
    [ -e "$nocc/$name" ] || ln -s "$(readlink -f "$exe")" "$nocc/$name"
  done
done
for tool in cc gcc g++ c++ clang cmake make ninja git; do
  if PATH="$nocc" command -v "$tool" >/dev/null 2>&1; then die "$tool is still on the compiler-free PATH"; fi
done
say "compiler-free PATH ready (cc, gcc, g++, c++, clang, cmake, make, ninja, git: not found)"

# The consumers. Both write the tiny model, decode a prompt, then generate greedily with a prompt
# cache, and print one JSON line that the check compares across consumers and machines.
consumers="$work/consumers"
mkdir -p "$consumers"
cat >"$consumers/consumer.cjs" <<'EOF'
const path = require('node:path');
const os = require('node:os');
const fs = require('node:fs');
const { writeSyntheticModel, loadModel, generate, PromptCache, systemInfo } = require('kvstash');

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-consumer-'));
  const file = path.join(dir, 'tiny.gguf');
  await writeSyntheticModel({ shape: 'tiny', path: file, type: 'q8_0' });
  const model = await loadModel(file);
  const context = await model.createContext({ contextSize: 512, threads: 1 });
  await context.decode(model.tokenize('the prompt cache is saved and restored again by every session'));
  const logits = context.logits();
  let argmax = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[argmax]) argmax = i;
  context.memory.clear();
  const cache = new PromptCache({ dir: path.join(dir, 'cache') });
  const result = await generate(context, { system: 'You answer in one line.', prompt: 'name a colour', cache, maxTokens: 8, sampling: { temperature: 0 } }).result;
  await model.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  console.log(JSON.stringify({ consumer: 'cjs', arch: process.arch, variant: systemInfo().cpuVariant, argmax, logit: logits[argmax], tokens: Array.from(result.tokens) }));
}
main().catch((err) => { console.error(err); process.exit(1); });
EOF
cat >"$consumers/consumer.mts" <<'EOF'
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeSyntheticModel, loadModel, generate, PromptCache, systemInfo, type Model, type GenerationResult } from 'kvstash';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-consumer-'));
const file = path.join(dir, 'tiny.gguf');
await writeSyntheticModel({ shape: 'tiny', path: file, type: 'q8_0' });
const model: Model = await loadModel(file);
const context = await model.createContext({ contextSize: 512, threads: 1 });
await context.decode(model.tokenize('the prompt cache is saved and restored again by every session'));
const logits: Float32Array = context.logits();
let argmax = 0;
for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[argmax]!) argmax = i;
context.memory.clear();
const cache = new PromptCache({ dir: path.join(dir, 'cache') });
const result: GenerationResult = await generate(context, { system: 'You answer in one line.', prompt: 'name a colour', cache, maxTokens: 8, sampling: { temperature: 0 } }).result;
await model.dispose();
fs.rmSync(dir, { recursive: true, force: true });
console.log(JSON.stringify({ consumer: 'esm', arch: process.arch, variant: systemInfo().cpuVariant, argmax, logit: logits[argmax], tokens: Array.from(result.tokens) }));
EOF
cat >"$consumers/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "strict": true,
    "module": "nodenext",
    "moduleResolution": "nodenext",
    "target": "es2022",
    "types": ["node"],
    "noEmitOnError": true,
    "skipLibCheck": false
  },
  "files": ["consumer.mts"]
}
EOF

# new_project DIR: an empty npm project with the consumers in it
new_project() {
  mkdir -p "$1"
  cp "$consumers"/consumer.cjs "$consumers"/consumer.mts "$consumers"/tsconfig.json "$1/"
  printf '{ "name": "kvstash-consumer", "version": "1.0.0", "private": true }\n' >"$1/package.json"
}

# same_answer FILE...: every JSON line names the same argmax and generated tokens
same_answer() {
  node - "$@" <<'EOF'
const fs = require('fs');
const rows = process.argv.slice(2).flatMap((f) => fs.readFileSync(f, 'utf8').trim().split('\n')).map((l) => JSON.parse(l));
const key = (r) => JSON.stringify([r.argmax, r.tokens]);
for (const r of rows) {
  if (key(r) !== key(rows[0])) throw new Error(`answers differ: ${JSON.stringify(rows[0])} vs ${JSON.stringify(r)}`);
  if (!(r.tokens.length > 0)) throw new Error(`no tokens generated: ${JSON.stringify(r)}`);
}
console.error(`pack-check: same answer from ${rows.map((r) => `${r.consumer}/${r.arch}/${r.variant}`).join(', ')}: argmax ${rows[0].argmax}, ${rows[0].tokens.length} tokens`);
EOF
}

# 3. linux-x64 --------------------------------------------------------------------------------
x64="$work/x64"
new_project "$x64"
(cd "$x64" && PATH="$nocc" npm install --no-audit --no-fund --loglevel=error --foreground-scripts "$tarball" "typescript@$ts_version" "@types/node@$types_version" 2>"$work/x64-install.log") ||
  { cat "$work/x64-install.log" >&2; die "npm install of the tarball failed on linux-x64 without compilers"; }
grep -q 'using the prebuilt binary prebuilds/linux-x64/kvstash.node' "$work/x64-install.log" ||
  { cat "$work/x64-install.log" >&2; die "the install did not report using the linux-x64 prebuilt binary"; }
[ ! -e "$x64/node_modules/kvstash/build" ] || die "the install built something (node_modules/kvstash/build exists)"
(cd "$x64" && PATH="$nocc" node_modules/.bin/tsc -p tsconfig.json) || die "tsc --strict failed on the ESM/TypeScript consumer"
# A cache directory of their own, empty: the tokenizer of the synthetic model (the one file of
# llama.cpp's tree it needs) comes from the package, not from a fetch into it (which needs git).
export XDG_CACHE_HOME="$work/user-cache"
(cd "$x64" && PATH="$nocc" node consumer.cjs >"$work/x64-cjs.json" && PATH="$nocc" node consumer.mjs >"$work/x64-esm.json") ||
  die "a consumer failed on linux-x64"
! compgen -G "$XDG_CACHE_HOME/kvstash/llama.cpp-*" >/dev/null || die "the consumers fetched the tokenizer into the user cache instead of using the package's"
[ ! -e "$x64/node_modules/kvstash/deps" ] || die "the consumers fetched a llama.cpp tree into the installed package"
expected_x64="$(node -e "
  const f = require('fs').readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)[1].split(/\s+/);
  const has = (...n) => n.every((x) => f.includes(x));
  const v4 = has('avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl');
  console.log(v4 && has('avx512_vnni', 'avx512vbmi') ? 'x86-64-v4+vnni' : v4 ? 'x86-64-v4' : has('avx2', 'fma', 'f16c', 'bmi2') ? 'x86-64-v3' : 'x86-64-v2');")"
grep -q "\"variant\":\"$expected_x64\"" "$work/x64-cjs.json" || die "this CPU should get $expected_x64: $(cat "$work/x64-cjs.json")"
same_answer "$work/x64-cjs.json" "$work/x64-esm.json"

# 4. x64 CPU levels under qemu ----------------------------------------------------------------
command -v qemu-x86_64-static >/dev/null || die "no qemu-x86_64-static: run scripts/arm64.sh setup"
for cpu in Nehalem:x86-64-v2 Haswell:x86-64-v3; do
  (cd "$x64" && PATH="$nocc" qemu-x86_64-static -cpu "${cpu%%:*}" "$(command -v node)" consumer.cjs 2>/dev/null >"$work/x64-${cpu%%:*}.json") ||
    die "the consumer failed on an emulated ${cpu%%:*}"
  grep -q "\"variant\":\"${cpu#*:}\"" "$work/x64-${cpu%%:*}.json" || die "a ${cpu%%:*} should get ${cpu#*:}: $(cat "$work/x64-${cpu%%:*}.json")"
done
same_answer "$work/x64-cjs.json" "$work/x64-Nehalem.json" "$work/x64-Haswell.json"
status="$(cd "$x64" && KVSTASH_CPU_VARIANT=x86-64-v3 sh -c '"$@" >/dev/null 2>&1; echo $?' sh qemu-x86_64-static -cpu Nehalem "$(command -v node)" consumer.cjs)"
[ "$status" = 132 ] || die "the x86-64-v3 build on a Nehalem should die with SIGILL (exit 132), got exit $status"
say "x86-64-v3 forced onto an emulated Nehalem: SIGILL (exit 132), as it must"

# 5. --build-from-source without compilers fails with one clear error ---------------------------
nobuild="$work/no-build"
new_project "$nobuild"
if (cd "$nobuild" && PATH="$nocc" npm install --no-audit --no-fund --loglevel=error --foreground-scripts --build-from-source "$tarball" >"$work/no-build.log" 2>&1); then
  die "--build-from-source succeeded without a compiler"
fi
for line in 'could not install the native addon for linux-x64. Tried:' 'prebuilt binary: skipped (--build-from-source)' 'source build: not on PATH: cmake' 'apt-get install cmake g++ git'; do
  grep -qF "$line" "$work/no-build.log" || { cat "$work/no-build.log" >&2; die "the failed install's error lacks: $line"; }
done
say "--build-from-source without compilers: one error naming both causes and the fix"

# 6. linux-arm64 under qemu -------------------------------------------------------------------
arm64="$work/arm64"
new_project "$arm64"
cp "$x64/consumer.mjs" "$arm64/"
arm64_path="$(dirname "$arm64_node"):$nocc"
(cd "$arm64" && PATH="$arm64_path" QEMU_CPU=cortex-a76 "$arm64_node" "$npm_cli" install --no-audit --no-fund --loglevel=error --foreground-scripts "$tarball" 2>"$work/arm64-install.log") ||
  { cat "$work/arm64-install.log" >&2; die "npm install of the tarball failed on linux-arm64 without compilers"; }
grep -q 'using the prebuilt binary prebuilds/linux-arm64/kvstash.node' "$work/arm64-install.log" ||
  { cat "$work/arm64-install.log" >&2; die "the arm64 install did not report using the linux-arm64 prebuilt binary"; }
for cpu in cortex-a76:armv8.2-a+dotprod+fp16 cortex-a72:armv8-a; do
  for consumer in consumer.cjs consumer.mjs; do
    out="$work/arm64-${cpu%%:*}-$consumer.json"
    (cd "$arm64" && PATH="$arm64_path" QEMU_CPU="${cpu%%:*}" "$arm64_node" --single-threaded "$consumer" >"$out") ||
      die "$consumer failed on an emulated ${cpu%%:*}"
    grep -q "\"variant\":\"${cpu#*:}\"" "$out" || die "a ${cpu%%:*} should get ${cpu#*:}: $(cat "$out")"
  done
done
same_answer "$work"/arm64-*.json

# 7. the source-build fallback from the tarball -------------------------------------------------
source_build="$work/source-build"
new_project "$source_build"
cp "$x64/consumer.mjs" "$source_build/"
(cd "$source_build" && npm install --no-audit --no-fund --loglevel=error --foreground-scripts --build-from-source "$tarball" >"$work/source-build.log" 2>&1) ||
  { tail -40 "$work/source-build.log" >&2; die "the tarball's source build failed"; }
[ -f "$source_build/node_modules/kvstash/build/Release/kvstash.node" ] || die "--build-from-source left no build/Release/kvstash.node"
(cd "$source_build" && node consumer.cjs >"$work/source-cjs.json" && node consumer.mjs >"$work/source-esm.json") || die "a consumer failed on the source build"
grep -q '"variant":"source"' "$work/source-cjs.json" || die "the source-built install did not load its own build: $(cat "$work/source-cjs.json")"
same_answer "$work/source-cjs.json" "$work/source-esm.json"

say "passed in $((SECONDS - started)) s"
