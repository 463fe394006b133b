/**
 * What a Session does with long-term memory (issue 17, "sessions remember"), apart from the
 * session itself: session.ts only calls the few methods below at fixed points of a turn, so the
 * retrieval policy (tiers, budget, clears) can change without touching the transcript's code.
 *
 * - Every completed turn is archived (its user and assistant messages, numbered as the session
 *   counts turns) before send() resolves. The journal stays the source of truth: a turn the
 *   journal holds and the archive lacks (a crash between the two writes) is archived at resume.
 * - The session's cumulative summary, whenever the session writes one, replaces the stored one.
 * - Before each turn, retrieval in tiers: the stored summary when the window no longer holds it,
 *   then Memory.search's ranking (keyword and vector fused by reciprocal rank when the memory has
 *   an embed function) over this session's turns that left the window and the other sessions of
 *   the namespace; the best that fit a token budget become one system message. The session puts
 *   that message right after the system prefix, so the prefix still restores from the prompt
 *   cache, and journals it, so a resume rebuilds exactly what the model held.
 * - Clear policies: after N turns, above a share of the context, or on demand (compact()). A clear
 *   empties the window (the system prompt stays) after writing the cumulative summary.
 */
import type { ChatMessage } from '../llama/model.js';
import type { Memory, MemoryHit, MemorySearchMode, MemoryTier } from '../memory/memory.js';
import { requireInteger } from '../util/validate.js';

export interface RecallOptions {
  /** Most tokens (the backend's units) the injected message may take. Default: an eighth of the context. */
  maxTokens?: number;
  /** Most search results considered per turn. Default 5. */
  limit?: number;
  /** Default 'hybrid' (keyword ranking alone when the memory has no embed function). */
  mode?: MemorySearchMode;
}

export interface ClearOptions {
  /** Clear the window after this many turns since the last clear. Default 0: never. Unit: turns. */
  everyTurns?: number;
  /** Clear the window when, after a turn, it fills more than this share of the context (0-1). Default 0: never. */
  aboveShare?: number;
}

export interface SessionMemoryOptions {
  memory: Memory;
  recall?: RecallOptions;
  clear?: ClearOptions;
}

/** One retrieved item as it was injected before a turn. */
export interface RetrievedMemory {
  content: string;
  /** The archived message's role ('summary' for the summary). */
  role: string;
  score: number;
  tier: MemoryTier;
  sessionId: string;
  turn: number | null;
}

/** A turn number and the messages of one archived turn. */
export interface ArchivedTurn {
  turn: number;
  messages: readonly ChatMessage[];
}

const RECALL_HEADER = 'Relevant memory from earlier conversations:\n';

export class SessionMemory {
  archived = 0;
  retrieved = 0;
  private readonly recallOptions: Required<Omit<RecallOptions, 'maxTokens'>> & { maxTokens: number | undefined };
  private readonly clearOptions: Required<ClearOptions>;

  private constructor(
    readonly memory: Memory,
    private readonly sessionId: string,
    options: SessionMemoryOptions,
  ) {
    const recall = options.recall ?? {};
    this.recallOptions = {
      maxTokens: recall.maxTokens === undefined ? undefined : requireInteger(recall.maxTokens, 'memory.recall.maxTokens', 0),
      limit: requireInteger(recall.limit ?? 5, 'memory.recall.limit', 1, 1000),
      mode: recall.mode ?? 'hybrid',
    };
    const share = options.clear?.aboveShare ?? 0;
    if (typeof share !== 'number' || !(share >= 0 && share <= 1)) throw new RangeError('memory.clear.aboveShare must be a number from 0 to 1');
    this.clearOptions = { everyTurns: requireInteger(options.clear?.everyTurns ?? 0, 'memory.clear.everyTurns', 0), aboveShare: share };
  }

