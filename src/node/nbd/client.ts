import { once } from "node:events";
import { connect as netConnect, type Socket } from "node:net";
import { IovirtUsageError } from "../../core/errors.js";
import { Coverage } from "./coverage.js";
import { NbdError, errnoCode } from "./errors.js";
import { negotiate, serverText, type NbdExportInfo } from "./handshake.js";
import {
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  REQUEST_BYTES,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_BYTES,
  STRUCTURED_REPLY_MAGIC,
  commandName,
  encodeRequest,
  readU64,
  U32,
} from "./protocol.js";
import { SocketReader } from "./reader.js";
import { formatNbdAddress, type NbdAddress } from "./url.js";

export interface NbdClientOptions {
  log?: (line: string) => void;
  /** Limit for connecting plus the handshake (default 30 s): a server that stalls cannot hang connect(). */
  connectTimeoutMs?: number;
  /**
   * How long close() waits for requests in flight before dropping the
   * connection without NBD_CMD_DISC (default 30 s).
   */
  closeTimeoutMs?: number;
}

/** The ESHUTDOWN error value: the server is going away (proto.md: the client MUST then disconnect softly). */
const NBD_ESHUTDOWN = 108;
/** Error chunks carry an error value, a message of at most 4096 bytes and a few fixed fields. */
const MAX_ERROR_CHUNK = 8192;
/** Request headers are carved from slabs of this size: no allocation per request beyond a view. */
const ARENA_BYTES = REQUEST_BYTES * 256;

type Shutdown = "client" | "server";
/** One buffer, or a request's buffers in order (readv/writev). */
type Buffers = Uint8Array | readonly Uint8Array[];

