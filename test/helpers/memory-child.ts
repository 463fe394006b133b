/**
 * The other process of the memory tests, started with the test's own execArgv (so it runs the
 * TypeScript sources as the test does). Commands (argv[2]):
 *   write <db> <sessionId> <count> <batch>  archives `count` turns in batches, printing
 *                                            `acked <lastTurn>` after each batch resolved
 *   search <db> <query> <mode>               prints the search's results as one JSON line
 *   serve <db>                               reads commands from stdin (one JSON per line:
 *                                            {op: 'search', query, mode} | {op: 'stats'} |
 *                                            {op: 'add', ...input}),
 *                                            answers each with one JSON line
 */
import readline from 'node:readline';
import { Memory } from '../../lib/index.js';
import { hashEmbed } from './memory-embed.js';

async function main(): Promise<void> {
  const [command, db] = process.argv.slice(2);
  const memory = await Memory.open({ path: db!, embed: hashEmbed });
  if (command === 'write') {
    const [sessionId, count, batch] = [process.argv[4]!, Number(process.argv[5]), Number(process.argv[6])];
    process.stdout.write('ready\n');
    for (let turn = 0; turn < count; turn += batch) {
      const inputs = [];
      for (let i = turn; i < Math.min(count, turn + batch); i++) inputs.push({ sessionId, role: 'user', content: `turn ${i} of ${sessionId}: word${i} archived`, turn: i });
      await memory.addMany(inputs);
      process.stdout.write(`acked ${inputs[inputs.length - 1]!.turn}\n`);
    }
  } else if (command === 'search') {
    const hits = await memory.search(process.argv[4]!, { mode: process.argv[5] as 'hybrid', limit: 5 });
    process.stdout.write(`${JSON.stringify(hits)}\n`);
  } else if (command === 'serve') {
    process.stdout.write('ready\n');
    for await (const line of readline.createInterface({ input: process.stdin })) {
      const request = JSON.parse(line) as { op: string; query?: string; mode?: 'hybrid'; [key: string]: unknown };
      if (request.op === 'search') process.stdout.write(`${JSON.stringify(await memory.search(request.query!, { mode: request.mode!, limit: 5 }))}\n`);
      else if (request.op === 'stats') process.stdout.write(`${JSON.stringify(await memory.stats())}\n`);
      else if (request.op === 'add') process.stdout.write(`${JSON.stringify(await memory.add(request as never))}\n`);
    }
  }
  await memory.close();
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
