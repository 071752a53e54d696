/**
 * A point-to-point VXLAN tunnel (RFC 7348) as a switch port: Ethernet frames
 * travel inside UDP datagrams between this host and one remote VTEP, which
 * may be a Linux vxlan device, Open vSwitch or another iovirt.
 *
 * Sizes: each frame costs 8 (VXLAN) + 8 (UDP) + 20 (IPv4) or 40 (IPv6)
 * bytes of the underlay's MTU. RFC 7348 §4.3 forbids the VTEP to fragment,
 * so the largest inner frame is the underlay MTU minus 36 (IPv4) or 56
 * (IPv6): 1464 bytes on a 1500-byte underlay, i.e. an inner IP MTU of 1450
 * (the usual "MTU minus 50", which counts the inner Ethernet header too),
 * like Linux's own vxlan devices. Guests should use that MTU; to carry
 * full 1500-byte inner packets, raise the underlay's MTU (to 1550 or jumbo
 * frames) and pass it as `underlayMtu`.
 *
 * VXLAN carries no offload metadata, so the port accepts none: the switch
 * segments and completes checksums before send().
 */
import { createSocket, type RemoteInfo, type Socket } from "node:dgram";
import { isIP, SocketAddress } from "node:net";

import { isPlain, PLAIN_HDR, type NetHdr } from "../../core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../../core/net/offloads.js";
import type { SwitchPort } from "../../core/switch/port.js";
import { ETH_HLEN } from "../../core/virtio/devices/net/constants.js";
import { NetPortError } from "./errors.js";
import { countError, newPortStats, type PacketHandler, type PortStats } from "./stats.js";

/** IANA's VXLAN port (RFC 7348 §5, outer UDP destination port). */
export const VXLAN_PORT = 4789;
/** RFC 7348 §5: the VXLAN header. */
export const VXLAN_HLEN = 8;
/** RFC 7348 §5: flags bit I, "valid VNI" (the other seven bits are reserved). */
export const VXLAN_FLAG_I = 0x08;
export const VNI_MAX = 0xffffff;
/** RFC 7348 §5 recommends source ports from the dynamic/private range (RFC 6335). */
export const SOURCE_PORT_MIN = 49152;
export const SOURCE_PORT_MAX = 65535;

const UDP_HLEN = 8;
const IPV4_HLEN = 20;
const IPV6_HLEN = 40;
/** The largest UDP payload over IPv4 (65535 - 20 - 8); the IPv6 limit is larger but jumbograms are not used. */
const UDP_PAYLOAD_MAX = 65507;

/** The address part of a tunnel: where to listen, where to send, which VNI. */
export interface VxlanEndpoints {
  /** Local IP address to bind (IPv4 or IPv6, "0.0.0.0" or "::" for any). */
  local: string;
  /** Local UDP port to receive on (default 4789; 0 lets the kernel choose, see {@link VxlanPort.localPort}). */
  localPort?: number;
  /** The remote VTEP's IP address, same family as `local`. */
  remote: string;
  /** The remote VTEP's UDP port (default 4789). */
  remotePort?: number;
  /** VXLAN network identifier, 0 to 2^24 - 1. */
  vni: number;
}

export interface VxlanOptions extends VxlanEndpoints {
  /** The underlay's MTU (default 1500); maxFrame() is this minus the encapsulation (see the module comment). */
  underlayMtu?: number;
  /**
   * Sockets to send from, each bound to its own port in 49152-65535; a
   * flow always leaves from the same one (RFC 7348 §5: source port from a
   * hash of the inner headers, for ECMP entropy). 0 sends from the receiving
   * socket (source port = localPort). Default 8.
   */
  sourcePorts?: number;
  /** Datagrams that may be in flight in the kernel before send() reports no-buffer (default 256). */
  sendSlots?: number;
  /** Accept datagrams from any address, not only from `remote` (default false). */
  anySource?: boolean;
  /**
   * Carry frames with an inner VLAN tag (default false: RFC 7348 §6.1 says
   * decapsulated frames with one SHOULD be discarded, and a VTEP SHOULD NOT
   * send them, unless configured otherwise).
   */
  innerVlan?: boolean;
  /** Name in the switch's statistics (default "vxlan"). */
  portName?: string;
  /** Receives each decapsulated frame (with a plain header: the remote VTEP sends complete packets). */
  onPacket: PacketHandler;
}

