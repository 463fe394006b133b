/**
 * The part reads of RedisStore: GETs pipelined over a few plain-TCP connections of their own; the
 * socket reads into one 1 MiB buffer per connection, and each reply's bytes are copied from it
 * straight to their place in the caller's buffer (the one llama.cpp imports from).
 *
 * Why not node-redis for these: its decoder gathers each reply's socket chunks and concats them into
 * a Buffer of its own, which the store then copied into place, and one connection carried every part.
 * Measured on loopback with a 24.6 MB entry (README, "Sharing the cache across machines"), this
 * reader on two connections fetched the parts in roughly half node-redis's time on one.
 *
 * Two GETs are in flight per connection, not every part at once: Redis runs all the commands it
 * has read before it writes a reply, copying each value into fresh reply buffers, and fresh pages
 * are slow to fault in on the machine measured (≈ 70 ms for 25 MB): with every part asked at once,
 * the first byte waited for all of that; with two, the copying overlaps the sending.
 *
 * It speaks only what it needs of RESP2: AUTH and SELECT from the URL, then GET; a reply is a bulk
 * string, a null bulk, a simple string or an error. Lookups, writes and TLS (`rediss://`, which
 * this reader does not do) stay with node-redis. A lost connection rejects every read waiting on it
 * and the next read connects anew; nothing is retried here (the store's caller falls back).
 */
import net from 'node:net';

/** A reply Redis sent as an error (`-ERR ...`), or the connection ending with reads in flight. */
export class BulkReadError extends Error {
  override name = 'BulkReadError';
}

interface PendingRead {
  /** Where the reply's bytes go; undefined for replies whose content is ignored (AUTH, SELECT). */
  target?: Buffer;
  offset: number;
  /** Room in `target` from `offset`: bytes past it are dropped (the caller sees the length). */
  room: number;
  resolve(length: number | null): void;
  reject(err: Error): void;
}

const CRLF = Buffer.from('\r\n', 'latin1');
/** GETs sent ahead on one connection before their replies. Unit: commands. */
const IN_FLIGHT = 2;
/** The most one socket read takes in. Unit: bytes. */
const READ_BYTES = 1 << 20;

/** One connection and the reads queued on it, answered in order. */
class BulkConnection {
  private readonly queue: PendingRead[] = [];
  /** GETs waiting for one of the IN_FLIGHT places. */
  private readonly waiting: Array<{ resolve(): void; reject(err: Error): void }> = [];
  private socket?: net.Socket;
  private readBuffer?: Buffer;
  private ready?: Promise<void>;
  /** The reply being read: its header line so far, or the bytes of its body still to come. */
  private line = '';
  private bodyLeft = -1;
  private bodyLength = 0;

  constructor(
    private readonly endpoint: { host: string; port: number; handshake: Buffer[][] },
    private readonly connectTimeoutMs: number,
  ) {}

  /** Sends GET key; resolves with the value's length (its bytes copied to target at offset, up to
   * `room`), null when the key does not exist. */
  async get(key: string, target: Buffer, offset: number, room: number): Promise<number | null> {
    await this.connected();
    // A few GETs in flight, not all: Redis runs every command it has read before it writes a reply,
    // so with every part asked at once the first byte waits until it has copied them all into
    // its reply buffers; with a few, its copying of the next part overlaps the sending of this one.
    if (this.queue.length >= IN_FLIGHT) await new Promise<void>((resolve, reject) => this.waiting.push({ resolve, reject }));
    return this.send([Buffer.from('GET'), Buffer.from(key, 'utf8')], target, offset, room);
  }

  destroy(err: Error): void {
    const socket = this.socket;
    this.socket = undefined;
    this.ready = undefined;
    socket?.destroy();
    this.line = '';
    this.bodyLeft = -1;
    for (const read of this.queue.splice(0)) read.reject(err);
    for (const waiter of this.waiting.splice(0)) waiter.reject(err);
  }

  private connected(): Promise<void> {
    this.ready ??= new Promise<void>((resolve, reject) => {
      // Reads land in one buffer of the connection's own, up to READ_BYTES at a time, and are copied
      // out at once: no Buffer allocated per read, and fewer reads than the default 64 KiB ones.
      const readBuffer = (this.readBuffer ??= Buffer.allocUnsafe(READ_BYTES));
      const socket = net.connect({
        host: this.endpoint.host,
        port: this.endpoint.port,
        noDelay: true,
        onread: {
          buffer: readBuffer,
          callback: (length) => {
            // A reset connection's late bytes must not reach the next connection's queue.
            if (this.socket === socket) this.receive(readBuffer.subarray(0, length));
            return true;
          },
        },
      });
      this.socket = socket;
      const timer = setTimeout(() => fail(new BulkReadError(`no connection within ${this.connectTimeoutMs} ms`)), this.connectTimeoutMs);
      const fail = (err: Error) => {
        clearTimeout(timer);
        if (this.socket === socket) this.destroy(err);
        reject(err);
      };
      socket.on('error', (err) => fail(new BulkReadError(err.message)));
      socket.on('close', () => fail(new BulkReadError('the connection closed')));
      socket.once('connect', () => {
        clearTimeout(timer);
        // AUTH and SELECT go first; a read queued behind them fails with them if Redis refuses.
        const handshake = this.endpoint.handshake.map((args) => this.send(args));
        Promise.all(handshake).then(() => resolve(), fail);
      });
    });
    return this.ready;
  }

