/**
 * The two errors a command throws for main() to print. They live apart from main.ts so commands
 * can throw them without importing the command table that imports them.
 */

/** A wrong command line: the message and the usage text go to stderr, exit code 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    readonly command?: string,
  ) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A failure the command has already explained in its message (no entry by that name, a prompt
 * the cache cannot hold): one line on stderr, exit code 1. */
export class CommandFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CommandFailure';
  }
}
