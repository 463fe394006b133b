// `kvstash chat`: a durable interactive chat that resumes after a kill.
import { spawn } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { CLI, requireBuiltCli, runCli } from './helpers/cli.js';
import { tinyModel } from './helpers/fixtures.js';

t.test('chat answers stdin lines, is killed mid-conversation, and resumes with the same command', async (t) => {
  requireBuiltCli();
  const dir = t.testdir();
  const args = ['chat', '--model', await tinyModel(), '--session', 'kitchen', '--dir', path.join(dir, 'sessions'), '--cache-dir', path.join(dir, 'cache'), '--max-tokens', '4', '--system', 'You are a cook.', '--threads', '2'];

  const first = await runCli(args, 'How long do I boil an egg?\nAnd pasta?\n');
  t.equal(first.code, 0, first.stderr);
  t.match(first.stderr, /New conversation "kitchen"/);
  t.match(first.stderr, /\(saved: 2 messages\)\n\(saved: 4 messages\)/, 'each turn is reported durable');

  // Killed after its first answer of the second run.
  const killed = await new Promise<string>((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (out += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => text.includes('(saved: 6 messages)') && child.kill('SIGKILL'));
    child.stdin.write('And rice?\n');
    child.on('exit', () => resolve(out));
  });
  t.ok(killed.length > 0, 'it answered, and said the turn was saved, before it was killed');

  const resumed = await runCli(args, 'What did I ask first?\n');
  t.equal(resumed.code, 0, resumed.stderr);
  t.match(resumed.stderr, /Resumed "kitchen": 6 messages, KV from checkpoint/, 'every answered message is still there');
  t.match(resumed.stderr, /\(saved: 8 messages\)/);
});

t.test('chat without --session is a usage error', async (t) => {
  requireBuiltCli();
  const result = await runCli(['chat', '--model', await tinyModel()]);
  t.equal(result.code, 2);
  t.match(result.stderr, /--session is required/);
});
