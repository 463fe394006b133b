#!/usr/bin/env node
// Compiles lib/ to dist/ (CommonJS + .d.ts, plus the ESM entry dist/index.mjs). Runs from npm's
// `prepare` hook, so a fresh clone's `npm install` leaves a usable package.
'use strict';

const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const tsc = require.resolve('typescript/bin/tsc');
fs.rmSync(path.join(root, 'dist'), { recursive: true, force: true });
const result = spawnSync(process.execPath, [tsc, '-p', root], { stdio: 'inherit' });
if (result.status !== 0) process.exit(result.status ?? 1);
const cli = path.join(root, 'dist', 'cli', 'main.js');
if (fs.existsSync(cli)) fs.chmodSync(cli, 0o755);
