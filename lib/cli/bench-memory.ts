/** `kvstash bench --memory`: the memory benchmark (lib/bench/memory.ts), its JSON and its table. */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { formatMemoryReport, MEMORY_FULL_CONFIG, MEMORY_QUICK_CONFIG, runMemoryBench } from '../bench/memory.js';
import { tildify } from './format.js';

export async function runMemoryBenchCommand(flags: { quick?: boolean; out?: string; 'json-only'?: boolean }, signal: AbortSignal): Promise<number> {
  const config = flags.quick === true ? MEMORY_QUICK_CONFIG : MEMORY_FULL_CONFIG;
  const report = await runMemoryBench(config, { signal, log: (line) => process.stderr.write(`${line}\n`) });
  const outDir = path.resolve(flags.out ?? 'bench-results');
  await fsp.mkdir(outDir, { recursive: true });
  const file = path.join(outDir, `memory-${report.startedAt.replace(/:/g, '-').replace(/\.\d+Z$/, 'Z')}.json`);
  await fsp.writeFile(file, `${JSON.stringify(report, null, 2)}\n`);
  if (flags['json-only'] === true) process.stdout.write(`${JSON.stringify(report)}\n`);
  else process.stdout.write(`${formatMemoryReport(report)}\nReport written to ${tildify(file)}\n`);
  return 0;
}
