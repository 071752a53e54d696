/**
 * A typed driver for DPDK's dpdk-testpmd (DPDK 22.11, Debian package
 * `dpdk-dev`), the peer that tests and benchmarks put on the other side of
 * iovirt's vhost-user network ports.
 *
 * How the two ends of a vhost-user link meet. The vhost-user protocol has a
 * front end (the side that owns the rings: QEMU, or DPDK's virtio-user PMD)
 * and a back end (the side that serves the device: DPDK's net_vhost PMD,
 * `iovirt switch`). Which side listens on the Unix socket is a separate
 * choice from which side is the front end:
 *
 *   net_virtio_user0,path=SOCK            virtio-user CONNECTS; the back end must already listen
 *                                         (its EAL probe fails, and testpmd carries on with no
 *                                         port, when nobody listens: launch() catches that).
 *   net_virtio_user0,path=SOCK,server=1   virtio-user LISTENS and the back end connects. Its EAL
 *                                         probe blocks in accept() until a back end connects, so
 *                                         testpmd shows no prompt before that: spawn(), start the
 *                                         back end, then await ready.
 *   net_vhost0,iface=SOCK                 the DPDK back end listens (the default).
 *   net_vhost0,iface=SOCK,client=1        the DPDK back end connects, and retries until the
 *                                         front end listens.
 *
 * Interactive mode is driven over a pipe: testpmd writes its prompt with
 * write(2) but command output through stdio, which a pipe makes fully
 * buffered, so output would only arrive at exit. testpmd therefore runs under
 * `stdbuf -oL` (coreutils), which makes its stdout line-buffered.
 *
 * Memory: no hugepages (`--no-huge -m 512 --single-file-segments`, IOVA as VA).
 * testpmd sizes its mbuf pool for every possible port (155456 mbufs, ~340 MB),
 * which does not fit in 512 MB, so `--total-num-mbufs` is always passed.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";

/**
 * testpmd's forwarding engines (`set fwd MODE`) that tests and benchmarks use.
 * txonly only transmits and rxonly only receives; flowgen does both on every
 * port in one lcore (it drops what it receives and sends frames of `set txpkts`
 * size to the port's --eth-peer), so one thread can be both ends of a forwarder.
 */
export type FwdMode = "io" | "mac" | "macswap" | "rxonly" | "txonly" | "flowgen" | "csum" | "icmpecho" | "5tswap";

/** One port's counters from `show port stats` (cumulative since start or `clear port stats`). */
export interface PortStats {
  port: number;
  rxPackets: number;
  rxMissed: number;
  rxBytes: number;
  rxErrors: number;
  rxNombuf: number;
  txPackets: number;
  txErrors: number;
  txBytes: number;
}

/** One port's forwarding-engine counters, printed by `stop` (`TX-dropped`: the ring was full). */
export interface FwdStats {
  port: number;
  rxPackets: number;
  rxDropped: number;
  txPackets: number;
  txDropped: number;
}

/** One line of `show port summary all`. */
export interface PortSummary {
  port: number;
  mac: string;
  name: string;
  driver: string;
  linkUp: boolean;
}

export interface TestpmdOptions {
  /** `--vdev` arguments, e.g. from virtioUserVdev() and vhostVdev(). */
  vdevs: readonly string[];
  /** EAL `-l` core list, e.g. "0,1" (lcore n on CPU n). Exclusive with `lcores`. */
  cores?: string;
  /** EAL `--lcores` map, e.g. "0@1,1@0" (lcore 0 on CPU 1, lcore 1 on CPU 0). */
  lcores?: string;
  /** EAL `--file-prefix`; unique per process by default, so several testpmds coexist. */
  filePrefix?: string;
  /** EAL `-m`, in MiB (default 512). */
  memoryMb?: number;
  /** testpmd `--total-num-mbufs` (default 32768, about 70 MB of 2176-byte mbufs). */
  totalMbufs?: number;
  /** Extra EAL arguments (before `--`). */
  eal?: readonly string[];
  /** Extra testpmd arguments (after `--`), e.g. ["--forward-mode=rxonly", "--txpkts=64"]. */
  args?: readonly string[];
  /**
   * Interactive (default): commands over stdin. Otherwise testpmd gets
   * `--auto-start --stats-period=N` and nextStats() reads what it prints.
   */
  interactive?: boolean;
  /** Seconds between stats blocks when not interactive (default 1). */
  statsPeriod?: number;
  /** Ports testpmd must have probed (default: one per vdev); fewer means a vdev failed. */
  ports?: number;
  /** Name in error messages, e.g. "testpmd A (vhost, rxonly)". */
  name?: string;
  /** Time for EAL init and port setup (default 20 s; includes waiting for a server=1 peer). */
  readyTimeoutMs?: number;
  /** Time one command may take (default 10 s). */
  commandTimeoutMs?: number;
  /** The executable (default $DPDK_TESTPMD or dpdk-testpmd from PATH). */
  binary?: string;
}