function bad(message: string): NetPortError {
  return new NetPortError("BAD_OPTION", `vxlan: ${message}`);
}

const SPEC_FORM = "LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI (e.g. 10.0.0.1:4789,10.0.0.2,42 or [fd00::1],[fd00::2]:4789,42)";

function parsePort(s: string, what: string): number {
  if (!/^\d{1,5}$/.test(s) || Number(s) < 1 || Number(s) > 65535)
    throw bad(`${what} port ${JSON.stringify(s)} is not a number from 1 to 65535`);
  return Number(s);
}

function parseHostPort(s: string, what: string): { ip: string; port: number | undefined } {
  let ip: string;
  let port: string | undefined;
  if (s.startsWith("[")) {
    const close = s.indexOf("]");
    if (close < 0) throw bad(`${what} address ${JSON.stringify(s)} lacks its closing "]"`);
    ip = s.slice(1, close);
    const rest = s.slice(close + 1);
    if (rest !== "" && !rest.startsWith(":")) throw bad(`${what} address ${JSON.stringify(s)}: expected ":PORT" after "]"`);
    if (rest !== "") port = rest.slice(1);
  } else if (s.indexOf(":") !== s.lastIndexOf(":")) {
    ip = s; // a bare IPv6 address; a port needs brackets
  } else {
    const colon = s.indexOf(":");
    ip = colon < 0 ? s : s.slice(0, colon);
    if (colon >= 0) port = s.slice(colon + 1);
  }
  if (isIP(ip) === 0)
    throw bad(`${what} address ${JSON.stringify(ip)} is not an IPv4 or IPv6 address (write IPv6 with a port as [ADDR]:PORT)`);
  return { ip, port: port === undefined ? undefined : parsePort(port, what) };
}

/**
 * Parses `LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI` (the --vxlan argument);
 * ports default to 4789, IPv6 addresses with a port are written in brackets.
 * Throws NetPortError BAD_OPTION saying what is wrong.
 */
export function parseVxlanSpec(spec: string): Required<VxlanEndpoints> {
  const parts = spec.split(",");
  if (parts.length !== 3) throw bad(`${JSON.stringify(spec)}: expected ${SPEC_FORM}`);
  const local = parseHostPort(parts[0]!.trim(), "local");
  const remote = parseHostPort(parts[1]!.trim(), "remote");
  const vniText = parts[2]!.trim();
  if (!/^\d{1,8}$/.test(vniText) || Number(vniText) > VNI_MAX)
    throw bad(`VNI ${JSON.stringify(vniText)} is not a number from 0 to ${VNI_MAX}`);
  const e = {
    local: local.ip,
    localPort: local.port ?? VXLAN_PORT,
    remote: remote.ip,
    remotePort: remote.port ?? VXLAN_PORT,
    vni: Number(vniText),
  };
  checkEndpoints(e);
  return e;
}

