// The cache commands end to end, as a user runs them: the compiled CLI in a child process against a
// temporary cache directory, and generate() in this process reading what `kvstash warm` stored.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { InspectReport, VerifyReport } from '../lib/cli/entries.js';
import type { WarmReport } from '../lib/cli/warm.js';
import { preparePrompt, templateLabel } from '../lib/generate/generate.js';
import { generate, loadModel, PromptCache, type CacheEntryInfo, type Model } from '../lib/index.js';
import { requireBuiltCli, runCli } from './helpers/cli.js';
import { prose, tinyModel } from './helpers/fixtures.js';

const THREADS = '2';
const SYSTEM = `You are the support assistant of a small shop. ${prose(300)}\n`;
const TOOLS = [{ name: 'get_order', description: 'Returns one order.', parameters: { order_id: { type: 'string' } } }];

let modelPath: string;
let model: Model;
const dir = t.testdir({ 'system.txt': SYSTEM, 'tools.json': JSON.stringify(TOOLS), 'broken.json': '{"name": ' });
const cacheDir = path.join(dir, 'cache');
const inDir = ['--cache-dir', cacheDir];

t.before(async () => {
  requireBuiltCli();
  modelPath = await tinyModel();
  model = await loadModel(modelPath);
});
t.teardown(() => model.dispose());

/** The template prefix generate() renders for this system prompt and tools (what warm must store). */
function generatePrefix(tools?: unknown): Int32Array {
  const { tokens, prefixLength } = preparePrompt(model, { system: SYSTEM, tools, prompt: 'Where is my order?' });
  return tokens.slice(0, prefixLength);
}

async function warm(...extra: string[]): Promise<WarmReport> {
  const { code, stdout, stderr } = await runCli(['warm', '--model', modelPath, '--system', path.join(dir, 'system.txt'), '--threads', THREADS, ...inDir, '--json', ...extra]);
  if (code !== 0) throw new Error(`warm exited ${code}: ${stderr}`);
  return JSON.parse(stdout) as WarmReport;
}

async function listed(): Promise<CacheEntryInfo[]> {
  const { code, stdout } = await runCli(['ls', ...inDir, '--json']);
  if (code !== 0) throw new Error(`ls exited ${code}`);
  return JSON.parse(stdout) as CacheEntryInfo[];
}

t.test('warm stores the template prefix that generate() then restores from disk', async (t) => {
  const prefix = generatePrefix(TOOLS);
  t.ok(prefix.length > 300, `the rendered prefix is ${prefix.length} tokens`);
  const report = await warm('--tools', path.join(dir, 'tools.json'));
  t.equal(report.tokenCount, prefix.length, 'the entry holds exactly the rendered prefix');
  t.equal(report.label, templateLabel(prefix), 'labelled as generate() labels a template prefix');
  t.equal(report.evaluatedTokens, prefix.length, 'a cold warm evaluates every token');
  t.same(report.alreadyCached, { tokens: 0, tier: null });
  t.ok(fs.existsSync(report.path) && report.path.startsWith(cacheDir + path.sep), 'the entry file is in --cache-dir');
  t.equal(report.bytes, fs.statSync(report.path).size);
  t.ok(report.restoreMs > 0 && report.evaluateMs > 0 && report.speedup! > 0, `evaluate ${report.evaluateMs} ms vs restore ${report.restoreMs} ms`);

  const entries = await listed();
  t.equal(entries.length, 1);
  t.match(entries[0], { key: report.key, label: report.label, tokenCount: prefix.length, tiers: ['disk'], model: { fingerprint: model.fingerprint } });

  const cache = new PromptCache({ dir: cacheDir });
  const context = await model.createContext({ contextSize: 1024, threads: 2 });
  t.teardown(() => context.dispose());
  const result = await generate(context, { system: SYSTEM, tools: TOOLS, prompt: 'Where is my order?', cache, maxTokens: 2 }).result;
  t.equal(result.tier, 'disk', 'generate() restored the warmed entry from disk');
  t.equal(result.cachedTokens, prefix.length, 'the whole template prefix was restored');
  t.equal(result.evaluatedTokens, result.promptTokens - prefix.length, 'only the question was evaluated');
  await cache.flush();
  t.equal((await listed()).length, 1, 'generate() found the prefix cached and saved no other entry');
});