export type TestpmdErrorCode = "spawn" | "exited" | "timeout" | "ports" | "command" | "parse" | "closed";

/** Something testpmd did that the caller did not ask for; carries the tails of its output. */
export class TestpmdError extends Error {
  override name = "TestpmdError";
  readonly code: TestpmdErrorCode;
  readonly stderrTail: string;
  readonly stdoutTail: string;
  constructor(code: TestpmdErrorCode, message: string, stdoutTail = "", stderrTail = "") {
    const tails = [
      stderrTail.trim() !== "" ? `--- stderr (tail) ---\n${stderrTail.trim()}` : "",
      stdoutTail.trim() !== "" ? `--- stdout (tail) ---\n${stdoutTail.trim()}` : "",
    ].filter((s) => s !== "");
    super(tails.length > 0 ? `${message}\n${tails.join("\n")}` : message);
    this.code = code;
    this.stderrTail = stderrTail;
    this.stdoutTail = stdoutTail;
  }
}

// ---- vdev strings -------------------------------------------------------

/** DPDK's devargs split on commas: a path holding one cannot be passed. */
function devargPath(what: string, path: string): string {
  if (path === "" || /[,\s]/.test(path)) throw new RangeError(`${what}: path '${path}' is empty or holds a comma or blank`);
  return path;
}

function queuesArg(what: string, queues: number | undefined): number {
  const q = queues ?? 1;
  if (!Number.isInteger(q) || q < 1 || q > 128) throw new RangeError(`${what}: queues ${q} is not in [1, 128]`);
  return q;
}

export interface VirtioUserPort {
  /** The vhost-user socket. */
  path: string;
  /** Queue pairs (default 1). */
  queues?: number;
  /** Ring size (virtio-user's default is 256). */
  queueSize?: number;
  /** VIRTIO_F_RING_PACKED: packed rings instead of split. */
  packed?: boolean;
  /** virtio-user listens on `path` and the back end connects (see the file comment). */
  server?: boolean;
  /** Offer VIRTIO_NET_F_MRG_RXBUF (virtio-user's default is on). */
  mrgRxbuf?: boolean;
  /** Offer VIRTIO_F_IN_ORDER (virtio-user's default is on). */
  inOrder?: boolean;
  /** The port's MAC address. */
  mac?: string;
  /** Distinguishes several virtio-user ports in one testpmd (default 0). */
  index?: number;
}

/** `--vdev` for a virtio-user port: testpmd as the front end (the "guest") of a vhost-user back end. */
export function virtioUserVdev(p: VirtioUserPort): string {
  const parts = [
    `net_virtio_user${p.index ?? 0}`,
    `path=${devargPath("virtio-user", p.path)}`,
    `queues=${queuesArg("virtio-user", p.queues)}`,
  ];
  if (p.queueSize !== undefined) {
    // virtio 1.2 §2.7.10.1 (packed) and §2.6 (split): a power of two, at most 32768.
    if (!Number.isInteger(p.queueSize) || p.queueSize < 2 || p.queueSize > 32768 || (p.queueSize & (p.queueSize - 1)) !== 0)
      throw new RangeError(`virtio-user: queue size ${p.queueSize} is not a power of two in [2, 32768]`);
    parts.push(`queue_size=${p.queueSize}`);
  }
  if (p.packed === true) parts.push("packed_vq=1");
  if (p.server === true) parts.push("server=1");
  if (p.mrgRxbuf !== undefined) parts.push(`mrg_rxbuf=${p.mrgRxbuf ? 1 : 0}`);
  if (p.inOrder !== undefined) parts.push(`in_order=${p.inOrder ? 1 : 0}`);
  if (p.mac !== undefined) {
    if (!/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(p.mac)) throw new RangeError(`virtio-user: '${p.mac}' is not a MAC address`);
    parts.push(`mac=${p.mac}`);
  }
  return parts.join(",");
}

