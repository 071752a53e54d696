/**
 * Makes a packet acceptable to its receiver before it is sent: the one place
 * the switch asks "can this port take this packet as it is?".
 *
 * TODO(fitOffloads): replace the body of fitFor with src/core/net's
 * `fitOffloads(frame, hdr, port.accepts(), port.maxFrame(), emit)` once it is
 * on main. Until then a packet whose offloads the port does not take is
 * dropped "offload-not-negotiated" instead of being checksummed and
 * segmented in software, and mirrors receive offloaded packets unchanged.
 */
import { isPlain, type NetHdr } from "../net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../net/offloads.js";

/** Delivers one packet (or one segment of it); null when taken, else why not. */
export type Emit = (frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null;

/** What fitFor needs to know about a receiver. */
export interface FitTarget {
  accepts(): Readonly<Offloads>;
  maxFrame(): number;
}

/** virtio 1.2 §5.1.6: virtio_net_hdr flags and gso types. */
const F_NEEDS_CSUM = 1;
const GSO_NONE = 0;
const GSO_TCPV4 = 1;
const GSO_TCPV6 = 4;
const GSO_UDP_L4 = 5;
const GSO_ECN = 0x80;

/**
 * Sends `frame` to `target` through `emit` in a form the target accepts.
 * Returns null when it was taken, or why not: a reason of its own when
 * nothing was emitted, else what emit returned. (The switch counts results in
 * its emit and counts this return only when emit was not called, so either
 * convention of the final fitOffloads counts each drop once.)
 */
export function fitFor(target: FitTarget, frame: Uint8Array, hdr: Readonly<NetHdr>, emit: Emit): DropReason | null {
  if (isPlain(hdr)) {
    return frame.length > target.maxFrame() ? "too-long" : emit(frame, hdr);
  }
  const a = target.accepts();
  if ((hdr.flags & F_NEEDS_CSUM) !== 0 && !a.csum) return "offload-not-negotiated";
  const gso = hdr.gsoType & ~GSO_ECN;
  if (gso === GSO_NONE) {
    if (frame.length > target.maxFrame()) return "too-long";
  } else {
    // A GSO packet is longer than maxFrame by design; the receiver cuts it (maxFrame is "after segmentation").
    const ok = gso === GSO_TCPV4 ? a.tso4 : gso === GSO_TCPV6 ? a.tso6 : gso === GSO_UDP_L4 ? a.uso : false;
    if (!ok) return "offload-not-negotiated";
    if ((hdr.gsoType & GSO_ECN) !== 0 && !a.ecn) return "offload-not-negotiated";
  }
  return emit(frame, hdr);
}

/**
 * Longest frame handed to a mirror: an IP packet of the largest length its
 * 16-bit total-length field allows, behind an Ethernet header and one VLAN tag.
 */
export const MIRROR_MAX_FRAME = 0xffff + 14 + 4;

const MIRROR_TARGET: FitTarget = { accepts: () => NO_OFFLOADS, maxFrame: () => MIRROR_MAX_FRAME };

/**
 * The fit path for a mirror (a pcap writer wants complete, segmented frames).
 * TODO(fitOffloads): `fitOffloads(frame, hdr, NO_OFFLOADS, MIRROR_MAX_FRAME, emit)`;
 * until then an offloaded packet is passed unchanged rather than dropped, so
 * a capture still shows it (with its checksum unfinished).
 */
export function fitForMirror(frame: Uint8Array, hdr: Readonly<NetHdr>, emit: Emit): DropReason | null {
  if (!isPlain(hdr)) return emit(frame, hdr);
  return fitFor(MIRROR_TARGET, frame, hdr, emit);
}
