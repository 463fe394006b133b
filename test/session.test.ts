// Durable sessions: checkpoints, fallbacks, torn journals, overflow policies, shared prefixes,
// tool turns, coded errors.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadModel, PromptCache, readEntryFile, Session, type Context, type Model, type OverflowPolicy } from '../lib/index.js';
import { bitIdentical, maxAbsDiff, prose, skipUnderEmulation, tinyModel } from './helpers/fixtures.js';
import { probeLogits } from './helpers/probe.js';

let model: Model;
const system = prose(150, 5);
const send = { maxTokens: 8 };

t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

async function withContext<T>(options: Parameters<Model['createContext']>[0], work: (context: Context) => Promise<T>): Promise<T> {
  const context = await model.createContext(options);
  try {
    return await work(context);
  } finally {
    await context.dispose();
  }
}

t.test('open, resume and lock errors are coded', async (t) => {
  const dir = t.testdir();
  await withContext({ contextSize: 2048 }, async (context) => {
    await t.rejects(Session.resume({ dir, id: 'nobody', context }), { code: 'E_SESSION_NOT_FOUND' });
    const session = await Session.open({ dir, id: 'a', context, system });
    await t.rejects(Session.open({ dir, id: 'a', context, system }), { code: 'E_SESSION_LOCKED' }, 'open twice in one process');
    await session.close();
    await t.rejects(Session.open({ dir, id: 'a', context, system }), { code: 'E_SESSION_EXISTS' });
    await t.rejects(Session.open({ dir, id: '../escape', context }), RangeError);
    const resumed = await Session.resume({ dir, id: 'a', context });
    await resumed.close();
    await t.rejects(resumed.send('hi').result, { code: 'E_DISPOSED' });
  });
});

t.test('a corrupt checkpoint falls back to the previous one, then to the prompt cache', async (t) => {
  const dir = t.testdir();
  const cacheDir = path.join(dir, 'cache');
  const replies: string[] = [];
  await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.open({ dir, id: 's', context, system, cache: new PromptCache({ dir: cacheDir }), checkpoint: { everyTurns: 1, keep: 2 } });
    for (const q of ['first question', 'second question', 'third question']) replies.push((await session.send(q, send).result).text);
    t.equal(session.stats().checkpoints, 3);
    await session.close();
  });
  const checkpoints = fs.readdirSync(path.join(dir, 's', 'checkpoints')).sort();
  t.equal(checkpoints.length, 2, 'older checkpoints beyond keep are deleted');
  const newest = path.join(dir, 's', 'checkpoints', checkpoints[1]!);
  const bytes = fs.readFileSync(newest);
  bytes[bytes.length >> 1] ^= 0xff;
  fs.writeFileSync(newest, bytes);

  const next = async (expectedPath: string, skipped: number) =>
    withContext({ contextSize: 2048 }, async (context) => {
      const session = await Session.resume({ dir, id: 's', context, cache: new PromptCache({ dir: cacheDir }) });
      const report = session.resumeReport!;
      t.equal(report.path, expectedPath, `resumed by ${report.path}`);
      t.equal(report.skippedCheckpoints.length, skipped);
      if (skipped > 0) t.match(report.skippedCheckpoints[0]!.reason, /checksum/, 'says why it skipped the newest');
      t.same(session.history.map((m) => m.content).filter((_, i) => i % 2 === 1).slice(0, 3), replies, 'the transcript is whole');
      const reply = await session.send('fourth question', send).result;
      const probe = await probeLogits(model, context);
      await session.close();
      return { reply, report, probe };
    });
  // The uninterrupted run: the same five questions in one session, never closed.
  const uninterrupted = await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.open({ dir: path.join(dir, 'reference'), id: 's', context, system, checkpoint: { everyTurns: 0, everySeconds: 0 } });
    const texts: string[] = [];
    const probes: Float32Array[] = [];
    for (const q of ['first question', 'second question', 'third question', 'fourth question', 'fourth question']) {
      texts.push((await session.send(q, send).result).text);
      probes.push(await probeLogits(model, context));
    }
    await session.close();
    return { texts, probes };
  });
  // Decoded in other batches than the uninterrupted run, the cells may differ in the last bits;
  // one wrong or missing token moves these logits by more than 1e-2.
  const TOLERANCE = 1e-3;
  t.same(replies, uninterrupted.texts.slice(0, 3), 'the first three replies are the uninterrupted run\'s');
  const fromOlder = await next('checkpoint', 1);
  t.ok(fromOlder.report.evaluatedTokens > 0, `caught up ${fromOlder.report.evaluatedTokens} tokens past the older checkpoint`);
  t.equal(fromOlder.reply.text, uninterrupted.texts[3], 'resumed from the older checkpoint, the reply is the uninterrupted run\'s');
  const olderDiff = maxAbsDiff(fromOlder.probe, uninterrupted.probes[3]!);
  t.ok(olderDiff < TOLERANCE, `and the sequence then holds what the uninterrupted run's does (max logit difference ${olderDiff})`);
  // No usable checkpoint at all: the system prefix comes from the prompt cache.
  fs.rmSync(path.join(dir, 's', 'checkpoints'), { recursive: true });
  const journal = path.join(dir, 's', 'journal.kvj');
  const transcriptBefore = fs.readFileSync(journal);
  const fromCache = await next('cache', 0);
  t.equal(fromCache.report.restoredTokens, model.tokenize(model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false }), { special: true }).length, 'the whole system prefix came from the cache');
  t.equal(fromCache.report.evaluatedTokens > 0, true);
  t.equal(fromCache.reply.text, uninterrupted.texts[4], 'resumed from the cache, the reply is the uninterrupted run\'s');
  const cacheDiff = maxAbsDiff(fromCache.probe, uninterrupted.probes[4]!);
  t.ok(cacheDiff < TOLERANCE, `and the sequence then holds what the uninterrupted run's does (max logit difference ${cacheDiff})`);
  const transcriptAfter = fs.readFileSync(journal);
  t.same(transcriptAfter.subarray(0, transcriptBefore.length), transcriptBefore, 'the resume only appended to the transcript');
  t.ok(transcriptAfter.length > transcriptBefore.length);
});

