import type { GuestError } from "../../core/errors.js";
import type { NetHdr } from "../../core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../../core/net/offloads.js";
import type { PortHandle } from "../../core/switch/index.js";
import type { SwitchPort } from "../../core/switch/port.js";
import { NetDevice } from "../../core/virtio/devices/net/device.js";
import type { RxBatch } from "../../core/virtio/devices/net/batch.js";
import type { PacketPort } from "../../core/virtio/devices/net/port.js";
import { NetPortError } from "../net/errors.js";
import { VhostUserServer, connectBackend } from "../vhost-user/server.js";
import { isMessageTrace, type VhostUserConnection } from "../vhost-user/connection.js";
import { parseMac, type VhostUserPortSpec } from "./spec.js";

/** How often a client-mode port retries connecting to its front end. */
const RECONNECT_MS = 1000;
/**
 * A guest error of one code is logged at most this often per port; the rest
 * are only counted (guestErrors, in the printed counters). A hostile or
 * broken driver can fault once per packet, and a line per packet would let
 * it flood the log at packet rate.
 */
const ERROR_LOG_INTERVAL_MS = 10_000;

/**
 * A switch port that is a virtio-net device served over vhost-user: a VM's
 * QEMU or a DPDK virtio-user process is on the other side. What the guest
 * transmits enters the switch; what the switch sends goes into the guest's
 * receive queues, with the offloads its driver negotiated.
 */
export class VhostUserNetPort implements SwitchPort {
  readonly name: string;
  readonly spec: VhostUserPortSpec;
  readonly device: NetDevice;
  private handle: PortHandle | null = null;
  private accepted: Readonly<Offloads> = NO_OFFLOADS;
  private server: VhostUserServer | null = null;
  private conn: VhostUserConnection | null = null;
  private retry: NodeJS.Timeout | null = null;
  private closed = false;
  private readonly log: (line: string) => void;
  private readonly verbose: boolean;
  private readonly busyPoll: boolean;
  /** Guest errors by code since start (the device reports each; the log shows a few). */
  readonly guestErrors: Record<string, number> = {};
  /** Per code: when it was last logged and how many went unlogged since. Codes are a fixed set. */
  private readonly errorLog = new Map<string, { at: number; quiet: number }>();

  constructor(spec: VhostUserPortSpec, opts: { log: (line: string) => void; verbose: boolean; busyPoll: boolean; rxBatch?: RxBatch }) {
    this.name = spec.name;
    this.spec = spec;
    this.log = opts.log;
    this.verbose = opts.verbose;
    this.busyPoll = opts.busyPoll;
    const port: PacketPort = {
      transmit: (frame, hdr) => this.handle?.input(frame, hdr),
      // send() below hands packets to this.device.receive itself, one call less per packet.
      attach: () => {},
      offloadsChanged: (accepts) => {
        this.accepted = accepts;
      },
    };
    this.device = new NetDevice({
      port,
      queuePairs: spec.queues,
      controlQueue: false,
      ...(opts.rxBatch !== undefined ? { rxBatch: opts.rxBatch } : {}),
      mtu: spec.mtu,
      ...(spec.mac !== null ? { mac: parseMac(spec.mac) } : {}),
    });
    this.device.events.guestError = (err, q) => this.guestError(err, q);
  }

  private guestError(err: GuestError, q: number | null): void {
    this.guestErrors[err.code] = (this.guestErrors[err.code] ?? 0) + 1;
    const now = Date.now();
    const seen = this.errorLog.get(err.code);
    if (seen !== undefined && now - seen.at < ERROR_LOG_INTERVAL_MS) {
      seen.quiet++;
      return;
    }
    const more = seen !== undefined && seen.quiet > 0 ? ` (${seen.quiet} more since the last report)` : "";
    this.errorLog.set(err.code, { at: now, quiet: 0 });
    this.log(`${this.name}: guest error${q === null ? "" : ` on queue ${q}`}: ${err.code}: ${err.message}${more}`);
  }

  /** Joins the switch and starts listening (or connecting). */
  start(handle: PortHandle): void {
    this.handle = handle;
    if (this.spec.client) this.connect();
    else {
      try {
        this.server = new VhostUserServer(this.spec.path, this.device, this.serverOptions());
      } catch (e) {
        // bind()'s own message names neither the port nor the path, and a switch may have many.
        throw new NetPortError("SYSTEM", `port ${this.name}: cannot listen on ${this.spec.path}: ${(e as Error).message}`, { cause: e });
      }
    }
  }

  private serverOptions(): Parameters<typeof connectBackend>[2] {
    return {
      log: (s: string) => (this.verbose || !isMessageTrace(s) ? this.log(`${this.name}: ${s}`) : undefined),
      busyPoll: this.busyPoll,
      onConnect: (c) => {
        this.conn = c;
        this.log(`${this.name}: front end connected`);
      },
      onDisconnect: (err) => {
        this.conn = null;
        this.accepted = NO_OFFLOADS;
        this.log(`${this.name}: front end disconnected${err ? `: ${err.message}` : ""}`);
        if (this.spec.client && !this.closed) this.scheduleConnect();
      },
    };
  }

  private connect(): void {
    this.retry = null;
    if (this.closed) return;
    try {
      connectBackend(this.spec.path, this.device, this.serverOptions());
    } catch (e) {
      if (this.verbose) this.log(`${this.name}: connect ${this.spec.path}: ${(e as Error).message}`);
      this.scheduleConnect();
    }
  }

  private scheduleConnect(): void {
    if (this.retry === null && !this.closed) this.retry = setTimeout(() => this.connect(), RECONNECT_MS);
  }

  /** The connection in use (busy-poll mode polls its rings). */
  get connection(): VhostUserConnection | null {
    return this.conn;
  }

  accepts(): Readonly<Offloads> {
    return this.accepted;
  }

  maxFrame(): number {
    return this.device.maxReceiveFrame;
  }

  linkUp(): boolean {
    return this.conn !== null && this.device.carrierUp;
  }

  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    return this.device.receive(frame, hdr);
  }

  /** QEMU (and DPDK) options that attach a front end to this port. */
  frontEndHelp(): string {
    const s = this.spec;
    const id = s.name;
    const mq = s.queues > 1;
    const chardev = s.client
      ? `-chardev socket,id=${id},path=${s.path},server=on,wait=off`
      : `-chardev socket,id=${id},path=${s.path},reconnect=1`;
    const dev =
      `-device virtio-net-pci,netdev=${id}n${s.mac !== null ? `,mac=${s.mac}` : ""}${mq ? `,mq=on` : ""}` +
      `${s.mtu !== 1500 ? `,host_mtu=${s.mtu}` : ""}`;
    return (
      `  ${s.name}: QEMU ${chardev} \\\n      -netdev vhost-user,id=${id}n,chardev=${id}${mq ? `,queues=${s.queues}` : ""} ${dev}\n` +
      `  ${s.name}: DPDK --vdev net_virtio_user0,path=${s.path}${mq ? `,queues=${s.queues}` : ""}${s.client ? ",server=1" : ""}\n`
    );
  }

  close(): void {
    this.closed = true;
    if (this.retry !== null) clearTimeout(this.retry);
    this.retry = null;
    this.server?.close();
    this.conn?.close();
    this.conn = null;
  }
}
