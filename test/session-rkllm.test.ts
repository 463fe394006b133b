// Sessions on an RKLLM model, against the fake librkllmrt.so (one token per byte, so the fake's
// statistics count exactly the bytes of the text it was given): the same API as on llama.cpp; each
// turn prefills only what it adds to the runtime's kept history; checkpoints are rkllm/prompt-cache
// entries made through prompt_cache_params; resume loads the newest one whose rendering is a prefix
// of the transcript's (else the system prompt's cache, else nothing) and prefills only the rest;
// corrupt or foreign checkpoints are skipped with their code; overflow, tools, coded refusals.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { readEntryFile } from '../lib/cache/entry.js';
import { CHATML_TEMPLATE, loadRkllmModel, PromptCache, Session, type GenerationResult, type LoadRkllmModelOptions, type RkllmModel } from '../lib/index.js';
import { CLI, runCli } from './helpers/cli.js';
import { FAKE_VERSIONS, FakeLog, fakeModelFile, fakeRuntimeLibrary, type FakeCall, type FakeVersion } from './helpers/fake-rkllm.js';

const root = t.testdir();
const log = new FakeLog(path.join(root, 'fake-calls.jsonl'));
const modelPath = fakeModelFile(root, 'qwen-fake');
process.env.XDG_CACHE_HOME = path.join(root, 'xdg');

const T = CHATML_TEMPLATE;
const SYSTEM = 'You are a terse assistant for RK3588 boards. Answer in one line.';
const QUESTIONS = Array.from({ length: 16 }, (_, i) => `Question ${i}: what does step ${i * 7} of the setup do?`);
const sys = T.system.replace('{system}', SYSTEM);
const user = (q: string): string => `${T.prefix}${q}${T.postfix}`;
const turn = (q: string, a: string): string => `${user(q)}${a}${T.turnEnd}`;
/** The fake's tokens are bytes. */
const bytes = (...parts: string[]): number => Buffer.byteLength(parts.join(''));

function load(version: FakeVersion, options: LoadRkllmModelOptions = {}): Promise<RkllmModel> {
  return loadRkllmModel(modelPath, {
    libraryPath: fakeRuntimeLibrary(version),
    runtimeVersion: version,
    maxNewTokens: 6,
    cacheDir: path.join(root, `cache-${version}`),
    ...options,
  });
}

/** The session's runs since the log was cleared: each rkllm_run with its rkllm_run:end. */
function runs(): Array<{ run: FakeCall; end: FakeCall }> {
  const started = log.calls('rkllm_run');
  const ended = log.calls('rkllm_run:end');
  return started.map((run, i) => ({ run, end: ended[i]! }));
}

function lastRun(): { prompt: string; infer: Record<string, unknown>; end: FakeCall } {
  const all = runs();
  const { run, end } = all[all.length - 1]!;
  return { prompt: (run.input as { prompt: string }).prompt, infer: run.infer as Record<string, unknown>, end };
}

function checkpointFiles(dir: string): string[] {
  const folder = path.join(dir, 'checkpoints');
  return fs.existsSync(folder) ? fs.readdirSync(folder).sort() : [];
}

t.test('open, resume and close behave as on llama.cpp; what cannot hold on the NPU is refused before anything is written', async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0');
  t.teardown(() => model.dispose());
  await t.rejects(Session.resume({ dir, id: 'nobody', context: model }), { code: 'E_SESSION_NOT_FOUND' });
  await t.rejects(Session.open({ dir, id: 'shifty', context: model, system: SYSTEM, overflow: { policy: 'shift' } }), { code: 'E_SHIFT_UNSUPPORTED' });
  t.notOk(fs.existsSync(path.join(dir, 'shifty')), "a refused 'shift' wrote nothing");
  await t.rejects(Session.open({ dir, id: 'templated', context: model, template: 'chatml' }), TypeError, 'template is a llama.cpp option');
  await t.rejects(Session.open({ dir, id: 'seq', context: model, sequence: 1 }), RangeError, 'one conversation per RKLLM model');
  t.notOk(fs.existsSync(path.join(dir, 'templated')));

  const session = await Session.open({ dir, id: 'a', context: model, system: SYSTEM });
  await t.rejects(Session.open({ dir, id: 'a', context: model, system: SYSTEM }), { code: 'E_SESSION_LOCKED' });
  await t.rejects(session.send('x', { stop: ['.'] }).result, RangeError, 'stop strings are refused, not approximated');
  await t.rejects(session.send('x', { maxTokens: 0 }).result, RangeError);
  t.same(session.history, [], 'refused sends left no turn');
  const reply = await session.send('hello').result;
  t.equal(reply.finishReason, 'length', 'maxNewTokens 6 of the model was the limit');
  t.equal(reply.tokens.length, 6);
  await session.close();
  await t.rejects(Session.open({ dir, id: 'a', context: model, system: SYSTEM }), { code: 'E_SESSION_EXISTS' });
  await t.rejects(Session.resume({ dir, id: 'a', context: model, overflow: { policy: 'shift' } }), { code: 'E_SHIFT_UNSUPPORTED' });
  const resumed = await Session.resume({ dir, id: 'a', context: model });
  t.same(resumed.history, [{ role: 'user', content: 'hello' }, { role: 'assistant', content: reply.text }]);
  await resumed.close();
  await t.rejects(resumed.send('hi').result, { code: 'E_DISPOSED' });
  await t.rejects(resumed.checkpoint(), { code: 'E_DISPOSED' });
});

