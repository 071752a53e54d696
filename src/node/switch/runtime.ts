/**
 * `iovirt switch` at run time: builds the switch and its ports from a
 * SwitchSpec, prints how to attach front ends, serves until SIGINT/SIGTERM,
 * prints counters on SIGUSR1 and at intervals. In --poll mode the whole
 * switch runs in one worker thread that busy-polls the vhost-user rings
 * (see poll-worker.ts); the main thread only relays signals.
 */
import { Switch, formatStats } from "../../core/switch/index.js";
import { RxBatch } from "../../core/virtio/devices/net/batch.js";
import type { NetHdr } from "../../core/net/hdr.js";
import type { Offloads } from "../../core/net/offloads.js";
import type { SwitchPort } from "../../core/switch/port.js";
import { PcapWriter, TapPort, VxlanPort, type PortStats as HostPortStats } from "../net/index.js";
import type { PortSpec, SwitchSpec } from "./spec.js";
import { VhostUserNetPort } from "./vhost-port.js";

export interface OpenedPort {
  spec: PortSpec;
  port: SwitchPort;
  close(): void | Promise<void>;
  /** For vhost-user ports: how to attach a front end. */
  help?: string;
  vhost?: VhostUserNetPort;
  /** For tap and VXLAN ports: the port's own counters (what the host side did with the frames). */
  host?: { kind: "tap" | "vxlan"; stats: Readonly<HostPortStats> };
}

/** A running switch: ports open, packets flowing. */
export class SwitchRuntime {
  readonly sw: Switch;
  readonly ports: OpenedPort[] = [];
  private readonly closers: (() => void | Promise<void>)[] = [];
  private ageTimer: NodeJS.Timeout | null = null;
  /** The vhost-user ports, for the polling loop (built on its first pass, once every port is open). */
  private vhostPorts: VhostUserNetPort[] | null = null;
  /** One batch for every VM port: what one guest sends in a pass reaches the others as one burst. */
  private readonly rxBatch = new RxBatch();
  /** The --pcap writers, for their counters. */
  private readonly pcaps: { file: string; stats: Readonly<HostPortStats> }[] = [];

  private constructor(
    readonly spec: SwitchSpec,
    private readonly log: (line: string) => void,
  ) {
    this.sw = new Switch({
      ageingMs: spec.ageSec * 1000,
      maxMacs: spec.maxMacs,
      maxMacsPerPort: spec.maxMacsPerPort,
      onError: (e, where) => log(`switch: ${where}: ${(e as Error).message}`),
    });
  }

  static async start(spec: SwitchSpec, log: (line: string) => void): Promise<SwitchRuntime> {
    const rt = new SwitchRuntime(spec, log);
    try {
      for (const p of spec.ports) await rt.open(p);
      for (const c of spec.pcaps) {
        const w = new PcapWriter({ path: c.file, onError: (e) => log(`pcap ${c.file}: ${e.message}`) });
        await w.open();
        rt.sw.addMirror((frame) => void w.write(frame), c.port === null ? undefined : { port: c.port });
        rt.closers.push(() => w.close());
        rt.pcaps.push({ file: c.file, stats: w.stats });
        log(`capturing ${c.port === null ? "all traffic" : `traffic of port ${c.port}`} into ${c.file}`);
      }
    } catch (e) {
      await rt.close();
      throw e;
    }
    rt.ageTimer = setInterval(() => rt.sw.age(), Math.max(1000, Math.min(30_000, (spec.ageSec * 1000) / 4)));
    rt.ageTimer.unref();
    return rt;
  }

  private async open(p: PortSpec): Promise<void> {
    const vlan = p.vlan === null ? {} : { vlan: p.vlan };
    if (p.kind === "vhost-user") {
      const v = new VhostUserNetPort(p, { log: this.log, verbose: this.spec.verbose, busyPoll: this.spec.poll, rxBatch: this.rxBatch });
      v.start(this.sw.addPort(v, vlan));
      this.ports.push({ spec: p, port: v, close: () => v.close(), help: v.frontEndHelp(), vhost: v });
      this.closers.push(() => v.close());
      return;
    }
    let handle: ReturnType<Switch["addPort"]> | null = null;
    const onPacket = (frame: Uint8Array, hdr: Readonly<NetHdr>): void => void handle?.input(frame, hdr);
    let port: TapPort | VxlanPort;
    let what: string;
    if (p.kind === "tap") {
      const tap = new TapPort({ name: p.ifname, portName: p.name, onPacket, onError: (e) => this.log(`port ${p.name}: ${e.message}`) });
      tap.open();
      port = tap;
      what = `tap ${tap.ifname} (offloads: ${describeOffloads(tap.accepts())})`;
    } else {
      // The inner MTU given is the underlay MTU less VXLAN's 50 bytes over IPv4 (RFC 7348 §5).
      const vx = VxlanPort.fromSpec(p.endpoints, { portName: p.name, underlayMtu: p.mtu + 50, onPacket });
      await vx.open();
      port = vx;
      what = `vxlan ${p.endpoints} (inner frames up to ${vx.maxFrame()} bytes)`;
    }
    this.closers.push(() => port.close());
    handle = this.sw.addPort(port, vlan);
    this.ports.push({ spec: p, port, close: () => port.close(), host: { kind: p.kind, stats: port.stats } });
    this.log(`port ${p.name}: ${what}`);
  }

