/**
 * VxlanPort: the argument parser, the flow hash, the wire format against a
 * plain UDP socket on loopback, and interoperation with Linux's own vxlan
 * device in a network namespace reached over a veth pair (runs as root).
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createSocket, type RemoteInfo, type Socket } from "node:dgram";
import fc from "fast-check";

import { copyHdr, plainHdr, PLAIN_HDR, type NetHdr } from "../../src/core/net/hdr.js";
import { NO_OFFLOADS } from "../../src/core/net/offloads.js";
import { NetPortError } from "../../src/node/net/errors.js";
import { flowHash, parseVxlanSpec, VxlanPort, type VxlanOptions } from "../../src/node/net/vxlan.js";
import {
  ETHERTYPE_IPV4,
  PROTO_ICMP,
  PROTO_UDP,
  arpRequest,
  ethernet,
  icmpEcho,
  ip4,
  ipv4,
  mac,
  parseArpReply,
  parseIpv4,
  run,
  udp,
  until,
} from "./net-frames.js";

interface Got {
  frame: Uint8Array;
  hdr: NetHdr;
}

function capture(): { got: Got[]; onPacket: (f: Uint8Array, h: Readonly<NetHdr>) => void } {
  const got: Got[] = [];
  return { got, onPacket: (f, h) => got.push({ frame: f.slice(), hdr: copyHdr(h, plainHdr()) }) };
}

function badOption(f: () => unknown, pattern: RegExp): void {
  assert.throws(f, (e: unknown) => e instanceof NetPortError && e.code === "BAD_OPTION" && pattern.test(e.message));
}

// ---------------------------------------------------------------------------
// Parsing and hashing
// ---------------------------------------------------------------------------

test("parseVxlanSpec reads IPv4 and bracketed IPv6 endpoints, with ports defaulting to 4789", () => {
  assert.deepEqual(parseVxlanSpec("10.0.0.1:4790,10.0.0.2,42"), {
    local: "10.0.0.1",
    localPort: 4790,
    remote: "10.0.0.2",
    remotePort: 4789,
    vni: 42,
  });
  assert.deepEqual(parseVxlanSpec("[fd00::1],[fd00::2]:8472,16777215"), {
    local: "fd00::1",
    localPort: 4789,
    remote: "fd00::2",
    remotePort: 8472,
    vni: 16777215,
  });
  assert.deepEqual(parseVxlanSpec("fd00::1, fd00::2, 0"), {
    local: "fd00::1",
    localPort: 4789,
    remote: "fd00::2",
    remotePort: 4789,
    vni: 0,
  });
});

test("parseVxlanSpec says what is wrong with a malformed argument", () => {
  badOption(() => parseVxlanSpec("10.0.0.1,10.0.0.2"), /expected LOCAL_IP\[:PORT\],REMOTE_IP\[:PORT\],VNI/);
  badOption(() => parseVxlanSpec("10.0.0.300,10.0.0.2,1"), /local address "10.0.0.300" is not an IPv4 or IPv6 address/);
  badOption(() => parseVxlanSpec("10.0.0.1,host.example,1"), /remote address "host.example"/);
  badOption(() => parseVxlanSpec("10.0.0.1:0,10.0.0.2,1"), /local port "0" is not a number from 1 to 65535/);
  badOption(() => parseVxlanSpec("10.0.0.1,10.0.0.2:65536,1"), /remote port "65536"/);
  badOption(() => parseVxlanSpec("10.0.0.1:x,10.0.0.2,1"), /local port "x"/);
  badOption(() => parseVxlanSpec("10.0.0.1,10.0.0.2,16777216"), /VNI "16777216" is not a number from 0 to 16777215/);
  badOption(() => parseVxlanSpec("10.0.0.1,10.0.0.2,-1"), /VNI "-1"/);
  badOption(() => parseVxlanSpec("10.0.0.1,fd00::2,1"), /must both be IPv4 or both IPv6/);
  badOption(() => parseVxlanSpec("[fd00::1,fd00::2,1"), /lacks its closing "\]"/);
  badOption(() => parseVxlanSpec("[fd00::1]x,fd00::2,1"), /expected ":PORT" after "\]"/);
});

test("VxlanPort refuses options out of range", () => {
  const base: VxlanOptions = { local: "127.0.0.1", remote: "127.0.0.1", vni: 1, onPacket: () => {} };
  badOption(() => new VxlanPort({ ...base, vni: 2 ** 24 }), /VNI 16777216/);
  badOption(() => new VxlanPort({ ...base, underlayMtu: 49 }), /underlayMtu 49 must be an integer from 50 to 65535/);
  badOption(() => new VxlanPort({ ...base, sourcePorts: 65 }), /sourcePorts 65/);
  badOption(() => new VxlanPort({ ...base, sendSlots: 0 }), /sendSlots 0/);
  badOption(() => new VxlanPort({ ...base, remotePort: 0 }), /remote port 0/);
});

test("maxFrame() is the underlay MTU less the encapsulation: 1464 over IPv4 and 1444 over IPv6 on 1500, more on jumbo underlays", () => {
  const onPacket = (): void => {};
  assert.equal(new VxlanPort({ local: "10.0.0.1", remote: "10.0.0.2", vni: 1, onPacket }).maxFrame(), 1500 - 20 - 8 - 8);
  assert.equal(new VxlanPort({ local: "fd00::1", remote: "fd00::2", vni: 1, onPacket }).maxFrame(), 1500 - 40 - 8 - 8);
  assert.equal(new VxlanPort({ local: "10.0.0.1", remote: "10.0.0.2", vni: 1, underlayMtu: 9000, onPacket }).maxFrame(), 8964);
  assert.equal(
    new VxlanPort({ local: "10.0.0.1", remote: "10.0.0.2", vni: 1, underlayMtu: 65535, onPacket }).maxFrame(),
    65499,
    "UDP's own limit",
  );
  assert.deepEqual({ ...new VxlanPort({ local: "10.0.0.1", remote: "10.0.0.2", vni: 1, onPacket }).accepts() }, { ...NO_OFFLOADS });
});

function tcpFrame(sport: number, dport: number, payload: Uint8Array): Uint8Array {
  const src = ip4("10.1.0.1");
  const dst = ip4("10.1.0.2");
  const t = new Uint8Array(20 + payload.length);
  t[0] = sport >> 8;
  t[1] = sport & 0xff;
  t[2] = dport >> 8;
  t[3] = dport & 0xff;
  t[12] = 0x50;
  t.set(payload, 20);
  return ethernet(mac("02:00:00:00:00:02"), mac("02:00:00:00:00:01"), ETHERTYPE_IPV4, ipv4(src, dst, 6, t));
}

test("flowHash depends on the flow, not on the payload, spreads flows, and gives a 32-bit value for any bytes", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 65535 }),
      fc.integer({ min: 0, max: 65535 }),
      fc.uint8Array({ maxLength: 64 }),
      fc.uint8Array({ maxLength: 64 }),
      (sp, dp, a, b) => {
        assert.equal(flowHash(tcpFrame(sp, dp, a)), flowHash(tcpFrame(sp, dp, b)));
      },
    ),
  );
  const hashes = new Set<number>();
  for (let sp = 1000; sp < 1064; sp++) hashes.add(flowHash(tcpFrame(sp, 80, new Uint8Array(10))));
  assert.ok(hashes.size > 60, `64 flows gave ${hashes.size} distinct hashes`);
  // Hostile or truncated frames of every length, steered toward the parsed EtherTypes.
  const ethertype = fc.constantFrom([0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x12, 0x34]);
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 90 }), ethertype, (bytes, type) => {
      if (bytes.length >= 14) bytes.set(type, 12);
      const h = flowHash(bytes);
      assert.ok(Number.isInteger(h) && h >= 0 && h < 2 ** 32, String(h));
    }),
  );
});

// ---------------------------------------------------------------------------
// Wire format against a plain UDP socket on loopback
// ---------------------------------------------------------------------------

interface Datagram {
  msg: Buffer;
  from: RemoteInfo;
}

async function udpPeer(address: string, type: "udp4" | "udp6" = "udp4"): Promise<{ sock: Socket; got: Datagram[]; port: number }> {
  const sock = createSocket(type);
  const got: Datagram[] = [];
  sock.on("message", (msg, from) => got.push({ msg, from }));
  await new Promise<void>((r) => sock.bind(0, address, r));
  return { sock, got, port: sock.address().port };
}

type Peer = Awaited<ReturnType<typeof udpPeer>>;

/** A VxlanPort on 127.0.0.1 (a free port) whose remote is `peer`; VNI 1 and no receiver unless `opts` say otherwise. */
function toPeer(peer: Peer, opts: Partial<ConstructorParameters<typeof VxlanPort>[0]> = {}): VxlanPort {
  return new VxlanPort({
    local: "127.0.0.1",
    localPort: 0,
    remote: "127.0.0.1",
    remotePort: peer.port,
    vni: 1,
    onPacket: () => {},
    ...opts,
  });
}