/** Bytes in a request's buffers. */
export function totalLength(bufs: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

class Pending {
  error: NbdError | null = null;
  constructor(
    readonly cookie: number,
    readonly type: number,
    readonly offset: number,
    readonly length: number,
    /** READ only: where the data goes (views of guest memory), one buffer or several in order. */
    readonly dst: Buffers | null,
    /** Structured READ only. */
    readonly coverage: Coverage | null,
    readonly resolve: () => void,
    readonly reject: (e: Error) => void,
  ) {}

  describe(): string {
    return this.type === NBD_CMD_FLUSH ? "FLUSH" : `${commandName(this.type)} [${this.offset}, +${this.length})`;
  }
}

/**
 * One NBD connection in the transmission phase (proto.md, "Transmission").
 * Requests are pipelined: each gets a cookie (the 64-bit handle, high half
 * 0) and a promise; replies, simple or structured, may come in any order.
 *
 * Failure regimes: a server error value fails only its request; a protocol
 * violation (unknown cookie, bad magic, a chunk outside its request, ...)
 * or a dropped connection fails every pending request and every later one,
 * and resolves `closed` with the reason.
 */
export class NbdClient {
  readonly address: NbdAddress;
  readonly info: NbdExportInfo;
  /** Resolves when the connection is gone: null after close(), else why it ended. */
  readonly closed: Promise<NbdError | null>;
  private readonly where: string;
  private readonly socket: Socket;
  private readonly reader: SocketReader;
  private readonly log: (line: string) => void;
  private readonly closeTimeoutMs: number;
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private failure: NbdError | null = null;
  private shutdown: Shutdown | null = null;
  private cleanClose = false;
  /** fail() ran: reader stopped, socket destroyed, pending requests failed. */
  private torn = false;
  private ended = false;
  private socketError: Error | null = null;
  private closePromise: Promise<void> | null = null;
  private resolveClosed!: (e: NbdError | null) => void;
  private drainWaiters: (() => void)[] = [];
  private corked = false;
  private arena = Buffer.alloc(0);
  private arenaView = new DataView(this.arena.buffer);
  private arenaUsed = 0;

  // Reply parsing state: one reply header, then maybe one chunk payload.
  private readonly hdr = new Uint8Array(STRUCTURED_REPLY_BYTES);
  private readonly hdrView = new DataView(this.hdr.buffer);
  private readonly hdrHead = this.hdr.subarray(0, SIMPLE_REPLY_BYTES);
  private readonly hdrTail = this.hdr.subarray(SIMPLE_REPLY_BYTES);
  private readonly fixed = new Uint8Array(12);
  private readonly fixedView = new DataView(this.fixed.buffer);
  private cur: Pending | null = null;
  private curFlags = 0;
  private curType = 0;
  private curLength = 0;
  private errPayload = new Uint8Array(0);
  /** The views a chunk of a vectored READ lands in, and which one is being filled. */
  private readonly chunkPieces: Uint8Array[] = [];
  private pieceAt = 0;
  // Bound once so that framing allocates no closures per message.
  private readonly onHead = (): void => this.head();
  private readonly onStructured = (): void => this.structured();
  private readonly onDataOffset = (): void => this.dataOffset();
  private readonly onChunkData = (): void => this.chunkDone();
  private readonly onPiece = (): void => this.nextPiece();
  private readonly onHole = (): void => this.hole();
  private readonly onErrorPayload = (): void => this.errorChunk();
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Connects and runs the handshake; rejects with an NbdError. */
  static async connect(address: NbdAddress, opts: NbdClientOptions = {}): Promise<NbdClient> {
    const where = formatNbdAddress(address);
    const log = opts.log ?? ((): void => {});
    const reader = new SocketReader();
    const socket =
      address.transport === "unix"
        ? netConnect({ path: address.socket, onread: reader.onread })
        : netConnect({ host: address.host, port: address.port, onread: reader.onread, noDelay: true });
    let sockErr: Error | null = null;
    const onError = (e: Error): void => {
      sockErr = e;
    };
    const onClose = (): void => {
      const why = sockErr === null ? "" : `: ${sockErr.message}`;
      reader.stop(
        new NbdError("NBD_DISCONNECTED", `${where}: the connection ended during the handshake${why}`, { cause: sockErr ?? undefined }),
      );
    };
    socket.on("error", onError);
    socket.on("close", onClose);
    reader.onOverflow = () => socket.destroy();

    const timeoutMs = opts.connectTimeoutMs ?? 30_000;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new NbdError("NBD_TIMEOUT", `${where}: no connection and handshake within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      const connected = once(socket, "connect").catch((e: unknown) => {
        throw new NbdError("NBD_CONNECT", `${where}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      });
      connected.catch(() => {}); // raced below; must not surface as unhandled after the race is decided
      await Promise.race([connected, timeout]);
      const io = {
        read: (n: number) => reader.readExact(n),
        write: (b: Uint8Array) => {
          if (!socket.destroyed) socket.write(b);
        },
      };
      const negotiated = negotiate(io, address.exportName, log);
      negotiated.catch(() => {});
      const info = await Promise.race([negotiated, timeout]);
      const client = new NbdClient(socket, reader, address, info, opts);
      socket.off("error", onError);
      socket.off("close", onClose);
      return client;
    } catch (e) {
      socket.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  private constructor(socket: Socket, reader: SocketReader, address: NbdAddress, info: NbdExportInfo, opts: NbdClientOptions) {
    this.socket = socket;
    this.reader = reader;
    this.address = address;
    this.info = info;
    this.where = formatNbdAddress(address);
    this.log = opts.log ?? ((): void => {});
    this.closeTimeoutMs = opts.closeTimeoutMs ?? 30_000;
    this.closed = new Promise((r) => (this.resolveClosed = r));
    socket.on("error", (e) => (this.socketError = e));
    socket.on("close", () => this.onSocketClosed());
    reader.onOverflow = (e) => this.fail(e);
    if (socket.destroyed) this.onSocketClosed();
    else this.reader.expect(this.hdrHead, this.onHead);
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** True once no more requests can be sent (closing, closed or failed). */
  get isClosed(): boolean {
    return this.failure !== null || this.shutdown !== null;
  }

  /** NBD_CMD_READ of dst.length bytes into dst (at most info.maxPayload). */
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.submit(NBD_CMD_READ, 0, offset, dst.length, dst, null);
  }

  /** One NBD_CMD_READ filling `dsts` in order. */
  readv(offset: number, dsts: readonly Uint8Array[]): Promise<void> {
    return this.submit(NBD_CMD_READ, 0, offset, totalLength(dsts), dsts, null);
  }

  /** NBD_CMD_WRITE; `src` is sent as is (no copy) and must not change until the promise settles. */
  write(offset: number, src: Uint8Array): Promise<void> {
    return this.submit(NBD_CMD_WRITE, 0, offset, src.length, null, src);
  }

  /** One NBD_CMD_WRITE of `srcs` in order (sent as they are, like write()). */
  writev(offset: number, srcs: readonly Uint8Array[]): Promise<void> {
    return this.submit(NBD_CMD_WRITE, 0, offset, totalLength(srcs), null, srcs);
  }

  /** NBD_CMD_FLUSH; only when the server set NBD_FLAG_SEND_FLUSH. */
  flush(): Promise<void> {
    return this.optional(NBD_FLAG_SEND_FLUSH, NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** NBD_CMD_TRIM; only when the server set NBD_FLAG_SEND_TRIM. */
  trim(offset: number, length: number): Promise<void> {
    return this.optional(NBD_FLAG_SEND_TRIM, NBD_CMD_TRIM, 0, offset, length);
  }

  /** NBD_CMD_WRITE_ZEROES; `noHole` sets NBD_CMD_FLAG_NO_HOLE (the range stays allocated). */
  writeZeroes(offset: number, length: number, noHole: boolean): Promise<void> {
    return this.optional(NBD_FLAG_SEND_WRITE_ZEROES, NBD_CMD_WRITE_ZEROES, noHole ? NBD_CMD_FLAG_NO_HOLE : 0, offset, length);
  }

  /** proto.md: a client MUST NOT use a command whose transmission flag the server did not set. */
  private optional(flag: number, type: number, flags: number, offset: number, length: number): Promise<void> {
    if ((this.info.transmissionFlags & flag) === 0) {
      return Promise.reject(
        new IovirtUsageError("NBD_UNSUPPORTED_COMMAND", `${this.where}: the server does not support ${commandName(type)}`),
      );
    }
    return this.submit(type, flags, offset, length, null, null);
  }

  /**
   * Soft disconnect (proto.md, "Terminating the transmission phase"): new
   * requests fail at once, requests in flight are waited for (up to
   * closeTimeoutMs), then NBD_CMD_DISC is sent and the server closes the
   * connection. Idempotent; resolves once the socket is closed.
   */
  close(): Promise<void> {
    this.shutdown ??= "client";
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  private async doClose(): Promise<void> {
    if (this.failure === null && this.pending.size > 0) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, this.closeTimeoutMs);
        this.drainWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    if (this.failure === null) {
      if (this.pending.size > 0) {
        this.fail(
          new NbdError(
            "NBD_CLOSED",
            `${this.where}: closed with ${this.pending.size} request(s) unanswered after ${this.closeTimeoutMs} ms`,
          ),
        );
      } else {
        const at = this.headerSlot();
        encodeRequest(this.arenaView, at, 0, NBD_CMD_DISC, this.allocCookie(), 0, 0);
        this.socket.end(this.arena.subarray(at, at + REQUEST_BYTES));
        this.failure = new NbdError("NBD_CLOSED", `${this.where}: closed by the client`);
        this.cleanClose = true;
        this.log(`nbd: ${this.where}: NBD_CMD_DISC sent`);
      }
    }
    if (!this.ended) {
      // The server closes after NBD_CMD_DISC; one that does not is cut off.
      const t = setTimeout(() => this.socket.destroy(), this.closeTimeoutMs);
      await this.closed;
      clearTimeout(t);
    }
  }

  private submit(type: number, flags: number, offset: number, length: number, dst: Buffers | null, payload: Buffers | null): Promise<void> {
    if (this.failure !== null || this.shutdown !== null) return Promise.reject(this.refusal());
    const ranged = type !== NBD_CMD_FLUSH;
    if (
      ranged &&
      !(
        Number.isSafeInteger(offset) &&
        offset >= 0 &&
        Number.isInteger(length) &&
        length > 0 &&
        length < U32 &&
        offset + length <= this.info.size
      )
    ) {
      return Promise.reject(new RangeError(`${commandName(type)} [${offset}, +${length}) outside the export (${this.info.size} bytes)`));
    }
    if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > this.info.maxPayload) {
      return Promise.reject(new RangeError(`${commandName(type)} of ${length} bytes exceeds the maximum payload ${this.info.maxPayload}`));
    }
    const cookie = this.allocCookie();
    const coverage = type === NBD_CMD_READ && this.info.structuredReplies ? new Coverage(length) : null;
    return new Promise<void>((resolve, reject) => {
      this.pending.set(cookie, new Pending(cookie, type, offset, length, dst, coverage, resolve, reject));
      const at = this.headerSlot();
      encodeRequest(this.arenaView, at, flags, type, cookie, offset, length);
      // Requests made in one tick leave in one writev.
      if (!this.corked) {
        this.corked = true;
        this.socket.cork();
        process.nextTick(this.uncork);
      }
      this.socket.write(this.arena.subarray(at, at + REQUEST_BYTES));
      if (payload instanceof Uint8Array) this.socket.write(payload);
      else if (payload !== null) for (const b of payload) if (b.length > 0) this.socket.write(b);
    });
  }

  private refusal(): NbdError {
    if (this.failure !== null && this.failure.code !== "NBD_CLOSED") {
      return new NbdError("NBD_DISCONNECTED", `${this.where}: the connection has ended: ${this.failure.message}`, { cause: this.failure });
    }
    return this.shutdown === "server"
      ? new NbdError("NBD_SHUTDOWN", `${this.where}: the server is shutting down`)
      : new NbdError("NBD_CLOSED", `${this.where}: the connection was closed by the client`);
  }

  private allocCookie(): number {
    let c: number;
    do {
      c = this.nextCookie;
      this.nextCookie = c === U32 - 1 ? 1 : c + 1;
    } while (this.pending.has(c));
    return c;
  }

  private headerSlot(): number {
    if (this.arenaUsed + REQUEST_BYTES > this.arena.length) {
      // The previous slab may still be queued for writing; it stays alive until written.
      this.arena = Buffer.allocUnsafe(ARENA_BYTES);
      this.arenaView = new DataView(this.arena.buffer, this.arena.byteOffset, this.arena.length);
      this.arenaUsed = 0;
    }
    const at = this.arenaUsed;
    this.arenaUsed += REQUEST_BYTES;
    return at;
  }

  // ---- replies ----

  private head(): void {
    const magic = this.hdrView.getUint32(0);
    if (magic === SIMPLE_REPLY_MAGIC) return this.simple();
    if (magic === STRUCTURED_REPLY_MAGIC && this.info.structuredReplies) return this.reader.expect(this.hdrTail, this.onStructured);
    this.violation(`reply magic 0x${magic.toString(16)}`);
  }

  private lookup(): Pending | null {
    const hi = this.hdrView.getUint32(8);
    const lo = this.hdrView.getUint32(12);
    const p = hi === 0 ? this.pending.get(lo) : undefined;
    if (p === undefined) {
      this.violation(`reply for unknown cookie 0x${hi.toString(16).padStart(8, "0")}${lo.toString(16).padStart(8, "0")}`);
      return null;
    }
    return p;
  }

  private simple(): void {
    const p = this.lookup();
    if (p === null) return;
    const errno = this.hdrView.getUint32(4);
    this.cur = p;
    this.curFlags = NBD_REPLY_FLAG_DONE;
    if (errno !== 0) {
      p.error = this.serverError(p, errno, "");
      return this.chunkDone();
    }
    if (p.type === NBD_CMD_READ) {
      // proto.md: once structured replies are agreed, a READ never gets a simple reply
      // with data; without them, exactly `length` bytes follow.
      if (this.info.structuredReplies) return this.violation(`simple reply with data to ${p.describe()}`);
      return this.receive(p, 0, p.length);
    }
    this.chunkDone();
  }

  private structured(): void {
    const p = this.lookup();
    if (p === null) return;
    const v = this.hdrView;
    this.cur = p;
    this.curFlags = v.getUint16(4);
    this.curType = v.getUint16(6);
    this.curLength = v.getUint32(16);
    const len = this.curLength;
    switch (this.curType) {
      case NBD_REPLY_TYPE_NONE:
        if (len !== 0) return this.violation(`NONE chunk with ${len} payload bytes`);
        if ((this.curFlags & NBD_REPLY_FLAG_DONE) === 0) return this.violation("NONE chunk without the DONE flag");
        return this.chunkDone();
      case NBD_REPLY_TYPE_OFFSET_DATA:
        if (p.type !== NBD_CMD_READ) return this.violation(`data chunk for ${p.describe()}`);
        if (len < 9) return this.violation(`OFFSET_DATA chunk of ${len} bytes`);
        return this.reader.expect(this.fixed.subarray(0, 8), this.onDataOffset);
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        if (p.type !== NBD_CMD_READ) return this.violation(`hole chunk for ${p.describe()}`);
        if (len !== 12) return this.violation(`OFFSET_HOLE chunk of ${len} bytes`);
        return this.reader.expect(this.fixed, this.onHole);
      default:
        // proto.md: an unknown type with bit 15 set is an error for this request only.
        if ((this.curType & NBD_REPLY_TYPE_ERROR_BIT) === 0)
          return this.violation(`unexpected chunk type ${this.curType} for ${p.describe()}`);
        if (len < 6 || len > MAX_ERROR_CHUNK) return this.violation(`error chunk of ${len} bytes`);
        this.errPayload = new Uint8Array(len);
        return this.reader.expect(this.errPayload, this.onErrorPayload);
    }
  }

  /** Checks a content chunk [offset, +n) against its request; returns where it starts in dst, or -1 (connection failed). */
  private place(p: Pending, offset: number, n: number, what: string): number {
    const rel = offset - p.offset;
    // proto.md: content MUST lie within the request and MUST NOT overlap earlier chunks.
    if (offset < 0 || rel < 0 || rel + n > p.length) {
      this.violation(`${what} [${offset}, +${n}) outside ${p.describe()}`);
      return -1;
    }
    const r = p.coverage!.add(rel, rel + n);
    if (r !== "ok") {
      this.violation(
        r === "overlap"
          ? `${what} [${offset}, +${n}) overlaps an earlier chunk of ${p.describe()}`
          : `${p.describe()} split into too many pieces`,
      );
      return -1;
    }
    return rel;
  }

  private dataOffset(): void {
    const p = this.cur!;
    const n = this.curLength - 8;
    const rel = this.place(p, readU64(this.fixedView, 0), n, "data chunk");
    if (rel < 0) return;
    // Straight into the caller's buffers: only the validated window is handed to the reader.
    this.receive(p, rel, n);
  }

  /** Receives [rel, +n) of the request's buffers from the reader, then ends the chunk. */
  private receive(p: Pending, rel: number, n: number): void {
    const d = p.dst!;
    if (d instanceof Uint8Array) return this.reader.expect(d.subarray(rel, rel + n), this.onChunkData);
    this.pieces(p, rel, n);
    this.pieceAt = 0;
    this.reader.expect(this.chunkPieces[0]!, this.onPiece);
  }

  private nextPiece(): void {
    if (++this.pieceAt < this.chunkPieces.length) this.reader.expect(this.chunkPieces[this.pieceAt]!, this.onPiece);
    else this.chunkDone();
  }

  /**
   * Sets chunkPieces to the views of [rel, +n) across the request's buffers
   * (empty ones skipped). A linear walk: a request has at most a queue's worth
   * of buffers, and servers send one or a few chunks per READ.
   */
  private pieces(p: Pending, rel: number, n: number): void {
    const out = this.chunkPieces;
    out.length = 0;
    const d = p.dst!;
    if (d instanceof Uint8Array) {
      out.push(d.subarray(rel, rel + n));
      return;
    }
    let start = 0;
    for (const b of d) {
      const end = start + b.length;
      if (b.length > 0 && end > rel && start < rel + n) out.push(b.subarray(Math.max(rel, start) - start, Math.min(rel + n, end) - start));
      if (end >= rel + n) break;
      start = end;
    }
  }

  private hole(): void {
    const p = this.cur!;
    const n = this.fixedView.getUint32(8);
    if (n === 0) return this.violation(`empty hole chunk for ${p.describe()}`);
    const rel = this.place(p, readU64(this.fixedView, 0), n, "hole chunk");
    if (rel < 0) return;
    this.pieces(p, rel, n);
    for (const v of this.chunkPieces) v.fill(0);
    this.chunkDone();
  }

  private errorChunk(): void {
    const p = this.cur!;
    const b = this.errPayload;
    const v = new DataView(b.buffer);
    const errno = v.getUint32(0);
    const msgLen = v.getUint16(4);
    const isOffset = this.curType === NBD_REPLY_TYPE_ERROR_OFFSET;
    if (6 + msgLen + (isOffset ? 8 : 0) > b.length)
      return this.violation(`error chunk message of ${msgLen} bytes in a ${b.length}-byte chunk`);
    if (errno === 0) return this.violation(`error chunk without an error value for ${p.describe()}`);
    let at = "";
    if (isOffset) {
      const off = readU64(v, 6 + msgLen);
      if (p.length === 0 || off < p.offset || off >= p.offset + p.length)
        return this.violation(`error offset ${off} outside ${p.describe()}`);
      at = ` at ${off}`;
    }
    const text = serverText(b.subarray(6, 6 + msgLen));
    p.error ??= this.serverError(p, errno, `${at}${text === "" ? "" : `: ${text}`}`);
    this.chunkDone();
  }

  private serverError(p: Pending, errno: number, detail: string): NbdError {
    const code = errnoCode(errno);
    if (errno === NBD_ESHUTDOWN && this.shutdown === null) {
      // proto.md: on ESHUTDOWN the client MUST initiate a soft disconnect.
      this.log(`nbd: ${this.where}: the server is shutting down; disconnecting`);
      this.shutdown = "server";
      queueMicrotask(() => void this.close());
    }
    return new NbdError(code, `${this.where}: ${p.describe()} failed: ${code} (${errno})${detail}`, { errno });
  }

  /** End of a chunk, or of a simple reply (which is always final). */
  private chunkDone(): void {
    const p = this.cur!;
    this.cur = null;
    if ((this.curFlags & NBD_REPLY_FLAG_DONE) !== 0) {
      if (p.error === null && p.coverage !== null && !p.coverage.complete) {
        return this.violation(`${p.describe()} ended after ${p.coverage.covered} of ${p.length} bytes`);
      }
      this.pending.delete(p.cookie);
      if (p.error !== null) p.reject(p.error);
      else p.resolve();
      if (this.pending.size === 0) this.wakeDrainers();
    }
    if (!this.torn) this.reader.expect(this.hdrHead, this.onHead);
  }

  private violation(what: string): void {
    this.fail(new NbdError("NBD_PROTOCOL", `${this.where}: protocol violation: ${what}`));
  }

  /** Ends the connection: every pending request fails with `err`. */
  private fail(err: NbdError): void {
    if (this.torn) return;
    this.torn = true;
    this.failure ??= err;
    if (!this.cleanClose) this.log(`nbd: ${this.where}: ${err.message}`);
    this.reader.stop(err);
    this.socket.destroy();
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(err);
    this.wakeDrainers();
  }

  private wakeDrainers(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }

  private onSocketClosed(): void {
    if (this.ended) return;
    this.ended = true;
    const why = this.socketError === null ? "closed by the server" : this.socketError.message;
    this.fail(new NbdError("NBD_DISCONNECTED", `${this.where}: connection lost (${why})`, { cause: this.socketError ?? undefined }));
    this.resolveClosed(this.cleanClose ? null : this.failure);
  }
}
