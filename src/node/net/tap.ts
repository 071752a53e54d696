/**
 * A Linux tap device as a switch port.
 *
 * The device is opened with IFF_VNET_HDR, so every packet read or written is
 * a 12-byte virtio_net_hdr (with num_buffers, TUNSETVNETHDRSZ 12) followed
 * by the Ethernet frame: the offload state a guest put in its transmit
 * header reaches the kernel unchanged, and the kernel hands over unsegmented
 * TSO/USO packets with partial checksums (TUNSETOFFLOAD). Constants are from
 * Linux include/uapi/linux/if_tun.h.
 *
 * Reading is driven by libuv readiness on the non-blocking descriptor and
 * drains it in batches into one reused buffer; writing is one writev per
 * packet (header + frame), which the tun driver takes as one packet.
 */
import { existsSync, readFileSync } from "node:fs";

import type { NetHdr } from "../../core/net/hdr.js";
import { plainHdr, readNetHdr, writeNetHdr } from "../../core/net/hdr.js";
import type { DropReason, Offloads } from "../../core/net/offloads.js";
import { NO_OFFLOADS } from "../../core/net/offloads.js";
import type { SwitchPort } from "../../core/switch/port.js";
import {
  ETH_HLEN,
  NET_HDR_SIZE,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "../../core/virtio/devices/net/constants.js";
import { errnoName, ioctl, open, SysError, tryRead, tryWritev, watch, type Fd, type Watcher } from "../native.js";
import { NetPortError } from "./errors.js";
import { countError, newPortStats, type PacketHandler, type PortStats } from "./stats.js";

// if_tun.h: the ioctls are _IOW/_IOR('T', nr, int or unsigned int), i.e.
// direction << 30 | sizeof(int) << 16 | 'T' << 8 | nr (asm-generic/ioctl.h).
const iow = (nr: number): number => (0x40000000 | (4 << 16) | (0x54 << 8) | nr) >>> 0;
const TUNSETIFF = iow(202);
const TUNSETPERSIST = iow(203);
const TUNSETOFFLOAD = iow(208);
const TUNSETVNETHDRSZ = iow(216);
const TUNSETVNETLE = iow(220);

// if_tun.h: TUNSETIFF ifr_flags.
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const IFF_TUN_EXCL = 0x8000;

// if_tun.h: TUNSETOFFLOAD bits (TUN_F_USO4/6 since Linux 6.2).
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_USO4 = 0x20;
export const TUN_F_USO6 = 0x40;

/** IFNAMSIZ (16) including the terminating NUL. */
export const IFNAME_MAX_BYTES = 15;
/** struct ifreq: ifr_name[16] and a union whose largest member (struct ifmap) makes 40 bytes on 64-bit. */
const IFREQ_SIZE = 40;
const IFR_FLAGS_OFFSET = 16;

/**
 * The largest packet the tun driver exchanges: a GSO packet is at most an
 * IPv4/IPv6 datagram of 65535 bytes (BIG TCP is not enabled on tun devices)
 * plus an Ethernet header and a VLAN tag the driver inserts on read.
 */
const MAX_PACKET = 65535 + ETH_HLEN + 4;
/** One byte more than the longest packet, so that a read filling the buffer shows truncation. */
const READ_BUFFER = NET_HDR_SIZE + MAX_PACKET + 1;

const EAGAIN = 11;
const DEFAULT_READ_BUDGET = 64;

export interface TapOptions {
  /**
   * Interface name, at most 15 bytes without "/", ":" or white space (Linux
   * dev_valid_name); a "%d" in it is numbered by the kernel. Omitted: the
   * kernel picks "tapN". Required with `attach`.
   */
  name?: string;
  /**
   * Attach to an existing tap (typically persistent, made with
   * `ip tuntap add dev NAME mode tap [user U]`) instead of creating one.
   * Without it, an existing interface of that name is an error.
   */
  attach?: boolean;
  /** Keep the interface when the port closes (TUNSETPERSIST). */
  persist?: boolean;
  /**
   * Offloads to ask the kernel for; each defaults to true. USO is granted
   * only by Linux 6.2 and later; {@link TapPort.accepts} says what was.
   */
  offloads?: Partial<Offloads>;
  /** Override of maxFrame(); default the interface MTU (read at open) + 14. */
  maxFrame?: number;
  /** Packets read per readiness callback before the event loop gets a turn (default 64). */
  readBudget?: number;
  /** Name in the switch's statistics; default the interface name. */
  portName?: string;
  /** Receives every packet the kernel sends through the tap. */
  onPacket: PacketHandler;
  /** Told once when the descriptor fails for good (the interface was deleted); the port is down from then on. */
  onError?: (err: NetPortError) => void;
}

function checkIfname(name: string): void {
  const bytes = new TextEncoder().encode(name).length;
  if (bytes === 0 || bytes > IFNAME_MAX_BYTES || name === "." || name === ".." || /[/:\s\0]/.test(name)) {
    throw new NetPortError(
      "BAD_OPTION",
      `tap: invalid interface name ${JSON.stringify(name)}: use 1 to ${IFNAME_MAX_BYTES} bytes without "/", ":" or white space`,
    );
  }
}

function offloadBits(o: Readonly<Offloads>): number {
  // if_tun.h / tun.c set_offload: TSO, ECN and USO are only meaningful with
  // CSUM (without it the kernel rejects them), ECN only with a TSO, and USO
  // only as the pair USO4 | USO6.
  if (!o.csum) return 0;
  let bits = TUN_F_CSUM;
  if (o.tso4) bits |= TUN_F_TSO4;
  if (o.tso6) bits |= TUN_F_TSO6;
  if (o.ecn && (o.tso4 || o.tso6)) bits |= TUN_F_TSO_ECN;
  if (o.uso) bits |= TUN_F_USO4 | TUN_F_USO6;
  return bits;
}

function offloadsOf(bits: number): Readonly<Offloads> {
  return Object.freeze({
    csum: (bits & TUN_F_CSUM) !== 0,
    tso4: (bits & TUN_F_TSO4) !== 0,
    tso6: (bits & TUN_F_TSO6) !== 0,
    ecn: (bits & TUN_F_TSO_ECN) !== 0,
    uso: (bits & (TUN_F_USO4 | TUN_F_USO6)) === (TUN_F_USO4 | TUN_F_USO6),
  });
}

function setupError(what: string, e: unknown, hint: Partial<Record<string, [NetPortError["code"], string]>>): NetPortError {
  if (e instanceof SysError) {
    const h = hint[e.code];
    if (h !== undefined) return new NetPortError(h[0], `${what}: ${e.code}: ${h[1]}`, { cause: e });
    return new NetPortError("SYSTEM", `${what}: ${e.code}`, { cause: e });
  }
  return new NetPortError("SYSTEM", `${what}: ${String(e)}`, { cause: e });
}

export class TapPort implements SwitchPort {
  readonly stats: PortStats = newPortStats();
  readonly #opts: TapOptions;
  readonly #onPacket: PacketHandler;
  readonly #readBudget: number;
  #ifname: string;
  #fd: Fd | null = null;
  #watcher: Watcher | null = null;
  #broken = false;
  #accepts: Readonly<Offloads> = NO_OFFLOADS;
  #maxFrame: number;

  // Receive side: one buffer and one header object for every packet.
  readonly #rxBuf = new Uint8Array(READ_BUFFER);
  readonly #rxView = new DataView(this.#rxBuf.buffer);
  readonly #rxHdr: NetHdr = plainHdr();
  // Transmit side: the header bytes and the writev list are reused.
  readonly #txHdr = new Uint8Array(NET_HDR_SIZE);
  readonly #txView = new DataView(this.#txHdr.buffer);
  readonly #iov: Uint8Array[] = [this.#txHdr, this.#txHdr];

  constructor(opts: TapOptions) {
    if (opts.name !== undefined) checkIfname(opts.name);
    if (opts.attach === true && opts.name === undefined) {
      throw new NetPortError("BAD_OPTION", "tap: attach needs the name of the existing tap device");
    }
    if (opts.maxFrame !== undefined && !(Number.isInteger(opts.maxFrame) && opts.maxFrame >= ETH_HLEN && opts.maxFrame <= MAX_PACKET)) {
      throw new NetPortError("BAD_OPTION", `tap: maxFrame must be an integer from ${ETH_HLEN} to ${MAX_PACKET}`);
    }
    const budget = opts.readBudget ?? DEFAULT_READ_BUDGET;
    if (!Number.isInteger(budget) || budget < 1) throw new NetPortError("BAD_OPTION", "tap: readBudget must be a positive integer");
    this.#opts = opts;
    this.#onPacket = opts.onPacket;
    this.#readBudget = budget;
    this.#ifname = opts.name ?? "";
    this.#maxFrame = opts.maxFrame ?? 1500 + ETH_HLEN;
  }

  /** The port's name: `portName`, else the interface name (known once open). */
  get name(): string {
    return this.#opts.portName ?? (this.#ifname === "" ? "tap" : this.#ifname);
  }

  /** The interface name: as given, or the one the kernel chose, once open. */
  get ifname(): string {
    return this.#ifname;
  }

  get isOpen(): boolean {
    return this.#fd !== null;
  }

  /**
   * Creates (or attaches to) the tap and starts reading. Throws
   * NetPortError: PERMISSION, NO_TUN, BUSY, NOT_FOUND, INCOMPATIBLE.
   */
  open(): void {
    if (this.#fd !== null) throw new NetPortError("BAD_OPTION", `tap ${this.#ifname}: already open`);
    const attach = this.#opts.attach === true;
    const given = this.#opts.name;
    if (attach && given !== undefined && !existsSync(`/sys/class/net/${given}`)) {
      // TUNSETIFF would create the device instead of failing; say so first.
      throw new NetPortError(
        "NOT_FOUND",
        `tap ${given}: no such interface to attach to: create it with "ip tuntap add dev ${given} mode tap user $USER", or drop attach to create it`,
      );
    }
    let fd: Fd;
    try {
      fd = open("/dev/net/tun", "rw", 0, { nonblock: true });
    } catch (e) {
      const noDev: [NetPortError["code"], string] = [
        "NO_TUN",
        "no tun device: load the module (modprobe tun), or give a container --device /dev/net/tun",
      ];
      throw setupError("tap: open /dev/net/tun", e, {
        ENOENT: noDev,
        ENODEV: noDev,
        ENXIO: noDev,
        EACCES: ["PERMISSION", "/dev/net/tun is not accessible: run as root or make it readable and writable for this user"],
        EPERM: ["PERMISSION", "/dev/net/tun is not accessible: run as root or make it readable and writable for this user"],
      });
    }
    try {
      this.#setup(fd, attach, given);
      this.#watcher = watch(fd, "r", (err) => {
        if (err !== null) this.#fail("rx", err.code);
        else this.#drain();
      });
      this.#fd = fd;
      this.#broken = false;
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  #setup(fd: Fd, attach: boolean, given: string | undefined): void {
    const label = `tap ${given ?? "(new)"}`;
    const ifr = new Uint8Array(IFREQ_SIZE);
    if (given !== undefined) ifr.set(new TextEncoder().encode(given));
    // Host byte order, as the kernel reads the short.
    const flags = new Uint16Array(ifr.buffer, IFR_FLAGS_OFFSET, 1);
    flags[0] = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (attach || given === undefined ? 0 : IFF_TUN_EXCL);
    try {
      ioctl(fd, TUNSETIFF, ifr);
    } catch (e) {
      throw setupError(`${label}: TUNSETIFF`, e, {
        EPERM: [
          "PERMISSION",
          attach
            ? `only its owner or a process with CAP_NET_ADMIN may attach: recreate it with "ip tuntap add dev ${given} mode tap user $USER" or run as root`
            : "creating a tap device needs CAP_NET_ADMIN: run as root, or attach to a tap made by root for this user",
        ],
        EBUSY: [
          "BUSY",
          attach
            ? "another process holds the device (a single-queue tap takes one descriptor)"
            : "an interface of that name exists: choose another name, or pass attach to use an existing tap",
        ],
        EINVAL: ["INCOMPATIBLE", "the existing interface is not a single-queue tap (a tun device, or one made with multi_queue)"],
      });
    }
    const end = ifr.indexOf(0);
    this.#ifname = new TextDecoder().decode(ifr.subarray(0, end < 0 || end > 16 ? 16 : end));
    const name = `tap ${this.#ifname}`;
    try {
      // The 12-byte header of VIRTIO_NET_F_MRG_RXBUF / virtio 1.x (virtio
      // 1.2 §5.1.6): num_buffers included, little-endian whatever the host.
      ioctl(fd, TUNSETVNETHDRSZ, new Int32Array([NET_HDR_SIZE]));
      ioctl(fd, TUNSETVNETLE, new Int32Array([1]));
    } catch (e) {
      throw setupError(`${name}: setting the virtio_net_hdr size and byte order`, e, {});
    }
    const o = this.#opts.offloads ?? {};
    const want = offloadBits({
      csum: o.csum ?? true,
      tso4: o.tso4 ?? true,
      tso6: o.tso6 ?? true,
      ecn: o.ecn ?? true,
      uso: o.uso ?? true,
    });
    this.#accepts = offloadsOf(this.#setOffload(fd, want, name));
    if (this.#opts.persist === true) {
      try {
        ioctl(fd, TUNSETPERSIST, 1);
      } catch (e) {
        throw setupError(`${name}: TUNSETPERSIST`, e, { EPERM: ["PERMISSION", "making a tap persistent needs CAP_NET_ADMIN"] });
      }
    }
    if (this.#opts.maxFrame === undefined) this.#maxFrame = readMtu(this.#ifname) + ETH_HLEN;
  }

  /**
   * TUNSETOFFLOAD; where the kernel predates USO (Linux 6.1: if_tun.h bits it
   * does not know give EINVAL), again without it. Returns the bits granted.
   */
  #setOffload(fd: Fd, bits: number, name: string): number {
    const noUso = bits & ~(TUN_F_USO4 | TUN_F_USO6);
    for (const attempt of noUso === bits ? [bits] : [bits, noUso]) {
      try {
        ioctl(fd, TUNSETOFFLOAD, attempt);
        return attempt;
      } catch (e) {
        if (!(e instanceof SysError && e.code === "EINVAL" && attempt !== noUso)) throw setupError(`${name}: TUNSETOFFLOAD`, e, {});
      }
    }
    throw new NetPortError("SYSTEM", `${name}: TUNSETOFFLOAD`); // not reached: the last attempt returns or throws
  }

  /**
   * Stops reading and closes the descriptor; a tap this port created goes
   * away with it unless `persist` was given. Idempotent.
   */
  close(): void {
    this.#watcher?.stop();
    this.#watcher = null;
    const fd = this.#fd;
    this.#fd = null;
    fd?.close();
  }

  /** What TUNSETOFFLOAD granted: the tun driver takes the same offloads on write as it produces on read. */
  accepts(): Readonly<Offloads> {
    return this.#accepts;
  }

  maxFrame(): number {
    return this.#maxFrame;
  }

  /** Open, and the descriptor has not failed (a deleted interface fails it). */
  linkUp(): boolean {
    return this.#fd !== null && !this.#broken;
  }

  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    const fd = this.#fd;
    if (fd === null || this.#broken) return this.#drop("link-down");
    const why = this.#check(frame, hdr);
    if (why !== null) return this.#drop(why);
    // num_buffers means nothing on transmit: 0.
    writeNetHdr(this.#txView, 0, hdr, 0);
    const iov = this.#iov;
    iov[1] = frame;
    const n = tryWritev(fd, iov);
    iov[1] = this.#txHdr; // do not keep the caller's frame alive
    if (n === NET_HDR_SIZE + frame.length) {
      this.stats.txPackets++;
      this.stats.txBytes += frame.length;
      return null;
    }
    if (n >= 0) {
      countError(this.stats, "tx:short-write");
      return "host-error";
    }
    const code = errnoName(n);
    countError(this.stats, `tx:${code}`);
    switch (code) {
      case "EAGAIN":
      case "ENOBUFS":
      case "ENOMEM":
        return "no-buffer";
      case "EINVAL":
        // tun_get_user: the kernel found the header inconsistent with the frame.
        return "bad-hdr";
      case "EIO":
        // tun_get_user refuses packets while the interface is down.
        return "link-down";
      case "EBADFD":
        this.#fail("tx", null);
        return "link-down";
      default:
        return "host-error";
    }
  }

  /** Checks the header against what the kernel was promised (TUNSETOFFLOAD) and against the frame. */
  #check(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    if (frame.length < ETH_HLEN) return "runt";
    const acc = this.#accepts;
    if ((hdr.flags & ~(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)) !== 0) return "bad-hdr";
    if ((hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) {
      if (!acc.csum) return "offload-not-negotiated";
      if (hdr.csumStart + hdr.csumOffset + 2 > frame.length) return "csum-out-of-range";
    }
    const gso = hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
    const ecn = (hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0;
    if (gso === VIRTIO_NET_HDR_GSO_NONE) {
      if (ecn) return "bad-hdr";
      return frame.length > this.#maxFrame ? "too-long" : null;
    }
    let ok: boolean;
    switch (gso) {
      case VIRTIO_NET_HDR_GSO_TCPV4:
        ok = acc.tso4;
        break;
      case VIRTIO_NET_HDR_GSO_TCPV6:
        ok = acc.tso6;
        break;
      case VIRTIO_NET_HDR_GSO_UDP_L4:
        ok = acc.uso;
        break;
      case 3: // VIRTIO_NET_HDR_GSO_UDP (UFO): never asked for
        ok = false;
        break;
      default:
        return "bad-hdr";
    }
    if (!ok || (ecn && !acc.ecn)) return "offload-not-negotiated";
    if (hdr.gsoSize === 0) return "gso-size-zero";
    return frame.length > MAX_PACKET ? "too-long" : null;
  }

  #drop(why: DropReason): DropReason {
    countError(this.stats, `tx:${why}`);
    return why;
  }

  /** Reads until EAGAIN or the budget is spent (readiness is level-triggered: the rest comes next turn). */
  #drain(): void {
    const fd = this.#fd;
    if (fd === null) return;
    const buf = this.#rxBuf;
    const v = this.#rxView;
    const hdr = this.#rxHdr;
    for (let i = 0; i < this.#readBudget; i++) {
      const n = tryRead(fd, buf);
      if (n < 0) {
        if (n !== -EAGAIN) this.#fail("rx", errnoName(n));
        return;
      }
      if (n < NET_HDR_SIZE + ETH_HLEN) {
        countError(this.stats, "rx:runt");
        continue;
      }
      if (n === buf.length) {
        countError(this.stats, "rx:truncated");
        continue;
      }
      readNetHdr(v, 0, hdr);
      this.stats.rxPackets++;
      this.stats.rxBytes += n - NET_HDR_SIZE;
      this.#onPacket(buf.subarray(NET_HDR_SIZE, n), hdr);
      if (this.#fd !== fd) return; // closed by the handler
    }
  }

  /** The descriptor failed for good: stop reading, report once, stay down until reopened. */
  #fail(dir: "rx" | "tx", code: string | null): void {
    if (code !== null) countError(this.stats, `${dir}:${code}`);
    if (this.#broken) return;
    this.#broken = true;
    this.#watcher?.stop();
    this.#watcher = null;
    this.#opts.onError?.(
      new NetPortError(
        "SYSTEM",
        `tap ${this.#ifname}: ${dir === "rx" ? "read" : "write"} failed${code === null ? "" : ` with ${code}`}; the port is down (was the interface deleted?): close and reopen it`,
      ),
    );
  }
}

/** The interface MTU from sysfs (1500 when it cannot be read, e.g. a tap already moved to another namespace). */
function readMtu(ifname: string): number {
  try {
    const mtu = Number(readFileSync(`/sys/class/net/${ifname}/mtu`, "utf8").trim());
    return Number.isInteger(mtu) && mtu >= 68 && mtu <= 65535 ? mtu : 1500;
  } catch {
    return 1500;
  }
}