  /** Busy-poll mode: one pass over every vhost-user port's rings; returns how many rings had work. */
  pollAll(): number {
    if (this.vhostPorts === null) this.vhostPorts = this.ports.flatMap((p) => (p.vhost === undefined ? [] : [p.vhost]));
    let n = 0;
    const ports = this.vhostPorts;
    for (let i = 0; i < ports.length; i++) {
      const c = ports[i]!.connection;
      if (c !== null && !c.isClosed) n += c.backend.pollAll();
    }
    return n;
  }

  /**
   * The switch's per-port counters, then what each virtio-net device dropped
   * before the switch saw it, and the driver faults it reported by code.
   */
  statsText(): string {
    let text = formatStats(this.sw.stats());
    for (const p of this.ports) {
      const d = p.vhost?.device.stats;
      if (d === undefined) continue;
      text += `\n${p.spec.name} device: tx ${d.txFrames} frames, dropped ${countsText(d.txDrops)}; rx ${d.rxFrames} frames, dropped ${countsText(d.rxDrops)}`;
      // Driver faults the log shows only now and then (a looping chain, a buffer too short for its header).
      const errors = p.vhost?.guestErrors ?? {};
      if (Object.keys(errors).length > 0) text += `; guest errors ${countsText(errors)}`;
    }
    // What the host side of tap and VXLAN ports and the captures did: failed writes and reads
    // (an errno, a full socket buffer, a frame from the wrong VNI) show only here.
    for (const p of this.ports) {
      const h = p.host;
      if (h === undefined) continue;
      const s = h.stats;
      text += `\n${p.spec.name} ${h.kind}: rx ${s.rxPackets} packets (${s.rxBytes} bytes), tx ${s.txPackets} packets (${s.txBytes} bytes), errors ${countsText(s.errors)}`;
    }
    for (const c of this.pcaps) {
      text += `\npcap ${c.file}: ${c.stats.txPackets} packets (${c.stats.txBytes} bytes) recorded, errors ${countsText(c.stats.errors)}`;
    }
    return text;
  }

  async close(): Promise<void> {
    if (this.ageTimer !== null) clearInterval(this.ageTimer);
    this.ageTimer = null;
    for (const c of this.closers.splice(0).reverse()) {
      try {
        await c();
      } catch (e) {
        this.log(`close: ${(e as Error).message}`);
      }
    }
  }
}

function stamp(line: string): void {
  process.stderr.write(`${new Date().toISOString()} ${line}\n`);
}

export interface RunOptions {
  /** The --poll worker's module (tests substitute one). */
  pollWorkerUrl?: URL;
}

/**
 * Runs the switch until SIGINT or SIGTERM; returns the exit code: 0 after a
 * signal, 1 when the --poll worker died (a bug: the ports are gone, and a
 * supervisor should see the failure and restart the switch).
 */
export async function runSwitch(spec: SwitchSpec, opts: RunOptions = {}): Promise<number> {
  const log = stamp;
  let stats: () => Promise<string>;
  let close: () => Promise<void>;
  let help: string;
  let died: Promise<Error> = new Promise(() => {});
  if (spec.poll) {
    const { PollSwitch } = await import("./poll-worker.js");
    const w = await PollSwitch.start(spec, log, opts.pollWorkerUrl);
    stats = () => w.stats();
    close = () => w.close();
    help = w.help;
    died = w.ended;
  } else {
    const rt = await SwitchRuntime.start(spec, log);
    stats = () => Promise.resolve(rt.statsText());
    close = () => rt.close();
    help = rt.ports.map((p) => p.help ?? "").join("");
  }
  log(
    `switch running with ${spec.ports.length} port(s)${spec.poll ? " (busy-poll worker)" : ""}: ${spec.ports.map((p) => p.name).join(", ")}`,
  );
  if (help !== "") process.stdout.write(`Attach front ends with (guest memory must be shared: memfd, share=on):\n${help}`);
  const printStats = (): void => void stats().then((s) => process.stdout.write(`${s}\n`));
  process.on("SIGUSR1", printStats);
  const timer = spec.statsIntervalSec > 0 ? setInterval(printStats, spec.statsIntervalSec * 1000) : null;
  let onSignal: (sig: NodeJS.Signals) => void = () => {};
  const signalled = new Promise<NodeJS.Signals>((resolve) => (onSignal = resolve));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    const why = await Promise.race([signalled, died]);
    if (why instanceof Error) {
      log(`switch worker died: ${why.stack ?? why.message}`);
      return 1;
    }
    log(`${why}: shutting down`);
    process.stdout.write(`${await stats()}\n`);
    await close();
    return 0;
  } finally {
    if (timer !== null) clearInterval(timer);
    process.off("SIGUSR1", printStats);
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

function describeOffloads(o: Readonly<Offloads>): string {
  const on = (Object.keys(o) as (keyof Offloads)[]).filter((k) => o[k]);
  return on.length === 0 ? "none" : on.join(" ");
}

/** "a=1 b=2", or "none". */
function countsText(m: Readonly<Record<string, number>>): string {
  return (
    Object.entries(m)
      .map(([k, v]) => `${k}=${v}`)
      .join(" ") || "none"
  );
}
