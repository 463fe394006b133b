// The SSE writer: keep-alive comments while a long prefill produces nothing (through the server,
// on the fake RKLLM runtime made slow), and backpressure: a reader that stops reading stops the
// producer instead of letting the server buffer without bound (a real node:http server and socket).
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { sendSse, type SseEvent } from '../lib/server/http.js';
import { slowFakeRkllmModels, startInProcess } from './helpers/serve.js';

const root = t.testdir();

t.test('keep-alive comments during a long prefill, then the chunks and [DONE]', async (t) => {
  // 3 ms per prefilled token: a ~300-byte prompt takes about a second before the first token.
  const models = slowFakeRkllmModels(t, path.join(root, 'rk'), 3000);
  const { server, url } = await startInProcess({ models, cacheDir: null, keepAliveMs: 100 });
  t.teardown(() => server.close());
  const response = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify({ model: 'qwen-fake', stream: true, messages: [{ role: 'user', content: 'board '.repeat(50) }] }),
  });
  t.equal(response.status, 200, 'streaming is decided by the body, not by Accept');
  t.match(response.headers.get('content-type'), /^text\/event-stream/);
  const text = await response.text();
  // The role chunk goes out at once; then comments keep the connection alive until the first text.
  const events = text.split('\n\n').filter(Boolean);
  t.match(events[0], /^data: .*"role":"assistant"/);
  const firstText = events.findIndex((e) => /"content":"[^"]/.test(e));
  const comments = events.slice(1, firstText).filter((e) => e === ': keep-alive');
  t.ok(comments.length >= 3, `${comments.length} keep-alive comments before the first text`);
  t.equal(comments.length, firstText - 1, 'nothing else in between');
  t.ok(text.endsWith('data: [DONE]\n\n'));
});

t.test('a reader that stops reading pauses the producer (backpressure)', async (t) => {
  let produced = 0;
  const payload = 'x'.repeat(64 * 1024);
  let finished: Promise<unknown> | undefined;
  const server = http.createServer((req, res) => {
    const controller = new AbortController();
    res.on('close', () => controller.abort());
    async function* events(): AsyncGenerator<SseEvent> {
      // Bounded (128 MiB), so a writer without backpressure fails the test instead of the process.
      while (produced < 2048) {
        produced++;
        yield { data: { payload } };
      }
    }
    finished = sendSse(res, events(), controller.signal);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => server.close());
  const { port } = server.address() as net.AddressInfo;
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  // Read the first bytes, then stop reading.
  await new Promise((resolve) => socket.once('data', resolve));
  socket.pause();
  await new Promise((resolve) => setTimeout(resolve, 500));
  const paused = produced;
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.equal(produced, paused, 'nothing more is produced while the reader does not read');
  t.ok(paused * payload.length < 16 * 1024 * 1024, `at most ${paused} events (${Math.round((paused * payload.length) / 1048576)} MiB) buffered`);
  let received = 0;
  socket.on('data', (chunk: Buffer) => (received += chunk.length));
  socket.resume();
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.ok(produced > paused, 'reading again lets it go on');
  t.ok(received > 0);
  socket.destroy();
  t.same(await finished, {}, 'the writer ends quietly when the client goes away');
});
