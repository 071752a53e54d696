import { IovirtUsageError } from "../../errors.js";
import { INFLIGHT_VERSION, InflightError, InflightQueueRegion, SPLIT_INFLIGHT, checkU16 } from "./layout.js";

const SH = SPLIT_INFLIGHT.header;
const SD = SPLIT_INFLIGHT.desc;

/**
 * In-flight tracking for a split ring.
 *
 * Use: `init(usedIdx)` on a fresh region, or `recover(ring used.idx)` on one
 * handed back by the front end. Then, for every chain popped, `onPop(head)`;
 * for every used entry `onUsed(head)` (before the ring's used.idx store that
 * publishes it), and once used.idx is stored, `commit(used.idx)`. Every
 * onUsed since the last commit must be published by that one store, and
 * commit must follow it before more used entries are recorded.
 */
export class SplitInflight extends InflightQueueRegion {
  private readonly inflight: Uint8Array;
  private readonly inBatch: Uint8Array;
  private batch: number[] = [];
  private usedIdx = 0;
  private lastBatchHead = 0;
  private counter = 0;
  private count = 0;

  constructor(region: Uint8Array, queueSize: number) {
    super(region, "split", queueSize);
    this.inflight = new Uint8Array(queueSize);
    this.inBatch = new Uint8Array(queueSize);
  }

  /** Number of heads recorded in flight (popped, used not committed). */
  get inFlight(): number {
    return this.count;
  }

  /**
   * Fresh region: everything zero, version 1, desc_num = queue size, used_idx
   * = the ring's used.idx now (0 for a new ring), so that a later recovery
   * compares against the right value.
   */
  init(usedIdx = 0): void {
    checkU16(usedIdx, "used idx");
    this.zero();
    this.st16(SH.descNum, this.queueSize);
    this.st16(SH.usedIdx, usedIdx);
    this.st16(SH.version, INFLIGHT_VERSION);
    this.reset(usedIdx, 0, 0);
  }

  /** Chain `head` was taken from the avail ring: record its order (counter), then mark it in flight. */
  onPop(head: number): void {
    this.checkReady();
    this.checkIndex(head, "head");
    if (this.inflight[head] !== 0) {
      throw new InflightError("HEAD_IN_FLIGHT", `head ${head} was made available again while still in flight`);
    }
    const d = this.descOff(head);
    this.stCounter(d + SD.counter, this.counter);
    this.st8(d + SD.inflight, 1);
    this.counter++;
    this.inflight[head] = 1;
    this.count++;
  }

  /** A used entry for `head` was written to the ring (not yet published): link it into the last-batch list. */
  onUsed(head: number): void {
    this.checkReady();
    this.checkIndex(head, "head");
    if (this.inflight[head] === 0 || this.inBatch[head] !== 0) {
      throw new IovirtUsageError("NOT_IN_FLIGHT", `head ${head} is not in flight (or already used in this batch)`);
    }
    this.st16(this.descOff(head) + SD.next, this.lastBatchHead);
    this.st16(SH.lastBatchHead, head);
    this.lastBatchHead = head;
    this.inBatch[head] = 1;
    this.batch.push(head);
  }

  /** The ring's used.idx now is `usedIdx`, covering exactly the onUsed calls since the last commit. */
  commit(usedIdx: number): void {
    this.checkReady();
    checkU16(usedIdx, "used idx");
    const moved = (usedIdx - this.usedIdx) & 0xffff;
    if (moved !== this.batch.length) {
      throw new IovirtUsageError(
        "BAD_COMMIT",
        `used idx moved by ${moved} (${this.usedIdx} -> ${usedIdx}) but ${this.batch.length} used entries were recorded since the last commit`,
      );
    }
    if (moved === 0) return;
    for (const h of this.batch) {
      this.st8(this.descOff(h) + SD.inflight, 0);
      this.inflight[h] = 0;
      this.inBatch[h] = 0;
      this.count--;
    }
    this.st16(SH.usedIdx, usedIdx);
    this.usedIdx = usedIdx;
    this.batch = [];
  }

