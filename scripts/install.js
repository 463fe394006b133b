#!/usr/bin/env node
// npm's install hook. A prebuilt binary for this platform (prebuilds/<platform>-<arch>/, chosen by
// node-gyp-build) is used when it loads; otherwise the addon is built from source (llama.cpp
// fetched from the npm registry, compiled with cmake-js). `npm install --build-from-source`
// (npm_config_build_from_source) skips the prebuilt binary. When neither works, one error lists
// what was tried, why each failed, and what to do.
'use strict';

const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const platform = `${process.platform}-${process.arch}`;

function firstLine(err) {
  return String(err && err.message ? err.message : err).split('\n')[0];
}

/** Loads the prebuilt binary; returns null on success, else why it is not usable. */
function tryPrebuild() {
  let found;
  try {
    found = require('node-gyp-build').path(root);
  } catch (err) {
    return fs.existsSync(path.join(root, 'prebuilds'))
      ? `none for ${platform} (kvstash ships linux-x64 and linux-arm64): ${firstLine(err)}`
      : 'none in this copy of kvstash (a git checkout has none until `npm run prebuild`)';
  }
  if (!found.includes(`${path.sep}prebuilds${path.sep}`)) {
    // node-gyp-build prefers an existing build/Release: a checkout that was built before.
    return `not used: ${path.relative(root, found)} is a source build already`;
  }
  try {
    require(found);
    process.stderr.write(`[kvstash] using the prebuilt binary ${path.relative(root, found)}\n`);
    return null;
  } catch (err) {
    return `${path.relative(root, found)} did not load: ${firstLine(err)}`;
  }
}

function main() {
  const forced = ['true', 'kvstash'].includes(process.env.npm_config_build_from_source);
  const tried = [];
  if (forced) {
    tried.push('prebuilt binary: skipped (--build-from-source)');
  } else {
    const problem = tryPrebuild();
    if (problem === null) return;
    tried.push(`prebuilt binary: ${problem}`);
    if (!problem.startsWith('not used')) process.stderr.write(`[kvstash] ${tried[0]}; building from source\n`);
  }
  try {
    require('./build-native.js').buildNative();
  } catch (err) {
    tried.push(`source build: ${firstLine(err)}`);
    process.stderr.write(
      [
        `[kvstash] could not install the native addon for ${platform}. Tried:`,
        ...tried.map((line) => `  - ${line}`),
        '  To fix: install cmake (>= 3.18), a C++17 compiler and git (Debian/Ubuntu: apt-get install cmake g++ git),',
        '  then run `npm rebuild kvstash`. On linux-x64 or linux-arm64 with glibc >= 2.34, a plain',
        '  `npm install kvstash` (without --build-from-source) needs none of them.',
        '',
      ].join('\n'),
    );
    process.exit(1);
  }
}

main();
