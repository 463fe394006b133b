// f32 → f16 conversion, checked exhaustively against the definition: every f16 value converts
// back to itself, and every midpoint between neighbours rounds to the even one.
import t from 'tap';
import { f16BitsToF32, f32ToF16Bits } from '../lib/models/f16.js';

t.test('known values', async (t) => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.5, 0x3800],
    [65504, 0x7bff], // largest finite
    [65520, 0x7c00], // halfway to the next binade: ties to even, which is Infinity
    [65519.99, 0x7bff],
    [1e6, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // halfway to the smallest subnormal: ties to even zero
    [2 ** -25 * 1.0000001, 0x0001],
    [3 * 2 ** -25, 0x0002], // halfway between subnormals 1 and 2: ties to even 2
    [0.1, 0x2e66],
    [0.02, 0x251f],
    [-0.0346, 0xa86e],
  ];
  for (const [x, bits] of cases) t.equal(f32ToF16Bits(x), bits, `${x} → 0x${bits.toString(16)}`);
  t.equal(f32ToF16Bits(NaN) & 0x7c00, 0x7c00, 'NaN keeps an all-ones exponent');
  t.not(f32ToF16Bits(NaN) & 0x3ff, 0, 'NaN keeps a non-zero mantissa');
});

t.test('every finite f16 value round-trips, every midpoint rounds to even', async (t) => {
  let roundTripFailures = 0;
  let midpointFailures = 0;
  for (let h = 0; h < 0x10000; h++) {
    const exponent = (h >>> 10) & 0x1f;
    if (exponent === 0x1f) continue;
    const x = f16BitsToF32(h);
    if (f32ToF16Bits(x) !== h) roundTripFailures++;
    // Midpoint to the next value away from zero (exactly representable in f32).
    const magnitude = h & 0x7fff;
    if (magnitude === 0x7bff) continue; // its upper neighbour is Infinity, covered above
    const next = f16BitsToF32(h + 1);
    const mid = (x + next) / 2;
    const even = (h & 1) === 0 ? h : h + 1;
    if (f32ToF16Bits(mid) !== even) midpointFailures++;
    // Just either side of the midpoint rounds to the nearer neighbour.
    const below = Math.fround(mid - Math.abs(mid) * 2 ** -23);
    const above = Math.fround(mid + Math.abs(mid) * 2 ** -23);
    const [lo, hi] = h & 0x8000 ? [h + 1, h] : [h, h + 1];
    if (f32ToF16Bits(below) !== lo || f32ToF16Bits(above) !== hi) midpointFailures++;
  }
  t.equal(roundTripFailures, 0, 'round trips');
  t.equal(midpointFailures, 0, 'midpoints');
});