t.test('warm --label: the system prompt alone, rendered by the chat template', async (t) => {
  const rendered = model.applyChatTemplate([{ role: 'system', content: SYSTEM }], { addAssistant: false });
  const expected = model.tokenize(rendered, { special: true });
  t.same(generatePrefix(), expected, "generate()'s prefix is the rendered system turn");
  const report = await warm('--label', 'support');
  t.equal(report.label, 'support');
  t.equal(report.tokenCount, expected.length);
  // Everything but the end of the system turn is shared with the entry that has tools appended.
  t.ok(report.alreadyCached.tokens > 0 && report.alreadyCached.tier === 'disk', `reused ${report.alreadyCached.tokens} cached tokens`);
  t.equal(report.alreadyCached.tokens + report.evaluatedTokens, expected.length);
  t.equal(report.speedup, null, 'no evaluate/restore ratio for a part-evaluated prompt');

  const entries = await listed();
  t.equal(entries.length, 2);
  t.equal(entries.find((e) => e.label === 'support')?.tokenCount, expected.length);

  const { code, stdout } = await runCli(['ls', ...inDir]);
  t.equal(code, 0);
  t.match(stdout, /^key\s+label\s+tokens\s+size\s+model\s+created\s+tiers\n/);
  t.match(stdout, new RegExp(`\\n${report.key.slice(0, 12)}  support\\s+${expected.length}\\s`), 'the row shows short key, label and tokens');
  t.match(stdout, /\n2 entries, .* in /);
});

t.test('inspect shows the header, the first tokens and a passing checksum', async (t) => {
  const entry = (await listed()).find((e) => e.label === 'support')!;
  const { code, stdout } = await runCli(['inspect', 'support', ...inDir]);
  t.equal(code, 0);
  t.match(stdout, new RegExp(`File\\s+${escape(entry.path!)}\\n`));
  t.match(stdout, new RegExp(`Key\\s+${entry.key}\\n`));
  t.match(stdout, /Backend\s+llama\.cpp \S+\n/);
  t.match(stdout, new RegExp(`Fingerprint\\s+${model.fingerprint} `));
  t.match(stdout, /Layout\s+kvType f16, flashAttention \w+\n/);
  t.match(stdout, new RegExp(`Tokens\\s+${entry.tokenCount}\\n`));
  const first = generatePrefix().slice(0, 16);
  t.match(stdout, new RegExp(`First 16\\s+${first.join(' ')} …\\n`));
  t.match(stdout, /checksum ok/);
  t.notMatch(stdout, /Text/, 'no text without --model');

  const json = await runCli(['inspect', entry.key.slice(0, 8), ...inDir, '--json', '--model', modelPath]);
  t.equal(json.code, 0, 'a short key names the entry');
  const report = JSON.parse(json.stdout) as InspectReport;
  t.equal(report.key, entry.key);
  t.same(report.header.tokens, Array.from(generatePrefix()));
  t.same(report.check, { ok: true });
  t.same(report.text, { modelMatches: true, start: model.detokenize(generatePrefix(), { special: true }).slice(0, 200) });

  const missing = await runCli(['inspect', 'nothing-by-this-name', ...inDir]);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /^kvstash: no entry in .* has the label or key 'nothing-by-this-name'/);
});

