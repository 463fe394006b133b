#!/usr/bin/env node
// The crash-and-resume stress run: the session crash test with 200 SIGKILLs instead of 30.
// Usage: node scripts/session-stress.js [trials]   (needs `npm install` done: it uses dist/)
'use strict';

const { spawnSync } = require('node:child_process');
const path = require('node:path');

const trials = process.argv[2] ?? '200';
const root = path.resolve(__dirname, '..');
const tap = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
const result = spawnSync(process.execPath, [tap, '--timeout=3600', 'test/session-crash.test.ts'], {
  cwd: root,
  stdio: 'inherit',
  env: { ...process.env, KVSTASH_CRASH_TRIALS: trials, DISABLE_V8_COMPILE_CACHE: '1' },
});
process.exit(result.status ?? 1);
