#!/usr/bin/env node
// npm's install hook. A prebuilt binary for this platform is used as is; otherwise the addon is
// built from source (llama.cpp fetched from the npm registry, compiled with cmake-js).
// `npm install --build-from-source` (npm_config_build_from_source) forces the source build.
'use strict';

const path = require('node:path');

const root = path.resolve(__dirname, '..');

function matchingPrebuild() {
  try {
    const found = require('node-gyp-build').path(root);
    return found.includes(`${path.sep}prebuilds${path.sep}`) ? found : null;
  } catch {
    return null;
  }
}

function main() {
  const forced = process.env.npm_config_build_from_source === 'true' || process.env.npm_config_build_from_source === 'kvstash';
  const prebuild = forced ? null : matchingPrebuild();
  if (prebuild) {
    try {
      require(prebuild);
      process.stderr.write(`[kvstash] using prebuilt binary ${path.relative(root, prebuild)}\n`);
      return;
    } catch (err) {
      process.stderr.write(`[kvstash] the prebuilt binary did not load (${err.message.split('\n')[0]}); building from source\n`);
    }
  }
  const { buildNative } = require('./build-native.js');
  try {
    buildNative();
  } catch (err) {
    process.stderr.write(
      [
        `[kvstash] could not install the native addon for ${process.platform}-${process.arch}:`,
        `  - prebuilt binary: ${forced ? 'skipped (--build-from-source)' : 'none matches this platform'}`,
        `  - source build: ${err.message}`,
        '  To fix: install cmake (>= 3.18), a C++17 compiler and git (Debian/Ubuntu: apt-get install cmake g++ git),',
        '  then run `npm rebuild kvstash`.',
        '',
      ].join('\n'),
    );
    process.exit(1);
  }
}

main();
