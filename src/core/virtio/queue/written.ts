import type { DirtyLog } from "../../memory/dirty-log.js";
import type { DescriptorChain } from "./chain.js";

/**
 * Where each buffer taken from a queue may be written, kept from its pop to
 * its used entry so that the entry marks in the dirty log exactly the bytes
 * it says were written (virtio 1.2 §2.7.8: `len` is the number of bytes
 * written into the buffer, from its first device-writable byte on). A queue
 * keeps one while its memory has a DirtyLog attached (dirty-log.ts).
 */
export class WriteRecord {
  /** Per buffer id: [gpa, length, gpa, length, ...] of its device-writable segments. */
  private readonly segs: (number[] | undefined)[];
  /** 1 while a buffer's segments are recorded and its used entry is not written. */
  private readonly known: Uint8Array;

  constructor(size: number) {
    this.segs = new Array<number[] | undefined>(size);
    this.known = new Uint8Array(size);
  }

  remember(chain: DescriptorChain): void {
    const id = chain.head;
    let s = this.segs[id];
    if (s === undefined) {
      s = [];
      this.segs[id] = s;
    }
    s.length = 0;
    for (let i = chain.readableCount; i < chain.count; i++) s.push(chain.addr(i), chain.len(i));
    this.known[id] = 1;
  }

  /** Marks the first `len` written bytes of buffer `id` and forgets it; false if where it lies was never recorded. */
  mark(log: DirtyLog, id: number, len: number): boolean {
    if (this.known[id] !== 1) return false;
    this.known[id] = 0;
    const s = this.segs[id]!;
    for (let k = 0; k < s.length && len > 0; k += 2) {
      const n = Math.min(s[k + 1]!, len);
      log.mark(s[k]!, n);
      len -= n;
    }
    return true;
  }

  /**
   * Marks every recorded buffer whole, for an IN_ORDER batch, whose used
   * entry gives the length of its last buffer only. The records stay: a
   * buffer of the batch is recorded afresh when its id is popped again, and
   * one still in flight must still be marked by its own used entry, after
   * its data is written (marked early only, its page could be read and
   * cleared before the write and never sent again).
   */
  markAll(log: DirtyLog): void {
    for (let id = 0; id < this.known.length; id++) {
      if (this.known[id] !== 1) continue;
      const s = this.segs[id]!;
      for (let k = 0; k < s.length; k += 2) log.mark(s[k]!, s[k + 1]!);
    }
  }
}