export interface VhostPort {
  /** The vhost-user socket. */
  iface: string;
  /** Queue pairs (default 1). */
  queues?: number;
  /** The back end connects (and reconnects) to a listening front end instead of listening. */
  client?: boolean;
  /** Distinguishes several vhost ports in one testpmd (default 0). */
  index?: number;
}

/** `--vdev` for DPDK's own vhost-user back end (the net_vhost PMD): the reference iovirt is compared with. */
export function vhostVdev(p: VhostPort): string {
  const parts = [`net_vhost${p.index ?? 0}`, `iface=${devargPath("vhost", p.iface)}`, `queues=${queuesArg("vhost", p.queues)}`];
  if (p.client === true) parts.push("client=1");
  return parts.join(",");
}

// ---- parsing ------------------------------------------------------------

/** A line of only '#' closes a block of `show port stats`. */
const BLOCK_END = /^\s*#{20,}\s*$/m;

function field(block: string, name: string, what: string): number {
  // Field names are matched whole and case-sensitively: "RX-packets" but not the "Rx-pps" of the throughput lines.
  const m = new RegExp(`(?:^|\\s)${name}:\\s*(\\d+)`).exec(block);
  if (m === null) throw new TestpmdError("parse", `${what}: no ${name} in:\n${block}`);
  const n = Number(m[1]);
  if (!Number.isSafeInteger(n)) throw new TestpmdError("parse", `${what}: ${name} ${m[1]} is past 2^53`);
  return n;
}

/**
 * The port blocks of `show port stats all` (or of --stats-period output), in
 * order. Only complete blocks count; lines that other threads interleave
 * (link events) are ignored; a block missing a counter is an error, never 0.
 */
export function parsePortStats(text: string): PortStats[] {
  const out: PortStats[] = [];
  const head = /NIC statistics for port (\d+)\s*#*[^\n]*\n/g;
  for (let m = head.exec(text); m !== null; m = head.exec(text)) {
    const rest = text.slice(m.index + m[0].length);
    const end = BLOCK_END.exec(rest);
    if (end === null) break; // still being printed
    const block = rest.slice(0, end.index);
    const what = `port ${m[1]} stats`;
    out.push({
      port: Number(m[1]),
      rxPackets: field(block, "RX-packets", what),
      rxMissed: field(block, "RX-missed", what),
      rxBytes: field(block, "RX-bytes", what),
      rxErrors: field(block, "RX-errors", what),
      rxNombuf: field(block, "RX-nombuf", what),
      txPackets: field(block, "TX-packets", what),
      txErrors: field(block, "TX-errors", what),
      txBytes: field(block, "TX-bytes", what),
    });
    head.lastIndex = m.index + m[0].length + end.index + end[0].length;
  }
  return out;
}

/** The per-port blocks of the forwarding statistics `stop` prints (not the accumulated one). */
export function parseFwdStats(text: string): FwdStats[] {
  const out: FwdStats[] = [];
  const head = /-+ Forward statistics for port (\d+)\s*-+\s*\n/g;
  for (let m = head.exec(text); m !== null; m = head.exec(text)) {
    const rest = text.slice(m.index + m[0].length);
    const end = /^\s*-{20,}\s*$/m.exec(rest);
    const block = end === null ? rest : rest.slice(0, end.index);
    const what = `port ${m[1]} forward stats`;
    out.push({
      port: Number(m[1]),
      rxPackets: field(block, "RX-packets", what),
      rxDropped: field(block, "RX-dropped", what),
      txPackets: field(block, "TX-packets", what),
      txDropped: field(block, "TX-dropped", what),
    });
  }
  return out;
}

/** The table of `show port summary all`. */
export function parsePortSummary(text: string): PortSummary[] {
  const out: PortSummary[] = [];
  const row = /^(\d+)\s+([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})\s+(\S+)\s+(\S+)\s+(up|down)\b/gm;
  for (let m = row.exec(text); m !== null; m = row.exec(text))
    out.push({ port: Number(m[1]), mac: m[2]!, name: m[3]!, driver: m[4]!, linkUp: m[5] === "up" });
  return out;
}

// ---- finding DPDK -------------------------------------------------------