for (const version of FAKE_VERSIONS) {
  t.test(`runtime ${version}: each turn prefills what it adds; checkpoints through prompt caches; resume prefills only past the newest`, async (t) => {
    const dir = t.testdir();
    const model = await load(version, { maxContextLen: 4096, cacheDir: path.join(dir, 'cache') });
    t.teardown(() => model.dispose());
    log.clear();
    const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, checkpoint: { everyTurns: 2, everySeconds: 0, keep: 2 } });
    t.match(runs().map((r) => r.run), [{ input: { prompt: sys }, infer: { mode: 1, keep_history: 0 } }], 'open made the system prompt cache (one run, no generation)');
    t.equal(log.last('rkllm_load_prompt_cache').tokens, bytes(sys), 'and loaded it');

    const replies: GenerationResult[] = [];
    log.clear();
    replies.push(await session.send(QUESTIONS[0]!).result);
    let last = lastRun();
    t.equal(last.prompt, sys + user(QUESTIONS[0]!), 'first turn: the whole window, as text the runtime does not template again');
    t.match(last.infer, { mode: 0, keep_history: 1 });
    t.same(log.calls('rkllm_set_chat_template').map((c) => [c.system_prompt, c.prompt_prefix, c.prompt_postfix]).pop(), ['', '', ''], 'the runtime template is empty');
    t.match(last.end, { cached_tokens: bytes(sys), prefill_tokens: bytes(user(QUESTIONS[0]!)), history_tokens: 0 }, 'the system prompt came from its cache');
    t.match(replies[0], { cachedTokens: bytes(sys), evaluatedTokens: bytes(user(QUESTIONS[0]!)), promptTokens: bytes(sys, user(QUESTIONS[0]!)), tier: 'disk' });

    log.clear();
    replies.push(await session.send(QUESTIONS[1]!).result);
    const [second, checkpointRun] = runs();
    t.equal((second!.run.input as { prompt: string }).prompt, T.turnEnd + user(QUESTIONS[1]!), 'second turn: only what the transcript adds to the kept history');
    t.match(second!.end, { history_tokens: bytes(sys, user(QUESTIONS[0]!)) + replies[0]!.tokens.length, prefill_tokens: bytes(T.turnEnd, user(QUESTIONS[1]!)) });
    t.match(replies[1], { tier: 'resident', evaluatedTokens: bytes(T.turnEnd, user(QUESTIONS[1]!)) });
    const window2 = sys + turn(QUESTIONS[0]!, replies[0]!.text) + turn(QUESTIONS[1]!, replies[1]!.text);
    t.match(checkpointRun!.run, { input: { prompt: window2 }, infer: { mode: 1, keep_history: 0, prompt_cache: { save: 1 } } }, 'everyTurns 2: the window, saved by the runtime');
    t.match(checkpointRun!.end, { cached_tokens: bytes(sys), prefill_tokens: bytes(window2) - bytes(sys), saved_prompt_cache: true }, 'a checkpoint prefills what follows the loaded cache once');
    t.equal(log.last('rkllm_load_prompt_cache').tokens, bytes(window2), 'then replaces the loaded cache');
    const files = checkpointFiles(path.join(dir, 's'));
    t.equal(files.length, 1, `one entry, no temporary left: ${files.join(', ')}`);
    const entry = await readEntryFile(path.join(dir, 's', 'checkpoints', files[0]!));
    t.match(entry.header, {
      kind: 'rkllm/prompt-cache',
      backend: { name: 'rkllm', version },
      model: { name: 'qwen-fake', architecture: 'rkllm', fingerprint: model.identity },
      layout: { conversationBytes: String(bytes(window2)), maxContextLen: String(model.runtime.params.maxContextLen) },
      tokenCount: 0,
      label: 'session:s',
    });
    t.equal(entry.header.payloadBytes, 12 + 4 * bytes(window2), "the payload is the runtime's file (the fake's: magic, count, ids)");

    log.clear();
    replies.push(await session.send(QUESTIONS[2]!).result);
    last = lastRun();
    t.equal(last.prompt, window2 + user(QUESTIONS[2]!), 'after a checkpoint the window is sent whole...');
    t.match(last.end, { cached_tokens: bytes(window2), prefill_tokens: bytes(user(QUESTIONS[2]!)), history_tokens: 0 }, '...and the runtime matches all of it');
    t.match(session.stats(), { turns: 3, toolResults: 0, clears: 0, summaries: 0, shifts: 0, tokensDropped: 0, checkpoints: 1, checkpointFailures: 0, resumes: { checkpoint: 0, cache: 0, prefill: 0 } });
    await session.close();

    log.clear();
    const resumed = await Session.resume({ dir, id: 's', context: model });
    const report = resumed.resumeReport!;
    t.match(report, { path: 'checkpoint', restoredTokens: bytes(window2), evaluatedTokens: bytes(turn(QUESTIONS[2]!, replies[2]!.text)), skippedCheckpoints: [], droppedJournalBytes: 0 });
    t.equal(log.calls('rkllm_run').length, 0, 'resuming ran nothing: the catch-up is prefilled with the next message');
    t.same(resumed.history.filter((m) => m.role === 'assistant').map((m) => m.content), replies.map((r) => r.text));
    const fourth = await resumed.send(QUESTIONS[3]!).result;
    last = lastRun();
    t.equal(last.prompt, window2 + turn(QUESTIONS[2]!, replies[2]!.text) + user(QUESTIONS[3]!));
    t.match(last.end, { cached_tokens: bytes(window2), prefill_tokens: bytes(turn(QUESTIONS[2]!, replies[2]!.text), user(QUESTIONS[3]!)) });
    t.equal(fourth.evaluatedTokens, report.evaluatedTokens + bytes(user(QUESTIONS[3]!)), 'the report said what the first turn would prefill for the catch-up');
    t.equal(resumed.stats().resumes.checkpoint, 1);
    const explicit = await resumed.checkpoint();
    t.equal(explicit.tokens, bytes(window2, turn(QUESTIONS[2]!, replies[2]!.text), turn(QUESTIONS[3]!, fourth.text)));
    t.equal(checkpointFiles(path.join(dir, 's')).length, 2);
    await resumed.close();
  });
}

