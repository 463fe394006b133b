/** The scripted conversation of the crash tests, and running it in a child process. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { prose } from './fixtures.js';

export const CHILD = path.join(__dirname, 'session-child.js');
export const CONTEXT = { contextSize: 2048 } as const;
export const SEND = { maxTokens: 6 } as const;

/** With `probe`, the child writes probe logits after each turn (readProbe reads them). */
export function writeScript(dir: string, modelPath: string, turns: number, probe = false): string {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'script.json');
  const messages = Array.from({ length: turns }, (_, turn) => `Question number ${turn}: ${prose(6 + (turn % 5), turn)}?`);
  fs.writeFileSync(file, JSON.stringify({ model: modelPath, dir, system: prose(200, 77), messages, context: CONTEXT, send: SEND, ...(probe ? { probe } : {}) }));
  return file;
}

export function readScript(file: string): { system: string; messages: string[] } {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as { system: string; messages: string[] };
}

/** The probe logits (see test/helpers/probe.ts) the child wrote after turn `turn` of a probing script in `dir`. */
export function readProbe(dir: string, turn: number): Float32Array {
  const bytes = fs.readFileSync(path.join(dir, `probe-${turn}.f32`));
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

/**
 * Runs the script in a child (`program`: session-child.js, or another child speaking its protocol).
 * With `killAfter`, SIGKILLs it that many ms after it printed `ready`.
 * Resolves with the turns it reported done and how long the conversation ran.
 */
export function runChild(script: string, killAfter?: number, program = CHILD): Promise<{ done: number; conversationMs: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [program, script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let done = 0;
    let readyAt = 0;
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.setEncoding('utf8').on('data', (text: string) => {
      if (!readyAt && text.includes('ready')) {
        readyAt = Date.now();
        if (killAfter !== undefined) timer = setTimeout(() => child.kill('SIGKILL'), killAfter);
      }
      for (const match of text.matchAll(/done (\d+)/g)) done = Number(match[1]);
    });
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (signal === 'SIGKILL' || code === 0) resolve({ done, conversationMs: readyAt ? Date.now() - readyAt : 0 });
      else reject(new Error(`child exited with ${code ?? signal}: ${stderr}`));
    });
  });
}
