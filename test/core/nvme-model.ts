/**
 * A small NVMe controller model for tests only: BAR0 registers, admin and
 * I/O queue pairs, Identify, Set Features (number of queues), Create/Delete
 * queues, Read, Write, Flush, Write Zeroes, Dataset Management and Abort on
 * one RAM namespace, with PRPs (and PRP lists) walked in the DMA memory.
 * It completes commands when their doorbell is written. Knobs make it
 * hostile: a wrong phase tag, an unknown command id, a duplicate
 * completion, identify data with absurd sizes, a fatal status, silence.
 */
import type { GuestMemory } from "../../src/core/memory/guest-memory.js";
import type { MmioRegion } from "../../src/core/pci/access.js";
import { ADMIN, CNS, CSTS_CFS, CSTS_RDY, FEATURE, ID_CTRL, ID_NS, NVM, NVME_REG } from "../../src/core/nvme/constants.js";

interface Q {
  base: number;
  entries: number;
  head: number;
  tail: number;
  phase: number;
  cq: number;
}

export interface ModelKnobs {
  /** Post completions with the wrong phase tag (the driver must not take them). */
  wrongPhase?: boolean;
  /** Complete every command a second time. */
  duplicate?: boolean;
  /** Complete with this command id instead of the right one. */
  foreignCid?: number;
  /** Report this LBADS in Identify Namespace. */
  lbads?: number;
  /** Report SGL support in Identify Controller (SGLS bits 1:0 = 01b). */
  sgl?: boolean;
  /** Do not complete commands of these opcodes on I/O queues (a stuck command). */
  silentIo?: Set<number>;
  /** CSTS.CFS after the next I/O command. */
  fatalAfterIo?: boolean;
}

export class NvmeModel implements MmioRegion {
  readonly size = 0x2000;
  readonly knobs: ModelKnobs = {};
  /** Block size 512, 4096 blocks (2 MiB). */
  readonly disk = new Uint8Array(2 << 20);
  readonly blockSize = 512;
  readonly log: string[] = [];
  /** I/O commands taken, per submission queue. */
  readonly ioBySq = new Map<number, number>();
  /** Transfers described by an SGL. */
  sglUsed = 0;
  cc = 0;
  csts = 0;
  private aqa = 0;
  private asq = 0;
  private acq = 0;
  private sqs = new Map<number, Q>();
  private cqs = new Map<number, Q>();
  private readonly mem: GuestMemory;
  private readonly mqes: number;

  constructor(mem: GuestMemory, opts: { mqes?: number } = {}) {
    this.mem = mem;
    this.mqes = opts.mqes ?? 63;
  }

  read8(): number {
    throw new Error("8-bit register read");
  }
  read16(): number {
    throw new Error("16-bit register read");
  }
  write8(): void {
    throw new Error("8-bit register write");
  }
  write16(): void {
    throw new Error("16-bit register write");
  }

  read32(off: number): number {
    switch (off) {
      case NVME_REG.CAP:
        return (this.mqes | (1 << 16) | (2 << 24)) >>> 0; // MQES, CQR, TO = 1 s
      case NVME_REG.CAP + 4:
        return 1 << 5; // DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 0
      case NVME_REG.VS:
        return 0x10400;
      case NVME_REG.CC:
        return this.cc;
      case NVME_REG.CSTS:
        return this.csts;
      default:
        return 0;
    }
  }

  write32(off: number, v: number): void {
    if (off >= NVME_REG.DOORBELLS) {
      const idx = (off - NVME_REG.DOORBELLS) / 4;
      const qid = idx >> 1;
      if ((idx & 1) === 0) this.sqTail(qid, v);
      else {
        const cq = this.cqs.get(qid);
        if (cq !== undefined) cq.head = v;
      }
      return;
    }
    switch (off) {
      case NVME_REG.CC:
        this.cc = v;
        if ((v & 1) !== 0 && (this.csts & CSTS_RDY) === 0) {
          this.sqs.set(0, { base: this.asq, entries: (this.aqa & 0xfff) + 1, head: 0, tail: 0, phase: 1, cq: 0 });
          this.cqs.set(0, { base: this.acq, entries: ((this.aqa >> 16) & 0xfff) + 1, head: 0, tail: 0, phase: 1, cq: 0 });
          this.csts = CSTS_RDY;
        } else if ((v & 1) === 0) {
          this.sqs.clear();
          this.cqs.clear();
          this.csts = (v >> 14) & 3 ? 2 << 2 : 0;
        }
        if (((v >> 14) & 3) !== 0) this.csts |= 2 << 2;
        return;
      case NVME_REG.AQA:
        this.aqa = v;
        return;
      case NVME_REG.ASQ:
        this.asq = this.asq - (this.asq % 2 ** 32) + v;
        return;
      case NVME_REG.ASQ + 4:
        this.asq = (this.asq % 2 ** 32) + v * 2 ** 32;
        return;
      case NVME_REG.ACQ:
        this.acq = this.acq - (this.acq % 2 ** 32) + v;
        return;
      case NVME_REG.ACQ + 4:
        this.acq = (this.acq % 2 ** 32) + v * 2 ** 32;
        return;
    }
  }

