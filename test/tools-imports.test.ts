// The tools room without circles (issue 21): lib/cli registers the bench command and uses the shared
// helpers, so lib/bench and lib/tools must never import lib/cli, directly or through other modules,
// and lib/tools (shared by demo, chat and bench) must not import lib/bench either. Read from the
// TypeScript sources: every static import and export-from, type-only ones included, and import().
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';

const LIB = path.resolve(__dirname, '..', 'lib');

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const full = path.join(dir, e.name);
    if (e.isDirectory()) return sources(full);
    return /\.m?ts$/.test(e.name) && !e.name.endsWith('.d.ts') ? [full] : [];
  });
}

/** The lib/ files `file` imports (relative specifiers; .js and .mjs written for .ts and .mts). */
export function importsOf(file: string, text = fs.readFileSync(file, 'utf8')): string[] {
  const specifiers = [
    ...text.matchAll(/^\s*(?:import|export)\b[^'";]*?\bfrom\s*['"]([^'"]+)['"]/gms),
    ...text.matchAll(/^\s*import\s*['"]([^'"]+)['"]/gm),
    ...text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g),
  ].map((m) => m[1]!);
  return specifiers
    .filter((s) => s.startsWith('.'))
    .map((s) => path.resolve(path.dirname(file), s).replace(/\.js$/, '.ts').replace(/\.mjs$/, '.mts'));
}

function graph(): Map<string, string[]> {
  return new Map(sources(LIB).map((file) => [file, importsOf(file)]));
}

/** Every lib/ file reachable from `start` by imports, with the chain that reaches it. */
function reachable(edges: Map<string, string[]>, start: string): Map<string, string[]> {
  const seen = new Map<string, string[]>([[start, [start]]]);
  const queue = [start];
  while (queue.length > 0) {
    const file = queue.shift()!;
    for (const next of edges.get(file) ?? []) {
      if (seen.has(next)) continue;
      seen.set(next, [...seen.get(file)!, next]);
      queue.push(next);
    }
  }
  return seen;
}

const room = (file: string): string => path.relative(LIB, file).split(path.sep)[0]!;
const show = (chain: string[]): string => chain.map((f) => path.relative(LIB, f)).join(' -> ');

/** For each file of `from`, the first chain of imports that reaches a room in `forbidden`. */
function violations(edges: Map<string, string[]>, from: string, forbidden: readonly string[]): string[] {
  const found: string[] = [];
  for (const file of edges.keys()) {
    if (room(file) !== from) continue;
    for (const [target, chain] of reachable(edges, file)) {
      if (forbidden.includes(room(target))) {
        found.push(show(chain));
        break;
      }
    }
  }
  return found;
}

t.test('the import reader sees every form of import', async (t) => {
  const file = path.join(LIB, 'bench', 'x.ts');
  const text = [
    "import fs from 'node:fs';",
    "import { a,\n  b } from '../cli/a.js';",
    "import type { C } from '../tools/c.js';",
    "export { d } from './d.js';",
    "import './e.js';",
    "const f = await import('../cli/f.js');",
    "import { g } from '../index.mjs';",
  ].join('\n');
  t.same(
    importsOf(file, text).map((f) => path.relative(LIB, f)).sort(),
    ['bench/d.ts', 'bench/e.ts', 'cli/a.ts', 'cli/f.ts', 'index.mts', 'tools/c.ts'],
  );
});

t.test('lib/bench reaches nothing in lib/cli, and lib/tools neither lib/cli nor lib/bench', async (t) => {
  const edges = graph();
  for (const name of ['bench', 'cli', 'tools']) t.ok([...edges.keys()].some((f) => room(f) === name), `lib/${name} has sources`);
  const missing = [...edges.values()].flat().filter((f) => !edges.has(f));
  t.same(missing.map((f) => path.relative(LIB, f)), [], 'every relative import names a lib/ source');
  t.same(violations(edges, 'bench', ['cli']), [], 'no chain of imports from lib/bench into lib/cli');
  t.same(violations(edges, 'tools', ['cli', 'bench']), [], 'no chain of imports from lib/tools into lib/cli or lib/bench');
  t.ok(
    [...edges.get(path.join(LIB, 'cli', 'main.ts'))!].includes(path.join(LIB, 'cli', 'bench.ts')),
    'the CLI registers the bench command (the direction that stays)',
  );
});
