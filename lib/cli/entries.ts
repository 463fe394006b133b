/**
 * The commands that look after the entries of a prompt cache directory: `kvstash ls`, `inspect`,
 * `verify` and `rm`. None loads a model, except `inspect --model` to show an entry's text.
 */
import type { KvstashError } from '../errors.js';
import fs from 'node:fs';
import path from 'node:path';
import { readEntryFile, readVerifiedEntry, type EntryFile, type EntryHeader } from '../cache/entry.js';
import type { CacheEntryInfo, PromptCache } from '../cache/prompt-cache.js';
import { loadModel } from '../llama/model.js';
import { CACHE_FLAGS, openCache } from './cache-flags.js';
import { CommandFailure, UsageError } from './errors.js';
import { escaped, fields, fmt, localTime, printable, size, table, tildify } from './format.js';
import type { Command, CommandIo, FlagSpecs, Flags, OperandSpec } from './main.js';
import { withStatus } from './progress.js';

/** Keys are shown cut to this many hex digits; any unambiguous start of a key names its entry. */
const SHORT_KEY = 12;
const MIN_KEY_PREFIX = 4;
const FIRST_TOKENS = 16;
const TEXT_CHARACTERS = 200;

const ENTRY_OPERAND: OperandSpec = {
  name: 'entry',
  help: `An entry's label, its key, or the first ${MIN_KEY_PREFIX} or more hex digits of its key (as \`kvstash ls\` shows them)`,
};

// ---------------------------------------------------------------------------------------------
// kvstash ls

const LS_FLAGS = { ...CACHE_FLAGS } as const satisfies FlagSpecs;

export const lsCommand: Command<typeof LS_FLAGS> = {
  summary: 'List the entries of the prompt cache',
  flags: LS_FLAGS,
  run: async (flags) => {
    const cache = openCache(flags);
    const entries = await cache.list();
    if (flags.json === true) {
      process.stdout.write(`${JSON.stringify(entries)}\n`);
      return 0;
    }
    const where = tildify(cache.dir!);
    if (entries.length === 0) {
      process.stdout.write(`No entries in ${where}\n`);
      return 0;
    }
    const rows = entries.map((e) => [
      e.key.slice(0, SHORT_KEY),
      // Header text is the file's: a label may carry terminal escapes.
      e.label === null ? '-' : escaped(e.label),
      fmt(e.tokenCount),
      size(e.bytes),
      e.model.name ? escaped(e.model.name) : 'unnamed',
      localTime(e.createdAt),
      e.tiers.join(','),
    ]);
    const header = ['key', 'label', 'tokens', 'size', 'model', 'created', 'tiers'];
    const total = entries.reduce((sum, e) => sum + e.bytes, 0);
    process.stdout.write(`${table(header, rows, ['left', 'left', 'right', 'right'])}\n\n${plural(entries.length, 'entry', 'entries')}, ${size(total)}, in ${where}\n`);
    return 0;
  },
};

// ---------------------------------------------------------------------------------------------
// kvstash inspect

const INSPECT_FLAGS = {
  model: { type: 'string', value: 'path.gguf', help: `Also show the first ${TEXT_CHARACTERS} characters of the entry's text, detokenized by this model` },
  ...CACHE_FLAGS,
} as const satisfies FlagSpecs;

export const inspectCommand: Command<typeof INSPECT_FLAGS> = {
  summary: "Show an entry's header and file, and check its checksum (exit 1 when it fails)",
  flags: INSPECT_FLAGS,
  operands: [{ ...ENTRY_OPERAND, help: `${ENTRY_OPERAND.help}, or the path of an entry file` }],
  run: runInspect,
};

export interface InspectReport {
  path: string;
  /** Size of the entry file. Unit: bytes. */
  fileBytes: number;
  key: string;
  header: EntryHeader;
  /** Where the state bytes start in the file. Unit: bytes. */
  payloadOffset: number;
  /** The entry format version of the file (lib/cache/entry.ts). */
  formatVersion: number;
  /** How the entry's digests are computed: 'crc32c' (format 3) or 'xxh64' (formats 1 and 2). */
  digestScheme: string;
  /** The entry's checksum stored in the file, hex: formats 2 and 3, that of its chunk digests. */
  checksum: string;
  /** How many separately hashed chunks the checked bytes form (format 1: one). */
  chunks: number;
  /** Every byte read and checked against the checksum. */
  check: { ok: true } | { ok: false; message: string };
  /** With --model: whether that model made the entry, and the start of its text. */
  text?: { modelMatches: boolean; start: string };
}