function checkEndpoints(e: VxlanEndpoints): 4 | 6 {
  const fl = isIP(e.local);
  const fr = isIP(e.remote);
  if (fl === 0) throw bad(`local address ${JSON.stringify(e.local)} is not an IPv4 or IPv6 address`);
  if (fr === 0) throw bad(`remote address ${JSON.stringify(e.remote)} is not an IPv4 or IPv6 address`);
  if (fl !== fr) throw bad(`local ${e.local} and remote ${e.remote} must both be IPv4 or both IPv6`);
  const lp = e.localPort;
  if (lp !== undefined && !(Number.isInteger(lp) && lp >= 0 && lp <= 65535)) throw bad(`local port ${lp} is not from 0 (any) to 65535`);
  const rp = e.remotePort;
  if (rp !== undefined && !(Number.isInteger(rp) && rp >= 1 && rp <= 65535)) throw bad(`remote port ${rp} is not from 1 to 65535`);
  if (!(Number.isInteger(e.vni) && e.vni >= 0 && e.vni <= VNI_MAX)) throw bad(`VNI ${e.vni} is not from 0 to ${VNI_MAX}`);
  return fl as 4 | 6;
}

function fnv(h: number, b: Uint8Array, start: number, end: number): number {
  for (let i = start; i < end; i++) h = Math.imul(h ^ b[i]!, 16777619);
  return h;
}

/**
 * A 32-bit hash of a frame's flow: MAC addresses and EtherType, and for
 * IPv4/IPv6 (behind at most one VLAN tag) the IP addresses and protocol and,
 * for TCP, UDP and SCTP of unfragmented IPv4 or IPv6 without extension
 * headers, the ports. Both directions of a flow hash differently, which
 * ECMP does not mind. Reads only within the frame.
 */
export function flowHash(f: Uint8Array): number {
  const n = f.length;
  let h = fnv(0x811c9dc5, f, 0, Math.min(n, 14));
  let l3 = 14;
  let type = n >= 14 ? (f[12]! << 8) | f[13]! : 0;
  if (type === 0x8100 && n >= 18) {
    h = fnv(h, f, 14, 18);
    type = (f[16]! << 8) | f[17]!;
    l3 = 18;
  }
  let proto = -1;
  let l4 = -1;
  if (type === 0x0800 && n >= l3 + 20) {
    h = fnv(h, f, l3 + 9, l3 + 10); // protocol
    h = fnv(h, f, l3 + 12, l3 + 20); // addresses
    const fragmented = (((f[l3 + 6]! & 0x3f) << 8) | f[l3 + 7]!) !== 0; // MF or an offset
    if (!fragmented) {
      proto = f[l3 + 9]!;
      l4 = l3 + (f[l3]! & 15) * 4;
    }
  } else if (type === 0x86dd && n >= l3 + 40) {
    h = fnv(h, f, l3 + 6, l3 + 7); // next header
    h = fnv(h, f, l3 + 8, l3 + 40); // addresses
    proto = f[l3 + 6]!;
    l4 = l3 + 40;
  }
  if ((proto === 6 || proto === 17 || proto === 132) && l4 + 4 <= n) h = fnv(h, f, l4, l4 + 4);
  return h >>> 0;
}

/** Whether the frame at `at` has an 802.1Q or 802.1ad tag (TPID 0x8100 or 0x88a8); it holds at least an Ethernet header. */
function isVlanTagged(b: Uint8Array, at: number): boolean {
  const tpid = (b[at + 12]! << 8) | b[at + 13]!;
  return tpid === 0x8100 || tpid === 0x88a8;
}

interface SendSlot {
  /** VXLAN header (written once) and room for the largest frame. */
  readonly buf: Buffer;
  len: number;
  readonly done: (err: Error | null) => void;
}

function bindSocket(sock: Socket, address: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    sock.once("error", onError);
    sock.bind({ address, port, exclusive: true }, () => {
      sock.off("error", onError);
      resolve();
    });
  });
}

function connectSocket(sock: Socket, address: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => sock.connect(port, address, (err?: Error) => (err ? reject(err) : resolve())));
}

function closeSocket(sock: Socket): Promise<void> {
  return new Promise((resolve) => {
    try {
      sock.close(() => resolve());
    } catch {
      resolve(); // already closed
    }
  });
}

function errCode(e: unknown): string {
  const c = (e as { code?: unknown } | null)?.code;
  return typeof c === "string" ? c : "error";
}

