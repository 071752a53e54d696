/**
 * An NVMe driver (NVM Express Base Specification 1.4, over PCIe), portable:
 * it needs the controller's BAR0 registers, memory the controller can reach
 * by DMA, and a way to wait. The node glue (src/node/nvme) provides them
 * through VFIO; tests provide a model.
 *
 * Queues are pairs: submission queue i completes into completion queue i
 * (the admin pair is 0). Commands are asynchronous: submit() returns a
 * promise that processCompletions() settles, called from an interrupt or a
 * poll loop; checkTimeouts() runs from a timer and deals with commands the
 * controller never completes (abort, then reset) and with a controller that
 * reports a fatal status (reset recovery).
 *
 * The controller is not trusted. A completion entry is used only when its
 * phase tag is the current one, its submission queue is the pair's, its
 * SQ head lies in the queue and its command id is outstanding; anything
 * else is counted (stats.badCompletions), reported (onDeviceError) and
 * skipped, and the command it may have meant times out. Identify data is
 * checked (identify.ts) before any field is used.
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import type { MmioRegion } from "../pci/access.js";
import type { DmaAllocator } from "../virtio/driver/dma.js";
import {
  ADMIN,
  CC_CSS_SHIFT,
  CC_EN,
  CC_IOCQES_SHIFT,
  CC_IOSQES_SHIFT,
  CC_MPS_SHIFT,
  CC_SHN_NORMAL,
  CNS,
  CQE_SHIFT,
  CQE_SIZE,
  CSTS_CFS,
  CSTS_RDY,
  CSTS_SHST_COMPLETE,
  CSTS_SHST_MASK,
  DSM_AD,
  FEATURE,
  IDENTIFY_BYTES,
  NVM,
  NVME_REG,
  SQE_SHIFT,
  SQE_SIZE,
} from "./constants.js";
import { NvmeControllerError, NvmeDeviceError, NvmeStatusError, NvmeTimeoutError } from "./errors.js";
import {
  encodeControllerList,
  parseController,
  parseControllerList,
  parseNamespace,
  parseNamespaceList,
  type ControllerIdentity,
  type NamespaceIdentity,
} from "./identify.js";

export interface NvmeHost {
  /** BAR0: registers and doorbells. */
  readonly regs: MmioRegion;
  /** Memory the controller reaches, at the addresses it uses (IOVAs behind an IOMMU). */
  readonly mem: GuestMemory;
  readonly dma: DmaAllocator;
  /** Resolves after `ms` milliseconds (register polls while the controller enables or resets). */
  delay(ms: number): Promise<void>;
  /** Milliseconds, monotonic. */
  now(): number;
  /** Called after a submission doorbell: a polling owner starts looking for completions. */
  submitted?(): void;
}

/** CAP, decoded (§3.1.1). */
export interface NvmeCapabilities {
  /** Most entries a queue may have (MQES + 1). */
  maxQueueEntries: number;
  /** Queues must be physically contiguous. */
  contiguousQueues: boolean;
  /** Worst-case time for CSTS.RDY to follow CC.EN, in ms (TO × 500). */
  timeoutMs: number;
  /** Bytes between doorbells (4 << DSTRD). */
  doorbellStride: number;
  /** NVM subsystem reset supported. */
  subsystemReset: boolean;
  /** Command sets supported (CSS bits: 0 NVM). */
  commandSets: number;
  /** Smallest and largest memory page sizes in bytes (2^(12 + MPSMIN/MAX)). */
  minPageSize: number;
  maxPageSize: number;
}

export function decodeCap(lo: number, hi: number): NvmeCapabilities {
  return {
    maxQueueEntries: (lo & 0xffff) + 1,
    contiguousQueues: ((lo >>> 16) & 1) !== 0,
    timeoutMs: ((lo >>> 24) & 0xff) * 500,
    doorbellStride: 4 << (hi & 0xf),
    subsystemReset: ((hi >>> 4) & 1) !== 0,
    commandSets: (hi >>> 5) & 0xff,
    minPageSize: 2 ** (12 + ((hi >>> 16) & 0xf)),
    maxPageSize: 2 ** (12 + ((hi >>> 20) & 0xf)),
  };
}

/** One submission queue entry's fields (§4.2); the command id is the driver's. */
export interface NvmeCommand {
  opcode: number;
  /** PSDT (§4.2, CDW0 bits 15:14): 0 PRPs, 1 an SGL in the data pointer. */
  psdt?: number;
  nsid?: number;
  prp1?: number;
  prp2?: number;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
}