/**
 * Runs `fn` with a VxlanPort on 127.0.0.1 (a free port) that sends to a
 * fresh UDP peer, opened unless `open` is false, and closes both after.
 */
async function withPeer(
  opts: Partial<ConstructorParameters<typeof VxlanPort>[0]>,
  fn: (port: VxlanPort, peer: Peer) => Promise<void>,
  open = true,
): Promise<VxlanPort> {
  const peer = await udpPeer("127.0.0.1");
  const port = toPeer(peer, opts);
  try {
    if (open) await port.open();
    await fn(port, peer);
  } finally {
    await port.close();
    peer.sock.close();
  }
  return port;
}

function sendTo(sock: Socket, msg: Uint8Array, port: number, address: string): Promise<void> {
  return new Promise((resolve, reject) => sock.send(msg, port, address, (err) => (err ? reject(err) : resolve())));
}

function vxlanDatagram(flags: number, vni: number, frame: Uint8Array, reserved = 0): Uint8Array {
  const d = new Uint8Array(8 + frame.length);
  d[0] = flags;
  d[1] = d[2] = d[3] = d[7] = reserved;
  d[4] = vni >> 16;
  d[5] = (vni >> 8) & 0xff;
  d[6] = vni & 0xff;
  d.set(frame, 8);
  return d;
}

