/**
 * The benchmark's eviction process: `node evict-helper.js <probe file>`. It finds how this machine
 * can drop a file from the page cache (page-cache.ts), prints {method, note} as one JSON line, then
 * for every file path read from stdin drops it and prints {left} (bytes still cached, or null).
 *
 * Why a process of its own: evicting runs dd and fincore, and every fork of the benchmark's process
 * would make each of its writable pages copy-on-write: its next writes (the KV buffer a restore
 * fills, the read buffer) then pay a page fault per page, 10–20 ms that would land in whichever
 * restore is timed next. Forks of this small process cost the benchmark nothing.
 */
import readline from 'node:readline';
import { findEvictor } from './page-cache.js';

const probe = process.argv[2];
if (!probe) {
  process.stderr.write('usage: evict-helper <probe file>\n');
  process.exit(2);
}
const evictor = findEvictor(probe);
process.stdout.write(`${JSON.stringify({ method: evictor.method, note: evictor.note })}\n`);
readline.createInterface({ input: process.stdin }).on('line', (file) => {
  process.stdout.write(`${JSON.stringify({ left: evictor.evict(file) })}\n`);
});