t.test('a corrupt or foreign checkpoint is skipped with its code; then the older one, the system prompt cache, a prefill', async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0', { maxContextLen: 4096, cacheDir: path.join(dir, 'cache') });
  t.teardown(() => model.dispose());
  const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, checkpoint: { everyTurns: 1, everySeconds: 0, keep: 3 } });
  const texts: string[] = [];
  for (const q of QUESTIONS.slice(0, 3)) texts.push((await session.send(q).result).text);
  await session.close();
  const folder = path.join(dir, 's', 'checkpoints');
  const byAge = async (): Promise<string[]> => {
    const files = checkpointFiles(path.join(dir, 's')).map((f) => path.join(folder, f));
    const stamps = await Promise.all(files.map(async (f) => (await readEntryFile(f)).header.layout.checkpointStamp!));
    return files.map((f, i) => [stamps[i]!, f]).sort().map(([, f]) => f!);
  };
  const [, middle, newest] = await byAge();
  const window = (n: number): string => sys + QUESTIONS.slice(0, n).map((q, i) => turn(q, texts[i]!)).join('');

  const bad = fs.readFileSync(newest!);
  bad[bad.length >> 1] ^= 0xff;
  fs.writeFileSync(newest!, bad);
  // A checkpoint of another conversation: intact, same model, not a prefix of this transcript.
  const other = await Session.open({ dir, id: 'other', context: model, system: 'Another system prompt.', checkpoint: { everyTurns: 1, everySeconds: 0, keep: 1 } });
  await other.send('something else').result;
  await other.send('and more').result;
  await other.close();
  // Renamed so that the session takes it for its second newest.
  const foreignFile = path.join(dir, 'other', 'checkpoints', checkpointFiles(path.join(dir, 'other'))[0]!);
  const foreignEntry = await readEntryFile(foreignFile);
  t.ok((await readEntryFile(middle!)).header.layout.checkpointStamp! < foreignEntry.header.layout.checkpointStamp!, 'the foreign one is newer than the middle one');
  const foreign = path.join(folder, path.basename(foreignFile));
  fs.copyFileSync(foreignFile, foreign);

  log.clear();
  let resumed = await Session.resume({ dir, id: 's', context: model });
  let report = resumed.resumeReport!;
  t.same(
    report.skippedCheckpoints.map((s) => [s.path, s.code]),
    [
      [newest, 'E_CACHE_CORRUPT'],
      [foreign, 'E_CACHE_MISMATCH'],
    ],
    'the damaged newest and the foreign one, each with its code',
  );
  t.match(report, { path: 'checkpoint', restoredTokens: bytes(window(2)) }, 'the older intact checkpoint');
  t.same(log.calls('rkllm_load_prompt_cache').map((c) => c.tokens), [bytes(window(2))], 'only the intact one reached the runtime');
  await resumed.send(QUESTIONS[3]!).result;
  t.match(lastRun().end, { cached_tokens: bytes(window(2)), prefill_tokens: bytes(turn(QUESTIONS[2]!, texts[2]!), user(QUESTIONS[3]!)) });
  await resumed.close();

  fs.rmSync(folder, { recursive: true });
  log.clear();
  resumed = await Session.resume({ dir, id: 's', context: model });
  report = resumed.resumeReport!;
  t.match(report, { path: 'cache', restoredTokens: bytes(sys), skippedCheckpoints: [] }, 'no checkpoint: the system prompt cache');
  await resumed.close();

  const uncached = await load('1.3.0', { maxContextLen: 4096, cacheDir: null });
  t.teardown(() => uncached.dispose());
  fs.rmSync(folder, { recursive: true, force: true });
  resumed = await Session.resume({ dir, id: 's', context: uncached });
  report = resumed.resumeReport!;
  const transcript = sys + resumed.history.reduce((text, m, i, all) => (m.role === 'user' ? text + turn(m.content, all[i + 1]!.content) : text), '');
  t.match(report, { path: 'prefill', restoredTokens: 0, evaluatedTokens: bytes(transcript) }, 'no cache at all: a prefill of everything');
  await resumed.close();
});