  private sqTail(qid: number, tail: number): void {
    const sq = this.sqs.get(qid);
    if (sq === undefined || (this.csts & CSTS_CFS) !== 0) return;
    sq.tail = tail;
    while (sq.head !== sq.tail) {
      const at = sq.base + sq.head * 64;
      sq.head = (sq.head + 1) % sq.entries;
      const cmd = new Uint8Array(64);
      this.mem.read(at, cmd);
      const v = new DataView(cmd.buffer);
      const op = v.getUint8(0);
      const cid = v.getUint16(2, true);
      if (qid !== 0 && this.knobs.silentIo?.has(op)) {
        this.log.push(`silent ${op} cid ${cid}`);
        continue;
      }
      if (qid !== 0) this.ioBySq.set(qid, (this.ioBySq.get(qid) ?? 0) + 1);
      const [sc, dw0] = qid === 0 ? this.admin(v) : this.io(v);
      this.post(sq, qid, cid, sc, dw0);
      if (this.knobs.duplicate) this.post(sq, qid, cid, sc, dw0);
      if (qid !== 0 && this.knobs.fatalAfterIo) this.csts |= CSTS_CFS;
    }
  }

  private post(sq: Q, sqid: number, cid: number, sc: number, dw0: number): void {
    const cq = this.cqs.get(sq.cq)!;
    const at = cq.base + cq.tail * 16;
    this.mem.writeU32(at, dw0);
    this.mem.writeU32(at + 4, 0);
    this.mem.writeU16(at + 8, sq.head);
    this.mem.writeU16(at + 10, sqid);
    this.mem.writeU16(at + 12, this.knobs.foreignCid ?? cid);
    const phase = this.knobs.wrongPhase ? cq.phase ^ 1 : cq.phase;
    this.mem.writeU16(at + 14, (sc << 1) | phase);
    cq.tail = (cq.tail + 1) % cq.entries;
    if (cq.tail === 0) cq.phase ^= 1;
  }

  private prpBytes(v: DataView, bytes: number): { addr: number; len: number }[] {
    const P = 4096;
    if (v.getUint8(1) >> 6 === 1) {
      // One SGL Data Block descriptor in the data pointer.
      if (v.getUint8(39) !== 0 || v.getUint32(32, true) < bytes)
        throw new Error("model: SGL descriptor not a data block covering the transfer");
      this.sglUsed++;
      return [{ addr: Number(v.getBigUint64(24, true)), len: bytes }];
    }
    const prp1 = Number(v.getBigUint64(24, true));
    const prp2 = Number(v.getBigUint64(32, true));
    const out = [{ addr: prp1, len: Math.min(bytes, P - (prp1 % P)) }];
    let left = bytes - out[0]!.len;
    if (left <= 0) return out;
    if (left <= P) return [...out, { addr: prp2, len: left }];
    for (let i = 0; left > 0; i++) {
      const page = Number(this.mem.readU64(prp2 + 8 * i));
      out.push({ addr: page, len: Math.min(P, left) });
      left -= P;
    }
    return out;
  }

