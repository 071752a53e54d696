/**
 * Drives `iovirt switch` as a child process from raw virtio-net "guests":
 * each NetGuest is a vhost-user front end with memfd memory and one rx/tx
 * queue pair (split or packed) that the test fills and reads itself, so it
 * can send any transmit header or descriptor chain a hostile driver could.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { PLAIN_HDR, plainHdr, readNetHdr, writeNetHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { decodeU64Bits, encodeU64, encodeVringAddr, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { Req, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, bit, ringFeatures } from "../../src/core/virtio/lifecycle/features.js";
import { NET_HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF } from "../../src/core/virtio/devices/net/constants.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import type { DriverQueue } from "../../src/core/virtio/driver/driver-queue.js";
import type { QueueState } from "../../src/core/virtio/queue/state.js";
import { eventfd, eventfdWrite, type Fd } from "../../src/node/native.js";
import { stopChild, waitForPath } from "../../tools/child.js";
import { GuestRam, RawFrontend } from "./vhost-user-raw.js";

export const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

/** Waits for `cond`, checking every 5 ms; the generous default suits a loaded 2-CPU machine. */
export async function waitUntil(what: string | (() => string), cond: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === "string" ? what : what()}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

// ---------------------------------------------------------------------------
// The switch process

/** Counters of one switch port (a row of formatStats). */
export interface PortRow {
  rxPkts: number;
  rxBytes: number;
  fwd: number;
  flood: number;
  txPkts: number;
  txBytes: number;
  drops: string;
}

/** What a vhost-user port's device counted ("<port> device: ..." lines). */
export interface DeviceLine {
  txFrames: number;
  txDrops: Record<string, number>;
  rxFrames: number;
  rxDrops: Record<string, number>;
  /** Guest errors (faults of the driver that the device reported) by code. */
  guestErrors: Record<string, number>;
}

/** The host side of a tap or VXLAN port, or a capture. */
export interface HostLine {
  rxPackets: number;
  txPackets: number;
  txBytes: number;
  errors: Record<string, number>;
}

export interface SwitchStats {
  ports: Map<string, PortRow>;
  devices: Map<string, DeviceLine>;
  /** By port name ("t0 tap: ..."). */
  hosts: Map<string, HostLine>;
  /** By capture file ("pcap FILE: ..."). */
  pcaps: Map<string, HostLine>;
}

function dropMap(s: string): Record<string, number> {
  const m: Record<string, number> = {};
  if (s === "none") return m;
  for (const kv of s.split(" ")) {
    const [k, v] = kv.split("=");
    assert.ok(k !== undefined && v !== undefined && /^\d+$/.test(v), `counter '${kv}'`);
    m[k] = Number(v);
  }
  return m;
}

/** Parses the text `iovirt switch` prints on SIGUSR1 (SwitchRuntime.statsText). */
export function parseStats(text: string): SwitchStats {
  const ports = new Map<string, PortRow>();
  const devices = new Map<string, DeviceLine>();
  const hosts = new Map<string, HostLine>();
  const pcaps = new Map<string, HostLine>();
  const lines = text.split("\n");
  const head = lines.findIndex((l) => /^port\s+rx pkts\s+rx bytes\s+fwd\s+flood\s+tx pkts\s+tx bytes\s+drops$/.test(l));
  assert.ok(head >= 0, `no counter table in:\n${text}`);
  for (const l of lines.slice(head + 1)) {
    if (l.startsWith("mac table:")) break;
    const m = /^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.*)$/.exec(l);
    assert.ok(m !== null, `counter row '${l}'`);
    ports.set(m[1]!, {
      rxPkts: Number(m[2]),
      rxBytes: Number(m[3]),
      fwd: Number(m[4]),
      flood: Number(m[5]),
      txPkts: Number(m[6]),
      txBytes: Number(m[7]),
      drops: m[8]!,
    });
  }
  for (const l of lines) {
    const h = /^(\S+) (?:tap|vxlan): rx (\d+) packets \(\d+ bytes\), tx (\d+) packets \((\d+) bytes\), errors (.+)$/.exec(l);
    if (h !== null) hosts.set(h[1]!, { rxPackets: Number(h[2]), txPackets: Number(h[3]), txBytes: Number(h[4]), errors: dropMap(h[5]!) });
    const c = /^pcap (.+): (\d+) packets \((\d+) bytes\) recorded, errors (.+)$/.exec(l);
    if (c !== null) pcaps.set(c[1]!, { rxPackets: 0, txPackets: Number(c[2]), txBytes: Number(c[3]), errors: dropMap(c[4]!) });
    const m = /^(\S+) device: tx (\d+) frames, dropped ([^;]+); rx (\d+) frames, dropped ([^;]+)(?:; guest errors (.+))?$/.exec(l);
    if (m === null) continue;
    devices.set(m[1]!, {
      txFrames: Number(m[2]),
      txDrops: dropMap(m[3]!),
      rxFrames: Number(m[4]),
      rxDrops: dropMap(m[5]!),
      guestErrors: dropMap(m[6] ?? "none"),
    });
  }
  return { ports, devices, hosts, pcaps };
}

