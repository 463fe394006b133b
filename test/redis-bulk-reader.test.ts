// RedisStore's part reader (lib/cache/redis-bulk-reader.ts) against a scripted RESP server: replies
// split at every byte land at their offsets, nulls, errors and oversized values are told apart,
// the URL's AUTH and SELECT go first, and a lost connection rejects what waits on it.
import net from 'node:net';
import t from 'tap';
import { BulkReadError, RedisBulkReader } from '../lib/cache/redis-bulk-reader.js';

/** A server that records each command (an array of strings) and answers it with `reply(args)`,
 * written `bytesPerWrite` bytes at a time. */
async function scriptedServer(reply: (args: string[]) => Buffer | 'hang' | 'close', bytesPerWrite = Infinity) {
  const commands: string[][] = [];
  const sockets = new Set<net.Socket>();
  let connections = 0;
  const server = net.createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    let pending = Buffer.alloc(0);
    let writing = Promise.resolve();
    socket.on('data', (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      for (;;) {
        const parsed = parseCommand(pending);
        if (!parsed) return;
        pending = pending.subarray(parsed.used);
        commands.push(parsed.args);
        const answer = reply(parsed.args);
        if (answer === 'hang') continue;
        if (answer === 'close') return void socket.destroy();
        writing = writing.then(async () => {
          for (let at = 0; at < answer.length; at += bytesPerWrite) {
            socket.write(answer.subarray(at, Math.min(answer.length, at + bytesPerWrite)));
            if (bytesPerWrite !== Infinity) await new Promise((resolve) => setImmediate(resolve));
          }
        });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    commands,
    connections: () => connections,
    dropAll: () => sockets.forEach((s) => s.destroy()),
    /** Writes `bytes` to every open connection (tests that answer by hand use one). */
    answer: (bytes: Buffer) => sockets.forEach((s) => s.write(bytes)),
    close: () => new Promise((resolve) => (sockets.forEach((s) => s.destroy()), server.close(resolve))),
  };
}

function parseCommand(bytes: Buffer): { args: string[]; used: number } | undefined {
  const lines = bytes.toString('latin1');
  let at = lines.indexOf('\r\n');
  if (at < 0) return undefined;
  const count = Number(lines.slice(1, at));
  at += 2;
  const args: string[] = [];
  for (let i = 0; i < count; i++) {
    const end = lines.indexOf('\r\n', at);
    if (end < 0) return undefined;
    const length = Number(lines.slice(at + 1, end));
    if (lines.length < end + 2 + length + 2) return undefined;
    args.push(bytes.toString('utf8', end + 2, end + 2 + length));
    at = end + 2 + length + 2;
  }
  return { args, used: at };
}

const bulk = (value: Buffer) => Buffer.concat([Buffer.from(`$${value.length}\r\n`), value, Buffer.from('\r\n')]);
const valueOf = (key: string) => Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 31 + key.length * 7) & 0xff));

t.test('replies split at every byte land at their offsets; nulls, errors and oversized values are told apart', async (t) => {
  for (const bytesPerWrite of [1, 7, Infinity]) {
    const server = await scriptedServer((args) => {
      const key = args[1]!;
      if (key === 'gone') return Buffer.from('$-1\r\n');
      if (key === 'gone3') return Buffer.from('_\r\n');
      if (key === 'wrong') return Buffer.from('-WRONGTYPE Operation against a key holding the wrong kind of value\r\n');
      if (key === 'long') return bulk(Buffer.alloc(400, 0xee));
      return bulk(valueOf(key));
    }, bytesPerWrite);
    t.teardown(server.close);
    const reader = new RedisBulkReader(`redis://127.0.0.1:${server.port}`, 2, 2000);
    t.teardown(() => reader.reset(new Error('done')));
    const target = Buffer.alloc(1000, 0x55);
    const results = await Promise.allSettled([
      reader.get('a', target, 0, 300),
      reader.get('gone', target, 300, 300),
      reader.get('bc', target, 300, 300),
      reader.get('wrong', target, 600, 300),
      reader.get('gone3', target, 600, 300),
      reader.get('long', target, 600, 300),
      reader.get('', target, 900, 100),
    ]);
    const label = `${bytesPerWrite} bytes per write`;
    t.same(
      results.map((r) => (r.status === 'fulfilled' ? r.value : (r.reason as Error).message)),
      [300, null, 300, 'WRONGTYPE Operation against a key holding the wrong kind of value', null, 400, 300],
      `${label}: each read's outcome`,
    );
    t.ok((results[3] as PromiseRejectedResult).reason instanceof BulkReadError, `${label}: an error reply is a BulkReadError`);
    t.same(target.subarray(0, 300), valueOf('a'), `${label}: first value in place`);
    t.same(target.subarray(300, 600), valueOf('bc'), `${label}: a null left its place to the next read`);
    t.same(target.subarray(600, 900), Buffer.alloc(300, 0xee), `${label}: an oversized value fills its room and no more`);
    t.same(target.subarray(900, 1000), valueOf('').subarray(0, 100), `${label}: the room bounds the copy`);
    t.same(
      server.commands.map((c) => c[0]),
      Array(7).fill('GET'),
      `${label}: GETs only, no handshake without credentials`,
    );
    t.equal(server.connections(), 2, `${label}: the reads spread over both connections`);
  }
});