t.test('checkpoints are cache entries: PromptCache and the CLI list, verify and remove them', { skip: fs.existsSync(CLI) ? false : `${CLI} is not built` }, async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0');
  t.teardown(() => model.dispose());
  const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, checkpoint: { everyTurns: 0, everySeconds: 0 } });
  await session.send(QUESTIONS[0]!).result;
  const written = await session.checkpoint();
  await session.close();
  const folder = path.join(dir, 's', 'checkpoints');
  const listed = await new PromptCache({ dir: folder }).list();
  t.match(listed, [{ key: path.basename(written.path, '.kvstash'), label: 'session:s', tokenCount: 0, model: { architecture: 'rkllm' } }]);
  t.equal(listed.length, 1);
  const ls = await runCli(['ls', '--cache-dir', folder, '--json']);
  t.equal(ls.code, 0, ls.stderr);
  t.match(JSON.parse(ls.stdout), [{ label: 'session:s', tokenCount: 0, path: written.path, model: { architecture: 'rkllm' } }]);
  const verify = await runCli(['verify', '--cache-dir', folder, '--json']);
  t.match(JSON.parse(verify.stdout), { ok: 1, corrupt: [] });
  const rm = await runCli(['rm', 'session:s', '--cache-dir', folder]);
  t.equal(rm.code, 0, rm.stderr);
  t.same(fs.readdirSync(folder), [], 'removed');
});