/** A completion queue entry (§4.6), after its checks. */
export interface NvmeCompletion {
  /** Command specific result (DW0). */
  dw0: number;
  sqhd: number;
  cid: number;
}

interface Pending {
  resolve: (c: NvmeCompletion) => void;
  reject: (e: Error) => void;
  deadline: number;
  what: string;
  /** Settled already (timed out): a late completion only frees the id. */
  settled: boolean;
}

/** A submission/completion queue pair. */
class QueuePair {
  readonly qid: number;
  readonly entries: number;
  readonly sqBase: number;
  readonly cqBase: number;
  sqTail = 0;
  sqHead = 0;
  cqHead = 0;
  phase = 1;
  readonly pending = new Map<number, Pending>();
  readonly freeCids: number[];
  /** Submissions waiting for a free slot, in order. */
  readonly waiting: (() => void)[] = [];
  /** Per command id, the PRP list page it owns once it needed one. */
  readonly prpLists = new Map<number, number>();

  constructor(qid: number, entries: number, sqBase: number, cqBase: number) {
    this.qid = qid;
    this.entries = entries;
    this.sqBase = sqBase;
    this.cqBase = cqBase;
    // entries - 1 commands at most: a full queue has tail one behind head (§4.1.2).
    this.freeCids = Array.from({ length: entries - 1 }, (_, i) => entries - 2 - i);
  }

  get full(): boolean {
    return this.freeCids.length === 0 || (this.sqTail + 1) % this.entries === this.sqHead;
  }
}

export interface NvmeOptions {
  /** Data pointers for reads and writes: "auto" (default) uses an SGL where the controller supports them, "prp" always PRPs. */
  dataPointer?: "auto" | "prp";
  /** Admin queue entries (default 32, capped by CAP.MQES). */
  adminEntries?: number;
  /** Command timeout in ms (default 30000; admin commands the same). */
  commandTimeoutMs?: number;
  /**
   * Interrupt vector of each completion queue: admin queue 0; I/O queue i
   * gets vectorOf(i), or null for none (polled). Default: none.
   */
  vectorOf?: (qid: number) => number | null;
}

export interface NvmeStats {
  commands: number;
  completions: number;
  /** Completion entries the driver refused (see the file comment). */
  badCompletions: number;
  timeouts: number;
  /** Late completions of commands that had timed out. */
  late: number;
  resets: number;
}

/** Bytes each data transfer's scatter list may cover: one PRP list page of 512 entries plus PRP1's page. */
const PRP_ENTRIES = 512;

export class NvmeController {
  readonly host: NvmeHost;
  cap: NvmeCapabilities;
  /** Identify Controller data, after enable(). */
  identity: ControllerIdentity | null = null;
  /** Largest transfer of one read or write in bytes (MDTS, and one PRP list). */
  maxTransfer = 0;
  /** Reads and writes describe their buffer with an SGL data block (the controller supports SGLs and they were not refused). */
  usesSgl = false;
  /** Called for each completion entry the driver refused, and for a controller that failed. */
  onDeviceError: ((e: Error) => void) | null = null;
  /** Called after each reset recovery (reason given). */
  onReset: ((why: string) => void) | null = null;
  readonly stats: NvmeStats = { commands: 0, completions: 0, badCompletions: 0, timeouts: 0, late: 0, resets: 0 };
  private readonly opts: {
    adminEntries: number;
    commandTimeoutMs: number;
    vectorOf: ((qid: number) => number | null) | undefined;
    dataPointer: "auto" | "prp";
  };
  private readonly pageSize = 4096;
  private queues: (QueuePair | null)[] = [];
  /** I/O queue pairs asked for (re-created after a reset) and their entries. */
  private ioPlan: { count: number; entries: number } = { count: 0, entries: 0 };
  private resetting: Promise<void> | null = null;
  private failed: NvmeControllerError | null = null;
  private readonly sqe = new Uint8Array(SQE_SIZE);
  private readonly sqeView = new DataView(this.sqe.buffer);

  constructor(host: NvmeHost, opts: NvmeOptions = {}) {
    this.host = host;
    this.opts = {
      adminEntries: opts.adminEntries ?? 32,
      commandTimeoutMs: opts.commandTimeoutMs ?? 30_000,
      vectorOf: opts.vectorOf,
      dataPointer: opts.dataPointer ?? "auto",
    };
    this.cap = this.readCap();
  }

  // ---- registers ----

