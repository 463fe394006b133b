/**
 * node-llama-cpp, measured the way its users would reuse a prompt: its own prefix reuse inside one
 * context sequence (what LlamaCompletion does: adaptStateToTokens, then evaluate the rest) and its
 * state files (saveStateToFile / loadStateFromFile). It is no dependency of kvstash: the benchmark
 * installs it on first need (./peer.ts); when that fails (offline, say) these rows are left out.
 */
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { concat } from '../tools/tokens.js';
import { importPeer, type PeerInstall } from './peer.js';

// The part of node-llama-cpp's API the benchmark calls, written out: its own types are not
// installed when kvstash is compiled (it is not in node_modules). Names and shapes as in its docs.
type Token = number & { __token?: never };
interface LlamaContextSequence {
  readonly nextTokenIndex: number;
  clearHistory(): Promise<void>;
  adaptStateToTokens(tokens: Token[], allowShift: boolean): Promise<void>;
  evaluate(tokens: Token[], options: { temperature: number }): AsyncGenerator<Token, void>;
  evaluateWithoutGeneratingNewTokens(tokens: Token[]): Promise<void>;
  eraseContextTokenRanges(ranges: Array<{ start: number; end: number }>): Promise<void>;
  saveStateToFile(file: string): Promise<{ fileSize: number }>;
  loadStateFromFile(file: string, options: { acceptRisk: true }): Promise<void>;
}
interface Llama {
  readonly buildType: string;
  readonly systemInfo: string;
  loadModel(options: { modelPath: string }): Promise<{
    createContext(options: { contextSize: number; batchSize: number; threads: number; sequences: number }): Promise<{ getSequence(): LlamaContextSequence }>;
  }>;
  dispose(): Promise<void>;
}
interface NodeLlamaCppModule {
  getLlama(options: { build: 'never'; skipDownload: boolean; gpu: false; progressLogs: boolean; logLevel: unknown }): Promise<Llama>;
  LlamaLogLevel: { error: unknown };
}

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

  /** Loads `modelPath` with the installed peer's prebuilt binary (ensurePeer installs it). */
  static async open(install: PeerInstall, modelPath: string, options: NodeLlamaCppOptions): Promise<NodeLlamaCppRunner> {
    const lib = await importPeer<NodeLlamaCppModule>(install);
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
      const info = { version: installedVersion(install), buildType: llama.buildType, systemInfo: llama.systemInfo };
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

/** The version npm installed, from its package.json (not in its exports, so read as a file). */
function installedVersion(install: PeerInstall): string {
  const file = path.join(install.dir, 'node_modules', 'node-llama-cpp', 'package.json');
  return (JSON.parse(fs.readFileSync(file, 'utf8')) as { version: string }).version;
}
