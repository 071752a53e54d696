/**
 * npm run bench:net — packet rates through a vhost-user-net back end:
 * `iovirt switch` against DPDK's own net_vhost PMD, both driven by DPDK
 * testpmd virtio-user front ends, same front ends, same CPUs, alternating order.
 *
 *   npm run bench:net                        all cases, text table
 *   npm run bench:net -- --json              {"bench":"net","results":[{"case","size","iovirtMpps","dpdkMpps","ratio"}]}
 *   npm run bench:net -- --case sink --size 64 --runs 1
 *   npm run bench:net -- --help
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, loadavg, release, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ArgReader, UsageError, parseOrExplain } from "../src/cli/args.js";
import { stopChild } from "../tools/child.js";
import { Testpmd, dpdkVersion, testpmdUnavailable, vhostVdev, virtioUserVdev } from "../tools/testpmd.js";

const HELP = `bench:net — iovirt switch against DPDK's net_vhost, same testpmd front ends

Usage:
  npm run bench:net -- [--case LIST] [--size LIST] [--seconds S] [--warmup S] [--runs N]
                       [--packed] [--in-flight N] [--iovirt-cpus LIST] [--iovirt-events] [--json]
  node dist/bench/net-compare.js [same options]

  --case LIST         comma-separated, from sink, forward (default: both)
                        sink     a testpmd virtio-user port in txonly -> the back end, which counts
                                 and drops (DPDK: testpmd with net_vhost in rxonly; iovirt: switch
                                 with one vhost-user port and a sink port)
                        forward  two testpmd virtio-user ports <-> the back end's two vhost-user
                                 ports, frames forwarded both ways (DPDK: testpmd with two net_vhost
                                 ports in io mode; iovirt: switch with two vhost-user ports)
  --size LIST         frame sizes in bytes, without FCS (default 64,1518)
  --seconds S         measurement window (default 3)
  --warmup S          traffic before the window opens (default 1)
  --runs N            measurements per back end; the median is reported (default 3)
  --packed            packed virtqueues (virtio-user packed_vq=1) instead of split
  --in-flight N       forward: bursts of 32 frames each front-end port starts with (default 16)
  --iovirt-cpus LIST  CPUs iovirt switch runs on, through taskset (default 1, where DPDK's back end polls)
  --iovirt-events     run the switch in event mode (kicks and eventfds) instead of --poll, its
                      fastest mode and the one that compares with DPDK's polling back end
  --json              print one JSON document
  --help              this text

Rates are received frames per second over the window, from the receiving side's counters:
net_vhost's RX-packets or the switch's rx_packets for the vhost-user port (sink), the front
ends' RX-packets on both ports together (forward). Each measurement starts fresh processes;
the order of the back ends flips from one measurement to the next, so slow drift on a shared
machine cancels.

CPUs: the machine has two, and two busy-polling threads on one CPU collapse both (each gets
a scheduler slice at a time and the ring between them fills or empties within it). So there
are exactly two polling threads: the back end on CPU 1 (DPDK: -l 0,1, forwarding lcore 1 on
CPU 1; iovirt: taskset -c 1) and one testpmd forwarding lcore on CPU 0 (--lcores 0@1,1@0;
its main lcore sleeps at the prompt). For forward that one lcore is both ends: the front-end
testpmd has two virtio-user ports in mac mode and starts with tx_first, so frames circulate
port 0 -> back end -> port 1 -> back end -> port 0, each leg addressed to the other port's MAC.
A separate txonly sender and rxonly receiver sharing CPU 0 measured 0.03-0.05 Mpps here (the
forwarder alone on CPU 1), or unpinned; the single-lcore loop about 7 Mpps.
`;

type CaseName = "sink" | "forward";
const CASE_NAMES = ["sink", "forward"] as const;
type Side = "iovirt" | "dpdk";

interface Options {
  cases: CaseName[];
  sizes: number[];
  seconds: number;
  warmup: number;
  runs: number;
  packed: boolean;
  inFlight: number;
  iovirtCpus: string;
  /** Run the switch with --poll (a busy-polling worker, as DPDK's back end polls). */
  iovirtPoll: boolean;
  json: boolean;
}