function onPath(cmd: string): string | null {
  if (cmd.includes("/")) return existsSync(cmd) ? cmd : null;
  for (const dir of (process.env["PATH"] ?? "").split(":")) {
    if (dir === "") continue;
    const p = join(dir, cmd);
    if (existsSync(p)) return p;
  }
  return null;
}

/** The dpdk-testpmd that launch() would run, or null. */
export function testpmdBinary(): string | null {
  return onPath(process.env["DPDK_TESTPMD"] ?? "dpdk-testpmd");
}

/** Null when testpmd can be driven here, else why not (for a message; tests fail on it). */
export function testpmdUnavailable(): string | null {
  if (testpmdBinary() === null) return "dpdk-testpmd not found (Debian: apt-get install dpdk-dev; tools/setup.sh installs it)";
  if (onPath("stdbuf") === null) return "stdbuf (coreutils) not found: testpmd's output cannot be read over a pipe without it";
  return null;
}

/** The DPDK version testpmd was built with, from its EAL banner, or null. */
export function dpdkVersion(): string | null {
  const bin = testpmdBinary();
  if (bin === null) return null;
  // A broken option makes EAL print usage and exit at once, without touching memory.
  const r = spawnSync(bin, ["--no-huge", "--no-pci", "-v", "--bogus-option"], { encoding: "utf8", timeout: 10_000 });
  return /RTE Version: '(?:DPDK )?([^']+)'/.exec(`${r.stdout}${r.stderr}`)?.[1] ?? null;
}

/** EAL's runtime directory for a file prefix (eal_create_runtime_dir: /var/run as root, else XDG_RUNTIME_DIR or /tmp). */
function runtimeDir(prefix: string): string {
  const base = process.getuid?.() === 0 ? "/var/run" : (process.env["XDG_RUNTIME_DIR"] ?? "/tmp");
  return join(base, "dpdk", prefix);
}

let prefixSeq = 0;

/** Every testpmd still running: killed if this process exits without closing them (they busy-poll a CPU). */
const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;
function track(child: ChildProcess, prefix: string): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once("exit", () => {
      for (const [c, p] of live) {
        c.kill("SIGKILL");
        // EAL made the directory during init; a killed testpmd cannot recreate it.
        rmSync(runtimeDir(p), { recursive: true, force: true });
      }
    });
  }
  live.set(child, prefix);
  child.once("exit", () => live.delete(child));
}

// ---- the driver ---------------------------------------------------------

const PROMPT = "testpmd> ";
const TAIL = 16_384;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A running dpdk-testpmd. launch() (or spawn() and `ready`) to start one, close() always. */
export class Testpmd {
  readonly name: string;
  readonly child: ChildProcess;
  readonly filePrefix: string;
  /** The full command line, for messages and reports. */
  readonly argv: readonly string[];
  readonly interactive: boolean;
  /** Resolves once EAL and the ports are up and (interactive) the first prompt is shown. */
  readonly ready: Promise<void>;

  private readonly commandTimeoutMs: number;
  private readonly expectPorts: number;
  private out = ""; // stdout tail, for messages
  private err = ""; // stderr tail
  private pending = ""; // stdout since the last prompt
  private waiter: { resolve: (reply: string) => void; reject: (e: Error) => void } | null = null;
  private queue: Promise<unknown> = Promise.resolve();
  private broken: TestpmdError | null = null;
  private exitInfo: string | null = null;
  private readonly exitPromise: Promise<void>;
  private statsText = ""; // non-interactive: stats output not consumed yet
  private statsWaiter: (() => void) | null = null;
  private closing: Promise<number | null> | null = null;

  /**
   * Starts testpmd and returns at once. Await `ready` before commands; a
   * virtio-user server=1 port keeps testpmd from becoming ready until its
   * back end connects.
   */
  static spawn(o: TestpmdOptions): Testpmd {
    return new Testpmd(o);
  }

  /** Starts testpmd and waits until it is ready; a testpmd that fails to start is reaped and its stderr thrown. */
  static async launch(o: TestpmdOptions): Promise<Testpmd> {
    const t = new Testpmd(o);
    try {
      await t.ready;
    } catch (e) {
      await t.close();
      throw e;
    }
    return t;
  }

