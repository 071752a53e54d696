/**
 * TapPort against the kernel (runs as root): taps created here are moved into
 * a network namespace of their own, which routes between them, so every
 * packet written is checked on the far side as the kernel saw it.
 *
 *   port A (all offloads)  --  ns 10.77.1.2 | 10.77.2.2  --  port B (no offloads)
 *                                          | 10.77.3.2  --  port C (all offloads)
 *   behind A: 10.77.1.1, behind B: 10.77.2.1, behind C: 10.77.3.1 (static neighbours)
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { release } from "node:os";
import { fileURLToPath } from "node:url";

import { copyHdr, plainHdr, PLAIN_HDR, type NetHdr } from "../../src/core/net/hdr.js";
import { NO_OFFLOADS } from "../../src/core/net/offloads.js";
import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_TCPV4,
} from "../../src/core/virtio/devices/net/constants.js";
import { NetPortError } from "../../src/node/net/errors.js";
import { TapPort, type TapOptions } from "../../src/node/net/tap.js";
import {
  ETHERTYPE_IPV4,
  PROTO_ICMP,
  PROTO_TCP,
  PROTO_UDP,
  ethernet,
  icmpEcho,
  ip4,
  ipv4,
  mac,
  parseIpv4,
  port16,
  run,
  tcpPartial,
  tcpSeq,
  udp,
  until,
} from "./net-frames.js";

const NS = `iovirt-tap-${process.pid}`;
const TAG = process.pid % 100000;
const HOST_MAC = { a: mac("02:00:00:00:0a:01"), b: mac("02:00:00:00:0b:01"), c: mac("02:00:00:00:0c:01") };
const NS_MAC = { a: mac("02:00:00:00:0a:02"), b: mac("02:00:00:00:0b:02"), c: mac("02:00:00:00:0c:02") };

interface Got {
  frame: Uint8Array;
  hdr: NetHdr;
}

class Capture {
  readonly got: Got[] = [];
  readonly onPacket = (frame: Uint8Array, hdr: Readonly<NetHdr>): void => {
    this.got.push({ frame: frame.slice(), hdr: copyHdr(hdr, plainHdr()) });
  };
  /** IPv4 packets of protocol `proto` (the kernel may also send IPv6 or ARP). */
  ipv4(proto: number): Got[] {
    return this.got.filter((g) => parseIpv4(g.frame)?.proto === proto);
  }
}

function nsIp(...args: string[]): string {
  return run("ip", "-n", NS, ...args);
}

/** Moves the port's tap into the namespace, addresses it and pins its peer's MAC. */
function plug(port: TapPort, net: number, nsMac: Uint8Array, hostMac: Uint8Array): void {
  const dev = port.ifname;
  run("ip", "link", "set", "dev", dev, "netns", NS);
  nsIp("link", "set", "dev", dev, "address", [...nsMac].map((x) => x.toString(16).padStart(2, "0")).join(":"));
  nsIp("addr", "add", `10.77.${net}.2/24`, "dev", dev);
  nsIp("link", "set", "dev", dev, "up");
  nsIp(
    "neigh",
    "replace",
    `10.77.${net}.1`,
    "lladdr",
    [...hostMac].map((x) => x.toString(16).padStart(2, "0")).join(":"),
    "dev",
    dev,
    "nud",
    "permanent",
  );
}

const cap = { a: new Capture(), b: new Capture(), c: new Capture() };
let portA: TapPort;
let portB: TapPort;
let portC: TapPort;

before(() => {
  run("ip", "netns", "add", NS);
  run(
    "ip",
    "netns",
    "exec",
    NS,
    "sysctl",
    "-q",
    "-w",
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
    "net.ipv4.ip_forward=1",
  );
  // A small read budget, so that bursts take several readiness callbacks.
  portA = new TapPort({ name: `ivtA${TAG}`, onPacket: cap.a.onPacket, readBudget: 3 });
  portB = new TapPort({ name: `ivtB${TAG}`, onPacket: cap.b.onPacket, offloads: { csum: false } });
  portC = new TapPort({ name: `ivtC${TAG}`, onPacket: cap.c.onPacket });
  for (const p of [portA, portB, portC]) p.open();
  plug(portA, 1, NS_MAC.a, HOST_MAC.a);
  plug(portB, 2, NS_MAC.b, HOST_MAC.b);
  plug(portC, 3, NS_MAC.c, HOST_MAC.c);
});