  private admin(v: DataView): [number, number] {
    const op = v.getUint8(0);
    const cdw10 = v.getUint32(40, true);
    const cdw11 = v.getUint32(44, true);
    switch (op) {
      case ADMIN.IDENTIFY: {
        const page = new Uint8Array(4096);
        const d = new DataView(page.buffer);
        const cns = cdw10 & 0xff;
        if (cns === CNS.CONTROLLER) {
          d.setUint16(ID_CTRL.VID, 0x1b36, true);
          page.set(new TextEncoder().encode("MODEL-SN-1"), ID_CTRL.SN);
          page.set(new TextEncoder().encode("iovirt test model"), ID_CTRL.MN);
          page[ID_CTRL.MDTS] = 5;
          page[ID_CTRL.SQES] = 0x66;
          page[ID_CTRL.CQES] = 0x44;
          d.setUint32(ID_CTRL.NN, 1, true);
          d.setUint16(ID_CTRL.ONCS, 0x0c, true);
          if (this.knobs.sgl) d.setUint32(ID_CTRL.SGLS, 1, true);
        } else if (cns === CNS.ACTIVE_NS_LIST) d.setUint32(0, 1, true);
        else if (cns === CNS.NAMESPACE) {
          const n = this.disk.length / this.blockSize;
          d.setBigUint64(ID_NS.NSZE, BigInt(n), true);
          d.setBigUint64(ID_NS.NCAP, BigInt(n), true);
          d.setUint32(ID_NS.LBAF, (this.knobs.lbads ?? 9) << 16, true);
        } else return [0x02, 0];
        const [seg] = this.prpBytes(v, 4096);
        this.mem.write(seg!.addr, page.subarray(0, seg!.len));
        return [0, 0];
      }
      case ADMIN.SET_FEATURES:
        if ((cdw10 & 0xff) !== FEATURE.NUMBER_OF_QUEUES) return [0x02, 0];
        return [0, Math.min(cdw11 & 0xffff, 3) | (Math.min(cdw11 >>> 16, 3) << 16)];
      case ADMIN.CREATE_CQ:
        this.cqs.set(cdw10 & 0xffff, {
          base: Number(v.getBigUint64(24, true)),
          entries: (cdw10 >>> 16) + 1,
          head: 0,
          tail: 0,
          phase: 1,
          cq: 0,
        });
        return [0, 0];
      case ADMIN.CREATE_SQ: {
        const cq = cdw11 >>> 16;
        if (!this.cqs.has(cq)) return [(1 << 8) | 0x00, 0];
        this.sqs.set(cdw10 & 0xffff, {
          base: Number(v.getBigUint64(24, true)),
          entries: (cdw10 >>> 16) + 1,
          head: 0,
          tail: 0,
          phase: 1,
          cq,
        });
        return [0, 0];
      }
      case ADMIN.DELETE_SQ:
        if (!this.sqs.delete(cdw10 & 0xffff)) return [(1 << 8) | 0x01, 0];
        this.log.push(`delete sq ${cdw10 & 0xffff}`);
        return [0, 0];
      case ADMIN.DELETE_CQ:
        if (!this.cqs.delete(cdw10 & 0xffff)) return [(1 << 8) | 0x01, 0];
        this.log.push(`delete cq ${cdw10 & 0xffff}`);
        return [0, 0];
      case ADMIN.ABORT:
        this.log.push(`abort cid ${cdw10 >>> 16} sq ${cdw10 & 0xffff}`);
        return [0, 1]; // DW0 bit 0: not aborted
      default:
        return [0x01, 0];
    }
  }

  private io(v: DataView): [number, number] {
    const op = v.getUint8(0);
    const lba = Number(v.getBigUint64(40, true));
    const nlb = (v.getUint32(48, true) & 0xffff) + 1;
    const bs = this.blockSize;
    if (op === NVM.FLUSH) return [0, 0];
    if ((lba + nlb) * bs > this.disk.length && op !== NVM.DSM) return [0x80, 0];
    if (op === NVM.READ || op === NVM.WRITE) {
      let off = lba * bs;
      for (const s of this.prpBytes(v, nlb * bs)) {
        if (op === NVM.READ) this.mem.write(s.addr, this.disk.subarray(off, off + s.len));
        else this.mem.read(s.addr, this.disk.subarray(off, off + s.len));
        off += s.len;
      }
      return [0, 0];
    }
    if (op === NVM.WRITE_ZEROES) {
      this.disk.fill(0, lba * bs, (lba + nlb) * bs);
      return [0, 0];
    }
    if (op === NVM.DSM) {
      const range = Number(v.getBigUint64(24, true));
      const n = this.mem.readU32(range + 4);
      const slba = Number(this.mem.readU64(range + 8));
      this.disk.fill(0, slba * bs, (slba + n) * bs);
      return [0, 0];
    }
    return [0x01, 0];
  }
}