/** Counter differences between two snapshots of one device (drop reasons that did not move are left out). */
export function deviceDelta(before: SwitchStats, after: SwitchStats, port: string): DeviceLine {
  const b = before.devices.get(port);
  const a = after.devices.get(port);
  assert.ok(a !== undefined && b !== undefined, `no device line for ${port}`);
  const diff = (x: Record<string, number>, y: Record<string, number>): Record<string, number> => {
    const out: Record<string, number> = {};
    for (const [k, v] of Object.entries(y)) if (v !== (x[k] ?? 0)) out[k] = v - (x[k] ?? 0);
    return out;
  };
  return {
    txFrames: a.txFrames - b.txFrames,
    txDrops: diff(b.txDrops, a.txDrops),
    rxFrames: a.rxFrames - b.rxFrames,
    rxDrops: diff(b.rxDrops, a.rxDrops),
    guestErrors: diff(b.guestErrors, a.guestErrors),
  };
}

/** Counter differences of one switch port between two snapshots. */
export function portDelta(before: SwitchStats, after: SwitchStats, port: string): Omit<PortRow, "drops"> {
  const b = before.ports.get(port);
  const a = after.ports.get(port);
  assert.ok(a !== undefined && b !== undefined, `no counter row for ${port}`);
  return {
    rxPkts: a.rxPkts - b.rxPkts,
    rxBytes: a.rxBytes - b.rxBytes,
    fwd: a.fwd - b.fwd,
    flood: a.flood - b.flood,
    txPkts: a.txPkts - b.txPkts,
    txBytes: a.txBytes - b.txBytes,
  };
}

/** `iovirt switch ARGS` as a child process. */
export class SwitchProcess {
  stdout = "";
  stderr = "";
  /** Resolves once the process has exited and its output pipes are drained ('exit' can come first). */
  private readonly closed: Promise<void>;

  private constructor(
    readonly child: ChildProcess,
    /** Names of its vhost-user ports: each prints a device line with the counters. */
    private readonly vhostPorts: string[],
  ) {
    child.stdout!.setEncoding("utf8").on("data", (s: string) => (this.stdout += s));
    child.stderr!.setEncoding("utf8").on("data", (s: string) => (this.stderr += s));
    this.closed = new Promise((resolve) => child.once("close", () => resolve()));
  }

