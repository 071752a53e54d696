import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootGuest, guestPaths, markerValue, type BootGuestResult, type GuestPaths } from "../../tools/guest/run.js";
import { stopChild } from "../../tools/child.js";
import { ip, netDeviceArgs, nsReceiver, sh, startSwitch, waitFor, type SwitchProc } from "./switch-helpers.js";

// Real peers around `iovirt switch`: Linux guests (Debian's virtio_net) under
// QEMU/TCG on vhost-user ports, the host kernel through a tap port inside a
// network namespace, a kernel vxlan device in another namespace, and tcpdump
// reading the switch's capture. One switch serves all of them.

const dir = mkdtempSync(join(tmpdir(), "iovirt-switch-"));
const TAP = "iovtap0";
const NS_TAP = "iovns-tap";
const NS_VX = "iovns-vx";
const VETH_H = "iovvx-h";
const VETH_N = "iovvx-n";
const MIB = 16;
const sock = (n: string): string => join(dir, `${n}.sock`);
const pcapAll = join(dir, "all.pcap");
const pcapVx = join(dir, "vxlan.pcap");
let paths: GuestPaths;
let sw: SwitchProc;
let tcpdumpVx: ChildProcess;

const switchArgs = [
  "--vhost-user",
  `${sock("a")},name=vma,mac=52:54:00:00:00:0a,mtu=9000`,
  "--vhost-user",
  `${sock("b")},name=vmb,mac=52:54:00:00:00:0b,mtu=9000,queues=2`,
  "--vhost-user",
  `${sock("c")},name=vmc,mac=52:54:00:00:00:0c`,
  "--tap",
  TAP,
  "--vxlan",
  "10.77.0.1:4789,10.77.0.2:4789,42",
  "--pcap",
  pcapAll,
];

function cleanNetwork(): void {
  ip(["netns", "del", NS_TAP], true);
  ip(["netns", "del", NS_VX], true);
  ip(["link", "del", VETH_H], true);
  ip(["link", "del", TAP], true);
}

/** Moves the switch's tap into the namespace and gives it 10.9.0.100 there (the tap goes away with the switch). */
async function tapIntoNamespace(): Promise<void> {
  await waitFor(`${TAP} to appear`, () => existsSync(`/sys/class/net/${TAP}`), 10_000);
  ip(["link", "set", TAP, "netns", NS_TAP]);
  ip(["-n", NS_TAP, "addr", "add", "10.9.0.100/24", "dev", TAP]);
  ip(["-n", NS_TAP, "link", "set", TAP, "up"]);
}

async function runSwitch(): Promise<SwitchProc> {
  const s = await startSwitch(switchArgs, [sock("a"), sock("b"), sock("c")]);
  await tapIntoNamespace();
  return s;
}

before(async () => {
  paths = await guestPaths();
  cleanNetwork();
  ip(["netns", "add", NS_TAP]);
  ip(["netns", "add", NS_VX]);
  ip(["-n", NS_TAP, "link", "set", "lo", "up"]);
  // The VXLAN underlay: a veth pair between the host (the switch's UDP socket) and the namespace.
  ip(["link", "add", VETH_H, "type", "veth", "peer", "name", VETH_N]);
  ip(["link", "set", VETH_N, "netns", NS_VX]);
  ip(["addr", "add", "10.77.0.1/30", "dev", VETH_H]);
  ip(["link", "set", VETH_H, "up"]);
  ip(["-n", NS_VX, "addr", "add", "10.77.0.2/30", "dev", VETH_N]);
  ip(["-n", NS_VX, "link", "set", VETH_N, "up"]);
  ip(["-n", NS_VX, "link", "add", "vx0", "type", "vxlan", "id", "42", "local", "10.77.0.2", "remote", "10.77.0.1", "dstport", "4789"]);
  ip(["-n", NS_VX, "addr", "add", "10.9.0.200/24", "dev", "vx0"]);
  ip(["-n", NS_VX, "link", "set", "vx0", "up"]);
  tcpdumpVx = spawn("ip", ["netns", "exec", NS_VX, "tcpdump", "-i", VETH_N, "-U", "-w", pcapVx, "udp", "port", "4789"], {
    stdio: "ignore",
  });
  sw = await runSwitch();
});

after(async () => {
  if (sw !== undefined) await stopChild(sw.child, 5000);
  if (tcpdumpVx !== undefined) await stopChild(tcpdumpVx, 2000);
  cleanNetwork();
  rmSync(dir, { recursive: true, force: true });
});

