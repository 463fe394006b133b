/**
 * `kvstash memory search|stats|prune --db <path>`: look into and bound a Memory database from the
 * shell. Without an embedding model the command line searches by keyword ('hybrid' is then the
 * keyword ranking); results print one per line, or as JSON with --json.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Memory, type MemoryRemoved, type MemorySearchMode } from '../memory/memory.js';
import { Session } from '../session/session.js';
import { CommandFailure, UsageError } from './errors.js';
import { escaped, fields, fmt, localTime, size, table, tildify } from './format.js';
import type { Command, FlagSpecs } from './main.js';

const MEMORY_FLAGS = {
  db: { type: 'string', value: 'path', help: 'The memory database file (required)' },
  namespace: { type: 'string', value: 'name', help: "The memory's namespace (default 'default')" },
  session: { type: 'string', value: 'id', help: 'search: the session the search is for (its turns are tier "session", other sessions\' "other")' },
  limit: { type: 'integer', help: 'search: results wanted (default 10)', min: 1, max: 1000 },
  mode: { type: 'string', value: 'hybrid|keyword', help: "search: 'hybrid' (default) or 'keyword'; vectors need an embedding model, which the command line has not" },
  'max-rows': { type: 'integer', help: 'prune: keep at most this many archived turns (oldest go first)' },
  'max-age-days': { type: 'integer', help: 'prune: remove turns and checkpoints older than this many days' },
  'max-bytes': { type: 'integer', help: "prune: keep the archived turns' bytes at or under this" },
  'max-checkpoints': { type: 'integer', help: 'prune: keep at most this many checkpoint records per session (the newest)' },
  sessions: {
    type: 'string',
    value: 'dir',
    help: "prune: the sessions' directory (Session.open's dir): the files of the removed checkpoint records, in <dir>/<id>/checkpoints/, are deleted too",
  },
  json: { type: 'boolean', help: 'Print JSON' },
} as const satisfies FlagSpecs;

const ACTIONS = ['search', 'stats', 'prune'] as const;

export const memoryCommand: Command<typeof MEMORY_FLAGS> = {
  summary: 'Search, count or prune a long-term memory database: kvstash memory search|stats|prune --db <path>',
  flags: MEMORY_FLAGS,
  operands: [
    { name: 'action', help: 'search, stats or prune' },
    { name: 'query', help: 'search: the text to look for (taken literally)', optional: true },
  ],
  run: async (flags, _io, operands) => {
    const [action, query] = operands as [string, string | undefined];
    if (!(ACTIONS as readonly string[]).includes(action)) throw new UsageError(`unknown memory action '${action}': use search, stats or prune`, 'memory');
    if (flags.db === undefined) throw new UsageError('--db <path> is required', 'memory');
    if (action === 'search' && query === undefined) throw new UsageError('memory search needs the text to look for', 'memory');
    if (action !== 'search' && query !== undefined) throw new UsageError(`memory ${action} takes no text`, 'memory');
    const mode = (flags.mode ?? 'hybrid') as MemorySearchMode;
    if (mode !== 'hybrid' && mode !== 'keyword') throw new UsageError("--mode must be 'hybrid' or 'keyword' (vector search needs an embedding model)", 'memory');
    // Opening creates a database; a command that only looks must not leave an empty one behind a typo.
    if (!fs.existsSync(flags.db)) throw new CommandFailure(`no memory database at ${flags.db}`);
    const memory = await Memory.open({ path: flags.db, ...(flags.namespace !== undefined ? { namespace: flags.namespace } : {}) });
    try {
      if (action === 'search') {
        const hits = await memory.search(query!, { mode, limit: flags.limit ?? 10, ...(flags.session !== undefined ? { sessionId: flags.session } : {}) });
        if (flags.json === true) process.stdout.write(`${JSON.stringify(hits)}\n`);
        else if (hits.length === 0) process.stdout.write('No match\n');
        else {
          const rows = hits.map((h) => [h.score.toFixed(4), h.tier, escaped(h.sessionId), h.turn === null ? '-' : String(h.turn), h.role, localTime(new Date(h.at).toISOString()), escaped(h.content)]);
          process.stdout.write(`${table(['score', 'tier', 'session', 'turn', 'role', 'at', 'content'], rows, ['right', 'left', 'left', 'right'])}\n`);
        }
      } else if (action === 'stats') {
        const stats = await memory.stats();
        if (flags.json === true) process.stdout.write(`${JSON.stringify(stats)}\n`);
        else {
          process.stdout.write(
            `${fields([
              ['database', tildify(stats.path)],
              ['namespace', escaped(stats.namespace)],
              ['turns', fmt(stats.turns)],
              ['sessions', fmt(stats.sessions)],
              ['summaries', fmt(stats.summaries)],
              ['bytes', size(stats.bytes)],
              ['checkpoints', `${fmt(stats.checkpoints)} (${size(stats.checkpointBytes)})`],
              ['vectors', stats.dimension === null ? 'none' : `${fmt(stats.vectors)} of ${stats.dimension} dimensions`],
              ['file', size(stats.fileBytes)],
            ])}\n`,
          );
        }
      } else {
        if (flags['max-rows'] === undefined && flags['max-age-days'] === undefined && flags['max-bytes'] === undefined && flags['max-checkpoints'] === undefined) {
          throw new UsageError('memory prune needs --max-rows, --max-age-days, --max-bytes or --max-checkpoints', 'memory');
        }
        const removed: MemoryRemoved = await memory.prune({
          ...(flags['max-rows'] !== undefined ? { maxRows: flags['max-rows'] } : {}),
          ...(flags['max-age-days'] !== undefined ? { maxAgeDays: flags['max-age-days'] } : {}),
          ...(flags['max-bytes'] !== undefined ? { maxBytes: flags['max-bytes'] } : {}),
          ...(flags['max-checkpoints'] !== undefined ? { maxCheckpointsPerSession: flags['max-checkpoints'] } : {}),
          ...(flags.sessions !== undefined ? { cache: Session.checkpointCache(path.resolve(flags.sessions)) } : {}),
        });
        if (flags.json === true) process.stdout.write(`${JSON.stringify(removed)}\n`);
        else {
          const files = flags.sessions === undefined ? '' : ` (${fmt(removed.cacheEntries)} checkpoint files deleted${removed.cacheErrors > 0 ? `, ${fmt(removed.cacheErrors)} could not be` : ''})`;
          process.stdout.write(`Removed ${fmt(removed.rows)} turns and ${fmt(removed.checkpoints)} checkpoint records${files}\n`);
        }
      }
    } finally {
      await memory.close();
    }
    return 0;
  },
};