t.test("the URL's credentials and database go first, as node-redis reads them", async (t) => {
  const server = await scriptedServer((args) => (args[0] === 'GET' ? bulk(valueOf(args[1]!)) : Buffer.from('+OK\r\n')));
  t.teardown(server.close);
  const reader = new RedisBulkReader(`redis://us%3Aer:p%40ss@127.0.0.1:${server.port}/3`, 1, 2000);
  t.teardown(() => reader.reset(new Error('done')));
  t.equal(await reader.get('k', Buffer.alloc(300), 0, 300), 300);
  t.same(server.commands, [['AUTH', 'us:er', 'p@ss'], ['SELECT', '3'], ['GET', 'k']]);

  const refused = await scriptedServer((args) => (args[0] === 'AUTH' ? Buffer.from('-WRONGPASS invalid username-password pair\r\n') : bulk(valueOf('x'))));
  t.teardown(refused.close);
  const denied = new RedisBulkReader(`redis://:nope@127.0.0.1:${refused.port}`, 1, 2000);
  t.teardown(() => denied.reset(new Error('done')));
  await t.rejects(denied.get('k', Buffer.alloc(300), 0, 300), { message: /WRONGPASS/ }, 'a refused AUTH fails the read behind it');
  t.throws(() => new RedisBulkReader('rediss://127.0.0.1:1', 1, 100), TypeError, 'TLS stays with node-redis');
});

t.test('a connection lost mid-reply rejects every read on it; the next read connects anew', async (t) => {
  let phase: 'partial' | 'whole' = 'partial';
  let server!: Awaited<ReturnType<typeof scriptedServer>>;
  server = await scriptedServer((args) => {
    if (phase === 'whole') return bulk(valueOf(args[1]!));
    // Half a reply, then the connection drops.
    setTimeout(() => server.dropAll(), 50);
    return bulk(valueOf(args[1]!)).subarray(0, 100);
  });
  t.teardown(server.close);
  const reader = new RedisBulkReader(`redis://127.0.0.1:${server.port}`, 1, 2000);
  t.teardown(() => reader.reset(new Error('done')));
  const target = Buffer.alloc(600);
  const lost = await Promise.allSettled([reader.get('a', target, 0, 300), reader.get('b', target, 300, 300)]);
  t.same(
    lost.map((r) => r.status === 'rejected' && r.reason instanceof BulkReadError),
    [true, true],
    'both reads rejected',
  );
  phase = 'whole';
  t.equal(await reader.get('a', target, 0, 300), 300, 'read again over a new connection');
  t.same(target.subarray(0, 300), valueOf('a'));
  t.equal(server.connections(), 2);

  const nobody = new RedisBulkReader(`redis://127.0.0.1:${server.port}`, 1, 2000);
  await server.close();
  const refused = await nobody.get('a', target, 0, 300).catch((err: unknown) => err);
  t.ok(refused instanceof BulkReadError, `nothing listening: rejected, not hung (${String(refused)})`);
});

t.test('reset() rejects reads still waiting with the given error', async (t) => {
  const server = await scriptedServer(() => 'hang');
  t.teardown(server.close);
  const reader = new RedisBulkReader(`redis://127.0.0.1:${server.port}`, 2, 2000);
  const waiting = reader.get('a', Buffer.alloc(10), 0, 10);
  await new Promise((resolve) => setTimeout(resolve, 50));
  const reason = new Error('timed out');
  reader.reset(reason);
  await t.rejects(waiting, reason);
});

t.test('two GETs in flight per connection: the rest are sent as replies come back, in order', async (t) => {
  const server = await scriptedServer(() => 'hang');
  t.teardown(server.close);
  const reader = new RedisBulkReader(`redis://127.0.0.1:${server.port}`, 1, 2000);
  t.teardown(() => reader.reset(new Error('done')));
  const target = Buffer.alloc(5 * 300);
  const reads = ['a', 'bb', 'ccc', 'dddd', 'eeeee'].map((key, i) => reader.get(key, target, i * 300, 300));
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.same(
    server.commands.map((c) => c[1]),
    ['a', 'bb'],
    'only two sent before any reply',
  );
  // Answer what was asked, one reply at a time, from the server's side of the one connection.
  for (let answered = 0; answered < 5; answered++) {
    server.answer(bulk(valueOf(server.commands[answered]![1]!)));
    await new Promise((resolve) => setTimeout(resolve, 30));
    t.ok(server.commands.length <= answered + 3, `after ${answered + 1} replies, ${server.commands.length} sent`);
  }
  t.same(await Promise.all(reads), [300, 300, 300, 300, 300]);
  ['a', 'bb', 'ccc', 'dddd', 'eeeee'].forEach((key, i) => t.same(target.subarray(i * 300, (i + 1) * 300), valueOf(key), `${key} in place`));
});
