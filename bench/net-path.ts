/**
 * npm run bench:netpath — the whole virtio-net data path in one thread, no
 * processes, no sockets: guest A's transmit ring -> NetDevice -> Switch ->
 * NetDevice -> guest B's receive ring (forward), or into a switch with A's
 * port alone (sink). The "guests" are the cheapest drivers possible: their
 * descriptor tables are written once and each pass only fills avail ring
 * entries and reads the used index, as DPDK's virtio-user does; so nearly
 * all the time measured is the back end's, per frame, which is what
 * bench:net's ratio against DPDK comes down to.
 *
 *   node dist/bench/net-path.js [--seconds S] [--size BYTES] [--case sink|forward] [--repeat N]
 */
import { GuestMemory } from "../src/core/memory/guest-memory.js";
import { mpps, nsEach, timeLoop } from "./loop.js";
import { PLAIN_HDR, type NetHdr } from "../src/core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../src/core/net/offloads.js";
import { Switch, type PortHandle, type SwitchPort } from "../src/core/switch/index.js";
import { RxBatch } from "../src/core/virtio/devices/net/batch.js";
import { NetDevice } from "../src/core/virtio/devices/net/device.js";
import { VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, NET_HDR_SIZE } from "../src/core/virtio/devices/net/constants.js";
import { VIRTIO_F_VERSION_1, features } from "../src/core/virtio/lifecycle/features.js";
import { initialQueueState } from "../src/core/virtio/queue/state.js";

const QSIZE = 256;
const SLOT = 2048;
const DESC = 0x0000;
const AVAIL = 0x1000;
const USED = 0x2000;
const BUFS = 0x10000;

/** What DPDK's virtio-user negotiates with testpmd's default configuration (no offloads asked). */
const NEGOTIATED = features(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF);

/** One split ring of a guest, driven from the driver side with precomputed descriptors. */
class GuestRing {
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  private availIdx = 0;
  private usedSeen = 0;
  constructor(
    readonly mem: GuestMemory,
    readonly base: number,
    writable: boolean,
    len: number,
  ) {
    const w = mem.windowOf(base, BUFS + QSIZE * SLOT);
    this.u16 = w.u16;
    this.u32 = w.u32;
    for (let i = 0; i < QSIZE; i++) {
      const d = (base + DESC + 16 * i) >>> 2;
      this.u32[d] = base + BUFS + i * SLOT;
      this.u32[d + 1] = 0;
      this.u32[d + 2] = len;
      this.u32[d + 3] = writable ? 2 : 0; // VIRTQ_DESC_F_WRITE, next 0
    }
  }
  state() {
    return initialQueueState("split", QSIZE, this.base + DESC, this.base + AVAIL, this.base + USED);
  }
  buffer(i: number): number {
    return this.base + BUFS + i * SLOT;
  }
  /** Makes every descriptor the device has given back available again; returns how many were used since the last call. */
  refill(): number {
    const used = Atomics.load(this.u16, (this.base + USED + 2) >>> 1);
    const done = (used - this.usedSeen) & 0xffff;
    this.usedSeen = used;
    const room = QSIZE - ((this.availIdx - used) & 0xffff);
    const ring = (this.base + AVAIL + 4) >>> 1;
    for (let k = 0; k < room; k++) {
      const idx = (this.availIdx + k) & 0xffff;
      this.u16[ring + (idx & (QSIZE - 1))] = idx & (QSIZE - 1);
    }
    this.availIdx = (this.availIdx + room) & 0xffff;
    Atomics.store(this.u16, (this.base + AVAIL + 2) >>> 1, this.availIdx);
    return done;
  }
}

