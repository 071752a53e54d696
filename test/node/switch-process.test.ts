import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { NetHdr } from "../../src/core/net/hdr.js";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import { NET_HDR_SIZE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4 } from "../../src/core/virtio/devices/net/constants.js";
import { BROADCAST, csumHdr, flowFrame, l4Offset, tsoHdr, type FlowSpec } from "../core/net-frames.js";
import { pseudoSum, sum16 } from "./net-frames.js";
import { ftruncate } from "../../src/node/native.js";
import { NetGuest, SwitchProcess, deviceDelta, macBytes, portDelta, waitUntil, type GuestOptions } from "./switch-harness.js";

// `iovirt switch` as a user runs it, with four raw virtio-net "guests" on
// its vhost-user ports: a, b and c on split rings, p on packed ones. The
// guests are iovirt's own driver queues in memfd memory, so a test can put
// any header or descriptor chain a hostile driver could into a ring.

const dir = mkdtempSync(join(tmpdir(), "iovirt-switch-proc-"));
const sock = (n: string): string => join(dir, `${n}.sock`);
const MAC = {
  a: macBytes("52:54:00:00:00:0a"),
  b: macBytes("52:54:00:00:00:0b"),
  c: macBytes("52:54:00:00:00:0c"),
  p: macBytes("52:54:00:00:00:0d"),
};
/** A offers checksum and TSO4 offload (not TSO6) so that its bad headers get past "not negotiated" to the checks behind. */
const A_OPTS: GuestOptions = { mrg: true, features: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) };
/** B's receive buffers are small: a packet spreads over several (MRG_RXBUF). */
const B_OPTS: GuestOptions = { mrg: true, rxBufSize: 256 };

let sw: SwitchProcess;
const guests = new Set<NetGuest>();
let a: NetGuest;
let b: NetGuest;
let c: NetGuest;
let p: NetGuest;

async function guest(name: string, opts: GuestOptions): Promise<NetGuest> {
  const g = await NetGuest.connect(sock(name), opts);
  guests.add(g);
  return g;
}

function drop(g: NetGuest): void {
  g.close();
  guests.delete(g);
}

before(async () => {
  const names = ["a", "b", "c", "p"];
  sw = await SwitchProcess.start(
    names.flatMap((n) => ["--vhost-user", `${sock(n)},name=${n}`]),
    names.map((n) => ({ name: n, path: sock(n) })),
  );
  a = await guest("a", A_OPTS);
  b = await guest("b", B_OPTS);
  c = await guest("c", {});
  p = await guest("p", { packed: true, mrg: true, rxBufSize: 512 });
});