  private readCap(): NvmeCapabilities {
    const lo = this.host.regs.read32(NVME_REG.CAP);
    const hi = this.host.regs.read32(NVME_REG.CAP + 4);
    if (lo === 0xffffffff && hi === 0xffffffff)
      throw new NvmeControllerError("NVME_GONE", "the controller's registers read all ones: it is gone");
    const cap = decodeCap(lo, hi);
    if ((cap.commandSets & 1) === 0) throw new NvmeDeviceError("NVME_CAP", "the controller does not support the NVM command set (CAP.CSS)");
    if (cap.maxQueueEntries < 2) throw new NvmeDeviceError("NVME_CAP", `CAP.MQES allows ${cap.maxQueueEntries} entries`);
    if (cap.minPageSize > this.pageSize || cap.maxPageSize < this.pageSize) {
      throw new NvmeDeviceError("NVME_CAP", `memory page sizes ${cap.minPageSize}..${cap.maxPageSize} exclude 4 KiB`);
    }
    return cap;
  }

  csts(): number {
    return this.host.regs.read32(NVME_REG.CSTS);
  }

  private write64(off: number, value: number): void {
    this.host.regs.write32(off, value % 2 ** 32);
    this.host.regs.write32(off + 4, Math.floor(value / 2 ** 32));
  }

  private doorbell(qid: number, cq: boolean, value: number): void {
    this.host.regs.write32(NVME_REG.DOORBELLS + (2 * qid + (cq ? 1 : 0)) * this.cap.doorbellStride, value);
  }

  /** Waits until (CSTS & mask) === want, at most CAP.TO; CFS or all ones end the wait with an error. */
  private async waitCsts(mask: number, want: number, what: string): Promise<void> {
    const deadline = this.host.now() + Math.max(this.cap.timeoutMs, 500);
    for (;;) {
      const s = this.csts();
      if (s === 0xffffffff) throw new NvmeControllerError("NVME_GONE", `${what}: CSTS reads all ones: the controller is gone`);
      if ((s & mask) === want) return;
      if ((s & CSTS_CFS) !== 0 && (mask & CSTS_CFS) === 0 && want !== 0) {
        throw new NvmeControllerError("NVME_CFS", `${what}: the controller reports a fatal status (CSTS 0x${s.toString(16)})`);
      }
      if (this.host.now() > deadline) {
        throw new NvmeControllerError("NVME_TIMEOUT", `${what}: CSTS 0x${s.toString(16)} after ${this.cap.timeoutMs} ms (CAP.TO)`);
      }
      await this.host.delay(1);
    }
  }

  // ---- enable, disable, reset ----

  /**
   * Brings the controller up (§7.6.1): disabled first if it runs, the admin
   * queue programmed, CC written (NVM command set, 4 KiB pages, 64/16-byte
   * entries), CSTS.RDY awaited, Identify Controller read and checked.
   */
  async enable(): Promise<ControllerIdentity> {
    this.failed = null;
    await this.disable();
    const entries = Math.min(this.opts.adminEntries, this.cap.maxQueueEntries, 4096);
    const admin = this.allocPair(0, entries);
    this.host.regs.write32(NVME_REG.AQA, ((entries - 1) << 16) | (entries - 1));
    this.write64(NVME_REG.ASQ, admin.sqBase);
    this.write64(NVME_REG.ACQ, admin.cqBase);
    this.queues = [admin];
    const cc = (0 << CC_CSS_SHIFT) | (0 << CC_MPS_SHIFT) | (SQE_SHIFT << CC_IOSQES_SHIFT) | (CQE_SHIFT << CC_IOCQES_SHIFT) | CC_EN;
    this.host.regs.write32(NVME_REG.CC, cc);
    await this.waitCsts(CSTS_RDY, CSTS_RDY, "enable");
    const id = parseController(await this.identify(CNS.CONTROLLER, 0));
    this.identity = id;
    const mdtsBytes = id.mdts === 0 ? Infinity : 2 ** id.mdts * this.cap.minPageSize;
    this.maxTransfer = Math.min(mdtsBytes, PRP_ENTRIES * this.pageSize);
    // SGLS bits 1:0 (§5.15.2.2): 01b SGLs without alignment rules, 10b with dword-aligned data blocks.
    // The driver's buffers are dword aligned, so either will do; NVMe over PCIe keeps admin commands on PRPs.
    this.usesSgl = this.opts.dataPointer === "auto" && (id.sgls & 3) !== 0;
    return id;
  }