after(() => {
  for (const p of [portA, portB, portC]) p?.close();
  spawnSync("ip", ["netns", "del", NS]);
});

function kernelAtLeast(major: number, minor: number): boolean {
  const m = /^(\d+)\.(\d+)/.exec(release());
  assert.ok(m !== null);
  const [maj, min] = [Number(m[1]), Number(m[2])];
  return maj > major || (maj === major && min >= minor);
}

test("accepts() reports what TUNSETOFFLOAD granted: checksums, TSO and ECN, USO exactly on Linux 6.2 and later; nothing without csum", () => {
  assert.deepEqual({ ...portA.accepts() }, { csum: true, tso4: true, tso6: true, ecn: true, uso: kernelAtLeast(6, 2) });
  assert.deepEqual({ ...portB.accepts() }, { ...NO_OFFLOADS });
  assert.equal(portA.maxFrame(), 1514, "MTU 1500 of a new tap + 14");
  assert.equal(portA.name, `ivtA${TAG}`);
  assert.ok(portA.linkUp());
});

test("TapPort exchanges an ICMP echo with the kernel through a tap moved into another network namespace", async () => {
  const data = new TextEncoder().encode("iovirt tap echo 0123456789");
  const req = ethernet(
    NS_MAC.a,
    HOST_MAC.a,
    ETHERTYPE_IPV4,
    ipv4(ip4("10.77.1.1"), ip4("10.77.1.2"), PROTO_ICMP, icmpEcho(8, 0x1234, 7, data)),
  );
  const before = { ...portA.stats, errors: { ...portA.stats.errors } };
  assert.equal(portA.send(req, PLAIN_HDR), null);
  await until(() => cap.a.ipv4(PROTO_ICMP).length > 0, "the echo reply");
  const reply = cap.a.ipv4(PROTO_ICMP)[0]!;
  const ip = parseIpv4(reply.frame)!;
  assert.deepEqual([reply.frame.subarray(0, 6), reply.frame.subarray(6, 12)], [HOST_MAC.a, NS_MAC.a]);
  assert.equal(ip.src, "10.77.1.2");
  assert.equal(ip.dst, "10.77.1.1");
  assert.ok(ip.headerOk && ip.l4Ok, "the reply's checksums verify");
  assert.equal(ip.l4[0], 0, "echo reply");
  assert.deepEqual(ip.l4.subarray(4, 8), new Uint8Array([0x12, 0x34, 0, 7]));
  assert.deepEqual(ip.l4.subarray(8), data);
  assert.equal(portA.stats.txPackets, before.txPackets + 1);
  assert.equal(portA.stats.txBytes, before.txBytes + req.length);
  assert.ok(portA.stats.rxPackets >= before.rxPackets + 1);
  assert.ok(portA.stats.rxBytes >= before.rxBytes + reply.frame.length);
});

test("40 echo requests sent back to back get 40 replies, read at most 3 per readiness callback", async () => {
  const start = cap.a.ipv4(PROTO_ICMP).length;
  for (let seq = 100; seq < 140; seq++) {
    const req = ethernet(
      NS_MAC.a,
      HOST_MAC.a,
      ETHERTYPE_IPV4,
      ipv4(ip4("10.77.1.1"), ip4("10.77.1.2"), PROTO_ICMP, icmpEcho(8, 0x4242, seq, new Uint8Array(64))),
    );
    assert.equal(portA.send(req, PLAIN_HDR), null);
  }
  await until(() => cap.a.ipv4(PROTO_ICMP).length >= start + 40, "40 replies");
  const seqs = cap.a
    .ipv4(PROTO_ICMP)
    .slice(start)
    .map((g) => parseIpv4(g.frame)!.l4)
    .map((m) => (m[6]! << 8) | m[7]!);
  assert.deepEqual(
    seqs.sort((x, y) => x - y),
    Array.from({ length: 40 }, (_, i) => 100 + i),
  );
});

