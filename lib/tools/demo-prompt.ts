/**
 * The demo's prompt: a support assistant's long system prompt (tool catalogue and policies) and
 * three customer questions. Shared by `kvstash demo` and the benchmark, which cuts it to exact
 * lengths (lib/bench/prompt.ts).
 */
import type { Model } from '../llama/model.js';

/** The questions asked after the system prompt. The cold run and warm 1 ask the first. */
export const DEMO_QUESTIONS: readonly string[] = [
  'My order #48213 arrived with a torn sleeve. Can I get a replacement before Friday?',
  'What is the return window for sale items bought in the EU?',
  'Please change the delivery address of order #50177 to 12 Harbour Road, Leith.',
];

export interface DemoPrompt {
  /** The system message: tool and policy text, trimmed to the requested token count. */
  system: string;
  /** The rendered system turn: the tokens cached and restored. */
  prefix: Int32Array;
  /** Per question, the rendered user turn and assistant header, tokenized on their own. Cold and
   * warm runs both evaluate prefix then suffix, so they see identical token sequences. */
  suffixes: Int32Array[];
}

/** Builds the demo's prompt, deterministically: the same model and target give the same tokens. */
export function buildDemoPrompt(model: Model, targetTokens: number): DemoPrompt {
  const renderSystem = (system: string): string => model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false });
  const count = (system: string): number => model.tokenize(renderSystem(system), { special: true }).length;

  let text = SYSTEM_INTRO;
  for (let section = 0; count(text) < targetTokens; section++) text += systemSection(section);
  // Cut at a word boundary: the longest run of words whose rendered turn fits the target.
  const words = text.split(/(?<=\s)/);
  let low = 1;
  let high = words.length;
  while (low < high) {
    const mid = Math.ceil((low + high) / 2);
    if (count(words.slice(0, mid).join('').trimEnd()) <= targetTokens) low = mid;
    else high = mid - 1;
  }
  const system = words.slice(0, low).join('').trimEnd();

  const conversations = DEMO_QUESTIONS.map((question) =>
    model.applyChatTemplate([{ role: 'system', content: system }, { role: 'user', content: question }]),
  );
  let prefixText = renderSystem(system);
  // Some templates (Gemma's, Llama 2's) fold the system text into the first user turn, so the
  // system turn alone does not start the conversation; then cache what every conversation shares.
  if (!conversations.every((c) => c.startsWith(prefixText))) prefixText = commonPrefix(conversations);
  return {
    system,
    prefix: model.tokenize(prefixText, { special: true }),
    // No BOS here: these tokens continue the prefix.
    suffixes: conversations.map((c) => model.tokenize(c.slice(prefixText.length), { special: true, addSpecial: false })),
  };
}

// The system prompt: a support assistant's tool catalogue and policies, repeated as needed

const SYSTEM_INTRO =
  'You are Atlas, the customer support assistant of Northwind Outfitters, an online shop for clothing and outdoor gear. ' +
  "Answer in the customer's language, briefly and exactly, and call the tools below instead of guessing. " +
  'The tool catalogue and the policies that follow apply to every conversation.\n';

const TOOLS: ReadonlyArray<readonly [name: string, purpose: string, argumentsText: string]> = [
  ['search_orders', 'Finds orders by customer email, order number or date range; at most 20, newest first.', 'query (string), from (ISO date, optional), to (ISO date, optional)'],
  ['get_order', 'Returns one order with its lines, payments, shipments and notes.', 'order_id (string)'],
  ['refund_order', 'Refunds some or all lines of a delivered order to the original payment method.', 'order_id (string), lines (array of line ids), reason (string)'],
  ['replace_item', 'Ships a replacement for a damaged or wrong item at no cost to the customer.', 'order_id (string), line_id (string), size (string, optional)'],
  ['update_address', 'Changes the delivery address of an order that has not shipped yet.', 'order_id (string), address (street, city, postcode, country)'],
  ['track_shipment', 'Returns the carrier, tracking number and latest scan of a shipment.', 'shipment_id (string)'],
  ['check_inventory', 'Returns the stock of a product variant in each warehouse.', 'sku (string)'],
  ['get_customer', 'Returns the customer profile, loyalty tier and open tickets.', 'email (string)'],
  ['apply_voucher', 'Issues a one-time voucher as a goodwill gesture.', 'email (string), amount (number, at most 25), currency (string)'],
  ['create_ticket', 'Opens a ticket for the warehouse or the payments team.', 'team (warehouse or payments), summary (string), order_id (string, optional)'],
  ['escalate_to_human', 'Hands the conversation to a human agent with a summary.', 'summary (string), urgency (low, normal or high)'],
];

const POLICIES: readonly string[] = [
  'Confirm the order number with the customer before you change or refund anything.',
  'Refunds are allowed within 30 days of delivery, and within 14 days for sale items bought in the EU.',
  "Never share another customer's data, and never read out a full payment card number.",
  'Offer a replacement before a refund when the item is damaged and in stock.',
  'An address can change only before the order ships; after that, open a warehouse ticket.',
  'Vouchers are a last resort: at most one per customer per quarter.',
  'Escalate to a human when the customer asks for one, is upset twice, or mentions a legal claim.',
  'Quote delivery dates only from track_shipment, never from memory.',
];

function systemSection(index: number): string {
  const [name, purpose, argumentsText] = TOOLS[index % TOOLS.length]!;
  return `\n### ${index + 1}. Tool ${name}\n${purpose}\nArguments: ${argumentsText}.\nPolicy: ${POLICIES[index % POLICIES.length]!}\n`;
}

/** The longest start all of `texts` share. */
function commonPrefix(texts: readonly string[]): string {
  let end = 0;
  const first = texts[0]!;
  while (end < first.length && texts.every((t) => t[end] === first[end])) end++;
  return first.slice(0, end);
}
