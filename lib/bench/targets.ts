/** The targets of issue 3, each judged on ratios of rows measured in the same run. */
import type { RowId, TypeResult } from './bench.js';

export interface TargetResult {
  id: TargetId;
  type: string;
  description: string;
  /** The measured quantity: a ratio (unit '×') or a time (unit 'ms'); null when a row it needs is missing. */
  value: number | null;
  unit: '×' | 'ms';
  op: '<=' | '<' | '>=';
  limit: number;
  /** How the value was formed from the rows. */
  formula: string;
  /** null when not measured. */
  met: boolean | null;
}

interface TargetSpec {
  id: string;
  description: string;
  unit: '×' | 'ms';
  op: '<=' | '<' | '>=';
  limit: number;
  /** Rows divided (numerator: one row; denominator: the sum of these rows, or a constant). */
  numerator: RowId;
  denominator: readonly RowId[] | null;
}

const TARGETS = [
  ...(
    [
      ['Resident', 'resident'],
      ['Ram', 'ram'],
      ['Disk', 'disk'],
      ['DiskEvicted', 'diskEvicted'],
    ] as const
  ).map(
    ([tier, restore]) =>
      ({
        id: `warmTtftOverhead${tier}`,
        description: `warm TTFT (${restore}) ≤ 1.05 × (its restore + the suffix prefill alone, timed just before in the same context): no overhead of ours`,
        unit: '×',
        op: '<=',
        limit: 1.05,
        numerator: `warm${tier}OverheadRatio`,
        denominator: null,
      }) as const,
  ),
  {
    id: 'warmTtftVsNodeLlamaCpp',
    description: "warm TTFT (resident copy, the prefix already in the context as in its reuse) ≤ 0.8 × node-llama-cpp's warm TTFT",
    unit: '×',
    op: '<=',
    limit: 0.8,
    numerator: 'warmResidentTtftMs',
    denominator: ['nlcWarmTtftMs'],
  },
  {
    id: 'warmDiskTtftVsNodeLlamaCpp',
    description: "warm TTFT (disk tier, page cache warm) ≤ 0.8 × node-llama-cpp's warm TTFT",
    unit: '×',
    op: '<=',
    limit: 0.8,
    numerator: 'warmDiskTtftMs',
    denominator: ['nlcWarmTtftMs'],
  },
  {
    id: 'restoreVsNodeLlamaCpp',
    description: "restore incl. checksum verification (disk, page cache warm) ≤ node-llama-cpp's unverified loadStateFromFile",
    unit: '×',
    op: '<=',
    limit: 1,
    numerator: 'diskRestoreMs',
    denominator: ['nlcLoadStateMs'],
  },
  {
    id: 'restoreVsPageCacheRead',
    description: 'restore incl. checksum verification (disk, page cache warm) ≤ 2 × the page-cache read time of the same bytes',
    unit: '×',
    op: '<=',
    limit: 2,
    numerator: 'diskRestoreMs',
    denominator: ['pageCacheReadMs'],
  },
  {
    id: 'residentHit',
    description: 'resident-copy hit < 2 ms',
    unit: 'ms',
    op: '<',
    limit: 2,
    numerator: 'residentRestoreMs',
    denominator: null,
  },
  {
    id: 'entrySize',
    description: 'entry size ≤ 1.02 × raw KV bytes of its tokens',
    unit: '×',
    op: '<=',
    limit: 1.02,
    numerator: 'entryBytes',
    denominator: ['rawKvBytes'],
  },
  {
    id: 'sessionsKvMemory',
    description: 'sessions sharing one template hold ≤ 1.25 × the KV bytes of one template plus their own tokens',
    unit: '×',
    op: '<=',
    limit: 1.25,
    numerator: 'sessionsKvBytes',
    denominator: ['sessionsTemplatePlusOwnBytes'],
  },
  {
    id: 'sessionsThroughput',
    description: 'concurrent sessions reach ≥ 3 × the aggregate tokens/s of running them one after another',
    unit: '×',
    op: '>=',
    limit: 3,
    numerator: 'sessionsConcurrentTokensPerSecond',
    denominator: ['sessionsSequentialTokensPerSecond'],
  },
  {
    id: 'prebuiltVsSource',
    description: "prebuilt binary's prompt-processing speed ≥ 0.9 × a source build's (native -march) in the same run",
    unit: '×',
    op: '>=',
    limit: 0.9,
    numerator: 'prebuiltPromptTokensPerSecond',
    denominator: ['sourcePromptTokensPerSecond'],
  },
] as const satisfies readonly TargetSpec[];

export type TargetId = (typeof TARGETS)[number]['id'];
export const TARGET_IDS: readonly TargetId[] = TARGETS.map((t) => t.id);

export function evaluateTargets(result: Pick<TypeResult, 'type' | 'rows'>): TargetResult[] {
  return TARGETS.map((spec: TargetSpec) => {
    const top = result.rows[spec.numerator];
    const parts = spec.denominator?.map((id) => result.rows[id]) ?? [];
    const missing = top === null || parts.some((p) => p === null);
    const bottom = parts.reduce<number>((a, b) => a + (b ?? 0), 0);
    const value = missing ? null : spec.denominator === null ? top : top / bottom;
    const met = value === null ? null : spec.op === '<=' ? value <= spec.limit : spec.op === '<' ? value < spec.limit : value >= spec.limit;
    const formula = spec.denominator === null ? spec.numerator : `${spec.numerator} / (${spec.denominator.join(' + ')})`;
    return {
      id: spec.id as TargetId,
      type: result.type,
      description: spec.description,
      value: value === null ? null : Math.round(value * 1000) / 1000,
      unit: spec.unit,
      op: spec.op,
      limit: spec.limit,
      formula,
      met,
    };
  });
}
