// The command line's parser (lib/cli/main.ts parseArguments: node:util's parseArgs splits the words,
// kvstash's rules check them). Exact results for each rule, where parseArgs alone would differ.
import t from 'tap';
import { parseArguments, UsageError, type FlagSpecs, type OperandSpec } from '../lib/cli/main.js';

const flags = {
  model: { type: 'string', help: '' },
  json: { type: 'boolean', help: '' },
  threads: { type: 'integer', help: '', min: 1, max: 8 },
} as const satisfies FlagSpecs;
const withOperand = { flags, operands: [{ name: 'entry', help: '', optional: true }] as readonly OperandSpec[] };
const noOperands = { flags };

const parse = (command: typeof withOperand | typeof noOperands, args: string[]) => parseArguments('c', command, args);

t.test('accepted command lines', async (t) => {
  const cases: Array<[typeof withOperand | typeof noOperands, string[], object]> = [
    [noOperands, [], { flags: {}, operands: [] }],
    [noOperands, ['--model', 'm.gguf', '--json', '--threads=3'], { flags: { model: 'm.gguf', json: true, threads: 3 }, operands: [] }],
    [noOperands, ['--model=--x'], { flags: { model: '--x' }, operands: [] }],
    [noOperands, ['--model', '-x'], { flags: { model: '-x' }, operands: [] }],
    [withOperand, ['-abc'], { flags: {}, operands: ['-abc'] }],
    [withOperand, ['-'], { flags: {}, operands: ['-'] }],
    [withOperand, ['--json', '--', '--model'], { flags: { json: true }, operands: ['--model'] }],
    [withOperand, ['e1', '--threads', '8'], { flags: { threads: 8 }, operands: ['e1'] }],
  ];
  for (const [command, args, expected] of cases) t.same(parse(command, args), expected, args.join(' ') || '(nothing)');
});

t.test('rejected command lines: a UsageError naming the command and the rule', async (t) => {
  const cases: Array<[typeof withOperand | typeof noOperands, string[], string]> = [
    [noOperands, ['--bogus'], "unknown option '--bogus'"],
    [noOperands, ['--constructor'], "unknown option '--constructor'"],
    [noOperands, ['--json', '--json'], '--json given twice'],
    [noOperands, ['--model=a', '--model', 'b'], '--model given twice'],
    [noOperands, ['--json=1'], '--json takes no value'],
    [noOperands, ['--model'], '--model needs a value'],
    [noOperands, ['--model', '--json'], '--model needs a value'],
    [noOperands, ['--threads', '--'], '--threads needs a value'],
    [noOperands, ['--model='], '--model must not be empty'],
    [noOperands, ['--threads', '-1'], "--threads must be a whole number, got '-1'"],
    [noOperands, ['--threads=1e3'], "--threads must be a whole number, got '1e3'"],
    [noOperands, ['--threads=9'], '--threads must be in [1, 8], got 9'],
    [noOperands, ['--threads=9007199254740993'], "--threads must be a whole number, got '9007199254740993'"],
    [noOperands, ['word'], "unexpected argument 'word'"],
    [noOperands, ['-x'], "unexpected argument '-x'"],
    [noOperands, ['--'], "unexpected argument '--'"],
    [withOperand, ['a', 'b'], "unexpected argument 'b'"],
    [withOperand, ['--', 'a', 'b'], "unexpected argument 'b'"],
    [withOperand, ['-ab', '-cd'], "unexpected argument '-cd'"],
  ];
  for (const [command, args, message] of cases) {
    t.throws(() => parse(command, args), { constructor: UsageError, message, command: 'c' }, args.join(' '));
  }
  t.throws(
    () => parseArguments('c', { flags, operands: [{ name: 'entry', help: '' }] }, ['--json']),
    { constructor: UsageError, message: 'missing <entry>' },
    'a required operand that is missing',
  );
});
