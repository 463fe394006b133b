/**
 * A deterministic embedding for the memory tests: a bag of hashed words (FNV-1a of each lower-cased
 * word picks one of `dim` dimensions), so texts that share words are near and texts that share
 * none are orthogonal, as a real model's vectors behave for the cases tested.
 */
export function bagOfWords(text: string, dim = 64): Float32Array {
  const vector = new Float32Array(dim);
  for (const match of text.toLowerCase().matchAll(/[\p{L}\p{N}]+/gu)) {
    let hash = 0x811c9dc5;
    for (const ch of match[0]) {
      hash ^= ch.codePointAt(0)!;
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    vector[hash % dim]! += 1;
  }
  return vector;
}

export const hashEmbed = async (texts: string[]): Promise<Float32Array[]> => texts.map((text) => bagOfWords(text));
