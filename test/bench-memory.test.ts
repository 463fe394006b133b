// `kvstash bench --memory`'s TTFT row (issue 17: "a turn's TTFT with memory vs without on the same
// conversation"), on a small run: the same conversation without and with memory on the tiny model,
// retrieval timed apart from the injected text's prefill, the memory's reads within it, the ratio
// and the share against the 5 % target, in the JSON and in the table.
import t from 'tap';
import { formatMemoryReport, runMemoryBench, type MemoryTtftConfig } from '../lib/bench/memory.js';
import { percentile } from '../lib/bench/server.js';
import { tinyModel } from './helpers/fixtures.js';

const round2 = (value: number): number => Math.round(value * 100) / 100;

t.test("a turn's TTFT with memory vs without: retrieval apart from the injected prefill, in JSON and table", async (t) => {
  const config: MemoryTtftConfig = { turns: 4, contextSize: 1024, threads: 1, systemWords: 40, maxTokens: 2 };
  const report = await runMemoryBench({ sizes: [400], queries: 5, batch: 100, dim: 32 }, { ttft: { modelPath: await tinyModel(), config } });
  const ttft = report.ttft!;
  t.ok(ttft, 'the report has the TTFT part');
  t.equal(ttft.archivedTurns, 400, 'retrieval ran over the filled memory');
  t.equal(ttft.perTurn.length, config.turns - 1, 'every turn but the first is measured');
  for (const [i, [without, withMemory, retrieval, search]] of ttft.perTurn.entries()) {
    t.ok(without > 0 && withMemory > 0, `turn ${i + 1}: both TTFTs measured (${without} / ${withMemory} ms)`);
    t.ok(search > 0 && search <= retrieval && retrieval < withMemory, `turn ${i + 1}: 0 < search ${search} <= retrieval ${retrieval} < TTFT with memory ${withMemory}`);
  }
  const median = (column: number): number => round2(percentile(ttft.perTurn.map((turn) => turn[column]!), 50));
  // perTurn is rounded to 0.01 ms, the medians are taken before rounding: equal within that.
  t.ok(Math.abs(ttft.ttftWithoutMemoryMs - median(0)) <= 0.01 && Math.abs(ttft.ttftWithMemoryMs - median(1)) <= 0.01, 'the TTFTs are the medians of the turns');
  t.ok(Math.abs(ttft.retrievalMs - median(2)) <= 0.01 && Math.abs(ttft.searchMs - median(3)) <= 0.01, 'so are retrieval and search');
  t.ok(ttft.injectedTokens > 0, `retrieval injected archived text (${ttft.injectedTokens} tokens)`);
  t.equal(ttft.ratio, round2(ttft.ttftWithMemoryMs / ttft.ttftWithoutMemoryMs));
  t.equal(ttft.retrievalShare, ttft.retrievalMs / ttft.ttftWithoutMemoryMs);
  t.equal(ttft.injectedPrefillMs, round2(ttft.ttftWithMemoryMs - ttft.retrievalMs - ttft.ttftWithoutMemoryMs), 'the rest of the difference is the injected prefill');
  const target = report.targets.find((x) => x.name.startsWith("retrieval's share of a turn's TTFT"));
  t.match(target, { target: '<= 5 %', met: ttft.retrievalShare <= 0.05 });

  const table = formatMemoryReport(report);
  t.match(table, `| ${ttft.ttftWithoutMemoryMs} ms | ${ttft.ttftWithMemoryMs} ms | ${ttft.ratio} x | ${ttft.retrievalMs} ms (${ttft.searchMs} ms) |`);
  t.match(table, /hybrid recall over 400 archived turns/);

  const plain = await runMemoryBench({ sizes: [100], queries: 2, batch: 100, dim: 32 });
  t.equal(plain.ttft, undefined, 'without a model there is no TTFT part');
  t.notOk(plain.targets.some((x) => x.name.startsWith("retrieval's share")));
});