test("a NEEDS_CSUM UDP datagram written to one tap leaves a tap without checksum offload with the checksum the kernel completed", async () => {
  const src = ip4("10.77.1.1");
  const dst = ip4("10.77.2.1");
  const data = new TextEncoder().encode("odd-length payload, finished by the kernel!");
  const frame = ethernet(NS_MAC.a, HOST_MAC.a, ETHERTYPE_IPV4, ipv4(src, dst, PROTO_UDP, udp(src, dst, 40000, 5555, data, true)));
  assert.equal(parseIpv4(frame)!.l4Ok, false, "sent with only the pseudo-header sum in place");
  const hdr = { ...plainHdr(), flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: 34, csumOffset: 6 };
  assert.equal(portA.send(frame, hdr), null);
  await until(() => cap.b.ipv4(PROTO_UDP).length > 0, "the forwarded datagram on B");
  const got = cap.b.ipv4(PROTO_UDP)[0]!;
  const ip = parseIpv4(got.frame)!;
  assert.equal(got.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, "B took no offloads: the packet comes plain");
  assert.equal(ip.ttl, 63, "forwarded once");
  assert.ok(ip.headerOk, "IPv4 header checksum");
  assert.ok(ip.l4Ok, "UDP checksum completed from csum_start/csum_offset");
  assert.deepEqual(ip.l4.subarray(8), data);
  assert.deepEqual(got.frame.subarray(0, 12), new Uint8Array([...HOST_MAC.b, ...NS_MAC.b]));
});

function tsoFrame(dst: Uint8Array, payload: number, seq: number): Uint8Array {
  const src = ip4("10.77.1.1");
  const data = new Uint8Array(payload);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  return ethernet(NS_MAC.a, HOST_MAC.a, ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, tcpPartial(src, dst, 40001, 80, seq, data), 9));
}

const TSO_HDR: NetHdr = {
  flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
  gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
  hdrLen: 54,
  gsoSize: 1000,
  csumStart: 34,
  csumOffset: 16,
};

test("a TSO4 packet of 3000 bytes written to a tap leaves a tap without TSO as three 1000-byte segments with valid checksums", async () => {
  const frame = tsoFrame(ip4("10.77.2.1"), 3000, 1_000_000);
  assert.equal(portA.send(frame, TSO_HDR), null);
  await until(() => cap.b.ipv4(PROTO_TCP).length >= 3, "three segments on B");
  const segs = cap.b.ipv4(PROTO_TCP).map((g) => parseIpv4(g.frame)!);
  assert.equal(segs.length, 3);
  const payload = frame.subarray(54);
  segs.forEach((ip, i) => {
    assert.ok(ip.headerOk && ip.l4Ok, `segment ${i} checksums`);
    assert.equal(tcpSeq(ip.l4), 1_000_000 + 1000 * i);
    assert.equal(port16(ip.l4, 2), 80);
    assert.deepEqual(ip.l4.subarray(20), payload.subarray(1000 * i, 1000 * (i + 1)));
  });
});

test("the kernel hands a forwarded TSO4 packet to a tap that accepted TSO4 unsegmented, with its GSO header", async () => {
  const frame = tsoFrame(ip4("10.77.3.1"), 3000, 5000);
  assert.equal(portA.send(frame, TSO_HDR), null);
  await until(() => cap.c.ipv4(PROTO_TCP).length > 0, "the packet on C");
  const tcp = cap.c.ipv4(PROTO_TCP);
  assert.equal(tcp.length, 1, "one unsegmented packet");
  const got = tcp[0]!;
  assert.equal(got.frame.length, frame.length);
  assert.equal(got.hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4);
  assert.equal(got.hdr.gsoSize, 1000);
  assert.equal(got.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM);
  assert.equal(got.hdr.csumStart, 34);
  assert.equal(got.hdr.csumOffset, 16);
  assert.deepEqual(got.frame.subarray(54), frame.subarray(54));
});