  /** `memory` is a Memory or {memory, recall?, clear?}; undefined without one. */
  static attach(memory: Memory | SessionMemoryOptions | undefined, sessionId: string): SessionMemory | undefined {
    if (memory === undefined) return undefined;
    if (memory === null || typeof memory !== 'object') throw new TypeError('memory must be a Memory or {memory, recall?, clear?}');
    const options: SessionMemoryOptions = 'memory' in memory ? memory : { memory };
    if (typeof options.memory?.search !== 'function') throw new TypeError('memory must be a Memory (from Memory.open) or {memory, recall?, clear?}');
    return new SessionMemory(options.memory, sessionId, options);
  }

  /** Archives one completed turn; resolves once it is committed. */
  async archive({ turn, messages }: ArchivedTurn): Promise<void> {
    await this.memory.addMany(messages.map((m) => ({ sessionId: this.sessionId, role: m.role, content: m.content, turn })));
    this.archived++;
  }

  /** Archives the turns of `turns` the archive lacks (numbered above the last archived one). */
  async repair(turns: readonly ArchivedTurn[]): Promise<number> {
    const last = (await this.memory.lastTurn(this.sessionId)) ?? -1;
    const missing = turns.filter((t) => t.turn > last);
    if (missing.length === 0) return 0;
    await this.memory.addMany(missing.flatMap(({ turn, messages }) => messages.map((m) => ({ sessionId: this.sessionId, role: m.role, content: m.content, turn }))));
    return missing.length;
  }

  /** Stores the session's cumulative summary, replacing the previous one. */
  async storeSummary(content: string, turn: number): Promise<void> {
    await this.memory.setSummary(this.sessionId, content, { turn });
  }

  /**
   * What to inject before the turn whose user message is `query`: one system message (undefined
   * when nothing was found) and the items in it. `firstTurnInWindow` is the number of the oldest
   * turn the window still holds (turns from it on are not searched); `summaryInWindow` says the
   * window already holds the session's summary; `measure` sizes a message in the backend's units.
   */
  async recall(
    query: string,
    window: { firstTurnInWindow: number; summaryInWindow: boolean; capacity: number },
    measure: (message: ChatMessage) => number,
  ): Promise<{ message: ChatMessage | undefined; retrieved: RetrievedMemory[] }> {
    const budget = this.recallOptions.maxTokens ?? Math.floor(window.capacity / 8);
    const candidates: RetrievedMemory[] = [];
    if (!window.summaryInWindow) {
      const summary = await this.memory.summary(this.sessionId);
      if (summary && summary.content.trim()) candidates.push({ content: summary.content, role: 'summary', score: 1, tier: 'summary', sessionId: this.sessionId, turn: summary.turn });
    }
    const hits = /\S/.test(query)
      ? await this.memory.search(query, {
          sessionId: this.sessionId,
          beforeTurn: window.firstTurnInWindow,
          tiers: ['session', 'other'],
          limit: this.recallOptions.limit,
          mode: this.recallOptions.mode,
        })
      : [];
    candidates.push(...hits.map(toRetrieved));
    // The best first, each whole or not at all, while the message fits the budget.
    const retrieved: RetrievedMemory[] = [];
    for (const item of candidates) {
      const next = [...retrieved, item];
      if (measure(recallMessage(next)) <= budget) retrieved.push(item);
    }
    this.retrieved += retrieved.length;
    return { message: retrieved.length > 0 ? recallMessage(retrieved) : undefined, retrieved };
  }

  /** Whether the window should be cleared after a turn: `turnsSinceClear` turns since the last
   * clear, the window filling `used` of `capacity`. */
  shouldClear(turnsSinceClear: number, used: number, capacity: number): boolean {
    const { everyTurns, aboveShare } = this.clearOptions;
    return (everyTurns > 0 && turnsSinceClear >= everyTurns) || (aboveShare > 0 && used > aboveShare * capacity);
  }
}


function recallMessage(items: readonly RetrievedMemory[]): ChatMessage {
  const lines = items.map((item) => `- ${item.tier === 'other' ? `(another conversation) ` : ''}${item.role}: ${item.content}`);
  return { role: 'system', content: `${RECALL_HEADER}${lines.join('\n')}` };
}

function toRetrieved(hit: MemoryHit): RetrievedMemory {
  return { content: hit.content, role: hit.role, score: hit.score, tier: hit.tier, sessionId: hit.sessionId, turn: hit.turn };
}