export class VxlanPort implements SwitchPort {
  readonly name: string;
  readonly stats: PortStats = newPortStats();
  readonly #onPacket: PacketHandler;
  readonly #family: 4 | 6;
  readonly #local: string;
  readonly #localPort: number;
  readonly #remote: string;
  readonly #remotePort: number;
  readonly #vni: number;
  readonly #maxFrame: number;
  readonly #nSourcePorts: number;
  readonly #nSlots: number;
  readonly #anySource: boolean;
  readonly #innerVlan: boolean;

  #rx: Socket | null = null;
  /** Where packets leave from: the source-port sockets, or the receiving socket alone. */
  #tx: Socket[] = [];
  #slots: SendSlot[] = [];
  #free: number[] = [];
  #open = false;
  #opening = false;

  constructor(opts: VxlanOptions) {
    this.#family = checkEndpoints(opts);
    this.#onPacket = opts.onPacket;
    this.#local = opts.local;
    this.#localPort = opts.localPort ?? VXLAN_PORT;
    // The form the kernel reports sources in (inet_ntop), compared as strings on receive.
    this.#remote = new SocketAddress({ address: opts.remote, family: this.#family === 4 ? "ipv4" : "ipv6" }).address;
    this.#remotePort = opts.remotePort ?? VXLAN_PORT;
    this.#vni = opts.vni;
    const overhead = VXLAN_HLEN + UDP_HLEN + (this.#family === 4 ? IPV4_HLEN : IPV6_HLEN);
    const mtu = opts.underlayMtu ?? 1500;
    if (!Number.isInteger(mtu) || mtu < overhead + ETH_HLEN || mtu > 65535) {
      throw bad(`underlayMtu ${mtu} must be an integer from ${overhead + ETH_HLEN} to 65535`);
    }
    this.#maxFrame = Math.min(mtu - overhead, UDP_PAYLOAD_MAX - VXLAN_HLEN);
    const sp = opts.sourcePorts ?? 8;
    if (!Number.isInteger(sp) || sp < 0 || sp > 64) throw bad(`sourcePorts ${sp} must be an integer from 0 to 64`);
    this.#nSourcePorts = sp;
    const slots = opts.sendSlots ?? 256;
    if (!Number.isInteger(slots) || slots < 1 || slots > 65536) throw bad(`sendSlots ${slots} must be an integer from 1 to 65536`);
    this.#nSlots = slots;
    this.#anySource = opts.anySource === true;
    this.#innerVlan = opts.innerVlan === true;
    this.name = opts.portName ?? "vxlan";
  }

  /** A port from a `LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI` argument ({@link parseVxlanSpec}). */
  static fromSpec(spec: string, opts: Omit<VxlanOptions, keyof VxlanEndpoints>): VxlanPort {
    return new VxlanPort({ ...opts, ...parseVxlanSpec(spec) });
  }

  get vni(): number {
    return this.#vni;
  }

  /** The UDP source ports packets leave from (empty until open). */
  get sourcePorts(): number[] {
    return this.#tx.map((s) => s.address().port);
  }

  /** The UDP port received on (useful with localPort 0, for tests). */
  get localPort(): number {
    return this.#rx?.address().port ?? this.#localPort;
  }

  /**
   * Binds the receiving socket and the source-port sockets. Throws
   * NetPortError ADDRESS (not an address of this host, or the port is
   * taken) or PERMISSION (a port below 1024 without privilege).
   */
  async open(): Promise<void> {
    if (this.#open || this.#opening) throw bad("already open");
    this.#opening = true;
    try {
      await this.#openSockets();
    } finally {
      this.#opening = false;
    }
  }

  async #openSockets(): Promise<void> {
    const type = this.#family === 4 ? "udp4" : "udp6";
    const made: Socket[] = [];
    const socket = (): Socket => {
      const s = createSocket({ type, ipv6Only: this.#family === 6 });
      made.push(s);
      return s;
    };
    try {
      const rx = socket();
      await this.#bind(rx, this.#localPort, "receive");
      rx.on("message", (msg: Buffer, from: RemoteInfo) => this.#receive(msg, from));
      rx.on("error", (err) => countError(this.stats, `rx:${errCode(err)}`));
      const tx: Socket[] = [];
      for (let i = 0; i < this.#nSourcePorts; i++) {
        const s = socket();
        await this.#bindSourcePort(s);
        await connectSocket(s, this.#remote, this.#remotePort);
        // Connected: nothing but the remote's own port can reach it, and nothing is expected to.
        s.on("message", () => countError(this.stats, "rx:on-source-port"));
        s.on("error", (err) => countError(this.stats, `tx:${errCode(err)}`));
        tx.push(s);
      }
      this.#rx = rx;
      this.#tx = tx.length > 0 ? tx : [rx];
    } catch (e) {
      await Promise.all(made.map(closeSocket));
      throw e;
    }
    const header = Buffer.alloc(VXLAN_HLEN);
    // RFC 7348 §5: flags with I set, 24 reserved bits, the VNI, 8 reserved bits (reserved fields zero on transmission).
    header[0] = VXLAN_FLAG_I;
    header.writeUIntBE(this.#vni, 4, 3);
    this.#slots = [];
    this.#free = [];
    for (let i = 0; i < this.#nSlots; i++) {
      const buf = Buffer.alloc(VXLAN_HLEN + this.#maxFrame);
      header.copy(buf);
      const slot: SendSlot = { buf, len: 0, done: (err) => this.#sent(i, slot, err) };
      this.#slots.push(slot);
      this.#free.push(i);
    }
    this.#open = true;
  }

  async #bind(sock: Socket, port: number, what: string): Promise<void> {
    try {
      await bindSocket(sock, this.#local, port);
    } catch (e) {
      throw this.#bindError(e, port, what);
    }
  }

  #bindError(e: unknown, port: number, what: string): NetPortError {
    const where = this.#family === 4 ? `${this.#local}:${port}` : `[${this.#local}]:${port}`;
    const fail = `vxlan: cannot bind the ${what} socket to ${where}`;
    switch (errCode(e)) {
      case "EADDRNOTAVAIL":
        return new NetPortError(
          "ADDRESS",
          `${fail}: ${this.#local} is not an address of this host (see "ip addr"; ${this.#family === 4 ? "0.0.0.0" : "::"} listens on all)`,
          { cause: e },
        );
      case "EADDRINUSE":
        return new NetPortError(
          "ADDRESS",
          `${fail}: the port is in use (another VTEP, or a kernel vxlan device with that dstport): choose another port`,
          { cause: e },
        );
      case "EACCES":
      case "EPERM":
        return new NetPortError("PERMISSION", `${fail}: ports below 1024 need privilege: run as root or use a higher port`, { cause: e });
      default:
        return new NetPortError("SYSTEM", `${fail}: ${errCode(e)}`, { cause: e });
    }
  }

  /** Binds to a free port in 49152-65535, trying pseudo-random ones (RFC 7348 §5). */
  async #bindSourcePort(sock: Socket): Promise<void> {
    const span = SOURCE_PORT_MAX - SOURCE_PORT_MIN + 1;
    let port = SOURCE_PORT_MIN + Math.floor(Math.random() * span);
    for (let attempt = 0; ; attempt++) {
      try {
        await bindSocket(sock, this.#local, port);
        return;
      } catch (e) {
        if (errCode(e) !== "EADDRINUSE" || attempt === 63) throw this.#bindError(e, port, "source-port");
      }
      port = SOURCE_PORT_MIN + ((port - SOURCE_PORT_MIN + 7919) % span); // a prime stride visits every port
    }
  }

  /** Closes the sockets; datagrams already handed to the kernel still leave. Idempotent. */
  async close(): Promise<void> {
    if (this.#rx === null) return;
    this.#open = false;
    const socks = [this.#rx, ...this.#tx.filter((s) => s !== this.#rx)];
    this.#rx = null;
    this.#tx = [];
    this.#slots = [];
    this.#free = [];
    await Promise.all(socks.map(closeSocket));
  }

  /** None: VXLAN has no field for offload state, so packets must be complete and segmented. */
  accepts(): Readonly<Offloads> {
    return NO_OFFLOADS;
  }

  /** The largest inner frame that fits the underlay MTU unfragmented (RFC 7348 §4.3). */
  maxFrame(): number {
    return this.#maxFrame;
  }

  linkUp(): boolean {
    return this.#open;
  }

  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    if (!this.#open) return this.#drop("link-down");
    if (!isPlain(hdr)) return this.#drop("offload-not-negotiated");
    if (frame.length < ETH_HLEN) return this.#drop("runt");
    if (frame.length > this.#maxFrame) return this.#drop("too-long");
    if (!this.#innerVlan && isVlanTagged(frame, 0)) return this.#drop("vlan");
    const i = this.#free.pop();
    if (i === undefined) return this.#drop("no-buffer");
    const slot = this.#slots[i]!;
    // The frame is the caller's only for this call, and the kernel may take
    // the datagram later (libuv queues it when the socket buffer is full).
    slot.buf.set(frame, VXLAN_HLEN);
    slot.len = VXLAN_HLEN + frame.length;
    const tx = this.#tx;
    try {
      const sock = tx.length === 1 ? tx[0]! : tx[flowHash(frame) % tx.length]!;
      if (sock === this.#rx) sock.send(slot.buf, 0, slot.len, this.#remotePort, this.#remote, slot.done);
      else sock.send(slot.buf, 0, slot.len, slot.done);
    } catch (e) {
      this.#free.push(i);
      countError(this.stats, `tx:${errCode(e)}`);
      return "host-error";
    }
    return null;
  }

  #sent(i: number, slot: SendSlot, err: Error | null): void {
    // A slot of an earlier open() (closed since) is not this open's to reuse.
    if (this.#slots[i] === slot) this.#free.push(i);
    if (err !== null) {
      countError(this.stats, `tx:${errCode(err)}`);
      return;
    }
    this.stats.txPackets++;
    this.stats.txBytes += slot.len - VXLAN_HLEN;
  }

  #drop(why: DropReason): DropReason {
    countError(this.stats, `tx:${why}`);
    return why;
  }

  /** RFC 7348 §5: checks the I flag and the VNI (reserved bits are ignored on receipt); §6.1: inner VLAN tags. */
  #receive(msg: Buffer, from: RemoteInfo): void {
    if (!this.#anySource && from.address !== this.#remote) return countError(this.stats, "rx:wrong-source");
    if (msg.length < VXLAN_HLEN) return countError(this.stats, "rx:short");
    if ((msg[0]! & VXLAN_FLAG_I) === 0) return countError(this.stats, "rx:no-vni-flag");
    if (((msg[4]! << 16) | (msg[5]! << 8) | msg[6]!) !== this.#vni) return countError(this.stats, "rx:wrong-vni");
    const frameLen = msg.length - VXLAN_HLEN;
    if (frameLen < ETH_HLEN) return countError(this.stats, "rx:runt");
    if (!this.#innerVlan && isVlanTagged(msg, VXLAN_HLEN)) return countError(this.stats, "rx:inner-vlan");
    this.stats.rxPackets++;
    this.stats.rxBytes += frameLen;
    // A plain Uint8Array like every other port's, not a Buffer: one shape at the switch's call sites.
    this.#onPacket(new Uint8Array(msg.buffer, msg.byteOffset + VXLAN_HLEN, frameLen), PLAIN_HDR);
  }
}