  /** CC.EN = 0 and wait for CSTS.RDY = 0 (§3.1.6); every queue and outstanding command is dropped. */
  async disable(): Promise<void> {
    const cc = this.host.regs.read32(NVME_REG.CC);
    if (cc !== 0xffffffff && (cc & CC_EN) !== 0) this.host.regs.write32(NVME_REG.CC, cc & ~CC_EN);
    try {
      await this.waitCsts(CSTS_RDY, 0, "disable");
    } finally {
      this.dropQueues(new NvmeControllerError("NVME_RESET", "the controller was disabled"));
    }
  }

  /** Normal shutdown (§7.6.2): I/O queues deleted, CC.SHN, wait for CSTS.SHST complete, then disable. */
  async shutdown(): Promise<void> {
    const cc = this.host.regs.read32(NVME_REG.CC);
    if (cc === 0xffffffff || (cc & CC_EN) === 0) return this.disable();
    if (this.failed === null && this.resetting === null) {
      try {
        await this.deleteIoQueues();
      } catch {
        // a controller that will not delete its queues is shut down with them
      }
    }
    this.host.regs.write32(NVME_REG.CC, cc | CC_SHN_NORMAL);
    try {
      await this.waitCsts(CSTS_SHST_MASK, CSTS_SHST_COMPLETE, "shutdown");
    } finally {
      this.host.regs.write32(NVME_REG.CC, 0);
      this.dropQueues(new NvmeControllerError("NVME_RESET", "the controller was shut down"));
    }
  }

  /**
   * Reset recovery: every outstanding command fails with NVME_RESET, the
   * controller is disabled and enabled again and gets the I/O queues it had.
   * Concurrent callers share one reset.
   */
  reset(why: string): Promise<void> {
    this.resetting ??= (async () => {
      this.stats.resets++;
      try {
        this.dropQueues(new NvmeControllerError("NVME_RESET", `controller reset: ${why}`));
        await this.enable();
        if (this.ioPlan.count > 0) await this.createIoQueues(this.ioPlan.count, this.ioPlan.entries);
        this.onReset?.(why);
      } catch (e) {
        this.failed = new NvmeControllerError("NVME_FAILED", `reset after "${why}" failed: ${e instanceof Error ? e.message : String(e)}`);
        this.onDeviceError?.(this.failed);
        throw this.failed;
      } finally {
        this.resetting = null;
      }
    })();
    return this.resetting;
  }

  private dropQueues(err: Error): void {
    for (const q of this.queues) {
      if (q === null) continue;
      for (const p of q.pending.values()) if (!p.settled) p.reject(err);
      q.pending.clear();
      for (const w of q.waiting) w();
      q.waiting.length = 0;
      this.releasePair(q);
    }
    this.queues = [];
  }

  // ---- queue memory ----

  private allocPair(qid: number, entries: number): QueuePair {
    const sqBytes = Math.ceil((entries * SQE_SIZE) / this.pageSize) * this.pageSize;
    const cqBytes = Math.ceil((entries * CQE_SIZE) / this.pageSize) * this.pageSize;
    const sq = this.host.dma.alloc(sqBytes, this.pageSize);
    let cq: number;
    try {
      cq = this.host.dma.alloc(cqBytes, this.pageSize);
    } catch (e) {
      this.host.dma.release(sq);
      throw e;
    }
    this.host.mem.fill(sq, sqBytes, 0);
    this.host.mem.fill(cq, cqBytes, 0);
    return new QueuePair(qid, entries, sq, cq);
  }

  private releasePair(q: QueuePair): void {
    this.host.dma.release(q.sqBase);
    this.host.dma.release(q.cqBase);
    for (const page of q.prpLists.values()) this.host.dma.release(page);
    q.prpLists.clear();
  }

  // ---- submission and completion ----

  /**
   * Submits `cmd` on queue pair `qid` and resolves with its completion (or
   * rejects with NvmeStatusError, NvmeTimeoutError, NvmeControllerError).
   * Waits for a free slot when the queue is full. `prepare` gets the command
   * id before the entry is written (to set up a PRP list it owns).
   */
  async submit(qid: number, cmd: NvmeCommand, what: string, prepare?: (cid: number) => NvmeCommand): Promise<NvmeCompletion> {
    if (this.failed !== null) throw this.failed;
    if (this.resetting !== null && qid !== 0) await this.resetting;
    let q = this.queue(qid);
    while (q.full) {
      await new Promise<void>((r) => q.waiting.push(r));
      q = this.queue(qid); // the queue may have been re-created by a reset
    }
    const cid = q.freeCids.pop()!;
    const full = prepare?.(cid) ?? cmd;
    this.writeSqe(q, cid, full);
    this.stats.commands++;
    return new Promise<NvmeCompletion>((resolve, reject) => {
      q.pending.set(cid, { resolve, reject, deadline: this.host.now() + this.opts.commandTimeoutMs, what, settled: false });
      q.sqTail = (q.sqTail + 1) % q.entries;
      this.doorbell(qid, false, q.sqTail);
      this.host.submitted?.();
    });
  }