function guest(o: {
  name: string;
  ip: string;
  peer: string;
  role: string;
  extra?: string;
  mtu?: number;
  seconds?: number;
  args: string[];
  onLine?: (l: string) => void;
}): Promise<BootGuestResult> {
  const append = [
    "iovirt.script=net",
    "iovirt.modules=virtio_pci,virtio_net",
    `iovirt.ip=${o.ip}/24`,
    `iovirt.peer=${o.peer}`,
    `iovirt.role=${o.role}`,
    `iovirt.mib=${MIB}`,
    `iovirt.mtu=${o.mtu ?? 1500}`,
    `iovirt.seconds=${o.seconds ?? 10}`,
    "iovirt.timeout=170",
    ...(o.extra !== undefined ? [`iovirt.extra=${o.extra}`] : []),
  ].join(" ");
  return bootGuest({
    ...paths,
    sharedMemory: true,
    append,
    qemuArgs: o.args,
    timeoutMs: 180_000,
    ...(o.onLine ? { onLine: o.onLine } : {}),
  });
}

function explain(rs: BootGuestResult[]): string {
  return (
    rs.map((r, i) => `--- guest ${i} ---\n${r.markers.join("\n")}\n${r.stderr.slice(-1000)}`).join("\n") +
    `\n--- switch ---\n${sw.log().slice(-3000)}`
  );
}

/** Bytes per received packet in the guest's own counters: above the MTU only when GSO packets arrived whole. */
function rxAverage(markers: string[]): number {
  const s = markerValue(markers, "stats") ?? "";
  const pk = Number(/rx_packets=(\d+)/.exec(s)?.[1]);
  const by = Number(/rx_bytes=(\d+)/.exec(s)?.[1]);
  return by / pk;
}

/** virtio feature bit `b` in the guest's /sys/bus/virtio/.../features string. */
function featureBit(markers: string[], b: number): boolean {
  return (markerValue(markers, "features") ?? "")[b] === "1";
}

test(
  "two Linux guests on one switch (packed ring; mq with 2 queue pairs; MTU 9000): ping both ways, 16 MiB over TCP with its md5, TSO passed whole",
  { timeout: 240_000 },
  async () => {
    const [a, b] = await Promise.all([
      guest({
        name: "a",
        ip: "10.9.0.1",
        peer: "10.9.0.2",
        role: "recv+linger",
        mtu: 9000,
        args: netDeviceArgs({ id: "n0", sock: sock("a"), mac: "52:54:00:00:00:0a", device: ",packed=on,host_mtu=9000" }),
      }),
      guest({
        name: "b",
        ip: "10.9.0.2",
        peer: "10.9.0.1",
        role: "send+extra+linger",
        extra: "10.9.0.100,10.9.0.200",
        mtu: 9000,
        args: ["-smp", "2", ...netDeviceArgs({ id: "n0", sock: sock("b"), mac: "52:54:00:00:00:0b", queues: 2, device: ",host_mtu=9000" })],
      }),
    ]);
    const why = explain([a, b]);
    assert.ok(a.markers.includes("RESULT PASS"), why);
    assert.ok(b.markers.includes("RESULT PASS"), why);
    assert.equal(markerValue(a.markers, "recv-bytes")?.split(" ")[0], String(MIB << 20), why);
    assert.equal(markerValue(a.markers, "recv-md5"), markerValue(b.markers, "send-md5"), why);
    assert.ok(a.markers.includes("ping-again-ok"), why);
    assert.match(markerValue(a.markers, "net up") ?? "", /mtu=9000/);
    // Guest a negotiated the packed ring (bit 34); guest b runs two queue pairs.
    assert.ok(featureBit(a.markers, 34), `packed ring negotiated: ${why}`);
    assert.equal(markerValue(b.markers, "queues"), "rx=2 tx=2", why);
    // GUEST_TSO4 (7) and MRG_RXBUF (15) reach the receiver: TCP segments arrive larger than the MTU.
    assert.ok(featureBit(a.markers, 7) && featureBit(a.markers, 15), why);
    assert.ok(rxAverage(a.markers) > 9014, `receiver got whole TSO packets (average ${rxAverage(a.markers).toFixed(0)} bytes): ${why}`);
    // The same guest reached the host kernel's namespace through the tap and the VXLAN namespace through the uplink.
    assert.ok(b.markers.includes("extra-ping 10.9.0.100 ok"), `tap: ${why}`);
    assert.ok(b.markers.includes("extra-ping 10.9.0.200 ok"), `vxlan: ${why}`);
  },
);