  private constructor(o: TestpmdOptions) {
    if (o.cores !== undefined && o.lcores !== undefined) throw new RangeError("testpmd: give cores or lcores, not both");
    const bin = o.binary ?? testpmdBinary() ?? "dpdk-testpmd";
    this.name = o.name ?? "testpmd";
    this.interactive = o.interactive ?? true;
    this.commandTimeoutMs = o.commandTimeoutMs ?? 10_000;
    this.expectPorts = o.ports ?? o.vdevs.length;
    this.filePrefix = o.filePrefix ?? `iovirt-${process.pid}-${++prefixSeq}`;
    const eal = [
      ...(o.cores !== undefined ? ["-l", o.cores] : []),
      ...(o.lcores !== undefined ? ["--lcores", o.lcores] : []),
      "--no-huge",
      "-m",
      String(o.memoryMb ?? 512),
      "--no-pci",
      "--single-file-segments",
      "--file-prefix",
      this.filePrefix,
      ...o.vdevs.flatMap((v) => ["--vdev", v]),
      ...(o.eal ?? []),
    ];
    const pmd = [
      `--total-num-mbufs=${o.totalMbufs ?? 32768}`,
      ...(this.interactive ? ["-i"] : ["--auto-start", `--stats-period=${o.statsPeriod ?? 1}`]),
      ...(o.args ?? []),
    ];
    this.argv = ["stdbuf", "-oL", bin, ...eal, "--", ...pmd];
    this.child = spawn("stdbuf", this.argv.slice(1), { stdio: ["pipe", "pipe", "pipe"] });
    track(this.child, this.filePrefix);
    this.child.stdout!.setEncoding("utf8");
    this.child.stderr!.setEncoding("utf8");
    this.child.stdout!.on("data", (d: string) => this.onStdout(d));
    this.child.stderr!.on("data", (d: string) => {
      this.err = (this.err + d).slice(-TAIL);
    });
    // A testpmd that quits closes its stdin; a write racing that must not crash the caller.
    this.child.stdin!.on("error", () => {});
    this.exitPromise = new Promise<void>((resolve) => {
      this.child.once("error", (e) => {
        this.exitInfo = `could not be started: ${e.message}`;
        this.fail(new TestpmdError("spawn", `${this.name}: ${bin} ${this.exitInfo}`));
        resolve();
      });
      // 'close' rather than 'exit': by then all of stdout and stderr has been read, for the message.
      this.child.once("close", (code, signal) => {
        this.exitInfo ??= signal !== null ? `killed by ${signal}` : `exited with code ${code}`;
        this.fail(this.error("exited", `${this.name} ${this.exitInfo}`));
        resolve();
      });
    });
    this.ready = this.becomeReady(o.readyTimeoutMs ?? 20_000);
    this.ready.catch(() => {}); // launch() and callers see it; an unawaited spawn() must not crash the process
  }

  private error(code: TestpmdErrorCode, message: string): TestpmdError {
    return new TestpmdError(code, message, this.out.slice(-4096), this.err.slice(-4096));
  }

  private fail(e: TestpmdError): void {
    this.broken ??= e;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(e);
    this.statsWaiter?.();
  }

  private onStdout(d: string): void {
    this.out = (this.out + d).slice(-TAIL);
    if (!this.interactive) {
      this.statsText = (this.statsText + d).slice(-1 << 20);
      this.statsWaiter?.();
      return;
    }
    this.pending += d;
    // A reply ends at the first prompt at the start of a line. testpmd echoes
    // the command (CR LF) before its output, so even an empty reply has one.
    // Text after the prompt (a link event from another thread) belongs to the next reply.
    const at = this.pending.startsWith(PROMPT) ? 0 : this.pending.indexOf(`\n${PROMPT}`);
    if (at < 0 || this.waiter === null) return;
    const cut = at === 0 ? 0 : at + 1;
    const reply = this.pending.slice(0, cut);
    this.pending = this.pending.slice(cut + PROMPT.length);
    const w = this.waiter;
    this.waiter = null;
    w.resolve(reply);
  }

  private async becomeReady(timeoutMs: number): Promise<void> {
    if (this.interactive) {
      await this.awaitReply(timeoutMs, "the first prompt");
    } else {
      await this.waitFor(() => this.statsText.includes("NIC statistics for port"), timeoutMs, "the first stats block");
    }
    if (this.expectPorts > 0 && this.interactive) {
      const n = parsePortSummary(await this.send("show port summary all", this.commandTimeoutMs)).length;
      if (n !== this.expectPorts)
        throw this.error("ports", `${this.name} has ${n} ports, ${this.expectPorts} expected: a --vdev failed to probe`);
    }
  }

