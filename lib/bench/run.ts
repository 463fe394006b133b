#!/usr/bin/env node
/**
 * `npm run bench`: the same as `kvstash bench`, its flags after `--` (npm run bench -- --quick).
 * Parsing, SIGINT handling and exit codes are the CLI's.
 */
import { isKvstashError } from '../errors.js';
import { main, usage, UsageError } from '../cli/main.js';

main(['bench', ...process.argv.slice(2)]).then(
  (code) => {
    if (code === 130) process.exit(code);
    process.exitCode = code;
  },
  (err: unknown) => {
    // As the CLI prints them (lib/cli/main.ts keeps its printer private to its own entry point).
    if (err instanceof UsageError) {
      process.stderr.write(`kvstash: ${err.message}\n\n${usage(err.command)}\n`);
      process.exitCode = 2;
      return;
    }
    const text = isKvstashError(err) ? `${err.code}: ${err.message}` : err instanceof Error ? (err.stack ?? err.message) : String(err);
    process.stderr.write(`kvstash bench: ${text}\n`);
    process.exitCode = 1;
  },
);
