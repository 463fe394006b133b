// The examples in examples/ run end to end on the synthetic model.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { tinyModel } from './helpers/fixtures.js';

const examples = path.join(__dirname, '..', 'examples');

function runJsonLines(script: string, args: string[]): Array<Record<string, unknown>> {
  const result = spawnSync(process.execPath, [path.join(examples, script), ...args], { encoding: 'utf8', timeout: 120_000 });
  if (result.status !== 0) throw new Error(`${script} exited ${result.status}: ${result.stderr}`);
  return result.stdout.trim().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>);
}

t.test('static-prompt-bot: the system prompt is evaluated once, then restored; stale or damaged files fall back', async (t) => {
  const model = await tinyModel();
  const state = path.join(t.testdir(), 'bot-state');
  const ask = (modelPath: string, ...extra: string[]) =>
    runJsonLines('static-prompt-bot.js', ['--model', modelPath, '--state', state, '--max-tokens', '6', ...extra, 'Weather in Oslo?', 'And in Rome?']);

  const first = ask(model);
  t.match(first[0], { system: { source: 'full prefill' } });
  t.match(first[1], { system: { source: 'full prefill' } }, 'one process, one prefill');
  const second = ask(model);
  t.match(second[0], { system: { source: 'state file', problems: [] } });
  t.same(second.map((r) => r.tokens), first.map((r) => r.tokens), 'the same replies as after a full prefill');
  const systemTokens = first[0]!.systemTokens as number;
  t.ok(systemTokens > 400, `${systemTokens} system tokens`);
  t.ok((second[0]!.evaluated as number) < 30, `each request evaluates only its ${second[0]!.evaluated} dynamic tokens`);

  const withSummary = ask(model, '--summary', 'The user asked about Paris before.', '--tool', '{"city":"Oslo","celsius":-3}');
  t.ok((withSummary[0]!.evaluated as number) > (second[0]!.evaluated as number), 'summary and tool history are part of the dynamic part');
  t.match(withSummary[0], { system: { source: 'state file' } });

  // Another model of the same shape: the file is refused (a raw llama.cpp state would load).
  const other = ask(await tinyModel(2));
  t.match(other[0], { system: { source: 'full prefill' } });
  t.match((other[0]!.system as { problems: string[] }).problems[0], /^E_CACHE_MISMATCH/);

  // A damaged file: refused, re-evaluated, rewritten.
  for (const name of fs.readdirSync(state)) {
    const file = path.join(state, name);
    const bytes = fs.readFileSync(file);
    bytes[bytes.length - 40] ^= 1;
    fs.writeFileSync(file, bytes);
  }
  const repaired = ask(model);
  t.match(repaired[0], { system: { source: 'full prefill' } });
  t.same(repaired.map((r) => r.tokens), first.map((r) => r.tokens));
  t.match(ask(model)[0], { system: { source: 'state file' } }, 'and the next run restores again');
});

t.test('background-assistant: killed and restarted, it carries on the conversation', async (t) => {
  const model = await tinyModel();
  const dir = t.testdir();
  const inbox = path.join(dir, 'inbox.txt');
  fs.writeFileSync(inbox, Array.from({ length: 8 }, (_, i) => `Message ${i}: please note item ${i * 7}.`).join('\n'));

  const reference = runJsonLines('background-assistant.js', ['--model', model, '--dir', path.join(dir, 'reference'), '--inbox', inbox, '--max-tokens', '6']);
  const expected = reference.filter((e) => e.event === 'answered').map((e) => e.reply);
  t.equal(expected.length, 8);

  // Kill it with SIGKILL right after its third answer.
  const state = path.join(dir, 'state');
  const events = await new Promise<Array<Record<string, unknown>>>((resolve) => {
    const child = spawn(process.execPath, [path.join(examples, 'background-assistant.js'), '--model', model, '--dir', state, '--inbox', inbox, '--max-tokens', '6']);
    const seen: Array<Record<string, unknown>> = [];
    let buffer = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => {
      buffer += text;
      for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
        seen.push(JSON.parse(buffer.slice(0, nl)) as Record<string, unknown>);
        buffer = buffer.slice(nl + 1);
        if (seen.filter((e) => e.event === 'answered').length === 3) child.kill('SIGKILL');
      }
    });
    child.on('exit', () => resolve(seen));
  });
  const before = events.filter((e) => e.event === 'answered').length;
  t.ok(before >= 3, `${before} answers before the kill`);

  const restarted = runJsonLines('background-assistant.js', ['--model', model, '--dir', state, '--inbox', inbox, '--max-tokens', '6']);
  t.match(restarted[0], { event: 'resumed', path: 'checkpoint' });
  const answered = restarted.filter((e) => e.event === 'answered');
  t.ok((answered[0]!.index as number) >= 3, `it continued at message ${answered[0]!.index}`);
  t.same(answered.map((e) => e.reply), expected.slice(answered[0]!.index as number), 'with the replies of an uninterrupted run');
  t.match(restarted.at(-1), { event: 'idle', turns: 8 });
});