after(async () => {
  for (const g of guests) g.close();
  try {
    if (sw !== undefined) assert.equal(await sw.stop(), 0, `iovirt switch did not exit cleanly:\n${sw.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** How many lines of the switch's log match `re` so far. */
function logged(re: RegExp): number {
  return (sw.stderr.match(new RegExp(re.source, "gm")) ?? []).length;
}

/** Does `act`, then waits until the log has one more line matching `re`. */
async function expectLog(re: RegExp, what: string, act: () => void): Promise<void> {
  const before = logged(re);
  act();
  await waitUntil(what, () => logged(re) > before);
}

function frame(s: FlowSpec & { src: Uint8Array; dst: Uint8Array }): Uint8Array {
  return flowFrame({ payload: 100, ...s });
}

const ZERO_HDR: NetHdr = { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };

test("a broadcast from one guest reaches every other guest with its bytes and a plain header, spread over as many buffers as num_buffers says", async () => {
  const f = frame({ src: MAC.a, dst: BROADCAST, payload: 600, seed: 1 });
  a.send(f);
  const [atB] = await b.waitReceived(1, "the broadcast at b");
  const [atC] = await c.waitReceived(1, "the broadcast at c");
  const [atP] = await p.waitReceived(1, "the broadcast at p");
  for (const [at, r] of [
    ["b", atB],
    ["c", atC],
    ["p", atP],
  ] as const) {
    assert.ok(r !== undefined);
    assert.deepEqual(r.frame, f, `bytes at ${at}`);
    assert.deepEqual(r.hdr, ZERO_HDR, `header at ${at}: the sender asked for no offload`);
  }
  // §5.1.6.4: 12 + 642 bytes in 256-byte buffers take 3 of them; without MRG_RXBUF num_buffers is 1.
  assert.equal(atB!.numBuffers, Math.ceil((NET_HDR_SIZE + f.length) / 256));
  assert.equal(atB!.buffers, atB!.numBuffers);
  assert.equal(atC!.numBuffers, 1);
  assert.equal(atP!.numBuffers, 2, "654 bytes in 512-byte packed-ring buffers");
  assert.deepEqual(a.take(), [], "no copy back to the sender (it was flooded in the same pass)");
  assert.ok(a.kicks > 0, "without --poll the switch waits for kicks");
  b.take();
  c.take();
  p.take();
});

test("unicast to an unknown address floods; once b has sent, frames for b reach b only and c and p never see them", async () => {
  const before = await sw.stats();
  const unknown = frame({ src: MAC.a, dst: MAC.b, seed: 2 });
  a.send(unknown);
  for (const g of [b, c, p]) assert.deepEqual((await g.waitReceived(1, "the unknown unicast flooded"))[0]!.frame, unknown);
  for (const g of [b, c, p]) g.take();
  const reply = frame({ src: MAC.b, dst: MAC.a, seed: 3 });
  b.send(reply);
  assert.deepEqual((await a.waitReceived(1, "b's reply at a"))[0]!.frame, reply);
  a.take();
  const unicast = [10, 11, 12, 13, 14].map((seed) => frame({ src: MAC.a, dst: MAC.b, seed, payload: 40 * seed }));
  for (const f of unicast) a.send(f);
  // The switch handles a's ring in order: whoever got the marker would have got the unicasts first.
  const marker = frame({ src: MAC.a, dst: BROADCAST, seed: 99 });
  a.send(marker);
  const atB = await b.waitReceived(6, "the unicasts and the marker at b");
  assert.deepEqual(
    atB.map((r) => r.frame),
    [...unicast, marker],
  );
  for (const g of [c, p]) {
    const got = await g.waitReceived(1, "the marker");
    assert.deepEqual(
      got.map((r) => r.frame),
      [marker],
      "only the broadcast: neither b's reply nor a's unicasts to b",
    );
  }
  for (const g of [b, c, p]) g.take();
  const after = await sw.stats();
  const da = portDelta(before, after, "a");
  assert.deepEqual([da.rxPkts, da.fwd, da.flood], [7, 5, 2], "a: 7 in, 5 forwarded to b, 2 flooded");
  const db = portDelta(before, after, "b");
  assert.deepEqual([db.rxPkts, db.fwd, db.txPkts], [1, 1, 7]);
  assert.equal(portDelta(before, after, "c").txPkts, 2);
  assert.equal(deviceDelta(before, after, "b").rxFrames, 7, "b's device handed 7 packets to its driver");
});

test("a packed-ring guest and a split-ring guest exchange frames of every size class intact, header and frame in separate descriptors too", async () => {
  const sizes = [14, 15, 59, 60, 61, 127, 500, 501, 1000, 1499, 1500, 1513, 1514];
  const toP = sizes.map((n, i) => {
    const f = frame({ src: MAC.a, dst: MAC.p, seed: 100 + i, payload: Math.max(0, n - 42) });
    return n < 42 ? f.subarray(0, n) : f;
  });
  // p has not sent yet: the first frames flood (to b and c as well), which changes nothing at p.
  p.send(frame({ src: MAC.p, dst: MAC.a, seed: 1 }), undefined, { split: true });
  await a.waitReceived(1, "p's first frame at a");
  a.take();
  toP.forEach((f, i) => a.send(f, undefined, { split: i % 2 === 0 }));
  const got = await p.waitReceived(toP.length, "a's frames at p");
  assert.deepEqual(
    got.map((r) => r.frame.length),
    sizes,
  );
  assert.deepEqual(
    got.map((r) => r.frame),
    toP,
  );
  for (const r of got) assert.equal(r.numBuffers, Math.ceil((NET_HDR_SIZE + r.frame.length) / 512), "num_buffers in packed buffers");
  p.take();
  const toA = sizes.filter((n) => n >= 42).map((n, i) => frame({ src: MAC.p, dst: MAC.a, seed: 200 + i, payload: n - 42 }));
  toA.forEach((f, i) => p.send(f, undefined, { split: i % 2 === 1 }));
  assert.deepEqual(
    (await a.waitReceived(toA.length, "p's frames at a")).map((r) => r.frame),
    toA,
  );
  a.take();
  await p.waitTxDone();
  assert.deepEqual(c.take(), [], "nothing for c: both addresses are learned");
});

test("many frames through small rings: the receive ring wraps many times and nothing is lost or reordered", async () => {
  // a's ring has 64 entries: 600 frames wrap it and the packed ring at p about ten times each way.
  const n = 600;
  const frames = Array.from({ length: n }, (_, i) => frame({ src: MAC.a, dst: MAC.p, seed: 1000 + i, payload: 20 + (i % 200) }));
  for (let i = 0; i < n; i++) {
    a.send(frames[i]!);
    if (i % 48 === 47) {
      await a.waitTxDone();
      p.poll();
    }
  }
  const got = await p.waitReceived(n, "600 frames at p");
  assert.equal(got.length, n);
  assert.ok(
    got.every((r, i) => r.frame.length === frames[i]!.length && Buffer.compare(r.frame, frames[i]!) === 0),
    "every frame in order and intact",
  );
  p.take();
});

test("a TSO packet from a reaches b, which lacks GUEST_TSO4 and GUEST_CSUM, as MSS-sized segments with valid checksums", async () => {
  const spec = { src: MAC.a, dst: MAC.b, proto: "tcp" as const, payload: 4000, seed: 7 };
  const big = flowFrame(spec);
  a.send(big, tsoHdr(spec, 1448));
  const segs = await b.waitReceived(3, "three segments at b");
  assert.equal(segs.length, 3);
  const l4 = l4Offset(spec);
  const payload: Uint8Array[] = [];
  let seq = -1;
  for (const s of segs) {
    const f = s.frame;
    assert.deepEqual(s.hdr, ZERO_HDR, "b gets complete packets only");
    assert.deepEqual(f.subarray(0, 14), big.subarray(0, 14), "Ethernet header copied");
    assert.equal(sum16(f, 14, 34), 0xffff, "IPv4 header checksum");
    const tcpLen = f.length - l4;
    assert.equal(sum16(f, l4, f.length, pseudoSum(f.subarray(26, 30), f.subarray(30, 34), 6, tcpLen)), 0xffff, "TCP checksum");
    const s32 = new DataView(f.buffer, f.byteOffset).getUint32(l4 + 4);
    if (seq >= 0) assert.equal(s32, seq, "sequence numbers follow the payload");
    seq = s32 + (tcpLen - 20);
    payload.push(f.subarray(l4 + 20));
  }
  assert.deepEqual(
    payload.map((x) => x.length),
    [1448, 1448, 1104],
  );
  assert.deepEqual(Buffer.concat(payload), Buffer.from(big.subarray(l4 + 20)));
  b.take();
});

test("a hostile driver's bad transmit headers are dropped and counted by reason while its good frames and b's traffic go on", async () => {
  const before = await sw.stats();
  const good = (seed: number): Uint8Array => frame({ src: MAC.a, dst: MAC.b, seed, payload: 64 + seed });
  const tcp = { src: MAC.a, dst: MAC.b, proto: "tcp" as const, payload: 3000, seed: 5 };
  const tcp6 = { ...tcp, ipv6: true };
  const goods: Uint8Array[] = [];
  const sendGood = (seed: number): void => {
    const f = good(seed);
    goods.push(f);
    a.send(f);
  };
  sendGood(1);
  // GSO with gso_size 0 (§5.1.6.2.1: a driver setting a gso_type MUST set gso_size).
  a.send(flowFrame(tcp), { ...tsoHdr(tcp), gsoSize: 0 });
  sendGood(2);
  // NEEDS_CSUM with csum_start past the end of the frame.
  const small = frame({ src: MAC.a, dst: MAC.b, seed: 6 });
  a.send(small, { ...csumHdr({}), csumStart: small.length + 100 });
  sendGood(3);
  // TSO over IPv6 without HOST_TSO6 negotiated.
  a.send(flowFrame(tcp6), tsoHdr(tcp6));
  sendGood(4);
  // A plain frame longer than MTU 1500 allows.
  a.send(frame({ src: MAC.a, dst: MAC.b, seed: 8, payload: 1600 }));
  sendGood(5);
  // A runt: 10 bytes of frame, no room for an Ethernet header.
  a.send(good(9).subarray(0, 10));
  sendGood(6);
  // A buffer shorter than the virtio_net_hdr itself.
  a.sendBytes(new Uint8Array(8));
  sendGood(7);
  // A gso_type that names nothing.
  a.send(flowFrame(tcp), { ...tsoHdr(tcp), gsoType: 0x07 });
  sendGood(8);
  const atB = await b.waitReceived(goods.length, "the good frames at b");
  await a.waitTxDone();
  // b's ring is read in order and a's ring too: the last good frame arriving means every bad one was handled.
  assert.deepEqual(
    atB.map((r) => r.frame),
    goods,
    "exactly the good frames, in order",
  );
  b.take();
  const reply = frame({ src: MAC.b, dst: MAC.a, seed: 77 });
  await passes(b, a, reply, "b's frame at a", "b keeps working");
  const after = await sw.stats();
  const d = deviceDelta(before, after, "a");
  assert.equal(d.txFrames, goods.length, "a's device passed on the good frames only");
  assert.deepEqual(d.txDrops, {
    "gso-size-zero": 1,
    "csum-out-of-range": 1,
    "offload-not-negotiated": 1,
    "too-long": 1,
    runt: 1,
    "bad-hdr": 2,
  });
  assert.deepEqual(d.guestErrors, { NET_TX_TOO_LONG: 1, NET_TX_SHORT: 1 }, "the driver's own faults, counted by code");
  const pa = portDelta(before, after, "a");
  assert.equal(pa.rxPkts, goods.length, "the switch never saw a dropped frame");
  // The driver's own faults are logged too (stderr, which may arrive after the counters on stdout).
  await waitUntil("the oversized frame in the log", () => /a: guest error on queue 1: NET_TX_TOO_LONG/.test(sw.stderr));
  await waitUntil("the short buffer in the log", () => /a: guest error on queue 1: NET_TX_SHORT/.test(sw.stderr));
  assert.ok(sw.running);
});

test("a guest that sends oversized frames by the hundred gets each one counted, and the log a few lines, not hundreds", async () => {
  const before = await sw.stats();
  const tooLong = /a: guest error on queue 1: NET_TX_TOO_LONG/;
  const linesBefore = logged(tooLong);
  const big = frame({ src: MAC.a, dst: MAC.b, seed: 600, payload: 2000 });
  const last = frame({ src: MAC.a, dst: MAC.b, seed: 601 });
  for (let i = 0; i < 500; i++) {
    a.send(big);
    if (i % 50 === 49) await a.waitTxDone();
  }
  await passes(a, b, last, "the frame after the oversized ones");
  const after = await sw.stats();
  assert.deepEqual(deviceDelta(before, after, "a").txDrops, { "too-long": 500 });
  assert.ok(
    logged(tooLong) - linesBefore <= 2,
    `${logged(tooLong) - linesBefore} log lines for 500 oversized frames: a guest must not be able to flood the log`,
  );
  const errors = after.devices.get("a")?.guestErrors ?? {};
  assert.equal(errors.NET_TX_TOO_LONG! - (before.devices.get("a")?.guestErrors.NET_TX_TOO_LONG ?? 0), 500, "every one counted by code");
});

test("a transmit chain that loops takes a's transmit queue out of service, not the switch: b is served, a is served again after reconnecting", async () => {
  const before = await sw.stats();
  const first = frame({ src: MAC.a, dst: MAC.b, seed: 300 });
  await passes(a, b, first, "a's frame before the loop");
  await a.waitTxDone();
  await expectLog(/a: guest error on queue 1: CHAIN_LOOP/, "the switch to report the looping chain", () => a.sendLoopedChain());
  // a's receive queue still runs; b and c still talk.
  const toA = frame({ src: MAC.b, dst: MAC.a, seed: 301 });
  await passes(b, a, toA, "b's frame at a");
  const toC = frame({ src: MAC.b, dst: BROADCAST, seed: 302 });
  await passes(b, c, toC, "b's broadcast at c");
  for (const g of [a, c, p]) g.take();
  const mid = await sw.stats();
  assert.equal(deviceDelta(before, mid, "a").txFrames, 1, "nothing after the loop left a's ring");
  assert.deepEqual(deviceDelta(before, mid, "a").guestErrors, { CHAIN_LOOP: 1 }, "the counters show what stopped the ring");
  // A driver that broke its ring resets the device; over vhost-user that is a new session.
  await expectLog(/a: front end disconnected/, "the switch to notice a left", () => drop(a));
  a = await guest("a", A_OPTS);
  const again = frame({ src: MAC.a, dst: MAC.b, seed: 303 });
  await passes(a, b, again, "a's frame after reconnecting");
  assert.ok(sw.running);
});

test("a front end that vanishes mid-traffic and comes back is served again; the others never stop", async () => {
  // a queues a burst and b floods a at the same time; a then closes everything without a word.
  for (let i = 0; i < 40; i++) a.send(frame({ src: MAC.a, dst: MAC.b, seed: 400 + i }));
  for (let i = 0; i < 40; i++) b.send(frame({ src: MAC.b, dst: MAC.a, seed: 500 + i }));
  await expectLog(/a: front end disconnected/, "the switch to notice a left", () => drop(a));
  // Whatever of the burst got through arrives intact at b; then b and c carry on.
  await b.waitTxDone();
  const marker = frame({ src: MAC.c, dst: MAC.b, seed: 450 });
  c.send(marker);
  const atB = await waitMarker(b, marker);
  for (const r of atB) assert.deepEqual(r.frame.subarray(0, 12), new Uint8Array([...MAC.b, ...MAC.a]), "only a's frames before the marker");
  const toC = frame({ src: MAC.b, dst: MAC.c, seed: 451 });
  await passes(b, c, toC, "b's frame at c");
  a = await guest("a", A_OPTS);
  const fresh = frame({ src: MAC.a, dst: MAC.b, seed: 460 });
  await passes(a, b, fresh, "the new a's frame at b");
  const back = frame({ src: MAC.b, dst: MAC.a, seed: 461 });
  await passes(b, a, back, "b's frame at the new a");
  assert.ok(sw.running);
});

/**
 * Sends `f` from `from` and expects exactly it at `to`, then takes it there;
 * `what` names the wait (and `why` the check, if given).
 */
async function passes(from: NetGuest, to: NetGuest, f: Uint8Array, what: string, why = what): Promise<void> {
  from.send(f);
  assert.deepEqual(
    (await to.waitReceived(1, what)).map((r) => r.frame),
    [f],
    why,
  );
  to.take();
}

/** Waits for `marker` at g and returns what came before it (taking everything). */
async function waitMarker(g: NetGuest, marker: Uint8Array): Promise<{ frame: Uint8Array }[]> {
  await waitUntil("the marker frame", () => (g.poll(), g.received.some((r) => Buffer.compare(r.frame, marker) === 0)));
  const all = g.take();
  const at = all.findIndex((r) => Buffer.compare(r.frame, marker) === 0);
  assert.equal(at, all.length - 1, "nothing after the marker");
  return all.slice(0, at);
}

test("a guest that takes none of its packets holds at most 256 of them in the switch, the oldest; the rest are counted and the other guests get everything", async () => {
  drop(c);
  c = await guest("c", { rxBuffers: 0 });
  const before = await sw.stats();
  const n = 400;
  const sent: Uint8Array[] = [];
  for (let i = 0; i < n; i++) {
    const f = frame({ src: MAC.b, dst: BROADCAST, seed: 2000 + i, payload: 50 + (i % 100) });
    sent.push(f);
    b.send(f);
    if (i % 40 === 39) {
      await b.waitTxDone();
      a.poll();
      p.poll();
    }
  }
  for (const g of [a, p]) {
    const got = await g.waitReceived(n, "every broadcast at a guest that reads them");
    assert.ok(got.length === n && got.every((r, i) => Buffer.compare(r.frame, sent[i]!) === 0), "all, in order");
    g.take();
  }
  const mid = await sw.stats();
  assert.deepEqual(deviceDelta(before, mid, "c").rxDrops, { "no-buffer": n - 256 }, "c's device kept 256 (virtio-net maxPending)");
  assert.equal(deviceDelta(before, mid, "c").rxFrames, 0);
  // c finally posts buffers: the 256 waiting packets come, oldest first.
  c.refill(64);
  const got = await c.waitReceived(256, "the packets that waited for c");
  assert.deepEqual(
    got.map((r) => r.frame),
    sent.slice(0, 256),
  );
  c.take();
  const after = await sw.stats();
  assert.equal(deviceDelta(before, after, "c").rxFrames, 256);
});

test("a guest that shrinks its memory under the switch loses its port's service, not the switch's; after reconnecting it is served again", async () => {
  const before = await sw.stats();
  ftruncate(c.ram.fd, 0);
  const lost = frame({ src: MAC.a, dst: BROADCAST, seed: 3000 });
  await expectLog(/c: guest error: MEMORY_LOST/, "the switch to see c's memory shrink", () => a.send(lost));
  await b.waitReceived(1, "the broadcast at b");
  for (let i = 0; i < 10; i++) a.send(frame({ src: MAC.a, dst: BROADCAST, seed: 3001 + i }));
  await b.waitReceived(11, "the later broadcasts at b");
  b.take();
  p.take();
  const mid = await sw.stats();
  assert.equal(deviceDelta(before, mid, "c").guestErrors.MEMORY_LOST, 1);
  assert.equal(deviceDelta(before, mid, "c").rxFrames, 0, "nothing written into memory that is gone");
  assert.ok(sw.running);
  drop(c);
  c = await guest("c", {});
  const again = frame({ src: MAC.a, dst: BROADCAST, seed: 3100 });
  await passes(a, c, again, "a broadcast at the new c");
  b.take();
  p.take();
});
