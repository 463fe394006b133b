#!/usr/bin/env node
// Compiles lib/ to dist/ (CommonJS + .d.ts, plus the ESM entry dist/index.mjs). Runs from npm's
// `prepare` hook, so a fresh clone's `npm install` leaves a usable package, and before `npm test`.
// It compiles into a fresh directory and swaps it in, so stale files of deleted modules vanish and
// a process running from dist/ meanwhile never finds it half-written.
'use strict';

const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const dist = path.join(root, 'dist');
const fresh = path.join(root, `.dist-${process.pid}`);
const tsc = require.resolve('typescript/bin/tsc');
fs.rmSync(fresh, { recursive: true, force: true });
const result = spawnSync(process.execPath, [tsc, '-p', root, '--outDir', fresh], { stdio: 'inherit' });
if (result.status !== 0) {
  fs.rmSync(fresh, { recursive: true, force: true });
  process.exit(result.status ?? 1);
}
const cli = path.join(fresh, 'cli', 'main.js');
if (fs.existsSync(cli)) fs.chmodSync(cli, 0o755);
const old = path.join(root, `.dist-old-${process.pid}`);
if (fs.existsSync(dist)) fs.renameSync(dist, old);
fs.renameSync(fresh, dist);
fs.rmSync(old, { recursive: true, force: true });