  private send(args: Buffer[], target?: Buffer, offset = 0, room = 0): Promise<number | null> {
    return new Promise((resolve, reject) => {
      const socket = this.socket;
      if (!socket) return reject(new BulkReadError('the connection closed'));
      this.queue.push({ target, offset, room, resolve, reject });
      const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`, 'latin1')];
      for (const arg of args) parts.push(Buffer.from(`$${arg.length}\r\n`, 'latin1'), arg, CRLF);
      socket.write(Buffer.concat(parts));
    });
  }

  /** The oldest read got its reply: it leaves the queue, and a waiting GET takes its place. */
  private answered(): void {
    this.queue.shift();
    this.waiting.shift()?.resolve();
  }

  /** Parses replies as their bytes arrive: header lines are short and read byte by byte; bodies
   * are copied in runs, as long as the chunk allows. */
  private receive(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      const read = this.queue[0];
      if (!read) return this.destroy(new BulkReadError('Redis sent a reply nobody asked for'));
      if (this.bodyLeft >= 0) {
        const take = Math.min(this.bodyLeft, chunk.length - at);
        // The last two bytes of a body are its CRLF; the value is bodyLength bytes.
        const copied = this.bodyLength - Math.max(0, this.bodyLeft - 2);
        const valueEnd = Math.min(take, Math.max(0, this.bodyLeft - 2));
        if (read.target && valueEnd > 0 && copied < read.room) {
          chunk.copy(read.target, read.offset + copied, at, at + Math.min(valueEnd, read.room - copied));
        }
        this.bodyLeft -= take;
        at += take;
        if (this.bodyLeft === 0) {
          this.bodyLeft = -1;
          this.answered();
          read.resolve(this.bodyLength);
        }
        continue;
      }
      const newline = chunk.indexOf(10, at);
      const end = newline < 0 ? chunk.length : newline + 1;
      this.line += chunk.toString('latin1', at, end);
      at = end;
      if (newline < 0) continue;
      const line = this.line.slice(0, -2);
      this.line = '';
      switch (line[0]) {
        case '$': {
          const length = Number(line.slice(1));
          if (length === -1) {
            this.answered();
            read.resolve(null);
          } else if (Number.isSafeInteger(length) && length >= 0) {
            this.bodyLength = length;
            this.bodyLeft = length + 2;
          } else {
            return this.destroy(new BulkReadError(`Redis sent a bulk length of ${JSON.stringify(line.slice(1))}`));
          }
          break;
        }
        case '_': // RESP3's null, were a proxy to speak it
          this.answered();
          read.resolve(null);
          break;
        case '+':
        case ':':
          this.answered();
          read.resolve(0);
          break;
        case '-':
          this.answered();
          read.reject(new BulkReadError(line.slice(1)));
          break;
        default:
          return this.destroy(new BulkReadError(`Redis sent a reply of type ${JSON.stringify(line[0] ?? '')}, not one of a GET`));
      }
    }
  }
}

export class RedisBulkReader {
  private readonly connections: BulkConnection[];
  private next = 0;

  /** `url` a redis:// URL (not rediss://: callers keep node-redis for TLS). */
  constructor(url: string, connections: number, connectTimeoutMs: number) {
    const parsed = new URL(url);
    if (parsed.protocol !== 'redis:') throw new TypeError('RedisBulkReader: only redis:// URLs (TLS stays with node-redis)');
    const handshake: Buffer[][] = [];
    const password = decodeURIComponent(parsed.password);
    const username = decodeURIComponent(parsed.username);
    // As node-redis reads the URL: AUTH only with a password, with the user name when there is one.
    if (password) handshake.push([Buffer.from('AUTH'), ...(username ? [Buffer.from(username)] : []), Buffer.from(password)]);
    const db = parsed.pathname.slice(1);
    if (db && db !== '0') handshake.push([Buffer.from('SELECT'), Buffer.from(db)]);
    const endpoint = { host: parsed.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: Number(parsed.port || 6379), handshake };
    this.connections = Array.from({ length: connections }, () => new BulkConnection(endpoint, connectTimeoutMs));
  }

  /** GET `key` into `target` at `offset` (at most `room` bytes): the value's length, or null when
   * the key does not exist. Reads of one call spread over the connections in turn. */
  get(key: string, target: Buffer, offset: number, room: number): Promise<number | null> {
    const connection = this.connections[this.next++ % this.connections.length]!;
    return connection.get(key, target, offset, room);
  }

  /** Drops every connection (reads in flight reject with `err`); the next read connects anew. */
  reset(err: Error): void {
    for (const connection of this.connections) connection.destroy(err);
  }
}
