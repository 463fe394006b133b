#!/usr/bin/env node
// Run by `scripts/arm64.sh test` with the arm64 node under qemu: loads the prebuilt arm64 addon,
// says which build the loader picked (from llama.cpp's compiled-in CPU features), and decodes a
// prompt on the given model, printing a short digest of the logits so runs can be compared.
// Usage: node scripts/arm64-cpu-check.js MODEL.gguf
'use strict';

const path = require('node:path');
const { loadModel, systemInfo } = require(path.join(__dirname, '..', 'dist', 'index.js'));

async function main() {
  const file = process.argv[2];
  if (!file) throw new Error('usage: arm64-cpu-check.js MODEL.gguf');
  const features = systemInfo().cpuFeatures;
  const fast = /DOTPROD = 1/.test(features) && /FP16_VA = 1/.test(features);
  const build = process.arch !== 'arm64' ? 'native' : fast ? 'armv8.2-a+dotprod+fp16' : 'armv8-a';
  const model = await loadModel(file);
  const context = await model.createContext({ contextSize: 256, threads: 1 });
  await context.decode(model.tokenize('the prompt cache is saved and restored again by every session'));
  const logits = context.logits();
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  await model.dispose();
  process.stdout.write(
    `${process.arch} build=${build} model=${path.basename(file)} ` +
      `argmax=${best} logit=${logits[best].toFixed(4)}\n`,
  );
}

main().catch((err) => {
  process.stderr.write(`arm64-cpu-check: ${err.stack || err}\n`);
  process.exit(1);
});
