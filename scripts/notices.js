#!/usr/bin/env node
// npm's prepack hook: writes THIRD_PARTY_NOTICES, the licence texts of the code compiled into the
// prebuilt binaries, taken from the sources the build used (never committed: they are the other
// projects' own words, and they must match the versions built). The package's files list carries
// it next to kvstash's LICENSE.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { fetchLlama, PIN } = require('./fetch-llama.js');

const root = path.resolve(__dirname, '..');

function licenceOf(dir, names) {
  for (const name of names) {
    const file = path.join(dir, name);
    if (fs.existsSync(file)) return fs.readFileSync(file, 'utf8').trim();
  }
  throw new Error(`no licence file (${names.join(', ')}) in ${dir}`);
}

function packageDir(name) {
  return path.dirname(require.resolve(`${name}/package.json`, { paths: [root] }));
}

function main() {
  const llama = fetchLlama();
  const parts = [
    {
      what: `llama.cpp and ggml, commit ${PIN.commit} (compiled into every prebuilds/*/kvstash-*.so; models/ggml-vocab-qwen2.gguf is a file of that tree, holding the Qwen2 tokenizer's vocabulary and merges, which the Qwen team publishes under the Apache License 2.0)`,
      text: licenceOf(llama, ['LICENSE']),
    },
    {
      what: `node-addon-api ${require(path.join(packageDir('node-addon-api'), 'package.json')).version} (C++ headers compiled into the addon)`,
      text: licenceOf(packageDir('node-addon-api'), ['LICENSE.md', 'LICENSE']),
    },
    {
      what: `node-api-headers ${require(path.join(packageDir('node-api-headers'), 'package.json')).version} (C headers compiled into the addon and its loader)`,
      text: licenceOf(packageDir('node-api-headers'), ['LICENSE', 'LICENSE.md']),
    },
  ];
  const body = parts.map((p) => `${'='.repeat(78)}\n${p.what}\n${'='.repeat(78)}\n\n${p.text}\n`).join('\n');
  const header = 'Third-party software in the kvstash package\n\nkvstash itself is under the MIT licence in LICENSE. Its native binaries contain the following.\n\n';
  fs.writeFileSync(path.join(root, 'THIRD_PARTY_NOTICES'), header + body);
}

main();
