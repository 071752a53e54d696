import type { BlockPort } from "../../core/virtio/devices/blk/port.js";
import { NbdClient, totalLength, type NbdClientOptions } from "./client.js";
import { NbdError } from "./errors.js";
import type { NbdExportInfo } from "./handshake.js";
import { NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES } from "./protocol.js";
import { formatNbdAddress, parseNbdUrl } from "./url.js";

export interface NbdConnectOptions extends NbdClientOptions {
  /** Refuse writes even when the server allows them. */
  readOnly?: boolean;
}

/**
 * TRIM and WRITE_ZEROES carry no payload, but their length is 32 bits and a
 * server may refuse lengths beyond its maximum payload with EOVERFLOW or
 * EINVAL (proto.md, "Size constraints"); 1 GiB pieces stay clear of both
 * limits for every server we know and cost one request per GiB.
 */
const MAX_EFFECT_BYTES = 1 << 30;

/**
 * An NBD export as a BlockPort (see src/core/virtio/devices/blk/port.ts).
 *
 * Requests larger than the server's maximum payload are split; requests not
 * aligned to its minimum block size are completed through whole blocks
 * (bounce reads, and read-modify-write under a per-block lock), because
 * after asking for NBD_INFO_BLOCK_SIZE we MUST honour it (proto.md, "Size
 * constraints"). `discard` and `writeZeroes` exist only when the server
 * supports NBD_CMD_TRIM / NBD_CMD_WRITE_ZEROES, because virtio-blk offers
 * those features by testing the methods for `undefined`.
 *
 * Every method returns a promise; misuse (a range outside the disk) and
 * server errors arrive as rejections, never as synchronous throws.
 */
export class NbdBlockPort implements BlockPort {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** The server's minimum block size (1 when it advertised none, the protocol default). */
  readonly blockSize: number;
  /** The server's preferred block size (4096 when it advertised none). */
  readonly preferredBlockSize: number;
  /** The largest single READ or WRITE sent; larger requests are split. */
  readonly maxRequestBytes: number;
  /** What the handshake agreed on. */
  readonly info: NbdExportInfo;
  readonly url: string;
  declare readonly discard?: (offset: number, length: number) => Promise<void>;
  declare readonly writeZeroes?: (offset: number, length: number, unmap: boolean) => Promise<void>;
  private readonly client: NbdClient;
  /** Blocks under read-modify-write: the last operation queued on each. */
  private readonly locks = new Map<number, Promise<void>>();
  private closing: Promise<void> | null = null;

  /** Connects to `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. */
  static async connect(url: string, opts: NbdConnectOptions = {}): Promise<NbdBlockPort> {
    const client = await NbdClient.connect(parseNbdUrl(url), opts);
    try {
      return new NbdBlockPort(client, opts);
    } catch (e) {
      await client.close();
      throw e;
    }
  }