test("send() refuses, and counts, what the tap was not promised or what cannot be a packet", () => {
  const small = tsoFrame(ip4("10.77.2.1"), 100, 1);
  const errors = (p: TapPort, k: string) => p.stats.errors[`tx:${k}`] ?? 0;
  const n0 = errors(portB, "offload-not-negotiated");
  assert.equal(portB.send(small, TSO_HDR), "offload-not-negotiated", "B has no TSO");
  assert.equal(portB.send(small, { ...plainHdr(), flags: 1, csumStart: 34, csumOffset: 16 }), "offload-not-negotiated", "B has no csum");
  assert.equal(errors(portB, "offload-not-negotiated"), n0 + 2);
  assert.equal(portA.send(small.subarray(0, 13), PLAIN_HDR), "runt");
  assert.equal(portA.send(new Uint8Array(1515), PLAIN_HDR), "too-long");
  assert.equal(portA.send(small, { ...TSO_HDR, gsoSize: 0 }), "gso-size-zero");
  assert.equal(portA.send(small, { ...TSO_HDR, csumOffset: small.length }), "csum-out-of-range");
  assert.equal(portA.send(small, { ...plainHdr(), gsoType: 0x42 }), "bad-hdr");
  assert.equal(portA.send(small, { ...plainHdr(), flags: 4 }), "bad-hdr");
  assert.equal(portA.send(small, { ...TSO_HDR, gsoType: 3 }), "offload-not-negotiated", "UFO is never asked for");
  assert.equal(errors(portA, "runt"), 1);
  assert.equal(errors(portA, "too-long"), 1);
});

test("a header the kernel finds inconsistent with its frame comes back as bad-hdr, counted by errno", () => {
  // tun_get_user refuses an hdr_len beyond the bytes written (EINVAL); the port leaves that check to the kernel.
  const frame = tsoFrame(ip4("10.77.2.1"), 100, 1);
  const n0 = portA.stats.errors["tx:EINVAL"] ?? 0;
  assert.equal(portA.send(frame, { ...TSO_HDR, hdrLen: frame.length + 100 }), "bad-hdr");
  assert.equal(portA.stats.errors["tx:EINVAL"], n0 + 1);
});

test("a write to a tap whose interface is down comes back as link-down (the kernel's EIO)", () => {
  const p = new TapPort({ name: `ivtW${TAG}`, onPacket: () => {} });
  p.open();
  try {
    assert.equal(p.send(new Uint8Array(60), PLAIN_HDR), "link-down");
    assert.equal(p.stats.errors["tx:EIO"], 1);
    assert.equal(p.stats.txPackets, 0);
    assert.ok(p.linkUp(), "the port itself stays usable: the interface may come up");
  } finally {
    p.close();
  }
  assert.equal(p.linkUp(), false);
  assert.equal(p.send(new Uint8Array(60), PLAIN_HDR), "link-down", "closed");
});

test("bad interface names and attach without a name are refused before any system call", () => {
  const onPacket = (): void => {};
  for (const name of ["", "sixteen-bytes-xx", "a/b", "a:b", "a b", ".", ".."]) {
    assert.throws(
      () => new TapPort({ name, onPacket }),
      (e: unknown) => e instanceof NetPortError && e.code === "BAD_OPTION" && /1 to 15 bytes/.test(e.message),
      JSON.stringify(name),
    );
  }
  assert.throws(
    () => new TapPort({ attach: true, onPacket }),
    (e: unknown) => e instanceof NetPortError && e.code === "BAD_OPTION",
  );
  assert.doesNotThrow(() => new TapPort({ name: "fifteen-bytes-x", onPacket }));
});

function openError(opts: TapOptions): NetPortError {
  const p = new TapPort(opts);
  try {
    p.open();
  } catch (e) {
    assert.ok(e instanceof NetPortError, String(e));
    return e;
  }
  p.close();
  assert.fail("open() succeeded");
}

