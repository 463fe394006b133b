/**
 * User text becomes an FTS5 query that can only mean "documents containing any of these words":
 * the words are taken with the same rule the unicode61 tokenizer indexes by (letters, digits, and
 * the private-use/marks it keeps), each one quoted as an FTS5 string, joined by OR. Whatever the
 * text holds — quotes, `*`, `NEAR`, `AND`, `:`, `^`, parentheses, `;` — is never FTS5 or SQL syntax:
 * an operator word becomes a plain quoted word and punctuation separates words, as it does in the
 * index. Returns undefined when the text has no word (no keyword match is possible).
 */
const WORD = /[\p{L}\p{N}\p{M}\p{Co}]+/gu;

/** At most this many distinct words go into one query, so a pasted document stays a cheap query. */
export const MAX_QUERY_WORDS = 64;

export function literalFtsQuery(text: string): string | undefined {
  const words = new Set<string>();
  for (const match of text.matchAll(WORD)) {
    words.add(match[0].toLowerCase());
    if (words.size >= MAX_QUERY_WORDS) break;
  }
  if (words.size === 0) return undefined;
  // A word holds no '"' (the pattern excludes it), so wrapping it in quotes is the whole escape.
  return [...words].map((word) => `"${word}"`).join(' OR ');
}