  private queue(qid: number): QueuePair {
    const q = this.queues[qid];
    if (q === null || q === undefined) {
      throw new NvmeControllerError("NVME_NO_QUEUE", qid === 0 ? "the controller is not enabled" : `I/O queue ${qid} does not exist`);
    }
    return q;
  }

  private writeSqe(q: QueuePair, cid: number, c: NvmeCommand): void {
    const v = this.sqeView;
    this.sqe.fill(0);
    v.setUint8(0, c.opcode);
    v.setUint8(1, (c.psdt ?? 0) << 6);
    v.setUint16(2, cid, true);
    v.setUint32(4, c.nsid ?? 0, true);
    setU64(v, 24, c.prp1 ?? 0);
    setU64(v, 32, c.prp2 ?? 0);
    v.setUint32(40, c.cdw10 ?? 0, true);
    v.setUint32(44, c.cdw11 ?? 0, true);
    v.setUint32(48, c.cdw12 ?? 0, true);
    v.setUint32(52, c.cdw13 ?? 0, true);
    v.setUint32(56, c.cdw14 ?? 0, true);
    v.setUint32(60, c.cdw15 ?? 0, true);
    this.host.mem.write(q.sqBase + q.sqTail * SQE_SIZE, this.sqe);
  }

  /**
   * Takes every new completion entry of every queue (or of `qid`), checks
   * it and settles its command; rings the CQ head doorbells. The interrupt
   * and poll entry point. Returns the entries taken.
   */
  processCompletions(qid?: number): number {
    let n = 0;
    const list = qid === undefined ? this.queues : [this.queues[qid] ?? null];
    for (const q of list) if (q !== null) n += this.drain(q);
    return n;
  }

  private drain(q: QueuePair): number {
    const mem = this.host.mem;
    let taken = 0;
    // At most one lap per call: a controller that keeps writing entries cannot hold the driver here.
    while (taken < q.entries) {
      const at = q.cqBase + q.cqHead * CQE_SIZE;
      const status = mem.readU16(at + 14);
      if ((status & 1) !== q.phase) break;
      const dw0 = mem.readU32(at);
      const sqhd = mem.readU16(at + 8);
      const sqid = mem.readU16(at + 10);
      const cid = mem.readU16(at + 12);
      taken++;
      q.cqHead++;
      if (q.cqHead === q.entries) {
        q.cqHead = 0;
        q.phase ^= 1;
      }
      this.complete(q, { dw0, sqhd, sqid, cid, status });
    }
    if (taken > 0) this.doorbell(q.qid, true, q.cqHead);
    this.wake(q);
    return taken;
  }

  private complete(q: QueuePair, e: { dw0: number; sqhd: number; sqid: number; cid: number; status: number }): void {
    if (e.sqid !== q.qid || e.sqhd >= q.entries) {
      this.refuse(
        new NvmeDeviceError(
          "NVME_BAD_CQE",
          `CQ ${q.qid}: an entry names SQ ${e.sqid} with head ${e.sqhd} (the pair's SQ ${q.qid} has ${q.entries} entries)`,
        ),
      );
      return;
    }
    const p = q.pending.get(e.cid);
    if (p === undefined) {
      this.refuse(
        new NvmeDeviceError(
          "NVME_UNKNOWN_CID",
          `CQ ${q.qid}: a completion for command id ${e.cid}, which is not outstanding (unknown or completed twice)`,
        ),
      );
      return;
    }
    q.sqHead = e.sqhd;
    q.pending.delete(e.cid);
    q.freeCids.push(e.cid);
    this.stats.completions++;
    if (p.settled) {
      this.stats.late++;
      return;
    }
    p.settled = true;
    const sc = (e.status >> 1) & 0xff;
    const sct = (e.status >> 9) & 7;
    if (sc === 0 && sct === 0) p.resolve({ dw0: e.dw0, sqhd: e.sqhd, cid: e.cid });
    else p.reject(new NvmeStatusError(p.what, sct, sc, (e.status & 0x8000) !== 0));
  }

  private refuse(e: NvmeDeviceError): void {
    this.stats.badCompletions++;
    this.onDeviceError?.(e);
  }

  private wake(q: QueuePair): void {
    while (q.waiting.length > 0 && !q.full) q.waiting.shift()!();
  }

