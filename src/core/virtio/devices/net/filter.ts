import { ETH_HLEN, ETH_P_8021Q, VLAN_VID_COUNT } from "./constants.js";

/**
 * Addresses kept per class (unicast, multicast) in the MAC filter table. A
 * longer list switches that class to "accept all": virtio 1.2 §5.1.6.5.2
 * lets a device fall back to allmulti or promiscuous mode when given too
 * many addresses, and a guest sees at worst frames it would have asked for
 * in promiscuous mode.
 */
export const MAC_TABLE_ENTRIES = 64;

/**
 * The receive filter of virtio 1.2 §5.1.6.5: promiscuous and the other
 * VIRTIO_NET_CTRL_RX modes, the MAC filter table (unicast and multicast
 * entries), and the VLAN filter table. Plain state with no allocation on the
 * per-packet path.
 *
 * Promiscuous mode starts on: the spec asks for an empty MAC table on reset
 * and leaves the modes' initial values open; a driver without CTRL_RX has no
 * way to ask for frames to other addresses (a bridge inside the guest), and
 * one with it sets its mode as it brings the interface up. QEMU's device
 * makes the same choice.
 */
export class RxFilter {
  promisc = true;
  allmulti = false;
  alluni = false;
  nomulti = false;
  nouni = false;
  nobcast = false;
  /** Whether VIRTIO_NET_F_CTRL_VLAN was negotiated: only then are tagged frames checked (§5.1.6.5.3). */
  vlanFiltering = false;
  private readonly uni = new Uint8Array(MAC_TABLE_ENTRIES * 6);
  private readonly multi = new Uint8Array(MAC_TABLE_ENTRIES * 6);
  private uniCount = 0;
  private multiCount = 0;
  private uniOverflow = false;
  private multiOverflow = false;
  /** One bit per VLAN id. */
  private readonly vlans = new Uint32Array(VLAN_VID_COUNT / 32);

  /** Device reset: modes back to their start, both tables empty (§5.1.6.5.2, §5.1.6.5.3). */
  reset(vlanFiltering: boolean): void {
    this.promisc = true;
    this.allmulti = this.alluni = this.nomulti = this.nouni = this.nobcast = false;
    this.uniCount = this.multiCount = 0;
    this.uniOverflow = this.multiOverflow = false;
    this.vlans.fill(0);
    this.vlanFiltering = vlanFiltering;
  }

  /** Entries in the MAC table, unicast and multicast (an overflowing class counts as MAC_TABLE_ENTRIES + 1). */
  get tableSize(): { unicast: number; multicast: number } {
    return {
      unicast: this.uniOverflow ? MAC_TABLE_ENTRIES + 1 : this.uniCount,
      multicast: this.multiOverflow ? MAC_TABLE_ENTRIES + 1 : this.multiCount,
    };
  }

  /**
   * Replaces the MAC table from the command-specific data of
   * VIRTIO_NET_CTRL_MAC_TABLE_SET: le32 n, n unicast addresses, le32 m, m
   * multicast addresses, and nothing after them (§5.1.6.5.2). The whole
   * command is checked before anything changes; returns false (table
   * unchanged) when it is malformed or an address is in the wrong table.
   */
  setMacTable(d: Uint8Array): boolean {
    const uniAt = 4;
    const n = readLe32(d, 0);
    if (n < 0 || n > (d.length - 8) / 6) return false;
    const multiCountAt = uniAt + n * 6;
    const m = readLe32(d, multiCountAt);
    const multiAt = multiCountAt + 4;
    // Exactly the announced entries: N entries take N * 6 bytes, no more, no less.
    if (m < 0 || multiAt + m * 6 !== d.length) return false;
    for (let i = 0; i < n; i++) if ((d[uniAt + i * 6]! & 1) !== 0) return false;
    for (let i = 0; i < m; i++) if ((d[multiAt + i * 6]! & 1) === 0) return false;
    this.uniOverflow = n > MAC_TABLE_ENTRIES;
    this.uniCount = this.uniOverflow ? 0 : n;
    if (!this.uniOverflow) this.uni.set(d.subarray(uniAt, uniAt + n * 6));
    this.multiOverflow = m > MAC_TABLE_ENTRIES;
    this.multiCount = this.multiOverflow ? 0 : m;
    if (!this.multiOverflow) this.multi.set(d.subarray(multiAt, multiAt + m * 6));
    return true;
  }

  /** VIRTIO_NET_CTRL_VLAN_ADD / _DEL (§5.1.6.5.3). `vid` must be below 4096. */
  setVlan(vid: number, on: boolean): void {
    const w = vid >>> 5;
    const b = 1 << (vid & 31);
    this.vlans[w] = on ? this.vlans[w]! | b : this.vlans[w]! & ~b;
  }

  hasVlan(vid: number): boolean {
    return (this.vlans[vid >>> 5]! & (1 << (vid & 31))) !== 0;
  }

  /**
   * Whether a frame for the station address `mac` passes (§5.1.6.5.1 -
   * §5.1.6.5.3). `frame` holds at least an Ethernet header. Promiscuous mode
   * takes everything, VLAN filter included; then a tagged frame needs its
   * VLAN id in the table (when CTRL_VLAN was negotiated); then the
   * destination address decides: broadcast unless NOBCAST, multicast by
   * NOMULTI / ALLMULTI / the table, unicast by NOUNI / ALLUNI / the station
   * address / the table.
   */
  accepts(frame: Uint8Array, mac: Uint8Array): boolean {
    if (this.promisc) return true;
    if (this.vlanFiltering && frame.length >= ETH_HLEN + 4 && ((frame[12]! << 8) | frame[13]!) === ETH_P_8021Q) {
      if (!this.hasVlan(((frame[14]! & 0x0f) << 8) | frame[15]!)) return false;
    }
    const d0 = frame[0]!;
    if ((d0 & 1) !== 0) {
      if (d0 === 0xff && frame[1] === 0xff && frame[2] === 0xff && frame[3] === 0xff && frame[4] === 0xff && frame[5] === 0xff) {
        return !this.nobcast;
      }
      if (this.nomulti) return false;
      return this.allmulti || this.multiOverflow || inTable(this.multi, this.multiCount, frame);
    }
    if (this.nouni) return false;
    if (this.alluni || this.uniOverflow) return true;
    if (
      frame[0] === mac[0] &&
      frame[1] === mac[1] &&
      frame[2] === mac[2] &&
      frame[3] === mac[3] &&
      frame[4] === mac[4] &&
      frame[5] === mac[5]
    ) {
      return true;
    }
    return inTable(this.uni, this.uniCount, frame);
  }
}

function inTable(t: Uint8Array, count: number, f: Uint8Array): boolean {
  for (let i = 0, o = 0; i < count; i++, o += 6) {
    if (t[o] === f[0] && t[o + 1] === f[1] && t[o + 2] === f[2] && t[o + 3] === f[3] && t[o + 4] === f[4] && t[o + 5] === f[5]) return true;
  }
  return false;
}

/** A le32 at `at`, or -1 when the data ends before it. */
function readLe32(d: Uint8Array, at: number): number {
  if (at + 4 > d.length) return -1;
  return (d[at]! | (d[at + 1]! << 8) | (d[at + 2]! << 16) | (d[at + 3]! << 24)) >>> 0;
}