  /** Resolves with the text up to the next prompt. */
  private awaitReply(timeoutMs: number, what: string): Promise<string> {
    if (this.broken !== null) return Promise.reject(this.broken);
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        // The prompt may still come; later replies could not be told apart from this one's.
        const e = this.error("timeout", `${this.name}: no prompt after ${what} within ${timeoutMs} ms`);
        this.broken ??= e;
        reject(e);
      }, timeoutMs);
      this.waiter = {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.onStdout(""); // the prompt may be here already
    });
  }

  private async waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!cond()) {
      if (this.broken !== null) throw this.broken;
      const left = deadline - Date.now();
      if (left <= 0) throw this.error("timeout", `${this.name}: no ${what} within ${timeoutMs} ms`);
      await new Promise<void>((r) => {
        const timer = setTimeout(r, Math.min(left, 200));
        this.statsWaiter = () => {
          clearTimeout(timer);
          this.statsWaiter = null;
          r();
        };
      });
    }
  }

  /**
   * Runs one command and returns what it printed (without the echo of the
   * command). Commands run one at a time, in call order. testpmd's
   * "Bad arguments" / "Command not found" throw.
   */
  command(line: string, timeoutMs = this.commandTimeoutMs): Promise<string> {
    if (!this.interactive) return Promise.reject(new TestpmdError("command", `${this.name} is not interactive`));
    if (/[\r\n]/.test(line)) return Promise.reject(new RangeError(`testpmd command holds a line break: ${JSON.stringify(line)}`));
    const run = async (): Promise<string> => {
      await this.ready;
      return this.send(line, timeoutMs);
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => {});
    return p;
  }

  /** One command, once the prompt is up (becomeReady uses it before `ready` resolves). */
  private async send(line: string, timeoutMs: number): Promise<string> {
    if (this.broken !== null) throw this.broken;
    const reply = this.awaitReply(timeoutMs, `'${line}'`);
    this.child.stdin!.write(`${line}\n`);
    const text = (await reply).replace(/\r/g, "");
    const echo = text.indexOf(`${line}\n`);
    const body = echo >= 0 ? text.slice(echo + line.length + 1) : text;
    if (/^(Bad arguments|Command not found|Ambiguous command)/m.test(body))
      throw this.error("command", `${this.name} rejected '${line}': ${body.trim()}`);
    return body;
  }

  /** `set fwd MODE`. */
  async setFwd(mode: FwdMode): Promise<void> {
    const r = await this.command(`set fwd ${mode}`);
    if (!r.includes(`Set ${mode} packet forwarding mode`)) throw this.error("command", `${this.name}: set fwd ${mode}: ${r.trim()}`);
  }

  /** `set txpkts`: txonly's packet size (Ethernet frame without FCS), or its segment sizes. */
  async setTxpkts(sizes: number | readonly number[]): Promise<void> {
    const list = typeof sizes === "number" ? [sizes] : sizes;
    for (const s of list) if (!Number.isInteger(s) || s < 1 || s > 65535) throw new RangeError(`txpkts: ${s} is not in [1, 65535]`);
    // testpmd prints its complaint (e.g. "too big") and carries on; the check is that nothing was printed.
    const r = await this.command(`set txpkts ${list.join(",")}`);
    if (r.trim() !== "") throw this.error("command", `${this.name}: set txpkts ${list.join(",")}: ${r.trim()}`);
  }

  /** `start`: forwarding begins on the forwarding lcores. */
  async start(): Promise<void> {
    const r = await this.command("start");
    if (/Packet forwarding already started/.test(r)) return;
    if (!/packet forwarding - ports=/.test(r)) throw this.error("command", `${this.name}: start: ${r.trim()}`);
  }

  /** `stop`: forwarding ends; returns the forwarding engine's per-port counters for the run. */
  async stop(): Promise<FwdStats[]> {
    return parseFwdStats(await this.command("stop"));
  }

  /** `show port stats all`: every port's cumulative counters. */
  async portStats(): Promise<PortStats[]> {
    const stats = parsePortStats(await this.command("show port stats all"));
    if (this.expectPorts > 0 && stats.length !== this.expectPorts)
      throw this.error("parse", `${this.name}: stats for ${stats.length} ports, ${this.expectPorts} expected`);
    return stats;
  }

  /** One port's counters. */
  async stats(port = 0): Promise<PortStats> {
    const s = parsePortStats(await this.command(`show port stats ${port}`)).find((p) => p.port === port);
    if (s === undefined) throw this.error("parse", `${this.name}: no stats for port ${port}`);
    return s;
  }

  /**
   * `clear port stats all`. Not reliable on a port whose lcore is
   * forwarding: net_vhost updates its counters on every burst with a plain
   * read-modify-write, which can overwrite the reset. Compare two readings
   * there instead.
   */
  async clearStats(): Promise<void> {
    await this.command("clear port stats all");
  }

  /** `port stop` (forwarding must be stopped): the front end resets its device, a back end drops its rings. */
  async portStop(port: number | "all" = "all"): Promise<void> {
    await this.command(`port stop ${port}`, 30_000);
  }

  /** `port start`: the device is set up again (virtio-user renegotiates with its back end). */
  async portStart(port: number | "all" = "all"): Promise<void> {
    const r = await this.command(`port start ${port}`, 30_000);
    if (/Fail to start port|Failed/i.test(r)) throw this.error("command", `${this.name}: port start ${port}: ${r.trim()}`);
  }

  /** `show port summary all`: names, MACs and link state. */
  async summary(): Promise<PortSummary[]> {
    return parsePortSummary(await this.command("show port summary all"));
  }

  /** Polls until `port`'s link is up: for net_vhost, until a front end has connected and its rings are live. */
  async waitLinkUp(port = 0, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if ((await this.summary()).find((p) => p.port === port)?.linkUp === true) return;
      if (Date.now() > deadline) throw this.error("timeout", `${this.name}: port ${port}'s link is not up after ${timeoutMs} ms`);
      await sleep(50);
    }
  }

  /** Non-interactive mode: the next block of --stats-period counters printed after this call. */
  async nextStats(timeoutMs = 10_000): Promise<PortStats[]> {
    if (this.interactive) throw new TestpmdError("command", `${this.name} is interactive: use portStats()`);
    this.statsText = "";
    let got: PortStats[] = [];
    await this.waitFor(
      () => {
        const at = this.statsText.indexOf("Port statistics =");
        if (at < 0) return false;
        got = parsePortStats(this.statsText.slice(at));
        return got.length >= Math.max(1, this.expectPorts);
      },
      timeoutMs,
      "stats block",
    );
    return got;
  }

  /** Waits until `path` exists (a socket testpmd listens on), failing early if testpmd exits. */
  async waitForPath(path: string, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!existsSync(path)) {
      if (this.broken !== null && this.exitInfo !== null) throw this.broken;
      if (Date.now() > deadline) throw this.error("timeout", `${this.name} did not create ${path} within ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  /** Whether the process has ended. */
  get exited(): boolean {
    return this.exitInfo !== null;
  }

  /** What testpmd wrote to stderr (its tail): EAL, PMD and vhost logs. */
  stderrTail(): string {
    return this.err;
  }

  /** What testpmd wrote to stdout (its tail). */
  stdoutTail(): string {
    return this.out;
  }

  /**
   * Ends testpmd and reaps it: `quit` (interactive, when it still answers),
   * then SIGTERM, then SIGKILL, a few seconds apart; then removes EAL's
   * runtime directory. Idempotent. Returns the exit code (null after a signal).
   */
  close(graceMs = 5000): Promise<number | null> {
    this.closing ??= this.doClose(graceMs);
    return this.closing;
  }

  private async doClose(graceMs: number): Promise<number | null> {
    const ended = (ms: number): Promise<boolean> => Promise.race([this.exitPromise.then(() => true), sleep(ms).then(() => false)]);
    if (!this.exited) {
      if (this.interactive && this.broken === null) {
        this.child.stdin!.write("quit\n");
        this.child.stdin!.end(); // EOF on stdin also makes interactive testpmd quit
      } else {
        this.child.kill("SIGTERM");
      }
      if (!(await ended(graceMs))) {
        this.child.kill("SIGTERM");
        if (!(await ended(graceMs))) {
          this.child.kill("SIGKILL");
          await this.exitPromise;
        }
      }
    }
    this.broken ??= new TestpmdError("closed", `${this.name} is closed`);
    rmSync(runtimeDir(this.filePrefix), { recursive: true, force: true });
    return this.child.exitCode;
  }
}