t.test('a torn last journal record is dropped, the rest kept', async (t) => {
  const dir = t.testdir();
  await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.open({ dir, id: 't', context, system });
    await session.send('one', send).result;
    await session.send('two', send).result;
    await session.close();
  });
  const journal = path.join(dir, 't', 'journal.kvj');
  const whole = fs.readFileSync(journal);
  fs.writeFileSync(journal, whole.subarray(0, whole.length - 7)); // the last exchange, torn
  await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.resume({ dir, id: 't', context });
    t.same(session.history.map((m) => m.content)[0], 'one');
    t.equal(session.history.length, 2, 'the torn exchange is gone, the first kept');
    t.ok(session.resumeReport!.droppedJournalBytes > 0);
    await session.send('two again', send).result;
    await session.close();
  });
  await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.resume({ dir, id: 't', context });
    t.same(session.history.map((m) => m.content).filter((_, i) => i % 2 === 0), ['one', 'two again'], 'appends continue cleanly after the cut');
    t.equal(session.resumeReport!.droppedJournalBytes, 0);
    await session.close();
  });
});

for (const policy of ['drop-oldest', 'summarize', 'shift'] as OverflowPolicy[]) {
  // 'shift' runs under emulation too: it exercises llama.cpp's K-shift on the ARM kernels.
  const skip = policy === 'shift' ? false : skipUnderEmulation('the overflow policy is TypeScript, proven natively');
  t.test(`overflow: a conversation twice the context size runs to the end (${policy})`, { skip }, async (t) => {
    const dir = t.testdir();
    await withContext({ contextSize: 512 }, async (context) => {
      const summaries: number[] = [];
      const session = await Session.open({
        dir,
        id: 'long',
        context,
        system,
        checkpoint: { everyTurns: 0, everySeconds: 0 },
        overflow: {
          policy,
          ...(policy === 'summarize' ? { summarize: async (messages) => (summaries.push(messages.length), `they talked about ${messages.length} things`) } : {}),
        },
      });
      // Each turn adds ~70 tokens (question, reply, template): 20 turns are about 1,400 tokens,
      // more than twice the 512-token context.
      let turn = 0;
      let conversationTokens = 0;
      for (; turn < 20; turn++) {
        const result = await session.send(`Turn ${turn}: ${prose(30, turn)}`, { maxTokens: 16 }).result;
        conversationTokens += result.evaluatedTokens + result.tokens.length;
        const held = await context.exclusive(() => context.memory.range(0));
        t.ok(held.max < context.info.sequenceContextSize, `turn ${turn}: the sequence fits (${held.max + 1} cells)`);
      }
      t.ok(conversationTokens > 2 * context.info.sequenceContextSize, `${conversationTokens} tokens went through a ${context.info.sequenceContextSize}-token context`);
      const stats = session.stats();
      const events = policy === 'drop-oldest' ? stats.clears : policy === 'summarize' ? stats.summaries : stats.shifts;
      t.ok(events > 0, `${events} ${policy} events`);
      t.ok(stats.tokensDropped > 0, `${stats.tokensDropped} tokens dropped`);
      t.equal(stats.turns, turn);
      t.equal(session.history.length, turn * 2, 'the history keeps every turn');
      if (policy === 'summarize') {
        t.ok(summaries.length > 0);
        t.match(session.messages[0]!.content, /^Summary of the earlier conversation:\nthey talked about/);
      }
      // The system prompt is always the start of the sequence: the session's record of the
      // sequence (a checkpoint's tokens) starts with it, and so do the cells themselves: the
      // sequence cut back to the prefix length predicts the next token exactly as the prefix
      // evaluated alone does.
      const rendered = model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false });
      const prefix = model.tokenize(rendered, { special: true });
      const written = await session.checkpoint();
      const checkpointed = await readEntryFile(written.path);
      t.same(checkpointed.header.tokens.slice(0, prefix.length), Array.from(prefix), 'the sequence\'s tokens start with the system prompt');
      t.ok(written.tokens > prefix.length);
      const probe = model.tokenize(' cache', { addSpecial: false });
      const cut = await withContext({ contextSize: 512 }, async (copy) => {
        await copy.importState(await context.exportState({ sequence: 0 }), { sequence: 0 });
        await copy.exclusive(() => copy.memory.remove(0, prefix.length));
        await copy.decode(probe, { start: prefix.length });
        return copy.logits();
      });
      const alone = await withContext({ contextSize: 512 }, async (fresh) => {
        await fresh.decode(prefix);
        await fresh.decode(probe, { start: prefix.length });
        return fresh.logits();
      });
      t.ok(bitIdentical(cut, alone), `the cells up to the prefix length are the system prompt's (max logit difference ${maxAbsDiff(cut, alone)})`);
      const resumed = await withContext({ contextSize: 512 }, async (other) => {
        await session.close();
        const again = await Session.resume({ dir, id: 'long', context: other, overflow: { policy } });
        const messages = again.messages.length;
        await again.send('one more', { maxTokens: 8 }).result;
        await again.close();
        return messages;
      });
      t.equal(resumed, session.messages.length, 'a resume sees the same (reduced) conversation');
    });
  });
}

