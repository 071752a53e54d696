import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import { VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4 } from "../../src/core/virtio/devices/net/constants.js";
import { LINKTYPE_ETHERNET, readPcap } from "../../src/node/net/pcap.js";
import { BROADCAST, flowFrame, l4Offset, tsoHdr, type FlowSpec } from "../core/net-frames.js";
import { pseudoSum, sum16 } from "./net-frames.js";
import { SysError, unixAccept, type Fd } from "../../src/node/native.js";
import { listenUnix } from "../../src/node/native-util.js";
import { CLI, NetGuest, SwitchProcess, macBytes, parseStats, waitUntil, type RxPacket } from "./switch-harness.js";

// `iovirt switch` options at work in the child process, with raw virtio-net
// guests on its vhost-user ports: --poll (the switch in one busy-polling
// worker thread, no kicks), --pcap (captures read back with readPcap),
// client-mode ports, VLANs, --stats-interval, and what it prints and exits
// with when it cannot start.

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

async function guest(path: string | Fd, opts: Parameters<typeof NetGuest.connect>[1]): Promise<NetGuest> {
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
  const mark = sw.stdout.length;
  await stop(sw);
  // The counters printed at exit count what each capture recorded, the same frames as the files hold.
  const counted = parseStats(sw.stdout.slice(mark)).pcaps;
  const bytes = (fs: Uint8Array[]): number => fs.reduce((n, f) => n + f.length, 0);
  assert.deepEqual(counted.get(all), { rxPackets: 0, txPackets: sent.length, txBytes: bytes(sent), errors: {} });
  assert.deepEqual(counted.get(onC), { rxPackets: 0, txPackets: 2, txBytes: bcast.length + fromC.length, errors: {} });

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

test("--vhost-user PATH,client connects to a front end that listens, and again after the front end restarts", async () => {
  const sx = join(dir, "client-x.sock");
  const sy = join(dir, "client-y.sock");
  const sw = await start(
    ["--vhost-user", `${sx},name=x,client`, "--vhost-user", `${sy},name=y,mac=52:54:00:00:01:02,queues=2`],
    [{ name: "y", path: sy }],
  );
  // What it prints for attaching QEMU and DPDK (on stdout, after the start-up line on stderr): x is the client, so QEMU must listen.
  await waitUntil("the attach instructions", () => sw.stdout.includes(`DPDK --vdev net_virtio_user0,path=${sy},queues=2\n`));
  assert.ok(sw.stdout.includes(`-chardev socket,id=x,path=${sx},server=on,wait=off`), sw.stdout);
  assert.ok(sw.stdout.includes(`DPDK --vdev net_virtio_user0,path=${sx},server=1`));
  assert.ok(sw.stdout.includes(`-chardev socket,id=y,path=${sy},reconnect=1`));
  assert.ok(sw.stdout.includes("-netdev vhost-user,id=yn,chardev=y,queues=2 -device virtio-net-pci,netdev=yn,mac=52:54:00:00:01:02,mq=on"));
  const y = await guest(sy, {});
  for (const round of [1, 2]) {
    // The front end (QEMU with server=on) starts listening; the switch retries every second until it is there.
    const listener = listenUnix(sx);
    let conn: Fd | null = null;
    try {
      await waitUntil(`the switch to connect (round ${round})`, () => {
        try {
          conn = unixAccept(listener);
          return true;
        } catch (e) {
          if (e instanceof SysError && e.kind === "retry") return false;
          throw e;
        }
      });
    } finally {
      listener.close();
    }
    const x = await guest(conn!, {});
    const hello = frame({ src: MAC_X, dst: BROADCAST, seed: round });
    x.send(hello);
    assert.deepEqual(
      (await y.waitReceived(1, `x's broadcast at y (round ${round})`)).map((r) => r.frame),
      [hello],
    );
    y.take();
    const back = frame({ src: MAC_Y, dst: MAC_X, seed: 10 + round });
    y.send(back);
    assert.deepEqual(
      (await x.waitReceived(1, `y's frame at x (round ${round})`)).map((r) => r.frame),
      [back],
    );
    // The front end goes away (QEMU quits or restarts).
    x.close();
    guests.delete(x);
    await waitUntil("the switch to notice x left", () => (sw.stderr.match(/x: front end disconnected/g) ?? []).length >= round);
  }
  await stop(sw);
});

test("VLANs: access ports of one VLAN see each other untagged, a trunk sees them tagged, another VLAN sees nothing; --stats-interval prints counters unasked; --age forgets addresses", async () => {
  const names = ["v10a", "v10b", "v20", "trunk"];
  const path = (n: string): string => join(dir, `${n}.sock`);
  const vlan: Record<string, string> = { v10a: "10", v10b: "10", v20: "20", trunk: "trunk:10+20" };
  const sw = await start(
    [...names.flatMap((n) => ["--vhost-user", `${path(n)},name=${n},vlan=${vlan[n]}`]), "--stats-interval", "0.25", "--age", "0.5"],
    names.map((n) => ({ name: n, path: path(n) })),
  );
  const [a, b, other, trunk] = await Promise.all(names.map((n) => guest(path(n), {})));
  const frames = (got: RxPacket[]): Uint8Array[] => got.map((r) => r.frame);
  const fromA = { src: MAC_X, dst: BROADCAST, seed: 1 };
  a!.send(frame(fromA));
  assert.deepEqual(frames(await b!.waitReceived(1, "a's broadcast at b")), [frame(fromA)], "untagged on the access port");
  assert.deepEqual(
    frames(await trunk!.waitReceived(1, "a's broadcast on the trunk")),
    [frame({ ...fromA, vlan: 10 })],
    "tagged 10 on the trunk",
  );
  // From the trunk, tagged 20: only the VLAN 20 port gets it, untagged. Had a's broadcast leaked to it, it would be first.
  const fromTrunk = { src: MAC_Z, dst: BROADCAST, seed: 2 };
  trunk!.send(frame({ ...fromTrunk, vlan: 20 }));
  assert.deepEqual(frames(await other!.waitReceived(1, "the trunk's VLAN 20 broadcast")), [frame(fromTrunk)]);
  assert.deepEqual(a!.take(), [], "VLAN 10 ports do not see VLAN 20");
  assert.equal(b!.take().length, 1);
  // Counters arrive every quarter second without SIGUSR1.
  await waitUntil("two periodic counter prints", () => (sw.stdout.match(/^mac table: /gm) ?? []).length >= 2);
  assert.equal(parseStats(sw.stdout).ports.size, 4);
  // Two addresses were learned (a's, the trunk's); idle for half a second, both are forgotten.
  await waitUntil("both learned addresses to age out", () => /^mac table: 0\/8192 entries, 0 moved, 2 aged/m.test(sw.stdout));
  await stop(sw);
});

test("a port that cannot listen stops the switch at start with exit 1, naming the port and the path, with and without --poll", () => {
  for (const mode of [[], ["--poll"]]) {
    const r = spawnSync(
      process.execPath,
      [CLI, "switch", ...mode, "--vhost-user", join(dir, "fine.sock"), "--vhost-user", "/nonexistent/dir/b.sock,name=broken"],
      { encoding: "utf8", timeout: 60_000 },
    );
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /iovirt: port broken: cannot listen on \/nonexistent\/dir\/b\.sock: bind: .*ENOENT/);
  }
});