test("send() encapsulates per RFC 7348 §5 and a flow always leaves from one source port in 49152-65535", async () => {
  await withPeer({ vni: 0x123456 }, async (port, peer) => {
    assert.equal(port.sourcePorts.length, 8);
    for (const p of port.sourcePorts) assert.ok(p >= 49152 && p <= 65535, `source port ${p}`);
    const frames: Uint8Array[] = [];
    for (let sp = 2000; sp < 2032; sp++) frames.push(tcpFrame(sp, 443, new Uint8Array([sp & 0xff, 1, 2, 3])));
    for (const f of [...frames, ...frames]) assert.equal(port.send(f, PLAIN_HDR), null);
    await until(() => peer.got.length === 64, "64 datagrams");
    const bySport = new Map<number, Set<string>>();
    const byFlow = new Map<string, Set<number>>();
    for (const { msg, from } of peer.got) {
      assert.deepEqual([...msg.subarray(0, 8)], [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
      const inner = msg.subarray(8);
      assert.ok(
        frames.some((f) => Buffer.compare(Buffer.from(f), inner) === 0),
        "payload is a frame sent",
      );
      const flow = inner.subarray(34, 38).toString("hex");
      byFlow.set(flow, (byFlow.get(flow) ?? new Set()).add(from.port));
      bySport.set(from.port, (bySport.get(from.port) ?? new Set()).add(flow));
      assert.ok(port.sourcePorts.includes(from.port));
    }
    for (const [flow, ports] of byFlow) assert.equal(ports.size, 1, `flow ${flow} left from ${[...ports].join(",")}`);
    assert.ok(bySport.size > 1, "32 flows spread over more than one source port");
    await until(() => port.stats.txPackets === 64, "send completions");
    assert.equal(port.stats.txBytes, 2 * frames.reduce((n, f) => n + f.length, 0));
  });
});

test("with sourcePorts 0 packets leave from the receiving port", async () => {
  await withPeer({ vni: 7, sourcePorts: 0 }, async (port, peer) => {
    assert.equal(port.send(tcpFrame(1, 2, new Uint8Array(4)), PLAIN_HDR), null);
    await until(() => peer.got.length === 1, "the datagram");
    assert.equal(peer.got[0]!.from.port, port.localPort);
  });
});

test("receive checks the I flag, the VNI and the source, ignores reserved bits, and counts each drop", async () => {
  const cap = capture();
  const port = new VxlanPort({ local: "127.0.0.1", localPort: 0, remote: "127.0.0.1", remotePort: 9, vni: 42, onPacket: cap.onPacket });
  await port.open();
  const peer = await udpPeer("127.0.0.1");
  const stranger = await udpPeer("127.0.0.2");
  try {
    const frame = tcpFrame(5, 6, new Uint8Array([9, 9, 9]));
    const to = (d: Uint8Array, from = peer.sock) => sendTo(from, d, port.localPort, "127.0.0.1");
    await to(vxlanDatagram(0x08, 42, frame));
    await to(vxlanDatagram(0xff, 42, frame, 0xff)); // reserved bits set: ignored on receipt
    await to(vxlanDatagram(0x00, 42, frame));
    await to(vxlanDatagram(0x08, 43, frame));
    await to(vxlanDatagram(0x08, 42, frame).subarray(0, 7));
    await to(vxlanDatagram(0x08, 42, frame.subarray(0, 13)));
    await to(vxlanDatagram(0x08, 42, frame), stranger.sock);
    await until(() => Object.values(port.stats.errors).reduce((a, b) => a + b, 0) === 5, "five drops");
    assert.deepEqual(port.stats.errors, { "rx:no-vni-flag": 1, "rx:wrong-vni": 1, "rx:short": 1, "rx:runt": 1, "rx:wrong-source": 1 });
    assert.equal(cap.got.length, 2);
    for (const g of cap.got) {
      assert.deepEqual(g.frame, frame);
      assert.deepEqual(g.hdr, plainHdr());
    }
    assert.equal(port.stats.rxPackets, 2);
    assert.equal(port.stats.rxBytes, 2 * frame.length);
  } finally {
    await port.close();
    peer.sock.close();
    stranger.sock.close();
  }
});

function tagged(frame: Uint8Array, tpid = 0x8100): Uint8Array {
  const t = new Uint8Array(frame.length + 4);
  t.set(frame.subarray(0, 12));
  t.set([tpid >> 8, tpid & 0xff, 0, 5], 12);
  t.set(frame.subarray(12), 16);
  return t;
}

test("frames with an inner VLAN tag are discarded both ways unless innerVlan is set (RFC 7348 §6.1)", async () => {
  const strict = capture();
  const open = capture();
  const peer = await udpPeer("127.0.0.1");
  const A = toPeer(peer, { vni: 5, onPacket: strict.onPacket });
  const B = toPeer(peer, { vni: 5, innerVlan: true, onPacket: open.onPacket });
  await A.open();
  await B.open();
  try {
    const plain = tcpFrame(1, 2, new Uint8Array(8));
    const q = tagged(plain);
    const ad = tagged(plain, 0x88a8);
    assert.equal(A.send(q, PLAIN_HDR), "vlan");
    assert.equal(A.send(ad, PLAIN_HDR), "vlan");
    assert.equal(B.send(q, PLAIN_HDR), null);
    for (const p of [A, B]) {
      await sendTo(peer.sock, vxlanDatagram(0x08, 5, q), p.localPort, "127.0.0.1");
      await sendTo(peer.sock, vxlanDatagram(0x08, 5, plain), p.localPort, "127.0.0.1");
    }
    await until(() => open.got.length === 2 && strict.got.length === 1, "the frames");
    assert.deepEqual(strict.got[0]!.frame, plain);
    assert.equal(A.stats.errors["rx:inner-vlan"], 1);
    assert.equal(A.stats.errors["tx:vlan"], 2);
    assert.deepEqual(open.got[0]!.frame, q);
    await until(() => peer.got.length === 1, "B's tagged frame");
    assert.deepEqual(new Uint8Array(peer.got[0]!.msg.subarray(8)), q);
  } finally {
    await A.close();
    await B.close();
    peer.sock.close();
  }
});

test("with anySource, datagrams from any address are taken", async () => {
  const cap = capture();
  const port = new VxlanPort({ local: "127.0.0.1", localPort: 0, remote: "127.0.0.1", vni: 1, anySource: true, onPacket: cap.onPacket });
  await port.open();
  const stranger = await udpPeer("127.0.0.2");
  try {
    await sendTo(stranger.sock, vxlanDatagram(0x08, 1, tcpFrame(1, 1, new Uint8Array(1))), port.localPort, "127.0.0.1");
    await until(() => cap.got.length === 1, "the frame");
  } finally {
    await port.close();
    stranger.sock.close();
  }
});

test("send() refuses packets with offloads, runts, frames over maxFrame, and more than sendSlots in flight", async () => {
  const frame = tcpFrame(1, 2, new Uint8Array(10));
  const closed = await withPeer(
    { sendSlots: 2 },
    async (port, peer) => {
      assert.equal(port.send(frame, PLAIN_HDR), "link-down", "not open yet");
      await port.open();
      assert.equal(port.send(frame, { ...plainHdr(), flags: 1, csumStart: 34, csumOffset: 16 }), "offload-not-negotiated");
      assert.equal(port.send(frame, { ...plainHdr(), gsoType: 1, gsoSize: 100 }), "offload-not-negotiated");
      assert.equal(port.send(frame, { ...plainHdr(), flags: 2 }), null, "DATA_VALID asks nothing of the receiver");
      assert.equal(port.send(frame.subarray(0, 13), PLAIN_HDR), "runt");
      assert.equal(port.send(new Uint8Array(port.maxFrame() + 1), PLAIN_HDR), "too-long");
      assert.equal(port.send(new Uint8Array(port.maxFrame()), PLAIN_HDR), null, "exactly maxFrame fits");
      assert.equal(port.send(frame, PLAIN_HDR), "no-buffer", "both slots in flight");
      await until(() => port.stats.txPackets === 2, "completions");
      assert.equal(port.send(frame, PLAIN_HDR), null, "slots come back");
      await until(() => peer.got.length === 3, "three datagrams");
      assert.equal(peer.got[1]!.msg.length, 8 + port.maxFrame());
      assert.deepEqual(port.stats.errors, {
        "tx:link-down": 1,
        "tx:offload-not-negotiated": 2,
        "tx:runt": 1,
        "tx:too-long": 1,
        "tx:no-buffer": 1,
      });
    },
    false,
  );
  assert.equal(closed.linkUp(), false);
  assert.equal(closed.send(frame, PLAIN_HDR), "link-down");
});

test("two VxlanPorts over IPv6 loopback carry frames both ways", async () => {
  const a = capture();
  const b = capture();
  // Fixed ports, since each must know the other's before opening.
  const pa = 20000 + (process.pid % 10000);
  const pb = pa + 10000;
  const A = new VxlanPort({ local: "::1", localPort: pa, remote: "::1", remotePort: pb, vni: 99, onPacket: a.onPacket });
  const B = new VxlanPort({ local: "::1", localPort: pb, remote: "::1", remotePort: pa, vni: 99, onPacket: b.onPacket });
  await A.open();
  await B.open();
  try {
    const f1 = tcpFrame(10, 20, new Uint8Array(100).fill(1));
    const f2 = tcpFrame(20, 10, new Uint8Array(B.maxFrame() - 54).fill(2));
    assert.equal(A.send(f1, PLAIN_HDR), null);
    assert.equal(B.send(f2, PLAIN_HDR), null);
    await until(() => a.got.length === 1 && b.got.length === 1, "both frames");
    assert.deepEqual(b.got[0]!.frame, f1);
    assert.deepEqual(a.got[0]!.frame, f2);
  } finally {
    await A.close();
    await B.close();
  }
});

test("open() explains an address this host lacks and a port already taken", async () => {
  const onPacket = (): void => {};
  const foreign = new VxlanPort({ local: "192.0.2.1", remote: "192.0.2.2", vni: 1, onPacket });
  await assert.rejects(
    foreign.open(),
    (e: unknown) => e instanceof NetPortError && e.code === "ADDRESS" && /192\.0\.2\.1 is not an address of this host/.test(e.message),
  );
  const first = new VxlanPort({ local: "127.0.0.1", localPort: 0, remote: "127.0.0.1", vni: 1, onPacket });
  await first.open();
  try {
    const second = new VxlanPort({ local: "127.0.0.1", localPort: first.localPort, remote: "127.0.0.1", vni: 1, onPacket });
    await assert.rejects(
      second.open(),
      (e: unknown) => e instanceof NetPortError && e.code === "ADDRESS" && /port is in use/.test(e.message),
    );
    assert.equal(second.linkUp(), false);
  } finally {
    await first.close();
  }
});

// ---------------------------------------------------------------------------
// Against Linux's vxlan device
// ---------------------------------------------------------------------------

const NS = `iovirt-vx-${process.pid}`;
const TAG = process.pid % 100000;
const VETH_HOST = `ivxh${TAG}`;
const VETH_NS = `ivxn${TAG}`;
const UDP_PORT = 30000 + (process.pid % 20000);
const OUR_MAC = mac("02:00:00:00:42:01");
const KERNEL_MAC = mac("02:00:00:00:42:02");

function nsIp(...args: string[]): string {
  return run("ip", "-n", NS, ...args);
}

let kernelSetUp = false;

before(() => {
  run("ip", "netns", "add", NS);
  kernelSetUp = true;
  run("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NS);
  run("ip", "addr", "add", "10.79.0.1/24", "dev", VETH_HOST);
  run("ip", "link", "set", "dev", VETH_HOST, "up");
  nsIp("addr", "add", "10.79.0.2/24", "dev", VETH_NS);
  nsIp("link", "set", "dev", VETH_NS, "up");
  run("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1");
  for (const [dev, vni, net, macAddr] of [
    ["vx0", "42", "192.168.79.2/24", "02:00:00:00:42:02"],
    ["vx1", "43", "192.168.80.2/24", "02:00:00:00:43:02"],
  ] as const) {
    nsIp(
      "link",
      "add",
      dev,
      "type",
      "vxlan",
      "id",
      vni,
      "local",
      "10.79.0.2",
      "remote",
      "10.79.0.1",
      "dstport",
      String(UDP_PORT),
      "dev",
      VETH_NS,
    );
    nsIp("link", "set", "dev", dev, "address", macAddr);
    nsIp("addr", "add", net, "dev", dev);
    nsIp("link", "set", "dev", dev, "up");
  }
});

after(() => {
  if (!kernelSetUp) return;
  // Deleting one end removes the pair at once (the namespace's own teardown is asynchronous).
  spawnSync("ip", ["link", "del", "dev", VETH_HOST]);
  spawnSync("ip", ["netns", "del", NS]);
});

test("VxlanPort talks to a Linux vxlan device: ARP, then ICMP echo with frames of exactly maxFrame, and other VNIs are counted drops", async () => {
  const cap = capture();
  const port = VxlanPort.fromSpec(`10.79.0.1:${UDP_PORT},10.79.0.2:${UDP_PORT},42`, { onPacket: cap.onPacket });
  await port.open();
  try {
    assert.equal(port.send(arpRequest(OUR_MAC, ip4("192.168.79.1"), ip4("192.168.79.2")), PLAIN_HDR), null);
    await until(() => cap.got.some((g) => parseArpReply(g.frame) !== null), "the ARP reply");
    const arp = cap.got.map((g) => parseArpReply(g.frame)).find((r) => r !== null)!;
    assert.deepEqual(arp, { mac: "02:00:00:00:42:02", ip: "192.168.79.2" });

    // The kernel's vxlan device has MTU 1450 on a 1500-byte underlay: an inner frame of 1464 bytes, our maxFrame.
    const data = new Uint8Array(port.maxFrame() - 14 - 20 - 8).map((_, i) => i & 0xff);
    const echo = ethernet(
      KERNEL_MAC,
      OUR_MAC,
      ETHERTYPE_IPV4,
      ipv4(ip4("192.168.79.1"), ip4("192.168.79.2"), PROTO_ICMP, icmpEcho(8, 77, 1, data)),
    );
    assert.equal(echo.length, port.maxFrame());
    assert.equal(port.send(echo, PLAIN_HDR), null);
    await until(() => cap.got.some((g) => parseIpv4(g.frame)?.proto === PROTO_ICMP), "the echo reply");
    const reply = cap.got.find((g) => parseIpv4(g.frame)?.proto === PROTO_ICMP)!;
    const ip = parseIpv4(reply.frame)!;
    assert.equal(reply.frame.length, port.maxFrame(), "the reply fills the kernel's MTU exactly");
    assert.equal(ip.src, "192.168.79.2");
    assert.ok(ip.headerOk && ip.l4Ok);
    assert.equal(ip.l4[0], 0);
    assert.deepEqual(ip.l4.subarray(8), data);

    // Traffic of VNI 43 (vx1) reaches the same UDP port and must not come through.
    const before = cap.got.length;
    // A datagram toward vx1's subnet makes the kernel send an ARP request through vx1.
    run(
      "ip",
      "netns",
      "exec",
      NS,
      "python3",
      "-c",
      "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.168.80.1', 9))",
    );
    await until(() => (port.stats.errors["rx:wrong-vni"] ?? 0) > 0, "a counted wrong-VNI drop");
    assert.equal(cap.got.length, before);
  } finally {
    await port.close();
  }
});

test("a UDP datagram sent through the tunnel reaches a socket behind the kernel's vxlan device with its checksum intact", async () => {
  const cap = capture();
  const port = new VxlanPort({
    local: "10.79.0.1",
    localPort: UDP_PORT,
    remote: "10.79.0.2",
    remotePort: UDP_PORT,
    vni: 42,
    onPacket: cap.onPacket,
  });
  await port.open();
  const listener = nsUdpListener();
  try {
    nsIp("neigh", "replace", "192.168.79.1", "lladdr", "02:00:00:00:42:01", "dev", "vx0", "nud", "permanent");
    const src = ip4("192.168.79.1");
    const dst = ip4("192.168.79.2");
    const payload = new TextEncoder().encode("through the tunnel");
    const frame = ethernet(KERNEL_MAC, OUR_MAC, ETHERTYPE_IPV4, ipv4(src, dst, PROTO_UDP, udp(src, dst, 40000, 7777, payload)));
    await listener.ready;
    assert.equal(port.send(frame, PLAIN_HDR), null);
    assert.equal(await listener.received, "through the tunnel 192.168.79.1 40000");
  } finally {
    listener.stop();
    await port.close();
  }
});

/** A UDP socket in the namespace (python3) that prints the first datagram it receives and its sender. */
function nsUdpListener(): { ready: Promise<void>; received: Promise<string>; stop: () => void } {
  const child = spawn("ip", [
    "netns",
    "exec",
    NS,
    "python3",
    "-c",
    "import socket,sys\n" +
      "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n" +
      "s.bind(('192.168.79.2',7777))\n" +
      "print('ready',flush=True)\n" +
      "s.settimeout(5)\n" +
      "d,a=s.recvfrom(65535)\n" +
      "print(d.decode(),a[0],a[1],flush=True)\n",
  ]);
  let out = "";
  let onReady: () => void = () => {};
  let onLine: (s: string) => void = () => {};
  const ready = new Promise<void>((r) => (onReady = r));
  const received = new Promise<string>((resolve, reject) => {
    onLine = resolve;
    child.on("exit", (code) => reject(new Error(`listener exited (${code}) after ${JSON.stringify(out)}`)));
  });
  child.stdout!.on("data", (b: Buffer) => {
    out += b.toString();
    const lines = out.split("\n");
    if (lines[0] === "ready") onReady();
    if (lines.length > 2) onLine(lines[1]!);
  });
  return { ready, received, stop: () => child.kill() };
}
