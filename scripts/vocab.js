#!/usr/bin/env node
// Part of npm's prepack hook: copies the Qwen2 vocab-only GGUF (llama.cpp's
// models/ggml-vocab-qwen2.gguf, 5.9 MB, 1.7 MB in the gzipped tarball) from the pinned llama.cpp
// tree into the package, so the synthetic models (`kvstash demo`, writeSyntheticModel) get a real
// tokenizer in an install from prebuilt binaries, which has no llama.cpp tree. Fetching it there
// instead meant the npm registry and git at the user's first run (llama.cpp comes as a git bundle
// inside node-llama-cpp's tarball, and the registry has the file nowhere as a plain file).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { fetchLlama } = require('./fetch-llama.js');

const root = path.resolve(__dirname, '..');
/** Where the package carries it: the same path below the package root as in llama.cpp's tree. */
const RELATIVE = path.join('models', 'ggml-vocab-qwen2.gguf');

function copyVocab() {
  const source = path.join(fetchLlama(), RELATIVE);
  const target = path.join(root, RELATIVE);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const partial = `${target}.partial-${process.pid}`;
  fs.copyFileSync(source, partial);
  fs.renameSync(partial, target);
  return target;
}

module.exports = { copyVocab, RELATIVE };

if (require.main === module) copyVocab();
