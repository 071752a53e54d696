import { bit, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1 } from "../../src/core/virtio/lifecycle/features.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import type { RingLayout } from "../../src/core/virtio/queue/index.js";
import {
  encodeConfig,
  encodeInflight,
  encodeMemTable,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  type MemRegionDesc,
} from "../../src/core/vhost-user/codec.js";
import { inflightMmapSize } from "../../src/core/vhost-user/inflight/index.js";
import { FLAG_NEED_REPLY, FLAG_REPLY, PF, Req, VERSION, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { Rng } from "../rng.js";
import type { FdSpec, GuestFill, Step, VuCase } from "./case.js";

/**
 * vhost-user case generator: a QEMU-like front end (vhost_dev_init and
 * vhost_dev_start for a vhost-user-blk device), then some life at run time,
 * then the strategy's damage.
 */
export const VU_STRATEGIES = [
  "valid", // the init sequence and kicks: the back end must serve and release everything
  "mutated", // bytes flipped, payloads cut or grown, absurd numbers, wrong/extra/missing fds
  "lifecycle", // many runtime changes: ring stop/restart, remap while running, reset, re-init, a shrunk memfd
  "reordered", // valid messages in a wrong order, duplicated or dropped
  "random", // random requests with random payloads and fds
] as const;

/** What the blk device offers (plus PROTOCOL_FEATURES), as GET_FEATURES would say. */
const OFFERED = new BlkDevice({ port: new RamDisk(512) }).offeredFeatures | bit(VHOST_USER_F_PROTOCOL_FEATURES);
/** Protocol features QEMU asks a blk back end for. */
const WANTED_PF = [PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.BACKEND_REQ, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.STATUS, PF.INFLIGHT_SHMFD];
/** Guest addresses of the two RAM regions: below and above 4 GiB, like a q35 guest. */
const RAM = [0, 0x1_0000_0000];
const RAM_BYTES = 0x8000;
/** Guest address of ring k, relative to its region: rings of up to 128 entries fit in RING_STRIDE. */
const RING_BASE = 0x800;
const RING_STRIDE = 0x1000;
const BLK_CONFIG_BYTES = 60;

export function generateVuCase(seed: number): VuCase {
  const r = new Rng(seed);
  const strategy = VU_STRATEGIES[seed % VU_STRATEGIES.length]!;
  const queues = r.chance(0.7) ? 1 : 2;
  const b = new FrontEnd(r, queues);
  if (strategy === "random") b.randomMessages(4 + r.int(24));
  else {
    b.init();
    b.life(strategy === "lifecycle" ? 4 + r.int(8) : 1 + r.int(3));
  }
  if (strategy === "mutated") for (let k = 1 + r.int(4); k > 0; k--) mutate(r, b.steps);
  if (strategy === "reordered") for (let k = 1 + r.int(3); k > 0; k--) reorder(r, b.steps);
  return { strategy, seed, queues, steps: b.steps };
}

/** The front end's plan: what it negotiated and where guest RAM and the rings are. */
class FrontEnd {
  readonly steps: Step[] = [];
  private pf = 0n;
  private features = 0n;
  private regions: MemRegionDesc[] = [];
  private ringRegion = 0;
  private readonly ringSize: number;
  private readonly userBase: number;

  constructor(
    private readonly r: Rng,
    private readonly queues: number,
  ) {
    this.ringSize = r.pick([4, 8, 16, 64, 128]);
    this.userBase = 0x7f00_0000_0000 + r.int(0x1000) * 0x10_0000;
  }

  private has(pf: number): boolean {
    return (this.pf & bit(pf)) !== 0n;
  }

  private get layout(): RingLayout {
    return (this.features & bit(VIRTIO_F_RING_PACKED)) !== 0n ? "packed" : "split";
  }

  /** A message; set requests ask for an ack when REPLY_ACK was negotiated, as QEMU does. */
  private msg(request: number, payload: Uint8Array = new Uint8Array(0), fds: FdSpec[] = []): void {
    const ack = this.has(PF.REPLY_ACK) && this.r.chance(0.8) ? FLAG_NEED_REPLY : 0;
    this.steps.push({ kind: "msg", request, flags: VERSION | ack, payload, fds });
  }

  private ringMsg(request: number, index: number, num: number): void {
    this.msg(request, encodeVringState({ index, num }));
  }

  /** vhost_dev_init, then vhost_user_blk_start: features, memory, in-flight area and every ring. */
  init(): void {
    const r = this.r;
    this.msg(Req.GET_FEATURES);
    this.msg(Req.GET_PROTOCOL_FEATURES);
    for (const p of WANTED_PF) if (r.chance(0.8)) this.pf |= bit(p);
    if (r.chance(0.05)) this.pf |= bit(r.int(64));
    this.msg(Req.SET_PROTOCOL_FEATURES, encodeU64(this.pf));
    if (this.has(PF.MQ)) this.msg(Req.GET_QUEUE_NUM);
    if (this.has(PF.CONFIGURE_MEM_SLOTS)) this.msg(Req.GET_MAX_MEM_SLOTS);
    if (this.has(PF.BACKEND_REQ)) this.msg(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [{ kind: r.chance(0.95) ? "socket" : "pipe" }]);
    this.msg(Req.SET_OWNER);
    if (this.has(PF.CONFIG)) this.getConfig();
    this.features = OFFERED & ~(r.chance(0.5) ? bit(r.int(64)) : 0n) & ~(r.chance(0.5) ? bit(VIRTIO_F_RING_PACKED) : 0n);
    if (r.chance(0.95)) this.features |= bit(VIRTIO_F_VERSION_1);
    if (this.has(PF.INFLIGHT_SHMFD)) this.inflight();
    this.msg(Req.SET_FEATURES, encodeU64(this.features));
    this.memory();
    for (let q = 0; q < this.queues; q++) this.startRing(q, 0);
    if (this.has(PF.STATUS)) this.msg(Req.SET_STATUS, encodeU64(0x0f));
  }

  private getConfig(): void {
    this.msg(Req.GET_CONFIG, encodeConfig({ offset: 0, size: BLK_CONFIG_BYTES, flags: 0, data: new Uint8Array(BLK_CONFIG_BYTES) }));
  }

  private inflight(): void {
    const n = this.queues;
    const size = this.ringSize;
    this.msg(Req.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: n, queueSize: size }));
    // QEMU hands back the area it was given (a dup of the fd); here, a memfd of the size the reply names.
    const mmapSize = inflightMmapSize("packed", n, size);
    this.msg(Req.SET_INFLIGHT_FD, encodeInflight({ mmapSize, mmapOffset: 0, numQueues: n, queueSize: size }), [
      { kind: "memfd", size: mmapSize },
    ]);
  }

  /** One or two RAM regions (the second above 4 GiB); the rings and requests live in one of them. */
  private memory(): void {
    const r = this.r;
    const count = r.chance(0.5) ? 1 : 2;
    this.ringRegion = r.int(count);
    this.regions = RAM.slice(0, count).map((gpa, i) => ({
      guestAddr: gpa,
      size: RAM_BYTES,
      userAddr: this.userBase + i * 0x10_0000,
      mmapOffset: r.chance(0.7) ? 0 : 0x1000,
    }));
    const fds = this.regions.map((m, i) => this.ramFd(m, i === this.ringRegion));
    if (this.has(PF.CONFIGURE_MEM_SLOTS) && r.chance(0.5)) {
      this.regions.forEach((m, i) => this.msg(Req.ADD_MEM_REG, encodeSingleRegion(m), [fds[i]!]));
    } else this.msg(Req.SET_MEM_TABLE, encodeMemTable(this.regions), fds);
  }

  private ramFd(m: MemRegionDesc, withRings: boolean): FdSpec {
    const fd: FdSpec = { kind: "memfd", size: m.mmapOffset + m.size };
    if (!withRings) return fd;
    const rings = Array.from({ length: this.queues }, (_, k) => ({ size: this.ringSize, gpa: m.guestAddr + RING_BASE + k * RING_STRIDE }));
    const guest: GuestFill = {
      gpa: m.guestAddr,
      fileOffset: m.mmapOffset,
      layout: this.layout,
      rings,
      requests: 1 + this.r.int(4),
      seed: this.r.u32(),
    };
    return { ...fd, guest };
  }

  /** SET_VRING_NUM/BASE/ADDR, KICK (which starts the ring), CALL, maybe ERR, ENABLE. */
  private startRing(q: number, base: number): void {
    const r = this.r;
    const m = this.regions[this.ringRegion]!;
    const { state } = layoutQueue(this.layout, this.ringSize, m.guestAddr + RING_BASE + q * RING_STRIDE);
    const user = (gpa: number): number => m.userAddr + (gpa - m.guestAddr);
    this.ringMsg(Req.SET_VRING_NUM, q, this.ringSize);
    this.ringMsg(Req.SET_VRING_BASE, q, base);
    const addr = { index: q, flags: 0, desc: user(state.descTable), used: user(state.deviceArea), avail: user(state.driverArea), log: 0 };
    this.msg(Req.SET_VRING_ADDR, encodeVringAddr(addr));
    this.msg(Req.SET_VRING_KICK, encodeU64(q), [this.eventFd()]);
    this.msg(Req.SET_VRING_CALL, encodeU64(q), [this.eventFd()]);
    if (r.chance(0.3)) this.msg(Req.SET_VRING_ERR, encodeU64(q), [this.eventFd()]);
    if ((this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n) this.ringMsg(Req.SET_VRING_ENABLE, q, 1);
  }

  /** An eventfd, or now and then the wrong kind of fd where one belongs. */
  private eventFd(): FdSpec {
    if (this.r.chance(0.95)) return { kind: "eventfd" };
    return this.r.pick<FdSpec>([{ kind: "pipe" }, { kind: "socket" }, { kind: "memfd", size: 4096 }]);
  }

  /** Run time: kicks, and what QEMU does while a guest runs, stops, migrates or resets. */
  life(rounds: number): void {
    const r = this.r;
    for (let i = 0; i < rounds; i++) {
      const q = r.int(this.queues);
      switch (r.int(13)) {
        case 0:
          this.getConfig();
          break;
        case 1:
          this.msg(Req.SET_CONFIG, encodeConfig({ offset: r.int(BLK_CONFIG_BYTES), size: 1, flags: 0, data: Uint8Array.of(r.int(256)) }));
          break;
        case 2:
          this.msg(Req.GET_STATUS);
          break;
        case 3:
          // Stop (as for migration), then start again from a base.
          this.ringMsg(Req.GET_VRING_BASE, q, 0);
          this.startRing(q, r.chance(0.5) ? 0 : r.int(0x10000));
          break;
        case 4:
          this.msg(Req.RESET_DEVICE);
          this.msg(Req.SET_FEATURES, encodeU64(this.features));
          for (let k = 0; k < this.queues; k++) this.startRing(k, 0);
          break;
        case 5:
          this.memory(); // a new table while rings run: they restart on the new memory
          break;
        case 6:
          this.hotplug();
          break;
        case 7:
          this.msg(Req.SET_VRING_CALL, encodeU64(q), [this.eventFd()]);
          break;
        case 8:
          this.ringMsg(Req.SET_VRING_ENABLE, q, r.int(2));
          break;
        case 9:
          // The front end truncates guest RAM (or the in-flight area) under the back end.
          this.steps.push({ kind: "shrink", fd: r.int(4) }, { kind: "kick", watch: r.int(4) });
          break;
        default:
          this.steps.push({ kind: "kick", watch: r.int(4) });
      }
    }
    this.steps.push({ kind: "kick", watch: r.int(4) });
  }

  /** ADD_MEM_REG of a DIMM, sometimes removed again (REM_MEM_REG). */
  private hotplug(): void {
    const m: MemRegionDesc = { guestAddr: 0x2_0000_0000, size: 0x4000, userAddr: this.userBase + 0x80_0000, mmapOffset: 0 };
    this.msg(Req.ADD_MEM_REG, encodeSingleRegion(m), [{ kind: "memfd", size: m.size }]);
    if (this.r.chance(0.5)) this.msg(Req.REM_MEM_REG, encodeSingleRegion(m));
  }

  randomMessages(n: number): void {
    const r = this.r;
    for (let i = 0; i < n; i++) {
      if (r.chance(0.15)) {
        this.steps.push({ kind: "kick", watch: r.int(4) });
        continue;
      }
      const payload = randomBytes(r, r.pick([0, 8, 8, 12, 20, 24, 40, 40, 72, 264, r.int(300)]));
      const fds = Array.from({ length: r.chance(0.6) ? 0 : 1 + r.int(2) }, () => randomFd(r));
      this.steps.push({ kind: "msg", request: 1 + r.int(41), flags: VERSION | (r.chance(0.5) ? FLAG_NEED_REPLY : 0), payload, fds });
    }
  }
}

