#!/usr/bin/env node
// Loads kvstash, says which CPU variant of the prebuilt addon the loader picked ('source' for a
// source build), and decodes a prompt on the given model, printing the top token and its logit so
// runs on different CPUs (real or emulated) can be compared. Used by scripts/arm64.sh and
// scripts/pack-check.sh to prove which kernels run where.
// Usage: node scripts/cpu-check.js MODEL.gguf
'use strict';

const path = require('node:path');
const { loadModel, systemInfo } = require(path.join(__dirname, '..', 'dist', 'index.js'));

async function main() {
  const file = process.argv[2];
  if (!file) throw new Error('usage: cpu-check.js MODEL.gguf');
  const { cpuVariant } = systemInfo();
  const model = await loadModel(file);
  const context = await model.createContext({ contextSize: 256, threads: 1 });
  await context.decode(model.tokenize('the prompt cache is saved and restored again by every session'));
  const logits = context.logits();
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  await model.dispose();
  process.stdout.write(
    `${process.arch} variant=${cpuVariant} model=${path.basename(file)} argmax=${best} logit=${logits[best].toFixed(4)}\n`,
  );
}

main().catch((err) => {
  process.stderr.write(`cpu-check: ${err.stack || err}\n`);
  process.exit(1);
});
