import { copyHdr, plainHdr, type NetHdr } from "../../../net/hdr.js";

/**
 * Packets waiting for receive buffers on one receive queue: a ring of copies
 * bounded in count and in bytes, oldest first. The header objects are
 * allocated once with the ring and reused.
 */
export class PendingPackets {
  private readonly frames: (Uint8Array | null)[];
  private readonly hdrs: NetHdr[];
  private head = 0;
  private n = 0;
  private held = 0;

  constructor(
    readonly maxCount: number,
    readonly maxBytes: number,
  ) {
    this.frames = new Array<Uint8Array | null>(maxCount).fill(null);
    this.hdrs = Array.from({ length: maxCount }, plainHdr);
  }

  get count(): number {
    return this.n;
  }
  get bytes(): number {
    return this.held;
  }

  /** Keeps a copy of the packet; false when either bound would be exceeded. */
  push(frame: Uint8Array, hdr: Readonly<NetHdr>): boolean {
    if (this.n >= this.maxCount || this.held + frame.length > this.maxBytes) return false;
    const cap = this.maxCount;
    const tail = this.head + this.n;
    const at = tail >= cap ? tail - cap : tail;
    this.frames[at] = frame.slice();
    copyHdr(hdr, this.hdrs[at]!);
    this.n++;
    this.held += frame.length;
    return true;
  }

  /** The oldest packet's frame (count > 0). */
  frame(): Uint8Array {
    return this.frames[this.head]!;
  }
  /** The oldest packet's header (count > 0); valid until the next shift. */
  hdr(): NetHdr {
    return this.hdrs[this.head]!;
  }

  shift(): void {
    const f = this.frames[this.head];
    if (f === null || f === undefined) return;
    this.held -= f.length;
    this.frames[this.head] = null;
    this.head = this.head + 1 === this.maxCount ? 0 : this.head + 1;
    this.n--;
  }

  /** Drops everything; returns how many packets were waiting. */
  clear(): number {
    const dropped = this.n;
    this.frames.fill(null);
    this.head = 0;
    this.n = 0;
    this.held = 0;
    return dropped;
  }
}
