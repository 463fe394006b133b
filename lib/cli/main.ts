#!/usr/bin/env node
/**
 * The `kvstash` command. Subcommands live in a table; each declares its flags, so parsing, usage
 * text and validation are written once here. Exit codes: 0 success, 1 failure, 2 bad usage,
 * 130 interrupted (SIGINT), as shells expect.
 */
import { parseArgs } from 'node:util';
import { isKvstashError } from '../errors.js';
import { benchCommand } from './bench.js';
import { chatCommand } from './chat.js';
import { demoCommand } from './demo.js';
import { inspectCommand, lsCommand, rmCommand, verifyCommand } from './entries.js';
import { memoryCommand } from './memory.js';
import { CommandFailure, UsageError } from './errors.js';
import { serveCommand } from './serve.js';
import { warmCommand } from './warm.js';

export { CommandFailure, UsageError };

export type FlagType = 'string' | 'integer' | 'boolean';

export interface FlagSpec {
  type: FlagType;
  /** What the value is called in the usage text, e.g. 'path.gguf'. */
  value?: string;
  help: string;
  /** Bounds of an integer flag, inclusive; a value outside is a usage error. Default 0 and 2^53-1. */
  min?: number;
  max?: number;
}

export type FlagSpecs = Readonly<Record<string, FlagSpec>>;

type FlagValue<T extends FlagType> = T extends 'string' ? string : T extends 'integer' ? number : boolean;

/** Parsed flags: a key is present only when the flag was given. */
export type Flags<S extends FlagSpecs> = { -readonly [K in keyof S]?: FlagValue<S[K]['type']> };

export interface CommandIo {
  /** Aborted on the first SIGINT; commands stop their running work and clean up. */
  signal: AbortSignal;
}

/** A word on the command line that is not an option, such as the entry of `kvstash rm <entry>`. */
export interface OperandSpec {
  name: string;
  help: string;
  /** Default false: without it the command line is a usage error. */
  optional?: boolean;
}

export interface Command<S extends FlagSpecs = FlagSpecs> {
  summary: string;
  flags: S;
  /** The operands the command takes, in order. Default none. */
  operands?: readonly OperandSpec[];
  /** Resolves with the exit code. `operands` holds the operands given, in the order declared. */
  run(flags: Flags<S>, io: CommandIo, operands: readonly string[]): Promise<number>;
}

const helpCommand: Command = {
  summary: 'Show this help, or the options of one command: kvstash help <command>',
  flags: {},
  run: async () => 0, // handled in main(): it needs the positional command name
};

const COMMANDS: Readonly<Record<string, Command>> = {
  demo: demoCommand,
  chat: chatCommand,
  bench: benchCommand,
  warm: warmCommand,
  ls: lsCommand,
  inspect: inspectCommand,
  verify: verifyCommand,
  rm: rmCommand,
  serve: serveCommand,
  memory: memoryCommand,
  help: helpCommand,
};

