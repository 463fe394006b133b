/** A real redis-server on 127.0.0.1 for the RedisStore tests: a free port, no persistence, a
 * temporary directory, stopped at teardown. Killed and restarted (empty) on the same port. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createClient } from 'redis';

export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export class RedisServer {
  private process?: ChildProcess;
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-redis-'));

  private constructor(
    readonly port: number,
    private readonly extra: string[],
  ) {}

  /** Starts a server; `extra` are more redis-server arguments (e.g. ['--requirepass', 'pw']). */
  static async start(extra: string[] = []): Promise<RedisServer> {
    const server = new RedisServer(await freePort(), extra);
    await server.restart();
    return server;
  }

  /** Starts a server on a given port (one a store was already pointed at). */
  static async startOn(port: number, extra: string[] = []): Promise<RedisServer> {
    const server = new RedisServer(port, extra);
    await server.restart();
    return server;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.process?.pid;
  }

  /** Starts it again (empty: nothing is saved) on the same port. */
  async restart(): Promise<void> {
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', this.dir, ...this.extra];
    const child = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.process = child;
    let output = '';
    child.stdout!.setEncoding('utf8').on('data', (text: string) => (output += text));
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (output += text));
    for (let waited = 0; !/Ready to accept connections/.test(output); waited += 20) {
      if (child.exitCode !== null || waited > 10_000) throw new Error(`redis-server did not start: ${output.slice(-800)}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  /** SIGKILL: connections drop mid-command, nothing is saved. */
  async kill(): Promise<void> {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
  }

  /** A command from an administrating client of its own (CONFIG SET, DEBUG, CLIENT PAUSE...). */
  async admin(args: string[], password?: string): Promise<unknown> {
    const client = createClient({ url: this.url, ...(password ? { password } : {}) });
    client.on('error', () => undefined);
    await client.connect();
    try {
      return await client.sendCommand(args);
    } finally {
      client.destroy();
    }
  }

  async stop(): Promise<void> {
    await this.kill();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