t.test('verify finds a flipped byte, names the entry, and --remove deletes it', async (t) => {
  t.equal((await runCli(['verify', ...inDir])).code, 0, 'every entry is sound at first');
  const entry = (await listed()).find((e) => e.label === 'support')!;
  const bytes = fs.readFileSync(entry.path!);
  bytes[bytes.length >> 1] ^= 0x10; // in the state bytes: only the checksum can tell
  fs.writeFileSync(entry.path!, bytes);

  const found = await runCli(['verify', ...inDir]);
  t.equal(found.code, 1);
  t.match(found.stdout, /: 1 ok, 1 corrupt\n/);
  t.match(found.stdout, new RegExp(`\\n${entry.key}\\.kvstash\\s+support\\s+its checksum does not match its bytes\\n`));
  t.ok(fs.existsSync(entry.path!), 'verify alone removes nothing');

  const inspected = await runCli(['inspect', 'support', ...inDir]);
  t.equal(inspected.code, 1, 'inspect fails the checksum too');
  t.match(inspected.stdout, /Check\s+FAILED: its checksum does not match its bytes/);

  const removed = await runCli(['verify', '--remove', ...inDir, '--json']);
  t.equal(removed.code, 1, 'the run that found corruption still exits 1');
  const report = JSON.parse(removed.stdout) as VerifyReport;
  t.same(report.corrupt, [{ path: entry.path, label: 'support', code: 'E_CACHE_CORRUPT', reason: 'its checksum does not match its bytes', removed: true }]);
  t.equal(report.ok, 1);
  t.notOk(fs.existsSync(entry.path!), 'the corrupt entry is gone');
  t.equal((await runCli(['verify', ...inDir])).code, 0);
});

t.test('rm removes by label or key; --all removes everything', async (t) => {
  await warm('--label', 'first');
  const before = await listed();
  t.equal(before.length, 2);

  const byLabel = await runCli(['rm', 'first', ...inDir]);
  t.equal(byLabel.code, 0);
  t.equal(byLabel.stdout, `Removed 1 entry from ${cacheDir}\n`);
  t.same((await listed()).map((e) => e.label), before.filter((e) => e.label !== 'first').map((e) => e.label));

  const again = await runCli(['rm', 'first', ...inDir]);
  t.equal(again.code, 1, 'removing what is not there fails');

  await warm('--label', 'second');
  const all = await runCli(['rm', '--all', ...inDir, '--json']);
  t.equal(all.code, 0);
  t.equal((JSON.parse(all.stdout) as { removed: number }).removed, 2);
  t.same(await listed(), []);
  t.equal((await runCli(['ls', ...inDir])).stdout, `No entries in ${cacheDir}\n`);
});

t.test('bad usage exits 2 with the command usage; bad input exits 1 with one line', async (t) => {
  const usage: Array<[string[], RegExp]> = [
    [['inspect', ...inDir], /^kvstash: missing <entry>\n\nUsage: kvstash inspect \[options\] <entry>\n/],
    [['rm', ...inDir], /^kvstash: give an entry or --all \(one of them\)\n\nUsage: kvstash rm /],
    [['rm', 'x', '--all', ...inDir], /^kvstash: give an entry or --all/],
    [['ls', 'extra', ...inDir], /^kvstash: unexpected argument 'extra'\n\nUsage: kvstash ls /],
    [['verify', '--bogus'], /^kvstash: unknown option '--bogus'/],
    [['warm', '--system', path.join(dir, 'system.txt')], /^kvstash: --model is required\n/],
    [['warm', '--model', 'm.gguf'], /^kvstash: --system is required\n/],
    [['warm', '--model', 'm.gguf', '--system', 's.txt', '--context', 'big'], /^kvstash: --context must be a whole number/],
  ];
  for (const [args, stderr] of usage) {
    const result = await runCli(args);
    t.equal(result.code, 2, `kvstash ${args.join(' ')}: exit 2`);
    t.match(result.stderr, stderr);
    t.equal(result.stdout, '');
  }

  const broken = await runCli(['warm', '--model', modelPath, '--system', path.join(dir, 'system.txt'), '--tools', path.join(dir, 'broken.json'), ...inDir]);
  t.equal(broken.code, 1);
  t.match(broken.stderr, /^kvstash: --tools .*broken\.json is not JSON: /);
  const missing = await runCli(['warm', '--model', modelPath, '--system', path.join(dir, 'missing.txt'), ...inDir]);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /^kvstash: ENOENT: no such file or directory, open '.*missing\.txt'\n$/);
  const help = await runCli(['help', 'warm']);
  t.equal(help.code, 0);
  t.match(help.stdout, /^Usage: kvstash warm \[options\]\n/);
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