for (const policy of ['drop-oldest', 'summarize'] as const) {
  t.test(`overflow (${policy}): a conversation several times the context runs to the end, every run inside it`, async (t) => {
    const dir = t.testdir();
    const maxContextLen = 480;
    const model = await load('1.3.0', { maxContextLen, cacheDir: path.join(root, 'cache-small') });
    t.teardown(() => model.dispose());
    const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, overflow: { policy }, checkpoint: { everyTurns: 3, everySeconds: 0 } });
    log.clear();
    for (const q of QUESTIONS) await session.send(q, { maxTokens: 6 }).result;
    const stats = session.stats();
    t.equal(stats.turns, QUESTIONS.length);
    t.equal(session.history.length, 2 * QUESTIONS.length, 'history keeps every turn');
    t.ok(session.messages.length < session.history.length, `the window holds ${session.messages.length} messages`);
    if (policy === 'drop-oldest') t.ok(stats.clears > 0 && stats.summaries === 0, `${stats.clears} clears`);
    else {
      t.ok(stats.summaries > 0, `${stats.summaries} summaries`);
      t.equal(session.messages[0]!.role, 'system', 'the window starts with the summary');
    }
    const sessionRuns = runs().filter((r) => (r.run.infer as { mode: number }).mode === 0 && (r.run.infer as { keep_history: number }).keep_history === 1);
    t.equal(sessionRuns.length, QUESTIONS.length);
    const sizes = sessionRuns.map(({ end }) => (end.history_tokens as number) + (end.prompt_tokens as number) + (end.generated as number));
    t.ok(Math.max(...sizes) <= maxContextLen, `the largest run held ${Math.max(...sizes)} of ${maxContextLen} positions`);
    await session.close();
    const resumed = await Session.resume({ dir, id: 's', context: model, overflow: { policy } });
    t.same(resumed.messages, session.messages, 'resume rebuilds the same window');
    await resumed.close();
  });
}

t.test('tool results go into the next input as <tool_response> blocks; another user of the model in between is noticed', async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0');
  t.teardown(() => model.dispose());
  const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, checkpoint: { everyTurns: 0, everySeconds: 0 } });
  const first = await session.send('What is the weather?').result;
  await session.addToolResult('weather', { celsius: 21 });
  log.clear();
  const second = await session.send('And tomorrow?').result;
  t.equal(lastRun().prompt, `${T.turnEnd}${T.prefix}<tool_response>\nweather: {"celsius":21}\n</tool_response>\nAnd tomorrow?${T.postfix}`);
  t.same(session.history.map((m) => m.role), ['user', 'assistant', 'tool', 'user', 'assistant']);
  t.equal(session.stats().toolResults, 1);

  log.clear();
  const other = await model.generate({ prompt: 'unrelated' }).result;
  t.match(log.last('rkllm_run:end'), { history_tokens: 0 }, "generate() does not see the session's history");
  t.ok(other.text.length > 0);
  log.clear();
  await session.send('Thanks.').result;
  const window = sys + turn('What is the weather?', first.text) + `${T.prefix}<tool_response>\nweather: {"celsius":21}\n</tool_response>\nAnd tomorrow?${T.postfix}${second.text}${T.turnEnd}`;
  t.equal(lastRun().prompt, window + user('Thanks.'), 'the session sends its window whole again');
  t.match(lastRun().end, { history_tokens: 0, cached_tokens: bytes(sys) });
  await session.close();
});

t.test('prefill after a resume vs a full re-prefill, from the fake\'s statistics', async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0', { maxContextLen: 4096 });
  t.teardown(() => model.dispose());
  const session = await Session.open({ dir, id: 's', context: model, system: SYSTEM, checkpoint: { everyTurns: 4, everySeconds: 0 } });
  const turns = 10;
  for (const q of QUESTIONS.slice(0, turns)) await session.send(q).result;
  await session.close();
  const question = QUESTIONS[turns]!;

  const measure = async (context: RkllmModel): Promise<{ prefill: number; prompt: number; path: string }> => {
    const resumed = await Session.resume({ dir, id: 's', context });
    log.clear();
    await resumed.send(question).result;
    const { end } = lastRun();
    const pathTaken = resumed.resumeReport!.path;
    // Undo the turn so that both measurements continue the same transcript.
    await resumed.close();
    return { prefill: end.prefill_tokens as number, prompt: (end.prompt_tokens as number) + (end.history_tokens as number), path: pathTaken };
  };
  const snapshot = fs.readFileSync(path.join(dir, 's', 'journal.kvj'));
  const checkpoints = fs.readdirSync(path.join(dir, 's', 'checkpoints'));
  const fromCheckpoint = await measure(model);
  fs.writeFileSync(path.join(dir, 's', 'journal.kvj'), snapshot);
  fs.rmSync(path.join(dir, 's', 'checkpoints'), { recursive: true });
  const uncached = await load('1.3.0', { maxContextLen: 4096, cacheDir: null });
  t.teardown(() => uncached.dispose());
  const full = await measure(uncached);
  t.equal(fromCheckpoint.path, 'checkpoint');
  t.equal(full.path, 'prefill');
  t.equal(fromCheckpoint.prompt, full.prompt, 'the same prompt');
  t.equal(full.prefill, full.prompt, 'without checkpoint or cache everything is prefilled');
  // Checkpoints after turns 4 and 8 (keep 2): the newest covers 8 turns; turns 9 and 10 and the
  // new question are prefilled.
  t.equal(checkpoints.length, 2);
  t.ok(fromCheckpoint.prefill < full.prefill / 3, `after a resume ${fromCheckpoint.prefill} tokens prefilled, ${full.prefill} for a full re-prefill`);
  t.comment(`RKLLM resume after 10 turns: prefilled ${fromCheckpoint.prefill} of ${full.prompt} prompt tokens (${((100 * fromCheckpoint.prefill) / full.prompt).toFixed(1)} %); full re-prefill ${full.prefill}`);
});