  /**
   * The timer's work: a controller with a fatal status (or gone) is reset;
   * a command past its deadline fails with NVME_TIMEOUT and its id stays
   * reserved until the controller completes it; an I/O command is also
   * aborted (Abort, §5.1), an admin command that timed out resets the
   * controller. Returns the commands that timed out now.
   */
  checkTimeouts(): number {
    if (this.resetting !== null || this.queues.length === 0) return 0;
    const s = this.csts();
    if (s === 0xffffffff || (s & CSTS_CFS) !== 0) {
      const why = s === 0xffffffff ? "the controller's registers read all ones" : "controller fatal status (CSTS.CFS)";
      this.onDeviceError?.(new NvmeControllerError(s === 0xffffffff ? "NVME_GONE" : "NVME_CFS", why));
      this.reset(why).catch(() => {});
      return 0;
    }
    const now = this.host.now();
    let n = 0;
    let adminStuck = false;
    for (const q of this.queues) {
      if (q === null) continue;
      for (const [cid, p] of q.pending) {
        if (p.settled || now < p.deadline) continue;
        p.settled = true;
        n++;
        this.stats.timeouts++;
        p.reject(new NvmeTimeoutError(`${p.what}: no completion within ${this.opts.commandTimeoutMs} ms`));
        if (q.qid === 0) adminStuck = true;
        else this.abort(q.qid, cid);
      }
    }
    if (adminStuck) this.reset("an admin command timed out").catch(() => {});
    return n;
  }

  private abort(sqid: number, cid: number): void {
    this.submit(0, { opcode: ADMIN.ABORT, cdw10: (cid << 16) | sqid }, `abort of command ${cid} on SQ ${sqid}`).catch(() => {
      // A failed abort leaves the id reserved; the next reset frees it.
    });
  }

  /** Commands submitted and not completed. */
  get outstanding(): number {
    let n = 0;
    for (const q of this.queues) if (q !== null) n += q.pending.size;
    return n;
  }

  // ---- admin commands ----

  /** Identify (§5.15) into a fresh page; returns a copy of the 4 KiB. */
  async identify(cns: number, nsid: number, cntid = 0): Promise<Uint8Array> {
    const buf = this.host.dma.alloc(IDENTIFY_BYTES, this.pageSize);
    try {
      this.host.mem.fill(buf, IDENTIFY_BYTES, 0);
      await this.submit(0, { opcode: ADMIN.IDENTIFY, nsid, prp1: buf, cdw10: (cntid << 16) | cns }, `identify CNS 0x${cns.toString(16)}`);
      const out = new Uint8Array(IDENTIFY_BYTES);
      this.host.mem.read(buf, out);
      return out;
    } finally {
      this.host.dma.release(buf);
    }
  }

  async activeNamespaces(): Promise<number[]> {
    return parseNamespaceList(await this.identify(CNS.ACTIVE_NS_LIST, 0), this.identity?.nn ?? 0xfffffffe);
  }

  async namespace(nsid: number): Promise<NamespaceIdentity> {
    return parseNamespace(nsid, await this.identify(CNS.NAMESPACE, nsid));
  }

  /** Set Features, Number of Queues (§5.21.1.7): asks for `n` pairs, returns how many the controller allocated. */
  async setQueueCount(n: number): Promise<number> {
    if (!(Number.isInteger(n) && n >= 1 && n <= 65535)) throw new RangeError(`${n} I/O queues`);
    const c = await this.submit(
      0,
      { opcode: ADMIN.SET_FEATURES, cdw10: FEATURE.NUMBER_OF_QUEUES, cdw11: ((n - 1) << 16) | (n - 1) },
      "set number of queues",
    );
    const sq = (c.dw0 & 0xffff) + 1;
    const cq = (c.dw0 >>> 16) + 1;
    return Math.min(sq, cq);
  }

  /**
   * Creates I/O queue pairs 1..count of `entries` each (capped by CAP.MQES):
   * Set Features for the count, then Create I/O CQ and SQ for each (§5.4,
   * §5.5). Returns how many exist.
   */
  async createIoQueues(count: number, entries = 256): Promise<number> {
    const granted = Math.min(count, await this.setQueueCount(count));
    const size = Math.min(entries, this.cap.maxQueueEntries);
    this.ioPlan = { count: granted, entries: size };
    for (let qid = 1; qid <= granted; qid++) {
      const q = this.allocPair(qid, size);
      try {
        const vector = this.opts.vectorOf?.(qid) ?? null;
        // CDW11: PC (contiguous), IEN (interrupts enabled), IV.
        const cqFlags = 1 | (vector === null ? 0 : 2 | (vector << 16));
        await this.submit(
          0,
          { opcode: ADMIN.CREATE_CQ, prp1: q.cqBase, cdw10: ((size - 1) << 16) | qid, cdw11: cqFlags >>> 0 },
          `create I/O CQ ${qid}`,
        );
        await this.submit(
          0,
          { opcode: ADMIN.CREATE_SQ, prp1: q.sqBase, cdw10: ((size - 1) << 16) | qid, cdw11: (qid << 16) | 1 },
          `create I/O SQ ${qid}`,
        );
      } catch (e) {
        this.releasePair(q);
        throw e;
      }
      this.queues[qid] = q;
    }
    return granted;
  }