test("open() says what to do: attach to a missing tap, create over an existing one, attach to a held one", () => {
  const onPacket = (): void => {};
  const missing = openError({ name: `ivtM${TAG}`, attach: true, onPacket });
  assert.equal(missing.code, "NOT_FOUND");
  assert.match(missing.message, /ip tuntap add dev ivtM\d+ mode tap/);

  const name = `ivtP${TAG}`;
  const first = new TapPort({ name, persist: true, onPacket });
  first.open();
  try {
    const exists = openError({ name, onPacket });
    assert.equal(exists.code, "BUSY");
    assert.match(exists.message, /exists.*attach/);
    const held = openError({ name, attach: true, onPacket });
    assert.equal(held.code, "BUSY");
    assert.match(held.message, /another process holds/);
  } finally {
    first.close();
  }
  try {
    assert.match(run("ip", "link", "show", "dev", name), new RegExp(name), "persist keeps the interface after close");
    const again = new TapPort({ name, attach: true, onPacket });
    again.open();
    assert.ok(again.linkUp());
    again.close();
  } finally {
    run("ip", "link", "del", "dev", name);
  }
  const tunName = `ivtT${TAG}`;
  run("ip", "tuntap", "add", "dev", tunName, "mode", "tun");
  try {
    const wrongKind = openError({ name: tunName, attach: true, onPacket });
    assert.equal(wrongKind.code, "INCOMPATIBLE");
  } finally {
    run("ip", "link", "del", "dev", tunName);
  }
});

test("without CAP_NET_ADMIN, creating a tap fails with PERMISSION and says how to get it", () => {
  const tapModule = fileURLToPath(new URL("../../src/node/net/tap.js", import.meta.url));
  const script = `
    const { TapPort } = await import(${JSON.stringify(tapModule)});
    try { new TapPort({ name: "ivtE${TAG}", onPacket() {} }).open(); console.log("opened"); }
    catch (e) { console.log(e.code + " " + e.message); }`;
  const r = spawnSync(
    "setpriv",
    ["--bounding-set", "-net_admin", "--inh-caps", "-net_admin", process.execPath, "--input-type=module", "-e", script],
    {
      encoding: "utf8",
    },
  );
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^PERMISSION .*CAP_NET_ADMIN/);
});

test("without /dev/net/tun, open() fails with NO_TUN and says how to get the device", () => {
  const tapModule = fileURLToPath(new URL("../../src/node/net/tap.js", import.meta.url));
  const script = `
    const { TapPort } = await import(${JSON.stringify(tapModule)});
    try { new TapPort({ onPacket() {} }).open(); console.log("opened"); }
    catch (e) { console.log(e.code + " " + e.message); }`;
  // A private mount namespace where /dev/net is an empty directory.
  const r = spawnSync(
    "unshare",
    [
      "--mount",
      "--propagation",
      "private",
      "sh",
      "-c",
      'mount -t tmpfs none /dev/net && exec "$0" --input-type=module -e "$1"',
      process.execPath,
      script,
    ],
    { encoding: "utf8" },
  );
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^NO_TUN .*ENOENT.*modprobe tun.*--device \/dev\/net\/tun/);
});

test("deleting the interface under an open port takes the port down once, with a message, and send() reports link-down", async () => {
  const errors: NetPortError[] = [];
  const p = new TapPort({ name: `ivtD${TAG}`, onPacket: () => {}, onError: (e) => errors.push(e) });
  p.open();
  try {
    run("ip", "link", "set", "dev", p.ifname, "up");
    run("ip", "link", "del", "dev", p.ifname);
    // The readiness watch reports the dead descriptor without any traffic.
    await until(() => errors.length > 0, "onError");
    assert.equal(p.linkUp(), false);
    assert.equal(errors.length, 1);
    assert.match(errors[0]!.message, /read failed .*deleted/);
    assert.equal(Object.keys(p.stats.errors).filter((k) => k.startsWith("rx:")).length, 1);
    assert.equal(p.send(new Uint8Array(60), PLAIN_HDR), "link-down");
  } finally {
    p.close();
  }
});
