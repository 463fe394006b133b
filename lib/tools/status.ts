/**
 * How slow work is shown. lib/tools and lib/bench take these as parameters instead of importing the
 * CLI's status line, so neither imports lib/cli (which imports both): the command line passes its
 * own (lib/cli/progress.ts, cliUi).
 */

/** (done, total): tokens evaluated of tokens to evaluate, or a fraction of 1. */
export type Progress = (done: number, total: number) => void;

/** Runs `work` under a status line labelled `label`; `work` reports its progress as it goes. */
export type StatusRunner = <T>(label: string, work: (progress: Progress) => Promise<T>) => Promise<T>;

export interface Ui {
  status: StatusRunner;
  /** A path as shown to a person (the CLI writes the home directory as ~). */
  showPath(file: string): string;
}
