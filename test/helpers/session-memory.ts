/** The conversation the session-memory tests hold: a fact told at turn 3 among filler turns. */
import type { Context, Model } from '../../lib/index.js';
import { prose } from './fixtures.js';

export const system = `You are a helpful assistant. ${prose(60, 5)}`;
export const FACT = 'Please remember this: my locker combination is wombat.';
export const QUESTION = 'What is my locker combination?';
export const send = { maxTokens: 4 };
/** The user's message at `turn`: the fact at turn 3, else prose without its words. */
export const question = (turn: number): string => (turn === 3 ? FACT : `Turn ${turn}: ${prose(14 + (turn % 5), turn)}.`);

/** Runs `body` on a fresh 1,024-token context of `model`, disposed afterwards. */
export async function withContext<T>(model: Model, body: (context: Context) => Promise<T>): Promise<T> {
  const context = await model.createContext({ contextSize: 1024 });
  try {
    return await body(context);
  } finally {
    await context.dispose();
  }
}
