/** Progress of slow work (loading a model, evaluating a long prompt) on stderr. */
import { performance } from 'node:perf_hooks';
import type { Progress, Ui } from '../tools/status.js';
import { duration, fmt, tildify } from './format.js';

export type { Progress };

/**
 * Runs `work` under a status line on stderr: a bar and a percentage, and for token counts the rate
 * and the time left. On a terminal the line is redrawn in place (its clock ticks between progress
 * reports, which come once per batch); elsewhere (logs, CI) it prints a line at each quarter.
 */
export async function withStatus<T>(label: string, work: (progress: Progress) => Promise<T>): Promise<T> {
  const tty = process.stderr.isTTY === true;
  const start = performance.now();
  let done = 0;
  let total = 0;
  /** When `done` was reported: the rate is taken there, so it holds still between reports. */
  let reportedAt = start;
  let drawnAt = -Infinity;
  let quarter = 1;
  const describe = (): string => {
    const elapsed = performance.now() - start;
    const parts = [label];
    let clock = duration(elapsed);
    if (total > 0) {
      const fraction = Math.min(1, done / total);
      parts.push(`[${'#'.repeat(Math.round(fraction * 24)).padEnd(24, '.')}] ${Math.floor(fraction * 100)}%`);
    }
    if (total > 1) {
      parts.push(`${fmt(done)}/${fmt(total)} tokens`);
      if (done > 0 && reportedAt > start) {
        // The mean rate up to the last report (once per batch): the time left counts down between reports.
        const perMs = done / (reportedAt - start);
        parts.push(`${fmt(Math.round(perMs * 1000))} tokens/s`);
        const left = (total - done) / perMs - (performance.now() - reportedAt);
        if (done < total && left > 0) clock += `, ${duration(left)} left`;
      }
    }
    parts.push(clock);
    return parts.join('  ');
  };
  const draw = (): void => {
    drawnAt = performance.now();
    process.stderr.write(`\r\x1b[K${describe()}`);
  };
  const timer = tty ? setInterval(draw, 250) : undefined;
  timer?.unref();
  process.stderr.write(tty ? `\r\x1b[K${describe()}` : `${label}...\n`);
  let finished = false;
  const progress: Progress = (d, t) => {
    // Reports travel through a queue and can arrive after the work has settled: drop those.
    if (finished) return;
    done = d;
    total = t;
    reportedAt = performance.now();
    if (tty) {
      // Model loading reports hundreds of times a second: a terminal needs a few redraws of it.
      if (reportedAt - drawnAt >= 50 || d >= t) draw();
    } else if (reportedAt - start >= 1000 && t > 0 && d < t && d / t >= quarter / 4) {
      // A line per quarter, the last being the finishing line below; none for work that is quick anyway.
      process.stderr.write(`${describe()}\n`);
      quarter = Math.floor((d / t) * 4) + 1;
    }
  };
  try {
    const result = await work(progress);
    if (total > 0) done = total;
    process.stderr.write(`${tty ? '\r\x1b[K' : ''}${describe()}  done\n`);
    return result;
  } catch (err) {
    if (tty) process.stderr.write('\n');
    throw err;
  } finally {
    finished = true;
    clearInterval(timer);
  }
}

/** The command line's way of showing slow work and paths, for lib/tools and lib/bench. */
export const cliUi: Ui = { status: withStatus, showPath: tildify };
