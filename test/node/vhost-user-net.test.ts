import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { writeNetHdr } from "../../src/core/net/hdr.js";
import { NetDevice } from "../../src/core/virtio/devices/net/device.js";
import { MemoryPacketPort } from "../../src/core/virtio/devices/net/port.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import {
  NET_HDR_SIZE,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
} from "../../src/core/virtio/devices/net/constants.js";
import { decodeU64Bits, encodeU64, encodeVringAddr, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { PF, Req, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { VIRTIO_F_VERSION_1, bit } from "../../src/core/virtio/lifecycle/features.js";
import { VhostUserServer } from "../../src/node/vhost-user/server.js";
import { eventfd, eventfdWrite, type Fd } from "../../src/node/native.js";
import { GuestRam, RawFrontend, blkServer, prepareRing, tick, type Ring } from "./vhost-user-raw.js";
import { GUEST_MAC, flowFrame, tsoHdr } from "../core/net-frames.js";

// virtio-net served over vhost-user the way QEMU's vhost-user-net and DPDK's
// virtio-user use it: no control queue (the front end keeps it), queue pairs
// counted by GET_QUEUE_NUM, receive rings chosen by SET_VRING_ENABLE, one
// vhost_dev per pair repeating SET_FEATURES, and SEND_RARP after migration.

const dir = mkdtempSync(join(tmpdir(), "iovirt-vu-net-"));
const path = join(dir, "net.sock");
const port = new MemoryPacketPort();
const device = new NetDevice({ port, queuePairs: 2, controlQueue: false, queueSize: 64 });
const server = new VhostUserServer(path, device);
after(() => {
  server.close();
  rmSync(dir, { recursive: true, force: true });
});

const BASE = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
const RX_BUF = NET_HDR_SIZE + 1514;

interface Session {
  c: RawFrontend;
  ram: GuestRam;
  fds: Fd[];
}

async function session(extraPF = 0n): Promise<Session> {
  const c = new RawFrontend(path);
  await c.handshake(extraPF);
  return { c, ram: new GuestRam(4 << 20), fds: [] };
}

/** Closes the front end and waits until the server has let it go (the device is reset then). */
async function end(s: Session): Promise<void> {
  s.c.close();
  for (let i = 0; i < 200 && server.connection !== null; i++) await tick();
  s.ram.close();
  for (const fd of s.fds) fd.close();
  assert.equal(server.connection, null);
}

/** Sets up ring `index` (SET_FEATURES and SET_MEM_TABLE again, as each of QEMU's per-pair vhost_devs does) and starts it; not enabled. */
async function ring(s: Session, index: number, features = 0n): Promise<Ring & { kick: Fd }> {
  const call = eventfd(0, { nonblock: true });
  const kick = eventfd(0, { nonblock: true });
  s.fds.push(call, kick);
  const r = await prepareRing(s.c, s.ram, { index, size: 16, call, features });
  assert.equal(await s.c.ack(Req.SET_VRING_KICK, encodeU64(index), [kick]), 0, "SET_VRING_KICK");
  return { ...r, kick };
}

async function enable(s: Session, index: number, on: boolean): Promise<void> {
  assert.equal(await s.c.ack(Req.SET_VRING_ENABLE, encodeVringState({ index, num: on ? 1 : 0 })), 0);
}

/** Posts `n` receive buffers in a driver-side ring. */
function postRx(s: Session, r: Ring, n: number): void {
  for (let i = 0; i < n; i++) {
    const b = s.ram.alloc(RX_BUF);
    assert.ok(r.queue.addOne(b, RX_BUF, true, b));
  }
  r.queue.publish();
}

/** Frames the device put into a driver-side receive ring, without their headers. */
function takeRx(s: Session, r: Ring): Uint8Array[] {
  const out: Uint8Array[] = [];
  r.queue.drainUsed((b, len) => {
    const f = new Uint8Array(len - NET_HDR_SIZE);
    s.ram.mem.read(b + NET_HDR_SIZE, f);
    out.push(f);
  });
  return out;
}

test("GET_QUEUE_NUM reports virtio-net's queue pairs, while blk keeps reporting queues", async () => {
  const s = await session();
  s.c.send(Req.GET_QUEUE_NUM);
  const r = await s.c.reply();
  assert.notEqual(r, "closed");
  if (r !== "closed") assert.equal(Number(decodeU64Bits(Req.GET_QUEUE_NUM, r.payload)), 2);
  assert.equal(device.numQueues, 4, "two pairs, no control queue");
  await end(s);
  assert.equal(new BlkDevice({ port: new RamDisk(4096), numQueues: 3 }).hostQueueNum, 3);
});

test("features QEMU passes through are offered (MQ, GUEST_ANNOUNCE) without CTRL_VQ, and accepted without it", async () => {
  const s = await session();
  s.c.send(Req.GET_FEATURES);
  const r = await s.c.reply();
  assert.notEqual(r, "closed");
  const f = r === "closed" ? 0n : decodeU64Bits(Req.GET_FEATURES, r.payload);
  assert.ok((f & bit(VIRTIO_NET_F_MQ)) !== 0n && (f & bit(VIRTIO_NET_F_GUEST_ANNOUNCE)) !== 0n);
  assert.equal(
    f & (bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_VLAN)),
    0n,
    "the front end keeps the control queue",
  );
  const acked = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_GUEST_ANNOUNCE) | bit(VIRTIO_NET_F_MRG_RXBUF);
  assert.equal(await s.c.ack(Req.SET_FEATURES, encodeU64(acked)), 0);
  assert.equal(device.announce(), false, "the front end announces; no control queue here to acknowledge");
  await end(s);
});