function parse(argv: string[]): Options | "help" {
  const o: Options = {
    cases: [...CASE_NAMES],
    sizes: [64, 1518],
    seconds: 3,
    warmup: 1,
    runs: 3,
    packed: false,
    inFlight: 16,
    iovirtCpus: "1",
    iovirtPoll: true,
    json: false,
  };
  const r = new ArgReader(argv);
  while (r.next()) {
    switch (r.flag) {
      case "--case":
        o.cases = r.subset(CASE_NAMES);
        break;
      case "--size":
        o.sizes = r
          .value()
          .split(",")
          .map((s) => {
            const n = Number(s);
            // Ethernet frames without FCS, from the shortest (60) to the longest untagged one at MTU 1500 (1514 + 4 of a VLAN tag),
            // so every frame fits one 2 KiB mbuf and no back end needs jumbo settings.
            if (!Number.isInteger(n) || n < 60 || n > 1518) throw new UsageError(`--size: '${s}' is not an integer in [60, 1518]`);
            return n;
          });
        break;
      case "--seconds":
        o.seconds = r.positive(600);
        break;
      case "--warmup":
        o.warmup = r.positive(60);
        break;
      case "--runs":
        o.runs = r.int(1, 100);
        break;
      case "--packed":
        o.packed = true;
        break;
      case "--in-flight":
        o.inFlight = r.int(1, 64);
        break;
      case "--iovirt-cpus":
        o.iovirtCpus = r.value();
        if (!/^\d+([-,]\d+)*$/.test(o.iovirtCpus)) throw new UsageError("--iovirt-cpus takes a CPU list such as 1 or 0-1");
        break;
      case "--iovirt-events":
        o.iovirtPoll = false;
        break;
      case "--json":
        o.json = true;
        break;
      case "--help":
      case "-h":
        return "help";
      default:
        r.unknown();
    }
  }
  return o;
}

// ---- CPU placement ------------------------------------------------------

/** DPDK back end: main lcore 0 (asleep at the prompt) on CPU 0, forwarding lcore 1 on CPU 1. */
const BACK_END_CORES = "0,1";
/** Front ends: forwarding lcore 1 on CPU 0, main lcore on CPU 1 (asleep at the prompt). */
const FRONT_END_LCORES = "0@1,1@0";

// ==== iovirt adapter ==========================================================
// The one place that knows `iovirt switch`'s command line and its stats output.
//
//   iovirt switch --vhost-user PATH,name=p0 [--vhost-user PATH,name=p1] [--poll]
//     each --vhost-user is a port whose vhost-user back end listens on PATH. A
//     switch with one port is a sink: what it takes from the front end's TX ring
//     is flooded to no other port and so dropped (and counted).
//   On SIGUSR1 it prints its counters table to stdout, one row per port:
//     NAME  rx-pkts  rx-bytes  fwd  flood  tx-pkts  tx-bytes  drops
//   rx counts frames the switch took from that port (the front end's TX ring).

const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

/** The switch's arguments after `node main.js`; `poll`: the busy-polling worker. */
function iovirtSwitchArgs(socks: readonly string[], poll: boolean): string[] {
  return ["switch", ...socks.flatMap((s, i) => ["--vhost-user", `${s},name=p${i}`]), ...(poll ? ["--poll"] : [])];
}

/** Null when `iovirt switch` exists, else why not. */
function iovirtSwitchUnavailable(): string | null {
  const r = spawnSync(process.execPath, [cli, "switch", "--help"], { encoding: "utf8", timeout: 10_000 });
  if (r.status === 0) return null;
  const why = (r.stderr || r.stdout || r.error?.message || "").trim().split("\n")[0] ?? "";
  return `iovirt switch not available (\`iovirt switch --help\` exited with ${r.status ?? r.signal}: ${why})`;
}

/** Per port: frames received from and sent to that port, from one stats row. */
interface IovirtPortStats {
  rxPackets: number;
  txPackets: number;
}

/** Parses the rows of the switch's counters table (name, rx pkts, rx bytes, fwd, flood, tx pkts, ...); later rows win. */
function parseIovirtStats(text: string): Map<string, IovirtPortStats> {
  const ports = new Map<string, IovirtPortStats>();
  for (const line of text.split("\n")) {
    const m = /^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s/.exec(line);
    if (m === null) continue;
    ports.set(m[1]!, { rxPackets: Number(m[2]), txPackets: Number(m[6]) });
  }
  return ports;
}

interface IovirtSwitch {
  child: ChildProcess;
  /** Asks for stats (SIGUSR1) and returns the next complete report of `port`. */
  portStats(port: string, timeoutMs?: number): Promise<IovirtPortStats>;
  stderr(): string;
  close(): Promise<void>;
}

