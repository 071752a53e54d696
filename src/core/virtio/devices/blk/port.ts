import { IovirtUsageError } from "../../../errors.js";

/**
 * What virtio-blk needs from storage (docs/architecture.md, principle 5). Offsets and
 * lengths are bytes and always inside [0, sizeBytes); the device checks that.
 * Methods may complete synchronously or return a promise. `queue` is the
 * virtio queue the request came from: storage with queues of its own (an
 * NVMe controller) maps them one to one; the others ignore it.
 */
export interface BlockPort {
  readonly sizeBytes: number;
  readonly readOnly?: boolean;
  /** Fill dst (a view of guest memory: no copy needed) from offset. */
  read(offset: number, dst: Uint8Array, queue?: number): void | Promise<void>;
  write(offset: number, src: Uint8Array, queue?: number): void | Promise<void>;
  /**
   * Optional vectored forms: one request's guest buffers, in order, as one
   * transfer (one preadv/pwritev instead of one call per buffer).
   */
  readv?(offset: number, dsts: Uint8Array[], queue?: number): void | Promise<void>;
  writev?(offset: number, srcs: Uint8Array[], queue?: number): void | Promise<void>;
  /** Make completed writes stable (fdatasync for a file). */
  flush(queue?: number): void | Promise<void>;
  /** Deallocate; later reads may return anything (§5.2.6.2). Optional. */
  discard?(offset: number, length: number): void | Promise<void>;
  /** Later reads return zeroes; `unmap` allows deallocation. Optional. */
  writeZeroes?(offset: number, length: number, unmap: boolean): void | Promise<void>;
}

/**
 * A sparse in-memory disk: 64 KiB chunks allocated on first write, so a
 * "1 TiB" disk costs only what is written. Reads of holes return zeroes.
 * A read-only disk refuses write, discard and writeZeroes with
 * IovirtUsageError READ_ONLY (the device already fails such requests).
 */
export class RamDisk implements BlockPort {
  sizeBytes: number;
  readonly readOnly: boolean;
  private static readonly CHUNK = 1 << 16;
  private readonly chunks = new Map<number, Uint8Array>();
  flushes = 0;

  constructor(sizeBytes: number, opts: { readOnly?: boolean } = {}) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % 512 !== 0) {
      throw new RangeError(`disk size ${sizeBytes} must be a positive multiple of 512`);
    }
    this.sizeBytes = sizeBytes;
    this.readOnly = opts.readOnly ?? false;
  }

  /** Grows or shrinks the disk; data beyond a new, smaller end is dropped. */
  resize(sizeBytes: number): void {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % 512 !== 0) throw new RangeError(`disk size ${sizeBytes}`);
    if (sizeBytes < this.sizeBytes) this.zero(sizeBytes, this.sizeBytes - sizeBytes, true);
    this.sizeBytes = sizeBytes;
  }

  get allocatedBytes(): number {
    return this.chunks.size * RamDisk.CHUNK;
  }

  read(offset: number, dst: Uint8Array): void {
    this.span(offset, dst.length, (chunk, at, n, done) => {
      if (chunk === undefined) dst.fill(0, done, done + n);
      else dst.set(chunk.subarray(at, at + n), done);
    });
  }

  write(offset: number, src: Uint8Array): void {
    this.writable();
    this.span(offset, src.length, (_c, at, n, done, idx) => this.chunk(idx).set(src.subarray(done, done + n), at));
  }

  flush(): void {
    this.flushes++;
  }

  discard(offset: number, length: number): void {
    this.writeZeroes(offset, length, true);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): void {
    this.writable();
    this.zero(offset, length, unmap);
  }

  private writable(): void {
    if (this.readOnly) throw new IovirtUsageError("READ_ONLY", "write to a read-only RamDisk");
  }

  private zero(offset: number, length: number, unmap: boolean): void {
    this.span(offset, length, (chunk, at, n, _done, idx) => {
      if (chunk === undefined) return;
      if (unmap && n === RamDisk.CHUNK) this.chunks.delete(idx);
      else chunk.fill(0, at, at + n);
    });
  }

  private chunk(idx: number): Uint8Array {
    let c = this.chunks.get(idx);
    if (c === undefined) {
      c = new Uint8Array(RamDisk.CHUNK);
      this.chunks.set(idx, c);
    }
    return c;
  }

  private span(
    offset: number,
    length: number,
    fn: (c: Uint8Array | undefined, at: number, n: number, done: number, idx: number) => void,
  ): void {
    if (!(offset >= 0 && offset + length <= this.sizeBytes)) throw new RangeError(`[${offset}, +${length}) outside the disk`);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const idx = Math.floor(pos / RamDisk.CHUNK);
      const at = pos % RamDisk.CHUNK;
      const n = Math.min(RamDisk.CHUNK - at, length - done);
      fn(this.chunks.get(idx), at, n, done, idx);
      done += n;
    }
  }
}