  private constructor(client: NbdClient, opts: NbdConnectOptions) {
    const info = client.info;
    this.client = client;
    this.info = info;
    this.url = formatNbdAddress(client.address);
    this.blockSize = info.minBlockSize;
    this.preferredBlockSize = info.preferredBlockSize;
    this.maxRequestBytes = info.maxPayload;
    // Whole sectors, and whole server blocks so that the last block can be read as one.
    const unit = Math.max(512, this.blockSize);
    this.sizeBytes = info.size - (info.size % unit);
    if (this.sizeBytes === 0) {
      throw new NbdError("NBD_EXPORT_TOO_SMALL", `${this.url}: export of ${info.size} bytes holds no whole ${unit}-byte block`);
    }
    const flags = info.transmissionFlags;
    this.readOnly = opts.readOnly === true || (flags & NBD_FLAG_READ_ONLY) !== 0;
    if (!this.readOnly && (flags & NBD_FLAG_SEND_TRIM) !== 0) {
      (this as { discard?: NbdBlockPort["discard"] }).discard = (offset, length) => this.trimRange(offset, length);
    }
    if (!this.readOnly && (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0) {
      (this as { writeZeroes?: NbdBlockPort["writeZeroes"] }).writeZeroes = (offset, length, unmap) =>
        this.zeroRange(offset, length, unmap);
    }
    const f = (bit: number, name: string): string => ((flags & bit) !== 0 ? ` ${name}` : "");
    opts.log?.(
      `nbd: ${this.url}: ${info.size} bytes via ${info.via === "go" ? "NBD_OPT_GO" : "NBD_OPT_EXPORT_NAME"}, ` +
        `${info.structuredReplies ? "structured" : "simple"} replies, block sizes ${this.blockSize}/${this.preferredBlockSize}/${this.maxRequestBytes}` +
        `${info.blockSizeAdvertised ? "" : " (defaults)"}, flags${f(NBD_FLAG_READ_ONLY, "read-only")}${f(NBD_FLAG_SEND_FLUSH, "flush")}` +
        `${f(NBD_FLAG_SEND_TRIM, "trim")}${f(NBD_FLAG_SEND_WRITE_ZEROES, "write-zeroes")}`,
    );
  }

  /** Resolves when the connection has ended: null after close(), else the reason. */
  get closed(): Promise<NbdError | null> {
    return this.client.closed;
  }

  /** True once requests can no longer be sent. */
  get isClosed(): boolean {
    return this.client.isClosed;
  }

  /** Requests on the wire now (after splitting). */
  get inFlight(): number {
    return this.client.inFlight;
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    const bad = this.check("read", offset, dst.length);
    if (bad !== null) return Promise.reject(bad);
    if (this.oneRequest(offset, dst.length)) return this.client.read(offset, dst);
    const view = (from: number, n: number): Uint8Array => dst.subarray(from - offset, from - offset + n);
    return this.spans(
      offset,
      dst.length,
      this.maxRequestBytes,
      (at, n) => this.client.read(at, view(at, n)),
      (block, from, n) => this.bounceRead(block, from, view(from, n)),
    );
  }

  write(offset: number, src: Uint8Array): Promise<void> {
    const bad = this.check("write", offset, src.length) ?? this.writable();
    if (bad !== null) return Promise.reject(bad);
    if (this.oneRequest(offset, src.length)) return this.client.write(offset, src);
    const view = (from: number, n: number): Uint8Array => src.subarray(from - offset, from - offset + n);
    return this.spans(
      offset,
      src.length,
      this.maxRequestBytes,
      (at, n) => this.client.write(at, view(at, n)),
      (block, from, n) => this.modify(block, from, n, view(from, n)),
    );
  }

  /**
   * A request's buffers as one NBD_CMD_READ when it is aligned and fits the
   * maximum payload (virtio-blk passes a chain's guest pages this way), so
   * a 1 MiB guest read is one request, not 256. Otherwise each buffer is
   * read on its own, with splitting and alignment as in read().
   */
  readv(offset: number, dsts: Uint8Array[]): Promise<void> {
    const total = totalLength(dsts);
    const bad = this.check("read", offset, total);
    if (bad !== null) return Promise.reject(bad);
    if (this.oneRequest(offset, total)) return this.client.readv(offset, dsts);
    return this.each(offset, dsts, (at, b) => this.read(at, b));
  }

  /** The write side of readv(). */
  writev(offset: number, srcs: Uint8Array[]): Promise<void> {
    const total = totalLength(srcs);
    const bad = this.check("write", offset, total) ?? this.writable();
    if (bad !== null) return Promise.reject(bad);
    if (this.oneRequest(offset, total)) return this.client.writev(offset, srcs);
    return this.each(offset, srcs, (at, b) => this.write(at, b));
  }

  /**
   * NBD_CMD_FLUSH. Without NBD_FLAG_SEND_FLUSH the protocol offers no way to
   * flush (such a server is expected to write through), so this resolves.
   */
  flush(): Promise<void> {
    const bad = this.check("flush", 0, 0);
    if (bad !== null) return Promise.reject(bad);
    if ((this.info.transmissionFlags & NBD_FLAG_SEND_FLUSH) === 0) return Promise.resolve();
    return this.client.flush();
  }

  /**
   * New requests fail at once; those in flight finish (a read-modify-write
   * is two NBD requests, and is not cut in half); then NBD_CMD_DISC.
   * Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      while (this.locks.size > 0) await Promise.all(this.locks.values());
      await this.client.close();
    })();
    return this.closing;
  }

  private check(what: string, offset: number, length: number): Error | null {
    if (this.closing !== null) return new NbdError("NBD_CLOSED", `${this.url}: the port is closed`);
    if (!(
      Number.isSafeInteger(offset) &&
      offset >= 0 &&
      Number.isSafeInteger(length) &&
      length >= 0 &&
      offset + length <= this.sizeBytes
    )) {
      return new RangeError(`${what} [${offset}, +${length}) outside the disk (${this.sizeBytes} bytes)`);
    }
    return null;
  }

  private each(offset: number, bufs: Uint8Array[], op: (at: number, b: Uint8Array) => Promise<void>): Promise<void> {
    const work: Promise<void>[] = [];
    let at = offset;
    for (const b of bufs) {
      if (b.length > 0) work.push(op(at, b));
      at += b.length;
    }
    return Promise.all(work).then(() => undefined);
  }

  /** The common case, sent as is: aligned to the server's blocks and within its maximum payload. */
  private oneRequest(offset: number, length: number): boolean {
    return length > 0 && length <= this.maxRequestBytes && offset % this.blockSize === 0 && length % this.blockSize === 0;
  }

  private writable(): Error | null {
    return this.readOnly ? new NbdError("NBD_READ_ONLY", `${this.url}: the export is read-only`) : null;
  }

  /**
   * Cuts [offset, +length) at the server's block boundaries: whole blocks
   * go to `aligned` in pieces of at most `piece` bytes, the partial block at
   * either end to `partial(blockStart, from, n)`.
   */
  private spans(
    offset: number,
    length: number,
    piece: number,
    aligned: (at: number, n: number) => Promise<void>,
    partial: (block: number, from: number, n: number) => Promise<void>,
  ): Promise<void> {
    if (length === 0) return Promise.resolve();
    const bs = this.blockSize;
    const end = offset + length;
    const headEnd = Math.min(end, Math.ceil(offset / bs) * bs);
    const tailStart = Math.max(headEnd, end - (end % bs));
    const work: Promise<void>[] = [];
    if (offset < headEnd) work.push(partial(offset - (offset % bs), offset, headEnd - offset));
    for (let at = headEnd; at < tailStart; at += piece) work.push(aligned(at, Math.min(piece, tailStart - at)));
    if (tailStart < end) work.push(partial(tailStart, tailStart, end - tailStart));
    return work.length === 1 ? work[0]! : Promise.all(work).then(() => undefined);
  }

  /** Reads the whole block at `block` and copies out the `out.length` bytes from `from`. */
  private async bounceRead(block: number, from: number, out: Uint8Array): Promise<void> {
    const tmp = new Uint8Array(this.blockSize);
    await this.client.read(block, tmp);
    out.set(tmp.subarray(from - block, from - block + out.length));
  }

  /**
   * Read-modify-write of one block: `n` bytes at `from` become `data` (zeroes
   * when it is null). Two partial writes to one block would otherwise each
   * write back the other's old bytes, so they take turns on that block.
   */
  private modify(block: number, from: number, n: number, data: Uint8Array | null): Promise<void> {
    return this.withBlock(block, async () => {
      const tmp = new Uint8Array(this.blockSize);
      await this.client.read(block, tmp);
      if (data === null) tmp.fill(0, from - block, from - block + n);
      else tmp.set(data, from - block);
      await this.client.write(block, tmp);
    });
  }

  private async withBlock(block: number, fn: () => Promise<void>): Promise<void> {
    const before = this.locks.get(block);
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = before === undefined ? mine : before.then(() => mine);
    this.locks.set(block, tail);
    try {
      if (before !== undefined) await before;
      await fn();
    } finally {
      release();
      if (this.locks.get(block) === tail) this.locks.delete(block);
    }
  }

  /** Only whole blocks are trimmed: TRIM is advisory (virtio §5.2.6.2 lets later reads return anything), so partial ends are left alone. */
  private trimRange(offset: number, length: number): Promise<void> {
    const bad = this.check("discard", offset, length) ?? this.writable();
    if (bad !== null) return Promise.reject(bad);
    return this.spans(
      offset,
      length,
      MAX_EFFECT_BYTES,
      (at, n) => this.client.trim(at, n),
      () => Promise.resolve(),
    );
  }

  /** WRITE_ZEROES for whole blocks (with NO_HOLE unless `unmap`), read-modify-write for partial ones. */
  private zeroRange(offset: number, length: number, unmap: boolean): Promise<void> {
    const bad = this.check("writeZeroes", offset, length) ?? this.writable();
    if (bad !== null) return Promise.reject(bad);
    return this.spans(
      offset,
      length,
      MAX_EFFECT_BYTES,
      (at, n) => this.client.writeZeroes(at, n, !unmap),
      (block, from, n) => this.modify(block, from, n, null),
    );
  }
}