test("RARP and MTU protocol features are offered for virtio-net and not for blk, INFLIGHT_SHMFD for blk and not for virtio-net", async () => {
  const s = await session();
  s.c.send(Req.GET_PROTOCOL_FEATURES);
  const r = await s.c.reply();
  assert.notEqual(r, "closed");
  const pf = r === "closed" ? 0n : decodeU64Bits(Req.GET_PROTOCOL_FEATURES, r.payload);
  assert.ok((pf & bit(PF.RARP)) !== 0n && (pf & bit(PF.MTU)) !== 0n);
  // The net device cannot resubmit buffers that were in flight, so a front end must not be told it can.
  assert.equal(pf & bit(PF.INFLIGHT_SHMFD), 0n);
  await end(s);
  const blk = blkServer();
  const b = new RawFrontend(blk.path);
  b.send(Req.GET_PROTOCOL_FEATURES);
  const rb = await b.reply();
  assert.notEqual(rb, "closed");
  const bpf = rb === "closed" ? 0n : decodeU64Bits(Req.GET_PROTOCOL_FEATURES, rb.payload);
  assert.equal(bpf & (bit(PF.RARP) | bit(PF.MTU)), 0n);
  assert.notEqual(bpf & bit(PF.INFLIGHT_SHMFD), 0n);
  b.close();
});

test("a receive ring gets packets only while the front end has it enabled", async () => {
  const s = await session();
  const rx = await ring(s, 0);
  postRx(s, rx, 4);
  const dropped = device.stats.rxDrops["no-buffer"] ?? 0;
  const f = flowFrame({ seed: 1 });
  assert.equal(port.inject(f), "no-buffer", "rings start disabled");
  assert.equal(rx.queue.hasUsed(), false);
  await enable(s, 0, true);
  assert.equal(port.inject(f), null);
  assert.deepEqual(takeRx(s, rx), [f]);
  await enable(s, 0, false);
  assert.equal(port.inject(f), "no-buffer");
  assert.equal(rx.queue.hasUsed(), false, "a disabled ring is not written");
  assert.equal(device.stats.rxDrops["no-buffer"], dropped + 2);
  await end(s);
});