/** A NetDevice as a switch port, as VhostUserNetPort connects one. */
class DevicePort implements SwitchPort {
  readonly device: NetDevice;
  handle: PortHandle | null = null;
  private receive: ((frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null) | null = null;
  private accepted: Readonly<Offloads> = NO_OFFLOADS;
  constructor(
    readonly name: string,
    mac: number,
    batch: RxBatch,
  ) {
    this.device = new NetDevice({
      controlQueue: false,
      rxBatch: batch,
      mac: new Uint8Array([2, 0, 0, 0, 0, mac]),
      port: {
        transmit: (frame, hdr) => this.handle?.input(frame, hdr),
        attach: (receive) => (this.receive = receive),
        offloadsChanged: (a) => (this.accepted = a),
      },
    });
  }
  accepts(): Readonly<Offloads> {
    return this.accepted;
  }
  maxFrame(): number {
    return this.device.maxReceiveFrame;
  }
  linkUp(): boolean {
    return this.device.carrierUp;
  }
  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    return this.receive === null ? "link-down" : this.receive(frame, hdr);
  }
}

function guest(mem: GuestMemory, port: DevicePort, frameLen: number, dst: number, src: number) {
  const tx = new GuestRing(mem, 0x100000, false, NET_HDR_SIZE + frameLen);
  const rx = new GuestRing(mem, 0x400000, true, SLOT);
  for (let i = 0; i < QSIZE; i++) {
    const f = mem.slice(tx.buffer(i) + NET_HDR_SIZE, frameLen);
    f.set([2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00]);
  }
  const d = port.device;
  d.attachMemory(mem);
  const bad = d.hostSetFeatures(NEGOTIATED);
  if (bad !== null) throw new Error(bad);
  d.restoreQueue(0, rx.state());
  d.restoreQueue(1, tx.state());
  rx.refill();
  return { tx, rx };
}

/** Packets straight into B's NetDevice.receive, as a switch port hands them over: the receive side alone. */
function runReceive(frameLen: number, seconds: number): void {
  const batch = new RxBatch();
  const b = new DevicePort("b", 2, batch);
  const gb = guest(GuestMemory.create(8 << 20), b, frameLen, 1, 2);
  const frame = new Uint8Array(2048).subarray(NET_HDR_SIZE, NET_HDR_SIZE + frameLen);
  frame.set([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
  const { count: received, secs } = timeLoop(seconds, 256, () => {
    batch.begin();
    for (let k = 0; k < 32; k++) b.send(frame, PLAIN_HDR);
    batch.end();
    return gb.rx.refill();
  });
  console.log(`receive  ${String(frameLen).padStart(5)} B  ${mpps(received, secs)} Mpps delivered  ${nsEach(received, secs)} ns/frame`);
}

function run(kind: "sink" | "forward", frameLen: number, seconds: number): void {
  const sw = new Switch();
  const batch = new RxBatch();
  const a = new DevicePort("a", 1, batch);
  const b = new DevicePort("b", 2, batch);
  a.handle = sw.addPort(a);
  if (kind === "forward") b.handle = sw.addPort(b);
  const ga = guest(GuestMemory.create(8 << 20), a, frameLen, kind === "forward" ? 2 : 9, 1);
  const gb = guest(GuestMemory.create(8 << 20), b, frameLen, 1, 2);
  // B speaks first so the switch knows where it is.
  if (kind === "forward") {
    gb.tx.refill();
    b.device.poll(1, 1);
  }
  let received = 0;
  const { count: frames, secs } = timeLoop(seconds, 256, () => {
    const sent = ga.tx.refill();
    a.device.poll(1, 64);
    received += gb.rx.refill();
    return sent;
  });
  const out = kind === "forward" ? `${mpps(received, secs)} Mpps delivered` : "";
  console.log(
    `${kind.padEnd(8)} ${String(frameLen).padStart(5)} B  ${mpps(frames, secs)} Mpps sent  ${out}  ${nsEach(frames, secs)} ns/frame`,
  );
}

const args = process.argv.slice(2);
const opt = (name: string, dflt: number): number => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const seconds = opt("--seconds", 2);
const size = opt("--size", 64);
const ci = args.indexOf("--case");
const kinds = ci >= 0 ? [args[ci + 1]!] : ["sink", "forward", "receive"];
const repeat = opt("--repeat", 1);
for (const kind of kinds)
  for (let r = 0; r < repeat; r++) {
    if (kind === "receive") runReceive(size, seconds);
    else if (kind === "sink" || kind === "forward") run(kind, size, seconds);
    else throw new RangeError(`--case ${kind}: sink, forward or receive`);
  }
