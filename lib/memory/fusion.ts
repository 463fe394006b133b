/**
 * Reciprocal rank fusion: each list votes 1 / (k + rank) for what it ranked (rank from 1), and the
 * fused order is by the sum. It needs no calibration between BM25 and cosine scores, which live on
 * unrelated scales. k = 60 is the constant of the method's original description.
 */
export const RRF_K = 60;

export function reciprocalRankFusion(lists: ReadonlyArray<readonly number[]>, k = RRF_K): Map<number, number> {
  const fused = new Map<number, number>();
  for (const list of lists) {
    list.forEach((id, index) => fused.set(id, (fused.get(id) ?? 0) + 1 / (k + index + 1)));
  }
  return fused;
}
