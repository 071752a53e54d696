import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { UsageError } from "../../src/cli/args.js";
import { SWITCH_HELP, parseSwitchArgs } from "../../src/cli/switch.js";
import type { SwitchSpec, VhostUserPortSpec } from "../../src/node/switch/spec.js";
import { CLI } from "./switch-harness.js";

// `iovirt switch` argument parsing: what a user gets for every mistake, the
// defaults, and the help text; then the binary's exit codes.

function parse(args: string[]): SwitchSpec {
  const s = parseSwitchArgs(args);
  assert.notEqual(s, "help");
  return s as SwitchSpec;
}

/** The UsageError message parseSwitchArgs gives for `args`. */
function usage(args: string[]): string {
  try {
    parseSwitchArgs(args);
  } catch (e) {
    assert.ok(e instanceof UsageError, `a UsageError, not ${String(e)}`);
    return e.message;
  }
  assert.fail(`accepted: ${args.join(" ")}`);
}

const VU = (s: string): string[] => ["--vhost-user", s];

const mistakes: { what: string; args: string[]; says: RegExp }[] = [
  { what: "no port at all", args: [], says: /give at least one port \(--vhost-user, --tap or --vxlan\)/ },
  { what: "options but no port", args: ["--mtu", "9000", "--poll"], says: /give at least one port/ },
  {
    what: "two ports named alike",
    args: [...VU("/s/a,name=x"), ...VU("/s/b,name=x")],
    says: /two ports are named 'x': give one of them name=/,
  },
  { what: "a tap named like a default vhost-user name", args: [...VU("/s/a"), "--tap", "vm0"], says: /two ports are named 'vm0'/ },
  {
    what: "one socket for two ports",
    args: [...VU("/s/a,name=x"), ...VU("/s/a,name=y")],
    says: /--vhost-user port x and --vhost-user port y both use the file \/s\/a/,
  },
  {
    what: "one socket spelled two ways (binding the second would unlink the first)",
    args: [...VU("/s/a,name=x"), ...VU("/s/../s/./a,name=y")],
    says: /--vhost-user port x and --vhost-user port y both use the file \/s\/\.\.\/s\/\.\/a/,
  },
  {
    what: "two captures into one file",
    args: [...VU("/s/a,name=x"), "--pcap", "/t/c.pcap", "--pcap", "/t//c.pcap,port=x"],
    says: /--pcap \/t\/c\.pcap and --pcap \/t\/\/c\.pcap,port=x both use the file \/t\/\/c\.pcap/,
  },
  {
    what: "a capture into a port's socket",
    args: [...VU("/s/a,name=x"), "--pcap", "/s/a"],
    says: /--vhost-user port x and --pcap \/s\/a both use the file \/s\/a/,
  },
  {
    what: "a multicast MAC",
    args: VU("/s/a,mac=01:00:5e:00:00:01"),
    says: /--vhost-user: MAC address 01:00:5e:00:00:01 is a multicast address/,
  },
  { what: "the broadcast MAC", args: VU("/s/a,mac=ff:ff:ff:ff:ff:ff"), says: /is a multicast address/ },
  {
    what: "a MAC with five bytes",
    args: VU("/s/a,mac=52:54:00:12:34"),
    says: /--vhost-user: bad MAC address '52:54:00:12:34' \(expected six hex bytes/,
  },
  { what: "a MAC with a non-hex digit", args: VU("/s/a,mac=52:54:00:12:34:5g"), says: /bad MAC address '52:54:00:12:34:5g'/ },
  { what: "a MAC with dashes", args: VU("/s/a,mac=52-54-00-12-34-56"), says: /bad MAC address/ },
  { what: "an empty MAC", args: VU("/s/a,mac="), says: /bad MAC address ''/ },
  { what: "queues=0", args: VU("/s/a,queues=0"), says: /--vhost-user: queues=0 is not an integer in \[1, 127\]/ },
  { what: "queues=128", args: VU("/s/a,queues=128"), says: /queues=128 is not an integer in \[1, 127\]/ },
  { what: "queues=1.5", args: VU("/s/a,queues=1.5"), says: /queues=1.5 is not an integer/ },
  { what: "queues=", args: VU("/s/a,queues="), says: /queues= is not an integer/ },
  { what: "queues=two", args: VU("/s/a,queues=two"), says: /queues=two is not an integer/ },
  { what: "a port mtu below 68", args: VU("/s/a,mtu=67"), says: /mtu=67 is not an integer in \[68, 65535\]/ },
  {
    what: "an option given twice",
    args: VU("/s/a,queues=2,queues=3"),
    says: /--vhost-user: 'queues' given twice in '\/s\/a,queues=2,queues=3'/,
  },
  { what: "client with a value", args: VU("/s/a,client=yes"), says: /--vhost-user: 'client' takes no value/ },
  {
    what: "an unknown vhost-user key",
    args: VU("/s/a,speed=10"),
    says: /--vhost-user: unknown option 'speed' \(known: queues, mac, client, name, mtu, vlan\)/,
  },
  { what: "a tap with mtu=", args: ["--tap", "t0,mtu=9000"], says: /--tap: unknown option 'mtu' \(known: name, vlan\)/ },
  {
    what: "a vxlan with queues=",
    args: ["--vxlan", "10.0.0.1,10.0.0.2,42,queues=2"],
    says: /--vxlan: unknown option 'queues' \(known: name, mtu, vlan\)/,
  },
  {
    what: "a pcap with an unknown key",
    args: [...VU("/s/a"), "--pcap", "/t/x.pcap,snap=10"],
    says: /--pcap: unknown option 'snap' \(known: port\)/,
  },
  { what: "a vhost-user port without a path", args: VU("name=x"), says: /--vhost-user takes PATH\[,queues=N\]/ },
  { what: "two paths for one port", args: VU("/s/a,/s/b"), says: /--vhost-user takes PATH/ },
  {
    what: "a port name with a space",
    args: VU("/s/a,name=my vm"),
    says: /--vhost-user: port name 'my vm' \(letters, digits, _ \. - only, up to 32\)/,
  },
  { what: "a port name of 33 characters", args: VU(`/s/a,name=${"n".repeat(33)}`), says: /port name 'n{33}'/ },
  { what: "a tap name over 15 characters", args: ["--tap", "a-very-long-tap0"], says: /--tap takes IFNAME \(1-15 characters/ },
  { what: "vlan=0", args: VU("/s/a,vlan=0"), says: /--vhost-user: vlan=0 is not an integer in \[1, 4094\]/ },
  { what: "vlan=4095", args: VU("/s/a,vlan=4095"), says: /vlan=4095 is not an integer in \[1, 4094\]/ },
  {
    what: "vlan=access",
    args: VU("/s/a,vlan=access"),
    says: /vlan=access: expected a VLAN number, trunk, trunk:10\+20 or trunk:10\+20\/1/,
  },
  { what: "a trunk list with a bad VLAN", args: VU("/s/a,vlan=trunk:10+5000"), says: /vlan=5000 is not an integer in \[1, 4094\]/ },
  { what: "a trunk list with an empty entry", args: VU("/s/a,vlan=trunk:10++20"), says: /vlan= is not an integer in \[1, 4094\]/ },
  { what: "a trunk native VLAN 0", args: VU("/s/a,vlan=trunk:10/0"), says: /vlan=0 is not an integer/ },
  { what: "trunk: with nothing after it", args: VU("/s/a,vlan=trunk:"), says: /vlan=trunk:: expected a VLAN number/ },
  {
    what: "--pcap port= naming no port",
    args: [...VU("/s/a,name=vm"), "--pcap", "/t/x.pcap,port=vn"],
    says: /--pcap \/t\/x\.pcap: no port is named 'vn' \(ports: vm\)/,
  },
  { what: "--pcap without a file", args: [...VU("/s/a"), "--pcap", "port=vm0"], says: /--pcap takes FILE\[,port=NAME\]/ },
  {
    what: "a vxlan spec with two parts",
    args: ["--vxlan", "10.0.0.1,10.0.0.2"],
    says: /--vxlan takes LOCAL_IP\[:PORT\],REMOTE_IP\[:PORT\],VNI/,
  },
  {
    what: "a vxlan local address that is no address",
    args: ["--vxlan", "10.0.0.300,10.0.0.2,42"],
    says: /--vxlan: vxlan: local address "10\.0\.0\.300" is not an IPv4 or IPv6 address/,
  },
  {
    what: "a vxlan remote host name",
    args: ["--vxlan", "10.0.0.1,peer.example,42"],
    says: /remote address "peer\.example" is not an IPv4 or IPv6 address/,
  },
  { what: "a VNI of 2^24", args: ["--vxlan", "10.0.0.1,10.0.0.2,16777216"], says: /VNI "16777216" is not a number from 0 to 16777215/ },
  { what: "a VNI that is no number", args: ["--vxlan", "10.0.0.1,10.0.0.2,x"], says: /VNI "x" is not a number/ },
  {
    what: "IPv4 to IPv6",
    args: ["--vxlan", "10.0.0.1,[fd00::2],42"],
    says: /local 10\.0\.0\.1 and remote fd00::2 must both be IPv4 or both IPv6/,
  },
  {
    what: "a vxlan port of 0 for the remote",
    args: ["--vxlan", "10.0.0.1,10.0.0.2:0,42"],
    says: /remote port "0" is not a number from 1 to 65535/,
  },
  {
    what: "an IPv6 address with a port but no brackets",
    args: ["--vxlan", "[fd00::1,[fd00::2],42"],
    says: /local address "\[fd00::1" lacks its closing "\]"/,
  },
  {
    what: "a vxlan mtu over 65485",
    args: ["--vxlan", "10.0.0.1,10.0.0.2,42,mtu=65486"],
    says: /--vxlan: mtu=65486 is not an integer in \[68, 65485\]/,
  },
  { what: "--mtu 67", args: [...VU("/s/a"), "--mtu", "67"], says: /--mtu takes an integer in \[68, 65535\]/ },
  { what: "--mtu without a value", args: [...VU("/s/a"), "--mtu"], says: /--mtu needs a value/ },
  { what: "--vhost-user without a value", args: ["--vhost-user"], says: /--vhost-user needs a value/ },
  { what: "--age 0", args: [...VU("/s/a"), "--age", "0"], says: /--age takes a number in \(0, 86400\]/ },
  { what: "--max-macs 0", args: [...VU("/s/a"), "--max-macs", "0"], says: /--max-macs takes an integer in \[1, 1048576\]/ },
  { what: "--stats-interval -1", args: [...VU("/s/a"), "--stats-interval", "-1"], says: /--stats-interval takes a number in \(0, 86400\]/ },
  { what: "an unknown flag", args: [...VU("/s/a"), "--promisc"], says: /unknown option --promisc/ },
  { what: "a bare word", args: ["/s/a"], says: /unknown option \/s\/a/ },
];

for (const m of mistakes) {
  test(`parseSwitchArgs explains ${m.what}`, () => {
    assert.match(usage(m.args), m.says);
  });
}

test("parseSwitchArgs defaults: MTU 1500, ageing 300 s, one queue pair, listening, no VLAN, 8192 MACs, no stats interval, kicks", () => {
  const s = parse([...VU("/s/a"), "--vxlan", "10.0.0.1,10.0.0.2,7", "--tap", "t0"]);
  assert.equal(s.ageSec, 300);
  assert.equal(s.maxMacs, 8192);
  assert.equal(s.statsIntervalSec, 0);
  assert.equal(s.poll, false);
  assert.equal(s.verbose, false);
  assert.deepEqual(s.pcaps, []);
  assert.deepEqual(s.ports, [
    { kind: "vhost-user", name: "vm0", vlan: null, path: "/s/a", queues: 1, mac: null, client: false, mtu: 1500 },
    { kind: "vxlan", name: "vxlan", vlan: null, endpoints: "10.0.0.1,10.0.0.2,7", mtu: 1450 },
    { kind: "tap", name: "t0", vlan: null, ifname: "t0" },
  ]);
});

test("parseSwitchArgs reads every option: --mtu sets vhost-user ports only, per-port keys override it, names count per kind", () => {
  const s = parse([
    "--mtu",
    "9000",
    ...VU("/s/a,queues=4,mac=52:54:00:AB:cd:01,client,mtu=1400,vlan=trunk:10+20/1"),
    ...VU("/s/b,name=db,vlan=30"),
    ...VU("/s/c"),
    "--vxlan",
    "[fd00::1]:4790,[fd00::2],42,mtu=8950,name=up,vlan=trunk",
    "--vxlan",
    "10.0.0.1,10.0.0.2,43",
    "--pcap",
    "/t/all.pcap",
    "--pcap",
    "/t/db.pcap,port=db",
    "--age",
    "2.5",
    "--max-macs",
    "16",
    "--stats-interval",
    "10",
    "--poll",
    "--verbose",
  ]);
  const [a, b, c, up, vx1] = s.ports;
  assert.deepEqual(a, {
    kind: "vhost-user",
    name: "vm0",
    vlan: { mode: "trunk", vids: [10, 20], native: 1 },
    path: "/s/a",
    queues: 4,
    mac: "52:54:00:AB:cd:01",
    client: true,
    mtu: 1400,
  } satisfies VhostUserPortSpec);
  assert.deepEqual([b?.name, b?.vlan, (b as VhostUserPortSpec).mtu], ["db", { mode: "access", vid: 30 }, 9000]);
  assert.equal(c?.name, "vm2", "the third --vhost-user is vm2 whatever the second is called");
  assert.deepEqual(up, { kind: "vxlan", name: "up", vlan: { mode: "trunk" }, endpoints: "[fd00::1]:4790,[fd00::2],42", mtu: 8950 });
  assert.deepEqual([vx1?.name, (vx1 as { mtu: number }).mtu], ["vxlan1", 1450], "--mtu is not the VXLAN inner MTU");
  assert.deepEqual(s.pcaps, [
    { file: "/t/all.pcap", port: null },
    { file: "/t/db.pcap", port: "db" },
  ]);
  assert.deepEqual([s.ageSec, s.maxMacs, s.statsIntervalSec, s.poll, s.verbose], [2.5, 16, 10, true, true]);
});

test("parseSwitchArgs: --help and -h win over everything else, mistakes after them included", () => {
  assert.equal(parseSwitchArgs(["--help"]), "help");
  assert.equal(parseSwitchArgs(["-h"]), "help");
  assert.equal(parseSwitchArgs([...VU("/s/a"), "--help", "--bogus"]), "help");
});

test("the switch help names every option and every per-port key, and each of them parses", () => {
  const flags = [
    "--vhost-user",
    "--tap",
    "--vxlan",
    "--pcap",
    "--mtu",
    "--age",
    "--max-macs",
    "--max-macs-per-port",
    "--stats-interval",
    "--poll",
    "--verbose",
    "--help",
  ];
  for (const f of flags) assert.ok(SWITCH_HELP.includes(f), `${f} in the help`);
  // Every flag the help describes (at the start of a line) is one the parser knows.
  const described = [...SWITCH_HELP.matchAll(/^ {2}(--[a-z-]+)/gm)].map((m) => m[1]!);
  assert.ok(described.length >= flags.length - 1);
  for (const f of described) assert.ok(flags.includes(f), `${f} in the help is parsed`);
  const vhostKeys = ["queues=N", "mac=MAC", "client", "name=NAME", "mtu=N", "vlan=V"];
  const line = SWITCH_HELP.split("\n").find((l) => l.trim().startsWith("--vhost-user PATH"));
  assert.ok(line !== undefined);
  for (const k of vhostKeys) assert.ok(line.includes(`[,${k}]`), `--vhost-user ${k}`);
  assert.match(SWITCH_HELP, /--tap IFNAME\[,name=NAME\]\[,vlan=V\]/);
  assert.match(SWITCH_HELP, /--vxlan LOCAL_IP\[:PORT\],REMOTE_IP\[:PORT\],VNI\[,name=NAME\]\[,mtu=N\]\[,vlan=V\]/);
  assert.match(SWITCH_HELP, /--pcap FILE\[,port=NAME\]/);
  assert.match(SWITCH_HELP, /trunk:10\+20\/1/, "the VLAN forms");
  for (const d of ["default 1500", "default 300", "default 8192", "default 1)", "default 1450", "default port 4789"])
    assert.ok(SWITCH_HELP.includes(d), `the help gives the ${d}`);
  // The defaults the help states are the parser's.
  const s = parse([...VU("/s/a"), "--vxlan", "10.0.0.1,10.0.0.2,1"]);
  assert.deepEqual([s.ports[0]?.kind === "vhost-user" && s.ports[0].mtu, s.ageSec, s.maxMacs], [1500, 300, 8192]);
  assert.equal((s.ports[1] as { mtu: number }).mtu, 1450);
});

test("iovirt switch --help prints the help on stdout and exits 0", () => {
  const r = spawnSync(process.execPath, [CLI, "switch", "--help"], { encoding: "utf8", timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, SWITCH_HELP);
  assert.equal(r.stderr, "");
});

test("iovirt switch with a usage error exits 2 with the reason and the help on stderr, starting nothing", () => {
  const r = spawnSync(process.execPath, [CLI, "switch", "--vhost-user", "/nonexistent/dir/a.sock,queues=0"], {
    encoding: "utf8",
    timeout: 60_000,
  });
  assert.equal(r.status, 2);
  assert.equal(r.stdout, "");
  assert.match(r.stderr, /^iovirt switch: --vhost-user: queues=0 is not an integer in \[1, 127\]\n\n/);
  assert.ok(r.stderr.endsWith(SWITCH_HELP));
});