/** Starts `iovirt switch` with a vhost-user port per socket (plus a sink) and waits for every socket. */
async function startIovirtSwitch(socks: readonly string[], opts: { poll: boolean; cpus: string }): Promise<IovirtSwitch> {
  for (const s of socks) rmSync(s, { force: true }); // a stale socket would look like a ready switch
  const args = [cli, ...iovirtSwitchArgs(socks, opts.poll)];
  // taskset pins every thread the switch has (main, workers, libuv's pool) to the back end's CPUs.
  const pinned = existsOnPath("taskset");
  const child = pinned
    ? spawn("taskset", ["-c", opts.cpus, process.execPath, ...args], { stdio: ["ignore", "pipe", "pipe"] })
    : spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  let wake: (() => void) | null = null;
  child.stdout!.setEncoding("utf8");
  child.stderr!.setEncoding("utf8");
  child.stdout!.on("data", (d: string) => {
    out = (out + d).slice(-65536);
    wake?.();
  });
  child.stderr!.on("data", (d: string) => (err = (err + d).slice(-8192)));
  const fail = (what: string): Error => new Error(`iovirt switch ${what}\n${err.trim()}`);
  const deadline = Date.now() + 10_000;
  while (!socks.every((s) => existsSync(s))) {
    if (child.exitCode !== null || child.signalCode !== null) throw fail(`exited (${child.exitCode ?? child.signalCode}) before listening`);
    if (Date.now() > deadline) {
      await stopChild(child, 3000);
      throw fail(`did not create ${socks.join(", ")} within 10 s`);
    }
    await sleep(25);
  }
  return {
    child,
    stderr: () => err,
    async portStats(port, timeoutMs = 5000) {
      out = "";
      child.kill("SIGUSR1");
      const until = Date.now() + timeoutMs;
      for (;;) {
        const s = parseIovirtStats(out).get(port);
        if (s !== undefined) return s;
        if (child.exitCode !== null || child.signalCode !== null) throw fail("exited while asked for stats");
        if (Date.now() > until) throw fail(`printed no stats line for port ${port} within ${timeoutMs} ms of SIGUSR1`);
        await new Promise<void>((r) => {
          const t = setTimeout(r, 50);
          wake = () => {
            clearTimeout(t);
            wake = null;
            r();
          };
        });
      }
    },
    async close() {
      await stopChild(child, 5000);
    },
  };
}

/** The sink case's iovirt back end: a switch with one vhost-user port (what it takes goes nowhere). */
function startIovirtSink(sock: string, o: { poll: boolean; cpus: string }): Promise<IovirtSwitch> {
  return startIovirtSwitch([sock], o);
}
// ==== end of the iovirt adapter ===============================================

