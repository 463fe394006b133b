/**
 * User text becomes an FTS5 query that can only mean "documents containing any of these words":
 * the words are taken with the same rule the unicode61 tokenizer indexes by (letters, digits, and
 * the private-use/marks it keeps), each one quoted as an FTS5 string, joined by OR. Whatever the
 * text holds — quotes, `*`, `NEAR`, `AND`, `:`, `^`, parentheses, `;` — is never FTS5 or SQL syntax:
 * an operator word becomes a plain quoted word and punctuation separates words, as it does in the
 * index.
 */
const WORD = /[\p{L}\p{N}\p{M}\p{Co}]+/gu;

/** At most this many distinct words are looked at, so a pasted document stays a cheap query. */
export const MAX_QUERY_WORDS = 64;

/** The distinct lower-cased words of `text`, in order of first appearance. */
export function queryWords(text: string): string[] {
  const words = new Set<string>();
  for (const match of text.matchAll(WORD)) {
    words.add(match[0].toLowerCase());
    if (words.size >= MAX_QUERY_WORDS) break;
  }
  return [...words];
}

/** The FTS5 query matching any of `words` (as queryWords returns them); undefined for none. */
export function anyOfWords(words: readonly string[]): string | undefined {
  if (words.length === 0) return undefined;
  // A word holds no '"' (the pattern excludes it), so wrapping it in quotes is the whole escape.
  return words.map((word) => `"${word}"`).join(' OR ');
}

/**
 * The words worth ranking by, given how many documents hold each (`documents`, same order): the
 * rarest first, while the documents they would make FTS5 score stay within `budget`, and always at
 * least the rarest one. A word in a large share of the archive ("is", "my") adds almost nothing to
 * BM25 (its inverse document frequency is near zero) but costs a score for every document holding
 * it: leaving it out keeps a search's work bounded by the budget, not by the archive's size.
 */
export function rankingWords(words: readonly string[], documents: readonly number[], budget: number): string[] {
  // `documents` may be capped at budget + 1 (counting stops there): such a word is kept only alone.
  const order = words.map((word, i) => ({ word, documents: documents[i]! })).sort((a, b) => a.documents - b.documents);
  const kept: string[] = [];
  let total = 0;
  for (const { word, documents: count } of order) {
    if (kept.length > 0 && total + count > budget) break;
    kept.push(word);
    total += count;
  }
  return kept;
}