async function runInspect(flags: Flags<typeof INSPECT_FLAGS>, _io: CommandIo, [ref]: readonly string[]): Promise<number> {
  const file = await entryFileOf(openCache(flags), ref!);
  // The structure is read first: a file too damaged to parse still gets its one-line reason.
  const entry = await readEntryFile(file);
  const check = await readVerifiedEntry(file).then(
    () => ({ ok: true }) as const,
    (err: KvstashError) => ({ ok: false, message: err.reason ?? err.message }) as const,
  );
  const report: InspectReport = {
    path: file,
    fileBytes: entry.fileSize,
    key: entry.key,
    header: entry.header,
    payloadOffset: entry.payloadOffset,
    formatVersion: entry.version,
    digestScheme: entry.digestScheme,
    checksum: entry.checksum.toString(16).padStart(entry.digestScheme === 'crc32c' ? 8 : 16, '0'),
    chunks: entry.chunkDigests.length / 8,
    check,
  };
  if (flags.model !== undefined) report.text = await entryText(path.resolve(flags.model), entry);
  if (flags.json === true) process.stdout.write(`${JSON.stringify(report)}\n`);
  else printInspect(report);
  return check.ok ? 0 : 1;
}

/** The file of the entry `ref` names: an entry in the cache, else the path of an entry file (one too
 * damaged to be listed can still be inspected). */
async function entryFileOf(cache: PromptCache, ref: string): Promise<string> {
  const [newest] = await findEntries(cache, ref);
  if (newest === undefined) {
    if (fs.statSync(ref, { throwIfNoEntry: false })?.isFile()) return path.resolve(ref);
    throw noEntry(cache, ref);
  }
  if (newest.path === undefined) throw new CommandFailure(`entry ${newest.key} has no file in ${tildify(cache.dir!)}`);
  return newest.path;
}

async function entryText(modelPath: string, entry: EntryFile): Promise<NonNullable<InspectReport['text']>> {
  const model = await withStatus('Loading the model', (progress) => loadModel(modelPath, { onProgress: (f) => progress(f, 1) }));
  try {
    // Another model's ids would detokenize into confident nonsense: say so rather than show it.
    if (model.fingerprint !== entry.header.model.fingerprint) return { modelMatches: false, start: '' };
    const tokens = entry.header.tokens;
    let text = '';
    // Tokens are rarely shorter than a character, so this many almost always suffice; more if not.
    for (let count = TEXT_CHARACTERS; text.length < TEXT_CHARACTERS; count *= 4) {
      text = model.detokenize(tokens.slice(0, count), { special: true });
      if (count >= tokens.length) break;
    }
    return { modelMatches: true, start: text.slice(0, TEXT_CHARACTERS) };
  } finally {
    await model.dispose();
  }
}

function printInspect(r: InspectReport): void {
  const h = r.header;
  const first = h.tokens.slice(0, FIRST_TOKENS).join(' ');
  const rows: Array<[string, string]> = [
    // Every text of the header is the file's and may carry terminal escapes: shown escaped.
    ['File', escaped(tildify(r.path))],
    ['Size', `${size(r.fileBytes)} (${fmt(r.fileBytes)} bytes; state ${size(h.payloadBytes)} from offset ${fmt(r.payloadOffset)})`],
    ['Key', r.key],
    ['Label', h.label === null ? '-' : escaped(h.label)],
    ['Created', `${localTime(h.createdAt)} (${escaped(h.createdAt)})`],
    ['Kind', h.kind],
    ['Backend', `${escaped(h.backend.name)} ${escaped(h.backend.version)}`],
    ['Model', `${h.model.name ? escaped(h.model.name) : 'unnamed'} (${escaped(h.model.architecture)})`],
    ['Fingerprint', `${escaped(h.model.fingerprint)} (${escaped(h.model.fingerprintScheme)})`],
    ['Layout', Object.entries(h.layout).map(([name, value]) => `${escaped(name)} ${escaped(value)}`).join(', ')],
    ['Tokens', fmt(h.tokenCount)],
    [`First ${Math.min(FIRST_TOKENS, h.tokenCount)}`, h.tokenCount > FIRST_TOKENS ? `${first} …` : first],
  ];
  if (r.text !== undefined) {
    rows.push([
      'Text',
      r.text.modelMatches
        ? `${printable(r.text.start)}${r.text.start.length >= TEXT_CHARACTERS ? ' …' : ''}`
        : 'not shown: --model is not the model that made this entry (its fingerprint differs)',
    ]);
  }
  rows.push(['Check', r.check.ok ? `checksum ok (format ${r.formatVersion}, ${r.digestScheme === 'crc32c' ? 'CRC-32C' : 'XXH64'} ${r.checksum}, ${r.chunks} chunk${r.chunks === 1 ? '' : 's'} checked, every byte read)` : `FAILED: ${escaped(r.check.message)}`]);
  process.stdout.write(`${fields(rows)}\n`);
}

// ---------------------------------------------------------------------------------------------
// kvstash verify

const VERIFY_FLAGS = {
  remove: { type: 'boolean', help: 'Delete the corrupt entries' },
  ...CACHE_FLAGS,
} as const satisfies FlagSpecs;