test("without PROTOCOL_FEATURES every ring starts enabled", async () => {
  const c = new RawFrontend(path);
  c.send(Req.GET_FEATURES);
  assert.notEqual(await c.reply(), "closed");
  const s: Session = { c, ram: new GuestRam(4 << 20), fds: [] };
  const call = eventfd(0, { nonblock: true });
  const kick = eventfd(0, { nonblock: true });
  s.fds.push(call, kick);
  // No REPLY_ACK either: every message goes out blind, then a packet shows the ring was enabled.
  c.send(Req.SET_FEATURES, encodeU64(bit(VIRTIO_F_VERSION_1)));
  c.send(Req.SET_MEM_TABLE, s.ram.memTable(), [s.ram.fd]);
  const probe = layoutQueue("split", 16, 0);
  const { state } = layoutQueue("split", 16, s.ram.alloc(probe.end, 4096));
  const q = createDriverQueue<number>(s.ram.mem, state, { indirect: false, eventIdx: false, inOrder: false });
  const ua = (gpa: number): number => s.ram.userAddr + gpa;
  c.send(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 16 }));
  c.send(Req.SET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
  c.send(
    Req.SET_VRING_ADDR,
    encodeVringAddr({ index: 0, flags: 0, desc: ua(state.descTable), avail: ua(state.driverArea), used: ua(state.deviceArea), log: 0 }),
  );
  c.send(Req.SET_VRING_CALL, encodeU64(0), [call]);
  c.send(Req.SET_VRING_KICK, encodeU64(0), [kick]);
  const r: Ring = { queue: q, state };
  postRx(s, r, 2);
  const f = flowFrame({ seed: 2 });
  let got: string | null = "link-down";
  for (let i = 0; i < 200 && got !== null; i++) {
    await tick();
    got = port.inject(f);
  }
  assert.equal(got, null);
  assert.deepEqual(takeRx(s, r), [f]);
  await end(s);
});

test("QEMU's per-pair start: SET_FEATURES and SET_MEM_TABLE again while the first pair runs; a different feature set is refused", async () => {
  const s = await session();
  const rx0 = await ring(s, 0);
  await enable(s, 0, true);
  postRx(s, rx0, 4);
  // Pair 1's vhost_dev starts: the same features and memory table again (ring() acks every step).
  const rx1 = await ring(s, 2);
  const f = flowFrame({ seed: 3 });
  assert.equal(port.inject(f), null, "the first pair's ring kept running");
  assert.deepEqual(takeRx(s, rx0), [f]);
  assert.equal(await s.c.ack(Req.SET_FEATURES, encodeU64(BASE | bit(VIRTIO_NET_F_MRG_RXBUF))), 1, "a new set under running rings");
  assert.equal(port.inject(f), null);
  assert.deepEqual(takeRx(s, rx0), [f], "and the ring still runs as before");
  assert.equal(rx1.queue.hasUsed(), false);
  await end(s);
});

test("packets go to the receive rings the front end enabled; one flow stays on one ring", async () => {
  const s = await session();
  const rx0 = await ring(s, 0);
  const rx1 = await ring(s, 2);
  postRx(s, rx0, 16);
  postRx(s, rx1, 16);
  await enable(s, 2, true);
  const flows = Array.from({ length: 8 }, (_, i) => flowFrame({ srcPort: 3000 + i, seed: i }));
  for (const f of flows) assert.equal(port.inject(f), null);
  assert.deepEqual(takeRx(s, rx1), flows, "only pair 1 is enabled");
  assert.equal(rx0.queue.hasUsed(), false);
  postRx(s, rx1, 8);
  await enable(s, 0, true);
  const seen = new Map<number, number>();
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 12; i++) assert.equal(port.inject(flowFrame({ srcPort: 4000 + i, seed: i })), null);
    const got0 = takeRx(s, rx0);
    const got1 = takeRx(s, rx1);
    postRx(s, rx0, got0.length);
    postRx(s, rx1, got1.length);
    for (const [k, got] of [got0, got1].entries()) {
      for (const g of got) {
        const sport = (g[34]! << 8) | g[35]!;
        if (round === 0) seen.set(sport, k);
        else assert.equal(seen.get(sport), k, `flow ${sport} changed rings`);
      }
    }
    if (round === 0) assert.ok(got0.length > 0 && got1.length > 0, `both rings used: ${got0.length} + ${got1.length}`);
  }
  await end(s);
});

