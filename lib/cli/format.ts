/** How the commands write numbers, sizes, paths and tables for a person. */
import os from 'node:os';
import path from 'node:path';

export function round(value: number): number {
  return Math.round(value * 100) / 100;
}

/** A count with thousands separators: 2,000. */
export function fmt(value: number): string {
  return value.toLocaleString('en-US');
}

/** Milliseconds: one decimal below 100, whole above. */
export function ms(value: number): string {
  return value >= 100 ? fmt(Math.round(value)) : value.toFixed(1);
}

/** A duration in the unit that reads best: 840 ms, 12.3 s, 4 min 05 s. */
export function duration(milliseconds: number): string {
  if (milliseconds < 1000) return `${ms(milliseconds)} ms`;
  const seconds = milliseconds / 1000;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const whole = Math.round(seconds);
  return `${Math.floor(whole / 60)} min ${String(whole % 60).padStart(2, '0')} s`;
}

/** A ratio: 1.5×, 37×, 4,000×. */
export function times(value: number): string {
  return `${value >= 10 ? fmt(Math.round(value)) : value.toFixed(1)}×`;
}

/** Bytes in decimal units, as file managers show them: 812 B, 40.9 kB, 24.6 MB, 1.2 GB. */
export function size(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 999.95 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** A path with the home directory written as ~. */
export function tildify(file: string): string {
  const home = os.homedir();
  return file.startsWith(home + path.sep) ? `~${file.slice(home.length)}` : file;
}

/** Text from a model or a file shown safely in a terminal, quoted: see escaped(). */
export function printable(text: string): string {
  return `"${escaped(text)}"`;
}

/**
 * Text from a file (a label, a model name, a file name) shown safely in a terminal, unquoted: every
 * control character escaped as JSON writes it (C0, DEL and C1 alike: ESC and CSI start terminal
 * escape sequences), line and paragraph separators too; bidi, format and unassigned marks replaced.
 */
export function escaped(text: string): string {
  return JSON.stringify(text)
    .slice(1, -1)
    .replace(/[\p{Cc}\u2028\u2029]/gu, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
    .replace(/[\p{Cf}\p{Co}\p{Cn}]/gu, '\uFFFD');
}

/** A local time to the minute: 2026-11-22 14:05. */
export function localTime(iso: string): string {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const two = (n: number): string => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}`;
}

/** Columns separated by two spaces, each as wide as its widest cell; `align` per column, default left. */
export function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>, align: ReadonlyArray<'left' | 'right'> = []): string {
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((row) => row[c]!.length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, c) => (align[c] === 'right' ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

/** Name/value lines with the values lined up; a value with several lines keeps them under each other. */
export function fields(rows: ReadonlyArray<readonly [name: string, value: string]>): string {
  const width = Math.max(...rows.map(([name]) => name.length));
  return rows.map(([name, value]) => `${name.padEnd(width)}  ${value.split('\n').join(`\n${' '.repeat(width + 2)}`)}`).join('\n');
}
