/** Small statistics for the benchmark: repeated timings are summarised by their median. */
import { median } from '../tools/stats.js';

export { median };

export interface Samples {
  /** Median of `values`. */
  median: number;
  min: number;
  max: number;
  /** Every measurement, in the order taken. */
  values: number[];
}

export function samples(values: readonly number[]): Samples {
  return { median: median(values), min: Math.min(...values), max: Math.max(...values), values: values.map(round3) };
}

/** Collects named series of measurements, one value per repetition. */
export class Series {
  private readonly data = new Map<string, number[]>();

  add(name: string, value: number): void {
    let list = this.data.get(name);
    if (!list) this.data.set(name, (list = []));
    list.push(value);
  }

  get(name: string): Samples {
    const values = this.data.get(name);
    if (!values || values.length === 0) throw new Error(`no measurements of ${name}`);
    return samples(values);
  }
}

export function round3(value: number): number {
  return Math.round(value * 1000) / 1000;
}