function randomBytes(r: Rng, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = r.chance(0.5) ? 0 : r.int(256);
  return b;
}

function randomFd(r: Rng): FdSpec {
  switch (r.int(4)) {
    case 0:
      return { kind: "memfd", size: r.pick([0, 16, 4096, 0x1_0000, 0x10_0000]) };
    case 1:
      return { kind: "eventfd" };
    case 2:
      return { kind: "socket" };
    default:
      return { kind: "pipe" };
  }
}

/** Numbers that break size and address arithmetic. */
const ABSURD = [0, 1, 0xfff, 0x1000, 0xffff_ffff, 0x1_0000_0000, 2 ** 53 - 1, 2 ** 53, 2 ** 63, 2 ** 64 - 1, 0x7fff_ffff_f000];

/** One random change to one message (a copy: steps may share payloads after a duplication). */
function mutate(r: Rng, steps: Step[]): void {
  const i = r.int(steps.length);
  const s = steps[i];
  if (s === undefined || s.kind !== "msg") return;
  const m = { ...s, payload: s.payload.slice(), fds: [...s.fds] };
  const p = m.payload;
  switch (r.int(11)) {
    case 0:
      if (p.length > 0) p[r.int(p.length)]! ^= 1 << r.int(8);
      break;
    case 1:
      if (p.length >= 8) new DataView(p.buffer).setBigUint64(8 * r.int(p.length >> 3), BigInt(r.pick(ABSURD)), true);
      break;
    case 2:
      if (p.length >= 4) new DataView(p.buffer).setUint32(4 * r.int(p.length >> 2), r.u32(), true);
      break;
    case 3:
      m.payload = p.subarray(0, r.int(p.length + 1));
      break;
    case 4:
      m.payload = Uint8Array.from([...p, ...randomBytes(r, 1 + r.int(64))]);
      break;
    case 5:
      m.request = r.chance(0.8) ? r.int(45) : r.u32();
      break;
    case 6:
      m.flags ^= r.pick([FLAG_REPLY, FLAG_NEED_REPLY, 1, 2, 1 << r.int(32)]);
      break;
    case 7:
      m.fds.splice(r.int(m.fds.length + 1), 1);
      break;
    case 8:
      m.fds.push(randomFd(r));
      break;
    case 9:
      if (m.fds.length > 0) m.fds[r.int(m.fds.length)] = randomFd(r);
      break;
    default:
      steps.push({ kind: "kick", watch: r.int(4) });
  }
  steps[i] = m;
}

/** Moves, duplicates or drops one step. */
function reorder(r: Rng, steps: Step[]): void {
  if (steps.length < 2) return;
  const i = r.int(steps.length);
  const j = r.int(steps.length);
  const s = steps[i]!;
  switch (r.int(3)) {
    case 0:
      steps[i] = steps[j]!;
      steps[j] = s;
      break;
    case 1:
      steps.splice(j, 0, s);
      break;
    default:
      steps.splice(i, 1);
  }
}
