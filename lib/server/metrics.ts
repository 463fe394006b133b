/**
 * GET /metrics: counters kept by the server, gauges read from the model pool, in Prometheus text
 * format (version 0.0.4). No client library: the format is a dozen lines of text.
 */
import type { ModelPool } from './model-pool.js';

/** TTFT histogram buckets. Unit: seconds. */
const TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

type Labels = Record<string, string>;

class Counter {
  private readonly values = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}

  inc(labels: Labels, by = 1): void {
    const key = labelText(labels);
    const item = this.values.get(key);
    if (item) item.value += by;
    else this.values.set(key, { labels, value: by });
  }

  get(labels: Labels): number {
    return this.values.get(labelText(labels))?.value ?? 0;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const { labels, value } of this.values.values()) lines.push(`${this.name}${labelText(labels)} ${value}`);
    return lines.join('\n');
  }
}

class Histogram {
  private readonly series = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: number[],
  ) {}

  observe(labels: Labels, value: number): void {
    const key = labelText(labels);
    let item = this.series.get(key);
    if (!item) this.series.set(key, (item = { labels, counts: this.buckets.map(() => 0), sum: 0, count: 0 }));
    this.buckets.forEach((bound, i) => {
      if (value <= bound) item!.counts[i]!++;
    });
    item.sum += value;
    item.count++;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    for (const { labels, counts, sum, count } of this.series.values()) {
      this.buckets.forEach((bound, i) => lines.push(`${this.name}_bucket${labelText({ ...labels, le: String(bound) })} ${counts[i]}`));
      lines.push(`${this.name}_bucket${labelText({ ...labels, le: '+Inf' })} ${count}`);
      lines.push(`${this.name}_sum${labelText(labels)} ${sum}`);
      lines.push(`${this.name}_count${labelText(labels)} ${count}`);
    }
    return lines.join('\n');
  }
}

function labelText(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`);
  return parts.length > 0 ? `{${parts.join(',')}}` : '';
}

function gauge(name: string, help: string, rows: Array<[Labels, number]>): string {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, ...rows.map(([labels, value]) => `${name}${labelText(labels)} ${value}`)].join('\n');
}

/** What a finished generation reports to the metrics. */
export interface GenerationFigures {
  model: string;
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
  /** Cache tier of the restored prefix; null on a miss. */
  tier: string | null;
  restoreMs: number;
  ttftMs: number | null;
}

export class Metrics {
  readonly requests = new Counter('kvstash_requests_total', 'HTTP requests answered, by route and status.');
  readonly promptTokens = new Counter('kvstash_prompt_tokens_total', 'Prompt tokens of finished generations.');
  readonly completionTokens = new Counter('kvstash_completion_tokens_total', 'Generated tokens.');
  readonly cacheLookups = new Counter('kvstash_cache_lookups_total', 'Prompt cache lookups (one per generation).');
  readonly cacheHits = new Counter('kvstash_cache_hits_total', 'Prompt cache lookups that restored a prefix, by tier.');
  readonly prefillSaved = new Counter('kvstash_prefill_tokens_saved_total', 'Prompt tokens restored from the cache instead of evaluated.');
  readonly restoreSeconds = new Counter('kvstash_cache_restore_seconds_total', 'Time spent restoring cached prefixes.');
  readonly aborted = new Counter('kvstash_generations_aborted_total', 'Generations stopped because the client went away.');
  readonly ttft = new Histogram('kvstash_time_to_first_token_seconds', 'From the start of a generation (after queueing) to its first token.', TTFT_BUCKETS);

  constructor(private readonly pool: ModelPool) {}

  generation(figures: GenerationFigures): void {
    const model = { model: figures.model };
    this.promptTokens.inc(model, figures.promptTokens);
    this.completionTokens.inc(model, figures.completionTokens);
    this.cacheLookups.inc(model);
    if (figures.tier !== null) this.cacheHits.inc({ ...model, tier: figures.tier });
    this.prefillSaved.inc(model, figures.cachedTokens);
    this.restoreSeconds.inc(model, figures.restoreMs / 1000);
    if (figures.ttftMs !== null) this.ttft.observe(model, figures.ttftMs / 1000);
  }

  render(): string {
    const stats = this.pool.stats();
    const parts = [
      this.requests.render(),
      this.promptTokens.render(),
      this.completionTokens.render(),
      this.ttft.render(),
      this.cacheLookups.render(),
      this.cacheHits.render(),
      this.prefillSaved.render(),
      this.restoreSeconds.render(),
      this.aborted.render(),
      gauge('kvstash_models_loaded', 'Models loaded now.', [[{}, stats.loaded]]),
      gauge('kvstash_models_loading', 'Models being loaded now.', [[{}, this.pool.loadingCount]]),
      gauge('kvstash_model_memory_bytes', 'Estimated memory of the loaded models (weights + KV).', [[{}, stats.bytes]]),
      gauge('kvstash_queue_depth', 'Requests waiting for a sequence.', [[{}, stats.queued], ...stats.models.map((m): [Labels, number] => [{ model: m.id }, m.queued])]),
      gauge('kvstash_sequences_active', 'Sequences leased by running generations.', [[{}, stats.active], ...stats.models.map((m): [Labels, number] => [{ model: m.id }, m.active])]),
      gauge('kvstash_sequences', 'Sequences per loaded model (--parallel).', stats.models.map((m): [Labels, number] => [{ model: m.id }, m.sequences])),
    ];
    return `${parts.join('\n')}\n`;
  }
}
