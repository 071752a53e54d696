import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import { VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4 } from "../../src/core/virtio/devices/net/constants.js";
import { LINKTYPE_ETHERNET, readPcap } from "../../src/node/net/pcap.js";
import { BROADCAST, flowFrame, l4Offset, tsoHdr, type FlowSpec } from "../core/net-frames.js";
import { pseudoSum, sum16 } from "./net-frames.js";
import { NetGuest, SwitchProcess, macBytes, parseStats } from "./switch-harness.js";

// `iovirt switch --poll` (the switch in one busy-polling worker thread, no
// kicks) and `--pcap` (captures read back with readPcap), each as a child
// process with raw virtio-net guests on its vhost-user ports.

const dir = mkdtempSync(join(tmpdir(), "iovirt-switch-modes-"));
const MAC_X = macBytes("52:54:00:00:01:01");
const MAC_Y = macBytes("52:54:00:00:01:02");
const MAC_Z = macBytes("52:54:00:00:01:03");
const running = new Set<SwitchProcess>();
const guests = new Set<NetGuest>();

after(async () => {
  for (const g of guests) g.close();
  for (const s of running) await s.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function start(args: string[], ports: { name: string; path: string }[]): Promise<SwitchProcess> {
  const s = await SwitchProcess.start(args, ports);
  running.add(s);
  return s;
}

async function stop(s: SwitchProcess): Promise<void> {
  running.delete(s);
  assert.equal(await s.stop(), 0, `iovirt switch did not exit cleanly:\n${s.stderr}`);
}

async function guest(path: string, opts: Parameters<typeof NetGuest.connect>[1]): Promise<NetGuest> {
  const g = await NetGuest.connect(path, opts);
  guests.add(g);
  return g;
}

function frame(s: FlowSpec & { src: Uint8Array; dst: Uint8Array }): Uint8Array {
  return flowFrame({ payload: 100, ...s });
}

test("--poll: frames flow both ways between a split-ring and a packed-ring guest that never kick, and SIGUSR1 reaches the worker", async () => {
  const sx = join(dir, "px.sock");
  const sy = join(dir, "py.sock");
  const sw = await start(
    ["--poll", "--vhost-user", `${sx},name=x`, "--vhost-user", `${sy},name=y`],
    [
      { name: "x", path: sx },
      { name: "y", path: sy },
    ],
  );
  assert.match(sw.stderr, /busy-poll worker/);
  const x = await guest(sx, { mrg: true });
  const y = await guest(sy, { packed: true, rxBufSize: 2048 });
  const bcast = frame({ src: MAC_X, dst: BROADCAST, seed: 1 });
  x.send(bcast);
  assert.deepEqual(
    (await y.waitReceived(1, "x's broadcast at y")).map((r) => r.frame),
    [bcast],
  );
  y.take();
  const reply = frame({ src: MAC_Y, dst: MAC_X, seed: 2, payload: 1472 });
  y.send(reply);
  const [atX] = await x.waitReceived(1, "y's reply at x");
  assert.deepEqual(atX!.frame, reply);
  assert.equal(atX!.numBuffers, 1, "1526 bytes fit one default buffer");
  x.take();
  const burst = Array.from({ length: 300 }, (_, i) => frame({ src: MAC_X, dst: MAC_Y, seed: 10 + i, payload: 10 + i }));
  for (let i = 0; i < burst.length; i++) {
    x.send(burst[i]!);
    if (i % 50 === 49) await x.waitTxDone();
  }
  const got = await y.waitReceived(burst.length, "x's burst at y");
  assert.ok(
    got.every((r, i) => Buffer.compare(r.frame, burst[i]!) === 0),
    "every frame in order and intact",
  );
  y.take();
  assert.deepEqual([x.kicks, y.kicks], [0, 0], "the worker polls: it asked the drivers never to kick");
  const stats = await sw.stats();
  assert.equal(stats.devices.get("x")?.txFrames, 1 + burst.length);
  assert.equal(stats.devices.get("y")?.rxFrames, 1 + burst.length);
  assert.equal(stats.ports.get("x")?.fwd, burst.length, "learned: the burst was forwarded, not flooded");
  for (const g of [x, y]) {
    g.close();
    guests.delete(g);
  }
  const mark = sw.stdout.length;
  await stop(sw);
  // At exit the switch prints its counters once more.
  assert.equal(parseStats(sw.stdout.slice(mark)).devices.get("y")?.rxFrames, 1 + burst.length);
});

test("--pcap: the capture of all traffic and the capture of one port hold the frames the guests sent, as plain segments", async () => {
  const sa = join(dir, "ca.sock");
  const sb = join(dir, "cb.sock");
  const sc = join(dir, "cc.sock");
  const all = join(dir, "all.pcap");
  const onC = join(dir, "c.pcap");
  const sw = await start(
    [
      "--vhost-user",
      `${sa},name=a`,
      "--vhost-user",
      `${sb},name=b`,
      "--vhost-user",
      `${sc},name=c`,
      "--pcap",
      all,
      "--pcap",
      `${onC},port=c`,
    ],
    [
      { name: "a", path: sa },
      { name: "b", path: sb },
      { name: "c", path: sc },
    ],
  );
  assert.match(sw.stderr, /capturing all traffic into .*all\.pcap/);
  assert.match(sw.stderr, /capturing traffic of port c into .*c\.pcap/);
  const a = await guest(sa, { features: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) });
  const b = await guest(sb, {});
  const c = await guest(sc, {});
  const sent: Uint8Array[] = [];
  const bcast = frame({ src: MAC_X, dst: BROADCAST, seed: 1 });
  a.send(bcast);
  await b.waitReceived(1, "the broadcast at b");
  await c.waitReceived(1, "the broadcast at c");
  sent.push(bcast);
  const fromB = frame({ src: MAC_Y, dst: MAC_X, seed: 2 });
  b.send(fromB);
  await a.waitReceived(1, "b's frame at a");
  sent.push(fromB);
  const spec = { src: MAC_X, dst: MAC_Y, proto: "tcp" as const, payload: 3000, seed: 3 };
  a.send(flowFrame(spec), tsoHdr(spec, 1000));
  const segs = (await b.waitReceived(4, "the TSO packet's segments at b")).slice(1).map((r) => r.frame);
  assert.equal(segs.length, 3, "b negotiated no offloads: 3000 bytes in 1000-byte segments");
  sent.push(...segs);
  const fromC = frame({ src: MAC_Z, dst: MAC_X, seed: 4 });
  c.send(fromC);
  await a.waitReceived(2, "c's frame at a");
  sent.push(fromC);
  await stop(sw);

  const capAll = readPcap(readFileSync(all));
  assert.equal(capAll.linkType, LINKTYPE_ETHERNET);
  assert.deepEqual(
    capAll.records.map((r) => Buffer.from(r.data)),
    sent.map((f) => Buffer.from(f)),
    "every packet once, as it entered; the TSO packet as the segments b got",
  );
  for (const r of capAll.records) assert.equal(r.len, r.caplen, "nothing truncated");
  // The capture's segments are complete packets: valid TCP checksums without any offload header.
  const l4 = l4Offset(spec);
  for (const r of capAll.records.slice(2, 5)) {
    const f = r.data;
    assert.equal(sum16(f, l4, f.length, pseudoSum(f.subarray(26, 30), f.subarray(30, 34), 6, f.length - l4)), 0xffff);
  }
  const capC = readPcap(readFileSync(onC));
  assert.deepEqual(
    capC.records.map((r) => Buffer.from(r.data)),
    [bcast, fromC].map((f) => Buffer.from(f)),
    "port c: the broadcast offered to it and what it sent, nothing between a and b",
  );
  const t0 = capAll.records[0]!;
  assert.ok(Math.abs(t0.tsSec - Date.now() / 1000) < 600, "timestamps are the time of capture");
});