test("the capture of that traffic reads back with tcpdump: pings, the TCP stream, frames within the MTU", () => {
  const out = sh("tcpdump", ["-r", pcapAll, "-nn", "-e"]);
  assert.match(out, /10\.9\.0\.2 > 10\.9\.0\.1: ICMP echo request/);
  assert.match(out, /10\.9\.0\.1 > 10\.9\.0\.2: ICMP echo reply/);
  assert.match(out, /10\.9\.0\.2\.\d+ > 10\.9\.0\.1\.5000: Flags \[S\]/);
  assert.match(out, /10\.9\.0\.2 > 10\.9\.0\.200: ICMP echo request/);
  // TSO packets were segmented for the capture: no frame longer than MTU 9000 + Ethernet header.
  const lengths = [...out.matchAll(/, length (\d+): /g)].map((m) => Number(m[1]));
  assert.ok(lengths.length > 1000, `${lengths.length} frames captured`);
  assert.ok(Math.max(...lengths) <= 9014, `longest captured frame ${Math.max(...lengths)}`);
});

test("the kernel vxlan device saw RFC 7348 encapsulated pings (tcpdump in its namespace)", async () => {
  await stopChild(tcpdumpVx, 2000);
  const out = sh("tcpdump", ["-r", pcapVx, "-nn"]);
  assert.match(out, /VXLAN, flags \[I\] \(0x08\), vni 42/);
  assert.match(out, /10\.9\.0\.2 > 10\.9\.0\.200: ICMP echo request/);
  assert.match(out, /10\.9\.0\.200 > 10\.9\.0\.2: ICMP echo reply/);
});

test(
  "a guest sends 16 MiB over TCP to the host kernel across the tap with offloads; the switch is SIGKILLed and restarted while it pings, and pings resume",
  { timeout: 240_000 },
  async () => {
    const rx = nsReceiver(NS_TAP, 5000, MIB << 20);
    let restarted: Promise<void> | null = null;
    let tapStats = "";
    const onLine = (line: string): void => {
      if (!line.includes("IOVIRT-GUEST: ping-start") || restarted !== null) return;
      restarted = (async () => {
        tapStats = await sw.stats();
        await new Promise((r) => setTimeout(r, 3000));
        sw.child.kill("SIGKILL");
        await new Promise((r) => sw.child.once("exit", r));
        sw = await runSwitch();
      })();
    };
    const c = await guest({
      name: "c",
      ip: "10.9.0.3",
      peer: "10.9.0.100",
      role: "send+ping",
      seconds: 25,
      args: netDeviceArgs({ id: "n0", sock: sock("c"), mac: "52:54:00:00:00:0c", reconnect: true }),
      onLine,
    });
    // The receiver ends once it has every byte; after the guest is gone, waiting longer is pointless.
    const late = setTimeout(() => rx.child.kill(), 10_000);
    const got = await rx.done.finally(() => clearTimeout(late));
    const why = explain([c]) + `\n--- receiver ---\n${got}`;
    assert.ok(restarted !== null, `the ping phase began: ${why}`);
    await restarted;
    assert.ok(c.markers.includes("RESULT PASS"), why);
    assert.match(got, new RegExp(`^${MIB << 20} ${markerValue(c.markers, "send-md5")}$`, "m"), why);
    // Offloads across the tap: the guest's TSO packets went to the kernel whole, so the switch's
    // frames toward the tap average more than an Ethernet frame can hold.
    const tap = new RegExp(`^${TAP}\\s+\\d+\\s+\\d+\\s+\\d+\\s+\\d+\\s+(\\d+)\\s+(\\d+)`, "m").exec(tapStats);
    assert.ok(tap !== null, `tap counters: ${tapStats}`);
    assert.ok(Number(tap[2]) / Number(tap[1]) > 1514, `frames to the tap average ${Number(tap[2]) / Number(tap[1])} bytes: ${tapStats}`);
    // The tap's own line: the kernel took every one of those frames (the switch counted what send() accepted).
    const host = new RegExp(
      `^${TAP} tap: rx (\\d+) packets \\(\\d+ bytes\\), tx (\\d+) packets \\((\\d+) bytes\\), errors (.+)$`,
      "m",
    ).exec(tapStats);
    assert.ok(host !== null, `tap host counters: ${tapStats}`);
    assert.equal(host[2], tap[1], `tap frames written: ${tapStats}`);
    assert.equal(host[3], tap[2], `tap bytes written: ${tapStats}`);
    // Pings answered up to the end: the last answered sequence number is one of the last few sent.
    const [last, , total] = (markerValue(c.markers, "ping-last-seq") ?? "").split(" ");
    assert.ok(Number(last) >= Number(total) - 5, `last answered ping ${last} of ${total}: ${why}`);
    assert.match(markerValue(c.markers, "ping-summary") ?? "", /packets transmitted/);
  },
);