  /**
   * Deletes every I/O queue pair, SQ before its CQ (Delete I/O SQ/CQ, §5.6,
   * §5.7); commands still on a deleted SQ complete as aborted. The memory
   * goes back to the DMA allocator.
   */
  async deleteIoQueues(): Promise<void> {
    for (let qid = this.queues.length - 1; qid >= 1; qid--) {
      const q = this.queues[qid];
      if (q === null || q === undefined) continue;
      await this.submit(0, { opcode: ADMIN.DELETE_SQ, cdw10: qid }, `delete I/O SQ ${qid}`);
      this.processCompletions(qid); // what the deletion aborted
      await this.submit(0, { opcode: ADMIN.DELETE_CQ, cdw10: qid }, `delete I/O CQ ${qid}`);
      for (const p of q.pending.values()) if (!p.settled) p.reject(new NvmeControllerError("NVME_RESET", `I/O queue ${qid} was deleted`));
      q.pending.clear();
      this.releasePair(q);
      this.queues[qid] = null;
    }
    this.queues.length = Math.min(this.queues.length, 1);
    this.ioPlan = { count: 0, entries: 0 };
  }

  /** I/O queue pairs in use. */
  get ioQueues(): number {
    return Math.max(0, this.queues.length - 1);
  }

  // ---- NVM commands ----

  /** Reads `blocks` logical blocks at `lba` of namespace `nsid` into device memory at `buf` (bytes = blocks × block size). */
  read(qid: number, nsid: number, lba: number, blocks: number, buf: number, bytes: number): Promise<NvmeCompletion> {
    return this.rw(NVM.READ, qid, nsid, lba, blocks, buf, bytes);
  }

  write(qid: number, nsid: number, lba: number, blocks: number, buf: number, bytes: number): Promise<NvmeCompletion> {
    return this.rw(NVM.WRITE, qid, nsid, lba, blocks, buf, bytes);
  }

  flush(qid: number, nsid: number): Promise<NvmeCompletion> {
    return this.submit(qid, { opcode: NVM.FLUSH, nsid }, `flush of namespace ${nsid}`);
  }

  writeZeroes(qid: number, nsid: number, lba: number, blocks: number): Promise<NvmeCompletion> {
    checkRange(lba, blocks);
    return this.submit(
      qid,
      { opcode: NVM.WRITE_ZEROES, nsid, ...lbaFields(lba), cdw12: blocks - 1 },
      `write zeroes at LBA ${lba}+${blocks}`,
    );
  }

  /** Dataset Management, deallocate (NVM Command Set §3.2.3): one range. */
  async deallocate(qid: number, nsid: number, lba: number, blocks: number): Promise<NvmeCompletion> {
    if (!(Number.isSafeInteger(lba) && lba >= 0 && Number.isInteger(blocks) && blocks >= 1 && blocks <= 0xffffffff)) {
      throw new RangeError(`deallocate LBA ${lba}+${blocks}`);
    }
    const range = this.host.dma.alloc(16, 16);
    try {
      this.host.mem.writeU32(range, 0);
      this.host.mem.writeU32(range + 4, blocks);
      this.host.mem.writeU32(range + 8, lba % 2 ** 32);
      this.host.mem.writeU32(range + 12, Math.floor(lba / 2 ** 32));
      return await this.submit(qid, { opcode: NVM.DSM, nsid, prp1: range, cdw10: 0, cdw11: DSM_AD }, `deallocate LBA ${lba}+${blocks}`);
    } finally {
      this.host.dma.release(range);
    }
  }