t.test('two sessions with the same system prompt share its cached prefix', async (t) => {
  const dir = t.testdir();
  const cache = new PromptCache({ dir: path.join(dir, 'cache') });
  await withContext({ contextSize: 4096, sequences: 2 }, async (context) => {
    const first = await Session.open({ dir, id: 'one', context, cache, system, sequence: 0 });
    const a = await first.send('hello from one', send).result;
    t.ok(a.cachedTokens > 100, 'the first session evaluated its prefix when it opened');
    const residentBefore = cache.stats().hits.resident;
    const second = await Session.open({ dir, id: 'two', context, cache, system, sequence: 1 });
    t.equal(cache.stats().hits.resident, residentBefore + 1, 'the second session copied the prefix from the first one\'s sequence');
    const b = await second.send('hello from two', send).result;
    const own = b.promptTokens - b.cachedTokens;
    t.equal(b.evaluatedTokens, own, `the second session's first turn evaluates only its own ${own} tokens`);
    t.ok(own < 20);
    await first.close();
    await second.close();
  });
});

t.test('tool results are turns of the transcript', async (t) => {
  const dir = t.testdir();
  await withContext({ contextSize: 2048 }, async (context) => {
    const session = await Session.open({ dir, id: 'agent', context, system: 'You call tools.', tools: [{ name: 'weather' }] });
    await session.send('Weather in Oslo?', send).result;
    await session.addToolResult('weather', { city: 'Oslo', celsius: -3 });
    await session.addToolResult('weather', { city: 'Rome', celsius: 14 });
    const reply = await session.send('So which is warmer?', send).result;
    t.ok(reply.cachedTokens > 0);
    t.same(session.history.map((m) => m.role), ['user', 'assistant', 'tool', 'tool', 'user', 'assistant']);
    t.equal(session.history[2]!.content, 'weather: {"city":"Oslo","celsius":-3}');
    await session.close();
    const resumed = await Session.resume({ dir, id: 'agent', context });
    t.same(resumed.history, session.history);
    t.equal(resumed.stats().toolResults, 2);
    await resumed.close();
  });
});

t.test('checkpoint on SIGTERM (opt-in), and the process still ends by the signal', async (t) => {
  const dir = t.testdir();
  const child = spawn(
    process.execPath,
    [
      '-e',
      `
      const { loadModel, Session } = require(${JSON.stringify(path.resolve(__dirname, '..', 'dist', 'index.js'))});
      (async () => {
        const model = await loadModel(${JSON.stringify(await tinyModel())});
        const context = await model.createContext({ contextSize: 2048 });
        const session = await Session.open({ dir: ${JSON.stringify(dir)}, id: 'term', context, system: 'hi', checkpoint: { everyTurns: 0, everySeconds: 0, onExit: true } });
        await session.send('hello', { maxTokens: 4 }).result;
        process.stdout.write('ready\\n');
        setInterval(() => {}, 1000);
      })();
    `,
    ],
    // tap instruments the child (its NODE_OPTIONS add signal-exit's SIGTERM listener): the
    // process must still end by the signal.
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  // A child that dies before it is ready fails the test instead of leaving it waiting.
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && resolve());
    child.once('exit', (code, signal) => reject(new Error(`the child ended before it was ready (${code ?? signal})`)));
  });
  t.same(fs.readdirSync(dir + '/term').includes('checkpoints'), false, 'no checkpoint before the signal');
  child.kill('SIGTERM');
  const [code, signal] = await new Promise<[number | null, string | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  t.equal(signal, 'SIGTERM', `ended by the signal (code ${code})`);
  t.equal(fs.readdirSync(path.join(dir, 'term', 'checkpoints')).length, 1, 'a checkpoint was written first');
});