function existsOnPath(cmd: string): boolean {
  return (process.env["PATH"] ?? "").split(":").some((d) => d !== "" && existsSync(join(d, cmd)));
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Progress goes to stderr, so --json's stdout stays one document. */
function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

// ---- measuring ----------------------------------------------------------

interface Ctx {
  dir: string;
  o: Options;
  seq: number;
}

/** Received-side counters; `bytes` is null where the back end counts packets only. */
interface Reading {
  packets: number;
  bytes: number | null;
}

/** A counter sample, timed at the middle of the round trip that read it. */
interface Sample extends Reading {
  at: number;
}

async function sample(read: () => Promise<Reading>): Promise<Sample> {
  const t0 = performance.now();
  const r = await read();
  return { ...r, at: (t0 + performance.now()) / 2 };
}

/**
 * Warm-up, then the received-packet rate over the window, in Mpps. Then the
 * sender stops and, once the counters are still (testpmd updates a port's
 * packet and byte counters one after the other, so a live pair can be a
 * burst apart), the totals are checked: no back end may deliver more
 * frames than were sent, and what arrived must have the size that was sent.
 */
async function window(
  ctx: Ctx,
  size: number,
  received: () => Promise<Reading>,
  sender: { sent: () => Promise<number>; stop: () => Promise<unknown> },
  what: string,
): Promise<number> {
  await sleep(ctx.o.warmup * 1000);
  const a = await sample(received);
  await sleep(ctx.o.seconds * 1000);
  const b = await sample(received);
  const n = b.packets - a.packets;
  if (n <= 0) throw new Error(`${what}: no packets arrived during the window (${a.packets} before, ${b.packets} after)`);
  await sender.stop();
  let last = await received();
  for (let i = 0; i < 50; i++) {
    await sleep(50);
    const now = await received();
    if (now.packets === last.packets) break;
    last = now;
  }
  const tx = await sender.sent();
  if (last.packets > tx) throw new Error(`${what}: ${last.packets} packets arrived, but only ${tx} were sent`);
  if (last.bytes !== null && last.bytes !== last.packets * size)
    throw new Error(`${what}: ${last.packets} packets of ${size} B should be ${last.packets * size} bytes, ${last.bytes} arrived`);
  return n / (b.at - a.at) / 1000;
}

function freshSocks(ctx: Ctx, n: number): string[] {
  ctx.seq++;
  return Array.from({ length: n }, (_, i) => join(ctx.dir, `${ctx.seq}-${i}.sock`));
}

async function closeAll(procs: readonly { close(): Promise<unknown> }[]): Promise<void> {
  await Promise.all(procs.map((p) => p.close()));
}

async function measureSink(side: Side, size: number, ctx: Ctx): Promise<number> {
  const [sock] = freshSocks(ctx, 1) as [string];
  const procs: { close(): Promise<unknown> }[] = [];
  try {
    let received: () => Promise<Reading>;
    let linkUp: () => Promise<void>;
    if (side === "dpdk") {
      const sink = await Testpmd.launch({
        name: "testpmd sink (net_vhost, rxonly)",
        cores: BACK_END_CORES,
        vdevs: [vhostVdev({ iface: sock })],
      });
      procs.push(sink);
      await sink.setFwd("rxonly");
      await sink.start();
      received = async () => {
        const s = await sink.stats(0);
        return { packets: s.rxPackets, bytes: s.rxBytes };
      };
      linkUp = () => sink.waitLinkUp(0);
    } else {
      const sw = await startIovirtSink(sock, { poll: ctx.o.iovirtPoll, cpus: ctx.o.iovirtCpus });
      procs.push(sw);
      received = async () => ({ packets: (await sw.portStats("p0")).rxPackets, bytes: null });
      linkUp = async () => {};
    }
    const g = await Testpmd.launch({
      name: "testpmd generator (virtio-user, txonly)",
      lcores: FRONT_END_LCORES,
      vdevs: [virtioUserVdev({ path: sock, packed: ctx.o.packed })],
    });
    procs.push(g);
    await g.setFwd("txonly");
    await g.setTxpkts(size);
    await linkUp();
    await g.start();
    const sender = { sent: async () => (await g.stats(0)).txPackets, stop: () => g.stop() };
    return await window(ctx, size, received, sender, `sink ${size} B, ${side}`);
  } finally {
    await closeAll(procs.reverse());
  }
}

/** The forward case's two front-end ports: fixed addresses, each the other's peer, so a learning switch learns both. */
const FORWARD_MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02"] as const;

async function measureForward(side: Side, size: number, ctx: Ctx): Promise<number> {
  const socks = freshSocks(ctx, 2);
  const procs: { close(): Promise<unknown> }[] = [];
  try {
    if (side === "dpdk") {
      const fwd = await Testpmd.launch({
        name: "testpmd forwarder (2 x net_vhost, io)",
        cores: BACK_END_CORES,
        vdevs: socks.map((iface, index) => vhostVdev({ iface, index })),
      });
      procs.push(fwd);
      await fwd.setFwd("io");
      await fwd.start();
    } else {
      procs.push(await startIovirtSwitch(socks, { poll: ctx.o.iovirtPoll, cpus: ctx.o.iovirtCpus }));
    }
    const ends = await Testpmd.launch({
      name: "testpmd endpoints (2 x virtio-user, mac)",
      lcores: FRONT_END_LCORES,
      vdevs: socks.map((path, index) => virtioUserVdev({ path, index, packed: ctx.o.packed, mac: FORWARD_MACS[index]! })),
      args: [`--eth-peer=0,${FORWARD_MACS[1]}`, `--eth-peer=1,${FORWARD_MACS[0]}`],
    });
    procs.push(ends);
    // mac: what arrives on one port leaves by the other, addressed to it (src = own MAC, dst = --eth-peer).
    await ends.setFwd("mac");
    await ends.setTxpkts(size);
    // tx_first: each port first sends this many bursts of txonly frames; they then circulate.
    await ends.command(`start tx_first ${ctx.o.inFlight}`);
    const both = async (): Promise<Reading> => {
      const s = await ends.portStats();
      return { packets: s.reduce((n, p) => n + p.rxPackets, 0), bytes: s.reduce((n, p) => n + p.rxBytes, 0) };
    };
    const sent = async (): Promise<number> => (await ends.portStats()).reduce((n, p) => n + p.txPackets, 0);
    return await window(ctx, size, both, { sent, stop: () => ends.stop() }, `forward ${size} B, ${side}`);
  } finally {
    await closeAll(procs.reverse());
  }
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

interface Result {
  case: CaseName;
  size: number;
  iovirtMpps: number | null;
  dpdkMpps: number | null;
  ratio: number | null;
  note?: string;
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

async function run(o: Options, iovirtWhyNot: string | null, dir: string): Promise<Result[]> {
  const ctx: Ctx = { dir, o, seq: 0 };
  const sides: Side[] = iovirtWhyNot === null ? ["iovirt", "dpdk"] : ["dpdk"];
  const points = o.cases.flatMap((c) => o.sizes.map((size) => ({ c, size })));
  const mpps = points.map(() => ({ iovirt: [] as number[], dpdk: [] as number[] }));
  for (let r = 0; r < o.runs; r++) {
    for (const [i, { c, size }] of points.entries()) {
      // Reversed every other measurement: whoever went last goes first next time.
      const order = (r + i) % 2 === 0 ? sides : [...sides].reverse();
      for (const side of order) {
        const load = loadavg()[0]!.toFixed(1);
        const m = c === "sink" ? await measureSink(side, size, ctx) : await measureForward(side, size, ctx);
        mpps[i]![side].push(m);
        progress(`${c} ${size} B, run ${r + 1}/${o.runs}: ${side} ${m.toFixed(3)} Mpps (load average ${load})`);
      }
    }
  }
  return points.map(({ c, size }, i) => {
    const iv = mpps[i]!.iovirt.length > 0 ? round3(median(mpps[i]!.iovirt)) : null;
    const dp = round3(median(mpps[i]!.dpdk));
    const res: Result = { case: c, size, iovirtMpps: iv, dpdkMpps: dp, ratio: iv === null ? null : Math.round((iv / dp) * 100) / 100 };
    if (iovirtWhyNot !== null) res.note = iovirtWhyNot;
    return res;
  });
}

function table(results: readonly Result[]): string[] {
  const fmt = (x: number | null, d: number): string => (x === null ? "-" : x.toFixed(d));
  const head = ["case", "size", "iovirt Mpps", "DPDK Mpps", "iovirt/DPDK"];
  const rows = results.map((r) => [r.case, `${r.size} B`, fmt(r.iovirtMpps, 3), fmt(r.dpdkMpps, 3), fmt(r.ratio, 2)]);
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => cells.map((s, i) => (i < 1 ? s.padEnd(width[i]!) : s.padStart(width[i]!))).join("  ");
  return [line(head), ...rows.map(line)];
}

async function main(): Promise<number> {
  const o = parseOrExplain("bench:net", HELP, () => parse(process.argv.slice(2)));
  if (typeof o === "number") return o;
  const noDpdk = testpmdUnavailable();
  if (noDpdk !== null) throw new Error(noDpdk);
  const iovirtWhyNot = iovirtSwitchUnavailable();
  if (iovirtWhyNot !== null) progress(`${iovirtWhyNot}: measuring DPDK only`);
  const dir = mkdtempSync(join(tmpdir(), "iovirt-bench-net-"));
  let results: Result[];
  try {
    results = await run(o, iovirtWhyNot, dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  if (o.json) {
    process.stdout.write(JSON.stringify({ bench: "net", results }) + "\n");
    return 0;
  }
  const cpu = cpus();
  console.log(
    `vhost-user-net back ends fed by testpmd virtio-user (${o.packed ? "packed" : "split"} rings, 1 queue pair); ` +
      `median of ${o.runs} x ${o.seconds} s after ${o.warmup} s warm-up, order alternating`,
  );
  console.log(`DPDK ${dpdkVersion() ?? "?"}, ${cpu.length} CPUs (${cpu[0]?.model ?? "?"}), Linux ${release()}`);
  console.log("");
  for (const line of table(results)) console.log(line);
  if (iovirtWhyNot !== null) console.log(`note: ${iovirtWhyNot}`);
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    console.error(e instanceof Error ? `bench:net: ${e.message}` : e);
    process.exitCode = 1;
  },
);
