/** Runs the compiled `kvstash` command in a child process, as a user does. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

// The CLI is the compiled one (npm install compiles dist/); after editing lib/, run `node scripts/build-ts.js`.
export const CLI = path.resolve(__dirname, '..', '..', 'dist', 'cli', 'main.js');

export function requireBuiltCli(): void {
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run \`node scripts/build-ts.js\` (npm install does it)`);
}

/** Runs the CLI; `stdin`, when given, is written to its standard input and closed. */
export function runCli(args: readonly string[], stdin?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: [stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    if (stdin !== undefined) child.stdin!.end(stdin);
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}