t.test('a torn last journal record is dropped, the rest kept (the same journal as on llama.cpp)', async (t) => {
  const dir = t.testdir();
  const model = await load('1.2.1', { maxContextLen: 4096, cacheDir: path.join(dir, 'cache') });
  t.teardown(() => model.dispose());
  const session = await Session.open({ dir, id: 't', context: model, system: SYSTEM, checkpoint: { everyTurns: 0, everySeconds: 0 } });
  await session.send('one').result;
  await session.send('two').result;
  await session.close();
  const journal = path.join(dir, 't', 'journal.kvj');
  const whole = fs.readFileSync(journal);
  fs.writeFileSync(journal, whole.subarray(0, whole.length - 7));
  const resumed = await Session.resume({ dir, id: 't', context: model });
  t.equal(resumed.history.length, 2, 'the torn exchange is gone, the first kept');
  t.equal(resumed.history[0]!.content, 'one');
  t.ok(resumed.resumeReport!.droppedJournalBytes > 0);
  t.match(resumed.resumeReport, { path: 'cache', restoredTokens: bytes(sys) });
  await resumed.send('two again').result;
  await resumed.close();
  const again = await Session.resume({ dir, id: 't', context: model });
  t.same(again.history.filter((m) => m.role === 'user').map((m) => m.content), ['one', 'two again'], 'appends continue cleanly after the cut');
  t.equal(again.resumeReport!.droppedJournalBytes, 0);
  await again.close();
});

t.test('two sessions on one model share the system prompt cache and take turns on the runtime', async (t) => {
  const dir = t.testdir();
  const model = await load('1.3.0', { maxContextLen: 4096, cacheDir: path.join(dir, 'cache') });
  t.teardown(() => model.dispose());
  log.clear();
  const first = await Session.open({ dir, id: 'one', context: model, system: SYSTEM, checkpoint: { everyTurns: 0, everySeconds: 0 } });
  const second = await Session.open({ dir, id: 'two', context: model, system: SYSTEM, checkpoint: { everyTurns: 0, everySeconds: 0 } });
  t.equal(runs().length, 1, 'the system prompt was evaluated once, for the first session');
  t.equal(fs.readdirSync(path.join(dir, 'cache')).filter((f) => f.endsWith('.kvstash')).length, 1, 'one cache entry');
  // Sends from both at once: the model's queue runs them one at a time, in call order.
  const [a1, b1] = await Promise.all([first.send('from one').result, second.send('from two').result]);
  log.clear();
  const [a2, b2] = await Promise.all([first.send('one again').result, second.send('two again').result]);
  const [ra, rb] = runs();
  t.equal((ra!.run.input as { prompt: string }).prompt, sys + turn('from one', a1.text) + user('one again'), "each session's turn after the other's sends its window whole");
  t.equal((rb!.run.input as { prompt: string }).prompt, sys + turn('from two', b1.text) + user('two again'));
  t.match(ra!.end, { history_tokens: 0, cached_tokens: bytes(sys) }, 'from the system prompt cache, never the other history');
  t.match(rb!.end, { history_tokens: 0, cached_tokens: bytes(sys) });
  t.same([a2.tier, b2.tier], ['disk', 'disk']);
  t.same(first.history.map((m) => m.content), ['from one', a1.text, 'one again', a2.text]);
  t.same(second.history.map((m) => m.content), ['from two', b1.text, 'two again', b2.text]);
  await first.close();
  await second.close();
});
