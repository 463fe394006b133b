/**
 * Starting kvstash's server for tests: in-process (createServer) or as the `kvstash serve` child
 * process a user runs, on 127.0.0.1 and a free port, with an official `openai` client pointed at it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import { createServer, type KvstashServer, type ServerOptions } from '../../lib/server/server.js';
import { CLI, requireBuiltCli } from './cli.js';
import { fakeModelFile, fakeRuntimeLibrary, type FakeVersion } from './fake-rkllm.js';
import { tinyModel } from './fixtures.js';

/** Copies the synthetic tiny model to `<models>/<id>/<file>`; returns the models folder. */
export async function addTinyModel(models: string, id = 'tiny', file = 'model.gguf', seed = 1): Promise<string> {
  fs.mkdirSync(path.join(models, id), { recursive: true });
  fs.copyFileSync(await tinyModel(seed), path.join(models, id, file));
  return models;
}

/** A fake .rkllm model at `<models>/<id>/` with a model.json naming the fake runtime library. */
export function addFakeRkllmModel(models: string, id = 'qwen-fake', version: FakeVersion = '1.3.0', settings: object = {}): string {
  const file = fakeModelFile(path.dirname(models), id);
  fs.writeFileSync(path.join(models, id, 'model.json'), JSON.stringify({ libraryPath: fakeRuntimeLibrary(version), runtimeVersion: version, maxNewTokens: 6, ...settings }));
  return file;
}

/**
 * `<dir>/models` with the fake RKLLM model 'qwen-fake' whose prefill takes `prefillUs` per token
 * (FAKE_RKLLM_PREFILL_US, restored when the test ends): a long prefill on demand.
 */
export function slowFakeRkllmModels(t: { teardown(fn: () => void): void }, dir: string, prefillUs: number): string {
  const models = path.join(dir, 'models');
  fs.mkdirSync(models, { recursive: true });
  addFakeRkllmModel(models, 'qwen-fake');
  process.env.FAKE_RKLLM_PREFILL_US = String(prefillUs);
  t.teardown(() => delete process.env.FAKE_RKLLM_PREFILL_US);
  return models;
}

export interface Running {
  server: KvstashServer;
  url: string;
  client: OpenAI;
  /** The server's log lines. */
  lines: string[];
}

/** createServer on 127.0.0.1:0; the client does not retry (tests see every status as sent). */
export async function startInProcess(options: ServerOptions, apiKey = 'unused'): Promise<Running> {
  const lines: string[] = [];
  const server = createServer({ threads: 2, contextSize: 1024, log: (line) => lines.push(line), ...options });
  const url = await server.listen({ port: 0 });
  return { server, url, client: client(url, apiKey), lines };
}

export function client(url: string, apiKey = 'unused'): OpenAI {
  return new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0 });
}

export interface Child {
  child: ChildProcess;
  url: string;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** `node dist/cli/main.js serve --port 0 ...args`; resolves once it printed its URL line. */
export function startChild(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Child> {
  requireBuiltCli();
  const child = spawn(process.execPath, [CLI, 'serve', '--port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let stdout = '';
  let stderr = '';
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      stdout += chunk;
      const url = /^kvstash serve: listening on (http:\/\/\S+)$/m.exec(stdout)?.[1];
      if (url) resolve({ child, url, stdout: () => stdout, stderr: () => stderr, exited });
    });
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    void exited.then(({ code }) => reject(new Error(`kvstash serve exited (${code}) before listening: ${stderr}`)));
  });
}

/** Raw HTTP for what the openai client hides (headers, bodies it refuses to send). */
export async function raw(url: string, method: string, pathname: string, body?: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; json: any; text: string }> {
  const response = await fetch(`${url}${pathname}`, { method, body, headers: { 'content-type': 'application/json', ...headers } });
  const text = await response.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, headers: response.headers, json, text };
}

/** The value of one Prometheus sample line (`name{labels} value`), or undefined. */
export function metric(text: string, sample: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line === undefined ? undefined : Number(line.slice(sample.length + 1));
}