export function usage(commandName?: string): string {
  const command = commandName === undefined ? undefined : COMMANDS[commandName];
  if (commandName === undefined || command === undefined) {
    const width = Math.max(...Object.keys(COMMANDS).map((name) => name.length));
    const rows = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`);
    return ['Usage: kvstash <command> [options]', '', 'Commands:', ...rows, '', 'Run `kvstash help <command>` for its options.'].join('\n');
  }
  const flags = Object.entries(command.flags).map(([name, spec]) => {
    const left = spec.type === 'boolean' ? `--${name}` : `--${name} ${spec.value ?? (spec.type === 'integer' ? 'N' : 'value')}`;
    return [left, spec.help] as const;
  });
  const operands = (command.operands ?? []).map((o) => [o.optional ? `[${o.name}]` : `<${o.name}>`, o.help] as const);
  const width = Math.max(0, ...[...operands, ...flags].map(([left]) => left.length));
  const synopsis = [`kvstash ${commandName}`, ...(flags.length > 0 ? ['[options]'] : []), ...operands.map(([left]) => left)].join(' ');
  const lines = [`Usage: ${synopsis}`, '', command.summary];
  const list = (rows: ReadonlyArray<readonly [string, string]>): string[] => rows.map(([left, help]) => `  ${left.padEnd(width)}  ${help}`);
  if (operands.length > 0) lines.push('', 'Arguments:', ...list(operands));
  if (flags.length > 0) lines.push('', 'Options:', ...list(flags));
  return lines.join('\n');
}

/**
 * Parses `--name value`, `--name=value`, boolean `--name`, and the command's operands (any other
 * word, a lone `-` or a word starting with one dash included; after `--`, every word); anything
 * else is a UsageError.
 *
 * node:util's parseArgs splits the words (its tokens: which word is an option, which its value,
 * where `--` stands). What it does not do is ours, on its tokens: integers and their bounds, empty
 * values, a flag given twice (it keeps the last), a value-taking flag followed by another flag (it
 * takes `--json` as the value), operands counted against the command's, `--` as an operand of a
 * command that takes none, and single-dash words kept as operands (it reads them as short options).
 */
export function parseArguments<S extends FlagSpecs>(
  commandName: string,
  command: Pick<Command<S>, 'flags' | 'operands'>,
  args: readonly string[],
): { flags: Flags<S>; operands: string[] } {
  const specs = command.flags;
  const operandSpecs = command.operands ?? [];
  const flags: Record<string, string | number | boolean> = {};
  const operands: string[] = [];
  const addOperand = (arg: string): void => {
    if (operands.length >= operandSpecs.length) throw new UsageError(`unexpected argument '${arg}'`, commandName);
    operands.push(arg);
  };
  const options = Object.fromEntries(Object.entries(specs).map(([name, spec]) => [name, { type: spec.type === 'boolean' ? ('boolean' as const) : ('string' as const) }]));
  const { tokens } = parseArgs({ args: [...args], options, strict: false, allowPositionals: true, tokens: true });
  let shortWord = -1; // `-abc` is one token per letter: the word is one operand
  for (const token of tokens) {
    if (token.kind === 'option-terminator') {
      if (operandSpecs.length === 0) addOperand('--');
      args.slice(token.index + 1).forEach(addOperand);
      break;
    }
    if (token.kind === 'positional') {
      addOperand(token.value);
      continue;
    }
    if (!token.rawName.startsWith('--')) {
      if (token.index !== shortWord) addOperand(args[token.index]!);
      shortWord = token.index;
      continue;
    }
    const name = token.name;
    const spec = Object.prototype.hasOwnProperty.call(specs, name) ? specs[name] : undefined;
    if (spec === undefined) throw new UsageError(`unknown option '--${name}'`, commandName);
    if (name in flags) throw new UsageError(`--${name} given twice`, commandName);
    if (spec.type === 'boolean') {
      if (token.value !== undefined) throw new UsageError(`--${name} takes no value`, commandName);
      flags[name] = true;
      continue;
    }
    const text = token.value;
    if (text === undefined || (!token.inlineValue && text.startsWith('--'))) throw new UsageError(`--${name} needs a value`, commandName);
    if (spec.type === 'integer') {
      if (!/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
        throw new UsageError(`--${name} must be a whole number, got '${text}'`, commandName);
      }
      const value = Number(text);
      const min = spec.min ?? 0;
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (value < min || value > max) throw new UsageError(`--${name} must be in [${min}, ${max}], got ${value}`, commandName);
      flags[name] = value;
    } else {
      if (text.length === 0) throw new UsageError(`--${name} must not be empty`, commandName);
      flags[name] = text;
    }
  }
  const missing = operandSpecs.slice(operands.length).find((o) => !o.optional);
  if (missing !== undefined) throw new UsageError(`missing <${missing.name}>`, commandName);
  return { flags: flags as Flags<S>, operands };
}

export async function main(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === 'help' || name === '--help' || name === '-h') {
    const topic = name === 'help' ? rest[0] : undefined;
    if (topic !== undefined && (COMMANDS[topic] === undefined || rest.length > 1)) throw new UsageError(`no command '${rest.join(' ')}'`);
    process.stdout.write(`${usage(topic)}\n`);
    return 0;
  }
  const command = Object.prototype.hasOwnProperty.call(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (command === undefined) throw new UsageError(`unknown command '${name}'`);
  if (rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(`${usage(name)}\n`);
    return 0;
  }
  const { flags, operands } = parseArguments(name, command, rest);

  const controller = new AbortController();
  const onSigint = (): void => {
    // A second Ctrl-C means "now": do not wait for the cleanup of the first.
    if (controller.signal.aborted) process.exit(130);
    controller.abort(new Error('interrupted (SIGINT)'));
  };
  process.on('SIGINT', onSigint);
  try {
    return await command.run(flags, { signal: controller.signal }, operands);
  } catch (err) {
    if (controller.signal.aborted) {
      process.stderr.write('kvstash: interrupted\n');
      return 130;
    }
    throw err;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

/** Prints an error for a person: coded and system errors as one line, anything else (a bug) with its stack. */
function report(err: unknown): number {
  if (err instanceof UsageError) {
    process.stderr.write(`kvstash: ${err.message}\n\n${usage(err.command)}\n`);
    return 2;
  }
  if (err instanceof CommandFailure) {
    process.stderr.write(`kvstash: ${err.message}\n`);
    return 1;
  }
  if (isKvstashError(err)) {
    process.stderr.write(`kvstash: ${err.code}: ${err.message}\n`);
    return 1;
  }
  const system = err as NodeJS.ErrnoException;
  if (err instanceof Error && typeof system.code === 'string' && typeof system.syscall === 'string') {
    // Node's messages mostly start with the code already ("ENOENT: no such file or directory, open …").
    process.stderr.write(`kvstash: ${err.message.startsWith(system.code) ? '' : `${system.code}: `}${err.message}\n`);
    return 1;
  }
  process.stderr.write(`kvstash: unexpected error (please report it): ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  return 1;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      // An interrupted command may leave native work (a quantize, say) that would keep the process alive.
      if (code === 130) process.exit(code);
      process.exitCode = code;
    },
    (err: unknown) => {
      process.exitCode = report(err);
    },
  );
}