test("transmitted TSO packets keep their offload header on the way to the port", async () => {
  const s = await session();
  const feats = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
  await ring(s, 0, feats);
  const tx = await ring(s, 1, feats);
  await enable(s, 1, true);
  const spec = { proto: "tcp" as const, payload: 4000 };
  const frame = flowFrame(spec);
  const hdr = tsoHdr(spec);
  const b = s.ram.alloc(NET_HDR_SIZE + frame.length);
  const h = new DataView(new ArrayBuffer(NET_HDR_SIZE));
  writeNetHdr(h, 0, hdr, 0);
  s.ram.mem.write(b, new Uint8Array(h.buffer));
  s.ram.mem.write(b + NET_HDR_SIZE, frame);
  const before = port.transmitted.length;
  assert.ok(tx.queue.addOne(b, NET_HDR_SIZE + frame.length, false, b));
  tx.queue.publish();
  eventfdWrite(tx.kick, 1);
  for (let i = 0; i < 200 && port.transmitted.length === before; i++) await tick();
  assert.deepEqual(port.transmitted.slice(before), [frame]);
  assert.deepEqual(port.transmittedHdrs[before], hdr);
  await end(s);
});

test("SEND_RARP broadcasts a RARP from the given MAC when the protocol feature is negotiated", async () => {
  const s = await session(bit(PF.RARP));
  const payload = new Uint8Array(8);
  payload.set(GUEST_MAC);
  const before = port.transmitted.length;
  assert.equal(await s.c.ack(Req.SEND_RARP, payload), 0);
  const f = port.transmitted[before]!;
  assert.equal(port.transmitted.length, before + 1);
  assert.equal(f.length, 60);
  assert.deepEqual([...f.subarray(0, 6)], [0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
  assert.deepEqual(f.subarray(6, 12), GUEST_MAC);
  assert.equal((f[12]! << 8) | f[13]!, 0x8035, "EtherType RARP");
  assert.equal((f[20]! << 8) | f[21]!, 3, "reverse request");
  assert.deepEqual(f.subarray(22, 28), GUEST_MAC);
  assert.equal(await s.c.ack(Req.SEND_RARP, new Uint8Array(6)), 1, "a payload that is not a u64");
  await end(s);
  const t = await session();
  assert.equal(await t.c.ack(Req.SEND_RARP, payload), 1, "not without PF.RARP");
  assert.equal(port.transmitted.length, before + 1);
  await end(t);
});

test("NET_SET_MTU is recorded and sets the frame limits; an impossible MTU is refused", async () => {
  const s = await session(bit(PF.MTU));
  assert.equal(await s.c.ack(Req.NET_SET_MTU, encodeU64(9000)), 0);
  assert.equal(await s.c.ack(Req.NET_SET_MTU, encodeU64(20)), 1);
  assert.equal(await s.c.ack(Req.NET_SET_MTU, encodeU64(1n << 40n)), 1);
  assert.equal(await s.c.ack(Req.SET_FEATURES, encodeU64(BASE | bit(VIRTIO_NET_F_MTU))), 0);
  assert.equal(device.maxReceiveFrame, 9000 + 18);
  await end(s);
  const t = await session();
  assert.equal(await t.c.ack(Req.NET_SET_MTU, encodeU64(9000)), 1, "not without PF.MTU");
  await end(t);
});