  private rw(opcode: number, qid: number, nsid: number, lba: number, blocks: number, buf: number, bytes: number): Promise<NvmeCompletion> {
    checkRange(lba, blocks);
    if (!(Number.isInteger(bytes) && bytes > 0 && bytes <= this.maxTransfer)) {
      throw new RangeError(`a transfer of ${bytes} bytes (at most ${this.maxTransfer} per command)`);
    }
    if (buf % 4 !== 0) throw new RangeError(`data buffer 0x${buf.toString(16)} is not dword aligned (§4.3)`);
    const what = `${opcode === NVM.READ ? "read" : "write"} of LBA ${lba}+${blocks}`;
    return this.submit(qid, { opcode }, what, (cid) => ({
      opcode,
      nsid,
      // An SGL Data Block descriptor in the data pointer (§4.4): address, length, type 0 subtype 0 in byte 15.
      ...(this.usesSgl ? { psdt: 1, prp1: buf, prp2: bytes } : this.prps(qid, cid, buf, bytes)),
      ...lbaFields(lba),
      cdw12: blocks - 1,
    }));
  }

  /**
   * PRP entries for `bytes` at `buf` (§4.3): PRP1 the first (possibly
   * offset) page; PRP2 the second page, or a PRP list (in a page the
   * command id owns) of every page after the first.
   */
  private prps(qid: number, cid: number, buf: number, bytes: number): { prp1: number; prp2: number } {
    const P = this.pageSize;
    const first = P - (buf % P);
    if (bytes <= first) return { prp1: buf, prp2: 0 };
    const rest = bytes - first;
    const next = buf + first;
    if (rest <= P) return { prp1: buf, prp2: next };
    const pages = Math.ceil(rest / P);
    const q = this.queue(qid);
    let list = q.prpLists.get(cid);
    if (list === undefined) {
      list = this.host.dma.alloc(P, P);
      q.prpLists.set(cid, list);
    }
    for (let i = 0; i < pages; i++) {
      const a = next + i * P;
      this.host.mem.writeU32(list + 8 * i, a % 2 ** 32);
      this.host.mem.writeU32(list + 8 * i + 4, Math.floor(a / 2 ** 32));
    }
    return { prp1: buf, prp2: list };
  }

  // ---- virtualization management (PF side) ----

  async primaryCapabilities(): Promise<Uint8Array> {
    return this.identify(CNS.PRIMARY_CTRL_CAPS, 0);
  }

  async secondaryControllers(): Promise<Uint8Array> {
    return this.identify(CNS.SECONDARY_CTRL_LIST, 0);
  }

  /**
   * Virtualization Management (§5.22): action `act` on resource type `rt`
   * for controller `cntlid`, `count` resources. Returns DW0 (resources
   * allocated, for assignments).
   */
  async virtualizationManagement(act: number, rt: number, cntlid: number, count: number): Promise<number> {
    const c = await this.submit(
      0,
      { opcode: ADMIN.VIRT_MGMT, cdw10: ((cntlid & 0xffff) << 16) | ((rt & 7) << 8) | (act & 0xf), cdw11: count & 0xffff },
      `virtualization management action ${act} on controller ${cntlid}`,
    );
    return c.dw0;
  }

  /** Namespace Attachment (§5.20): attaches (or detaches) `nsid` to the controllers listed. */
  async attachNamespace(nsid: number, controllers: readonly number[], detach = false): Promise<void> {
    const buf = this.host.dma.alloc(IDENTIFY_BYTES, this.pageSize);
    try {
      this.host.mem.write(buf, encodeControllerList(controllers));
      await this.submit(
        0,
        { opcode: ADMIN.NS_ATTACHMENT, nsid, prp1: buf, cdw10: detach ? 1 : 0 },
        `${detach ? "detach" : "attach"} namespace ${nsid}`,
      );
    } finally {
      this.host.dma.release(buf);
    }
  }

  /** Controllers namespace `nsid` is attached to (Identify CNS 12h). */
  async namespaceControllers(nsid: number): Promise<number[]> {
    return parseControllerList(await this.identify(CNS.NS_CONTROLLER_LIST, nsid));
  }
}

function setU64(v: DataView, at: number, value: number): void {
  v.setUint32(at, value % 2 ** 32, true);
  v.setUint32(at + 4, Math.floor(value / 2 ** 32), true);
}

function checkRange(lba: number, blocks: number): void {
  if (!(Number.isSafeInteger(lba) && lba >= 0 && Number.isInteger(blocks) && blocks >= 1 && blocks <= 0x10000)) {
    throw new RangeError(`LBA ${lba}+${blocks}: 1..65536 blocks at a non-negative LBA`);
  }
}

/** Starting LBA in CDW10 (low) and CDW11 (high). */
function lbaFields(lba: number): { cdw10: number; cdw11: number } {
  return { cdw10: lba % 2 ** 32, cdw11: Math.floor(lba / 2 ** 32) };
}