  /**
   * Reconnect: `ringUsedIdx` is the used.idx in the ring now. Finishes a batch
   * whose used.idx store happened before the crash (the spec's "When
   * reconnecting") and returns the heads still in flight, oldest pop first.
   * They stay recorded in flight: process them again (no onPop), then
   * onUsed/commit as usual. The device's next avail index is
   * `ringUsedIdx + returned.length` (mod 2^16).
   *
   * An uninitialized region (version 0) is initialized and yields [].
   * Throws InflightError, leaving the region untouched, if it is inconsistent.
   */
  recover(ringUsedIdx: number): number[] {
    checkU16(ringUsedIdx, "ring used idx");
    if (!this.isInitialized()) {
      this.init(ringUsedIdx);
      return [];
    }
    this.checkHeader();
    const n = this.queueSize;
    const regionUsed = this.ld16(SH.usedIdx);
    const pending = (ringUsedIdx - regionUsed) & 0xffff;
    if (pending > n) {
      throw new InflightError(
        "BAD_USED_IDX",
        `ring used.idx ${ringUsedIdx} is ${pending} entries past the region's used_idx ${regionUsed}, more than the queue size ${n}`,
      );
    }
    // The last batch: `pending` entries from last_batch_head, newest first. Its
    // length is what bounds the walk; a repeated entry means a corrupt list.
    const inLastBatch = new Uint8Array(n);
    const lastBatch: number[] = [];
    if (pending > 0) {
      let i = this.ld16(SH.lastBatchHead);
      for (let k = 0; ; k++) {
        if (i >= n) throw new InflightError("INDEX_OUT_OF_RANGE", `last-batch list entry ${k} is ${i}, not below the queue size ${n}`);
        if (inLastBatch[i] !== 0) throw new InflightError("LIST_LOOP", `last-batch list visits head ${i} twice within ${pending} entries`);
        inLastBatch[i] = 1;
        lastBatch.push(i);
        if (k + 1 === pending) break;
        i = this.ld16(this.descOff(i) + SD.next);
      }
    }
    const found: { head: number; counter: number }[] = [];
    for (let i = 0; i < n; i++) {
      const d = this.descOff(i);
      const f = this.ld8(d + SD.inflight);
      if (f > 1) throw new InflightError("BAD_INFLIGHT_FLAG", `desc[${i}].inflight is ${f}`);
      if (f === 1 && inLastBatch[i] === 0) found.push({ head: i, counter: this.ldCounter(d + SD.counter, `desc[${i}]`) });
    }
    // Validated: now finish the last batch.
    for (const i of lastBatch) {
      const d = this.descOff(i) + SD.inflight;
      if (this.ld8(d) !== 0) this.st8(d, 0);
    }
    if (pending > 0) this.st16(SH.usedIdx, ringUsedIdx);

    found.sort((a, b) => a.counter - b.counter || a.head - b.head);
    const lbh = this.ld16(SH.lastBatchHead);
    const next = found.length > 0 ? found[found.length - 1]!.counter + 1 : 0;
    this.reset(ringUsedIdx, lbh < n ? lbh : 0, next);
    for (const f of found) this.inflight[f.head] = 1;
    this.count = found.length;
    return found.map((f) => f.head);
  }

  private reset(usedIdx: number, lastBatchHead: number, counter: number): void {
    this.inflight.fill(0);
    this.inBatch.fill(0);
    this.batch = [];
    this.count = 0;
    this.usedIdx = usedIdx;
    this.lastBatchHead = lastBatchHead;
    this.counter = counter;
    this.ready = true;
  }

  private descOff(i: number): number {
    return SPLIT_INFLIGHT.headerSize + i * SPLIT_INFLIGHT.descSize;
  }
}