export const verifyCommand: Command<typeof VERIFY_FLAGS> = {
  summary: 'Read every entry and check it; list the corrupt ones (exit 1 when there are any, removed or not)',
  flags: VERIFY_FLAGS,
  run: runVerify,
};

export interface VerifyReport {
  dir: string;
  ok: number;
  /** E_CACHE_CORRUPT (removed with --remove) or E_CACHE_NOT_FILE (a FIFO, directory, symlink...: never removed). */
  corrupt: Array<{ path: string; label: string | null; code: string; reason: string; removed: boolean }>;
}

async function runVerify(flags: Flags<typeof VERIFY_FLAGS>): Promise<number> {
  const cache = openCache(flags);
  const remove = flags.remove === true;
  // The labels of corrupt entries whose header still parses, read before --remove deletes them.
  const labels = new Map((await cache.list()).flatMap((e) => (e.path === undefined ? [] : [[e.path, e.label] as const])));
  const result = await cache.verify({ remove });
  const report: VerifyReport = {
    dir: cache.dir!,
    ok: result.ok,
    corrupt: result.corrupt.map(({ path: file, code, reason, removed }) => ({ path: file, label: labels.get(file) ?? null, code, reason, removed })),
  };
  if (flags.json === true) {
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } else {
    const checked = report.ok + report.corrupt.length;
    const lines = [`Checked ${plural(checked, 'entry', 'entries')} in ${tildify(report.dir)}: ${report.ok} ok, ${report.corrupt.length} corrupt`];
    if (report.corrupt.length > 0) {
      const rows = report.corrupt.map((c) => [escaped(path.basename(c.path)), c.label === null ? '-' : escaped(c.label), escaped(c.reason)]);
      lines.push('', table(['file', 'label', 'problem'], rows));
      const removed = report.corrupt.filter((c) => c.removed).length;
      const kept = report.corrupt.filter((c) => c.code === 'E_CACHE_NOT_FILE').length;
      if (remove) lines.push('', `Removed ${plural(removed, 'corrupt entry', 'corrupt entries')}.`);
      else if (kept < report.corrupt.length) lines.push('', 'Remove them with `kvstash verify --remove`.');
      if (kept > 0) lines.push(`${plural(kept, 'path is', 'paths are')} not a regular file: kvstash never removes those; remove them yourself.`);
    }
    process.stdout.write(`${lines.join('\n')}\n`);
  }
  return report.corrupt.length > 0 ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// kvstash rm

const RM_FLAGS = {
  all: { type: 'boolean', help: 'Remove every entry' },
  ...CACHE_FLAGS,
} as const satisfies FlagSpecs;

export const rmCommand: Command<typeof RM_FLAGS> = {
  summary: 'Remove an entry (every entry with that label), or all of them with --all',
  flags: RM_FLAGS,
  operands: [{ ...ENTRY_OPERAND, optional: true }],
  run: runRm,
};

async function runRm(flags: Flags<typeof RM_FLAGS>, _io: CommandIo, [ref]: readonly string[]): Promise<number> {
  if ((ref === undefined) === (flags.all !== true)) throw new UsageError('give an entry or --all (one of them)', 'rm');
  const cache = openCache(flags);
  const doomed = ref === undefined ? await cache.list() : await findEntries(cache, ref);
  if (doomed.length === 0 && ref !== undefined) throw noEntry(cache, ref);
  let removed = 0;
  if (ref === undefined) {
    await cache.clear();
    removed = doomed.length;
  } else {
    for (const entry of doomed) removed += await cache.delete(entry.key);
  }
  if (flags.json === true) {
    process.stdout.write(`${JSON.stringify({ removed, keys: doomed.map((e) => e.key) })}\n`);
  } else {
    process.stdout.write(`Removed ${plural(removed, 'entry', 'entries')} from ${tildify(cache.dir!)}\n`);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------

/** The entries `ref` names (see PromptCache.find); an ambiguous key start is an error here. */
async function findEntries(cache: PromptCache, ref: string): Promise<CacheEntryInfo[]> {
  // As given: labels match exactly (`rm Prod` never removes `prod`); find() matches keys in either case.
  const found = await cache.find(ref);
  if (found.length > 1 && found[0]!.label !== ref) {
    throw new CommandFailure(`'${ref}' starts ${found.length} keys (${found.map((e) => e.key.slice(0, SHORT_KEY)).join(', ')}): give more of the key`);
  }
  return found;
}

function noEntry(cache: PromptCache, ref: string): CommandFailure {
  return new CommandFailure(`no entry in ${tildify(cache.dir!)} has the label or key '${ref}' (\`kvstash ls\` lists them)`);
}

function plural(count: number, one: string, many: string): string {
  return `${fmt(count)} ${count === 1 ? one : many}`;
}
