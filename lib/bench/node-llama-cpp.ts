/**
 * node-llama-cpp, measured the way its users would reuse a prompt: its own prefix reuse inside one
 * context sequence (what LlamaCompletion does: adaptStateToTokens, then evaluate the rest) and its
 * state files (saveStateToFile / loadStateFromFile). It is a devDependency: the benchmark is the
 * only user, and without it these rows are left out.
 */
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Llama, LlamaContextSequence, Token } from 'node-llama-cpp' with { 'resolution-mode': 'import' };

export interface NodeLlamaCppInfo {
  version: string;
  /** 'prebuilt' when its shipped binary was used (the benchmark never lets it build). */
  buildType: string;
  systemInfo: string;
}

export interface NodeLlamaCppOptions {
  threads: number;
  contextSize: number;
  batchSize: number;
}

export class NodeLlamaCppRunner {
  private constructor(
    readonly info: NodeLlamaCppInfo,
    private readonly llama: Llama,
    private readonly sequence: LlamaContextSequence,
  ) {}

  /** Loads `modelPath` with node-llama-cpp's prebuilt binary; null (and why) when it is not installed. */
  static async open(modelPath: string, options: NodeLlamaCppOptions): Promise<NodeLlamaCppRunner | { unavailable: string }> {
    let lib: typeof import('node-llama-cpp', { with: { 'resolution-mode': 'import' } });
    try {
      lib = await import('node-llama-cpp');
    } catch (err) {
      return { unavailable: `node-llama-cpp is not installed (${(err as Error).message.split('\n')[0]}); it is a devDependency of kvstash` };
    }
    // build: 'never' and skipDownload: its prebuilt binary or an error, never a download or a compile.
    const llama = await lib.getLlama({ build: 'never', skipDownload: true, gpu: false, progressLogs: false, logLevel: lib.LlamaLogLevel.error });
    try {
      const model = await llama.loadModel({ modelPath });
      const context = await model.createContext({
        contextSize: options.contextSize,
        batchSize: options.batchSize,
        threads: options.threads,
        sequences: 1,
      });
      const info = { version: packageVersion(), buildType: llama.buildType, systemInfo: llama.systemInfo };
      return new NodeLlamaCppRunner(info, llama, context.getSequence());
    } catch (err) {
      await llama.dispose();
      throw err;
    }
  }

  /** Evaluates `tokens` in the (emptied) sequence and samples the first token greedily. Unit: ms. */
  async cold(tokens: Int32Array): Promise<number> {
    await this.sequence.clearHistory();
    const start = performance.now();
    await this.firstToken(tokens);
    return performance.now() - start;
  }

  /**
   * Its warm time to first token: the sequence holds `prefix` (and whatever followed it, dropped
   * before the clock starts), and a new prompt `prefix + suffix` is matched against it and only the
   * suffix evaluated, as LlamaCompletion does. Unit: ms.
   */
  async warmTtft(prefix: Int32Array, suffix: Int32Array): Promise<number> {
    await this.keepPrefix(prefix.length);
    const input = asTokens(concat(prefix, suffix));
    const start = performance.now();
    await this.sequence.adaptStateToTokens(input.slice(0, -1), false);
    await this.firstToken(input.slice(this.sequence.nextTokenIndex));
    const elapsed = performance.now() - start;
    if (this.sequence.nextTokenIndex < input.length) throw new Error('node-llama-cpp did not evaluate the whole suffix');
    return elapsed;
  }

  /** Evaluates `suffix` after the prefix, no sampling: its compute for a batch of suffix tokens. Unit: ms. */
  async suffixPrefill(prefixLength: number, suffix: Int32Array): Promise<number> {
    await this.keepPrefix(prefixLength);
    const start = performance.now();
    await this.sequence.evaluateWithoutGeneratingNewTokens(asTokens(suffix));
    return performance.now() - start;
  }

  /** Saves the sequence, cut back to `prefixLength` tokens, with saveStateToFile. */
  async save(prefixLength: number, file: string): Promise<{ ms: number; bytes: number }> {
    await this.keepPrefix(prefixLength);
    const start = performance.now();
    const { fileSize } = await this.sequence.saveStateToFile(file);
    return { ms: performance.now() - start, bytes: fileSize };
  }

  /** Empties the sequence, then times loadStateFromFile (which checks nothing but the format). Unit: ms. */
  async load(file: string): Promise<number> {
    await this.sequence.clearHistory();
    const start = performance.now();
    await this.sequence.loadStateFromFile(file, { acceptRisk: true });
    return performance.now() - start;
  }

  get heldTokens(): number {
    return this.sequence.nextTokenIndex;
  }

  async dispose(): Promise<void> {
    await this.llama.dispose();
  }

  private async keepPrefix(prefixLength: number): Promise<void> {
    const end = this.sequence.nextTokenIndex;
    if (end < prefixLength) throw new Error(`the node-llama-cpp sequence holds ${end} tokens, not the ${prefixLength}-token prefix`);
    if (end > prefixLength) await this.sequence.eraseContextTokenRanges([{ start: prefixLength, end }]);
  }

  private async firstToken(tokens: Token[] | Int32Array): Promise<number> {
    const iterator = this.sequence.evaluate(asTokens(tokens), { temperature: 0 });
    try {
      const { value, done } = await iterator.next();
      if (done) throw new Error('node-llama-cpp generated no token');
      return value;
    } finally {
      await iterator.return();
    }
  }
}

function asTokens(tokens: Token[] | Int32Array): Token[] {
  return (Array.isArray(tokens) ? tokens : Array.from(tokens)) as Token[];
}

function concat(a: Int32Array, b: Int32Array): Int32Array {
  const out = new Int32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function packageVersion(): string {
  // Its package.json is not in its exports; its entry point sits in <package>/dist/.
  const entry = require.resolve('node-llama-cpp');
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (require(path.join(path.dirname(entry), '..', 'package.json')) as { version: string }).version;
}