  /** Starts the switch and waits until it serves: every socket exists and it says it runs. */
  static async start(args: string[], vhost: { name: string; path: string }[]): Promise<SwitchProcess> {
    const child = spawn(process.execPath, [CLI, "switch", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    const p = new SwitchProcess(
      child,
      vhost.map((v) => v.name),
    );
    try {
      for (const v of vhost) await waitForPath(v.path, child, "iovirt switch", 20_000);
      await waitUntil("iovirt switch to say it runs", () => p.stderr.includes("switch running") || child.exitCode !== null);
      assert.equal(child.exitCode, null, `iovirt switch exited:\n${p.stderr}`);
    } catch (e) {
      await p.stop();
      throw e;
    }
    return p;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** kill -USR1, then the counters it prints (complete once every vhost-user port's device line is there). */
  async stats(): Promise<SwitchStats> {
    const mark = this.stdout.length;
    this.child.kill("SIGUSR1");
    const last = this.vhostPorts.at(-1);
    const done = (): boolean => {
      const s = this.stdout.slice(mark);
      return last === undefined ? /mac table:.*\n/.test(s) : new RegExp(`^${last} device: .*\n`, "m").test(s);
    };
    await waitUntil("the counters printed on SIGUSR1", done);
    return parseStats(this.stdout.slice(mark));
  }

  /** SIGTERM (SIGKILL after 15 s); the exit code, once everything it printed is in stdout and stderr. */
  async stop(): Promise<number | null> {
    const code = await stopChild(this.child, 15_000);
    await this.closed;
    return code;
  }
}

// ---------------------------------------------------------------------------
// A raw virtio-net guest

export interface GuestOptions {
  /** Packed rings (VIRTIO_F_RING_PACKED) instead of split. */
  packed?: boolean;
  /** VIRTIO_NET_F_MRG_RXBUF: a packet may fill several receive buffers. */
  mrg?: boolean;
  /** Further virtio-net features to negotiate (each must be offered). */
  features?: bigint;
  /** Ring size of both queues (default 64). */
  ringSize?: number;
  /** Bytes per receive buffer, header included (default 12 + 1514). */
  rxBufSize?: number;
  /** Receive buffers posted at the start (default: a full ring). */
  rxBuffers?: number;
}

export interface RxPacket {
  /** The virtio_net_hdr the device wrote in front of the packet. */
  hdr: NetHdr;
  numBuffers: number;
  /** Receive buffers the packet actually took. */
  buffers: number;
  frame: Uint8Array;
}

interface Queue {
  index: number;
  q: DriverQueue<number>;
  state: QueueState;
  kick: Fd;
  call: Fd;
}

/** One queue pair of a virtio-net driver in the test's hands; the switch is the device. */
export class NetGuest {
  /** Packets received so far, oldest first (see poll). */
  readonly received: RxPacket[] = [];
  readonly packed: boolean;
  /** Kick eventfd writes so far (the device suppresses them while it polls). */
  kicks = 0;
  private readonly rxBufSize: number;
  private readonly txFree: { addr: number; cap: number }[] = [];
  private readonly txCap = new Map<number, number>();
  private partial: { hdr: NetHdr; numBuffers: number; parts: Uint8Array[]; buffers: number } | null = null;
  private closed = false;

  private constructor(
    private readonly c: RawFrontend,
    readonly ram: GuestRam,
    private readonly rx: Queue,
    private readonly tx: Queue,
    private readonly fds: Fd[],
    opts: GuestOptions,
  ) {
    this.packed = opts.packed === true;
    this.rxBufSize = opts.rxBufSize ?? NET_HDR_SIZE + 1514;
  }

  /** Connects to a vhost-user port (or takes a connection the switch made), negotiates, starts and enables rx0/tx0, and posts a full ring of receive buffers. */
  static async connect(target: string | Fd, opts: GuestOptions = {}): Promise<NetGuest> {
    const c = new RawFrontend(target);
    const ram = new GuestRam(16 << 20);
    const fds: Fd[] = [];
    try {
      await c.handshake();
      c.send(Req.GET_FEATURES);
      const r = await c.reply();
      assert.notEqual(r, "closed");
      const offered = r === "closed" ? 0n : decodeU64Bits(Req.GET_FEATURES, r.payload);
      let want = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (opts.features ?? 0n);
      if (opts.packed === true) want |= bit(VIRTIO_F_RING_PACKED);
      if (opts.mrg === true) want |= bit(VIRTIO_NET_F_MRG_RXBUF);
      assert.equal(offered & want, want, `features 0x${(want & ~offered).toString(16)} are not offered`);
      assert.equal(await c.ack(Req.SET_FEATURES, encodeU64(want)), 0, "SET_FEATURES");
      assert.equal(await c.ack(Req.SET_MEM_TABLE, ram.memTable(), [ram.fd]), 0, "SET_MEM_TABLE");
      const layout = opts.packed === true ? "packed" : "split";
      const size = opts.ringSize ?? 64;
      const rf = ringFeatures(want);
      const queues: Queue[] = [];
      for (const index of [0, 1]) {
        const { state } = layoutQueue(layout, size, ram.alloc(layoutQueue(layout, size, 0).end, 4096));
        const kick = eventfd(0, { nonblock: true });
        const call = eventfd(0, { nonblock: true });
        fds.push(kick, call);
        const ua = (gpa: number): number => ram.userAddr + gpa;
        assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index, num: size })), 0, "SET_VRING_NUM");
        // vhost-user.rst: for packed rings the base carries both wrap counters (bits 15 and 31), which start at 1.
        const base = layout === "packed" ? 0x80008000 : 0;
        assert.equal(await c.ack(Req.SET_VRING_BASE, encodeVringState({ index, num: base })), 0, "SET_VRING_BASE");
        const addr = { index, flags: 0, desc: ua(state.descTable), avail: ua(state.driverArea), used: ua(state.deviceArea), log: 0 };
        assert.equal(await c.ack(Req.SET_VRING_ADDR, encodeVringAddr(addr)), 0, "SET_VRING_ADDR");
        assert.equal(await c.ack(Req.SET_VRING_CALL, encodeU64(index), [call]), 0, "SET_VRING_CALL");
        assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(index), [kick]), 0, "SET_VRING_KICK");
        assert.equal(await c.ack(Req.SET_VRING_ENABLE, encodeVringState({ index, num: 1 })), 0, "SET_VRING_ENABLE");
        queues.push({ index, q: createDriverQueue<number>(ram.mem, state, rf), state, kick, call });
      }
      const g = new NetGuest(c, ram, queues[0]!, queues[1]!, fds, opts);
      g.refill(opts.rxBuffers ?? size);
      return g;
    } catch (e) {
      c.close();
      ram.close();
      for (const fd of fds) fd.close();
      throw e;
    }
  }

  private notify(q: Queue): void {
    q.q.publish();
    if (!q.q.needsKick()) return;
    eventfdWrite(q.kick, 1);
    this.kicks++;
  }

  /** Posts `n` more receive buffers. */
  refill(n: number): void {
    for (let i = 0; i < n; i++) {
      const b = this.ram.alloc(this.rxBufSize);
      assert.ok(this.rx.q.addOne(b, this.rxBufSize, true, b), "receive ring full");
    }
    this.notify(this.rx);
  }

  /**
   * Takes used receive buffers (putting them back at once) and reclaims used
   * transmit buffers. Called while waiting and before sending; between
   * calls, packets wait in the switch for receive buffers.
   */
  poll(): void {
    if (this.closed) return;
    const mem = this.ram.mem;
    let reposted = 0;
    this.rx.q.drainUsed((b, len) => {
      let data: Uint8Array;
      if (this.partial === null) {
        assert.ok(len >= NET_HDR_SIZE, `first receive buffer used for ${len} bytes, less than the header`);
        const h = new Uint8Array(NET_HDR_SIZE);
        mem.read(b, h);
        const v = new DataView(h.buffer);
        const hdr = readNetHdr(v, 0, plainHdr());
        this.partial = { hdr, numBuffers: v.getUint16(10, true), parts: [], buffers: 0 };
        data = new Uint8Array(len - NET_HDR_SIZE);
        mem.read(b + NET_HDR_SIZE, data);
      } else {
        data = new Uint8Array(len);
        mem.read(b, data);
      }
      const p = this.partial;
      p.parts.push(data);
      p.buffers++;
      // Each buffer goes straight back to the ring, as a driver refills its receive queue.
      assert.ok(this.rx.q.addOne(b, this.rxBufSize, true, b));
      reposted++;
      // §5.1.6.4: num_buffers in the first buffer says how many the packet spans (1 without MRG_RXBUF).
      if (p.buffers >= Math.max(1, p.numBuffers)) {
        const total = p.parts.reduce((s, x) => s + x.length, 0);
        const frame = new Uint8Array(total);
        let at = 0;
        for (const x of p.parts) {
          frame.set(x, at);
          at += x.length;
        }
        this.received.push({ hdr: p.hdr, numBuffers: p.numBuffers, buffers: p.buffers, frame });
        this.partial = null;
      }
    });
    if (reposted > 0) this.notify(this.rx);
    this.tx.q.drainUsed((b) => this.txFree.push({ addr: b, cap: this.txCap.get(b)! }));
  }

  /** The packets received so far, handed over: `received` starts empty again. */
  take(): RxPacket[] {
    this.poll();
    return this.received.splice(0);
  }

  /** Waits until `n` packets in all were received; returns all of them. */
  async waitReceived(n: number, what: string, timeoutMs?: number): Promise<RxPacket[]> {
    await waitUntil(
      () => `${what} (${this.received.length} of ${n} packets so far)`,
      () => (this.poll(), this.received.length >= n),
      timeoutMs,
    );
    return this.received;
  }

  /** Waits until every transmit buffer came back used. */
  async waitTxDone(timeoutMs?: number): Promise<void> {
    await waitUntil(
      () => `transmit buffers back (${this.tx.q.inFlight} in flight)`,
      () => (this.poll(), this.tx.q.inFlight === 0),
      timeoutMs,
    );
  }

  private txBuffer(len: number): number {
    const i = this.txFree.findIndex((f) => f.cap >= len);
    if (i >= 0) return this.txFree.splice(i, 1)[0]!.addr;
    const cap = Math.max(2048, len);
    const b = this.ram.alloc(cap);
    this.txCap.set(b, cap);
    return b;
  }

  /**
   * Transmits `frame` behind `hdr` (num_buffers 0), in one descriptor or,
   * with `split`, header and frame in two. Returns the buffer's guest address.
   */
  send(frame: Uint8Array, hdr: Readonly<NetHdr> = PLAIN_HDR, opts: { split?: boolean } = {}): number {
    const bytes = new Uint8Array(NET_HDR_SIZE + frame.length);
    writeNetHdr(new DataView(bytes.buffer), 0, hdr, 0);
    bytes.set(frame, NET_HDR_SIZE);
    return this.sendBytes(bytes, opts);
  }

  /** Transmits a buffer holding exactly `bytes` (which may be shorter than a header); returns its guest address. */
  sendBytes(bytes: Uint8Array, opts: { split?: boolean } = {}): number {
    this.poll();
    const b = this.txBuffer(bytes.length);
    this.ram.mem.write(b, bytes);
    const ok =
      opts.split === true && bytes.length > NET_HDR_SIZE
        ? this.tx.q.add(
            [
              { addr: b, len: NET_HDR_SIZE, writable: false },
              { addr: b + NET_HDR_SIZE, len: bytes.length - NET_HDR_SIZE, writable: false },
            ],
            b,
          )
        : this.tx.q.addOne(b, bytes.length, false, b);
    assert.ok(ok, "transmit ring full");
    this.notify(this.tx);
    return b;
  }

  /**
   * A hostile driver's split-ring chain that loops: one descriptor whose
   * NEXT points at itself, made available behind the driver queue's back.
   * virtio 1.2 §2.7.5.3.1 forbids chains longer than the ring (a loop is
   * one); the device must notice and stop the queue instead of spinning.
   * The transmit queue object is unusable afterwards.
   */
  sendLoopedChain(): void {
    assert.equal(this.packed, false, "a split-ring trick");
    const { descTable, driverArea, size } = this.tx.state;
    const mem = this.ram.mem;
    const b = this.txBuffer(64);
    const d = size - 1;
    mem.writeU64(descTable + 16 * d, b);
    mem.writeU32(descTable + 16 * d + 8, 64);
    mem.writeU16(descTable + 16 * d + 12, 1); // VIRTQ_DESC_F_NEXT
    mem.writeU16(descTable + 16 * d + 14, d);
    const idx = mem.readU16(driverArea + 2);
    mem.writeU16(driverArea + 4 + 2 * (idx % size), d);
    mem.storeU16Release(driverArea + 2, (idx + 1) & 0xffff);
    eventfdWrite(this.tx.kick, 1);
    this.kicks++;
  }

  /** Drops the connection as a crashing front end would: socket and eventfds closed, memory gone. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.c.close();
    for (const fd of this.fds) fd.close();
    this.ram.close();
  }
}

/** "52:54:00:00:00:0a" -> bytes. */
export function macBytes(s: string): Uint8Array {
  return Uint8Array.from(s.split(":").map((x) => parseInt(x, 16)));
}
