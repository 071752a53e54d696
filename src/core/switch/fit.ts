/**
 * Makes a packet acceptable to its receiver before it is sent: the one place
 * the switch asks "can this port take this packet as it is?". Packets with an
 * all-zero header take a short path; others go through src/core/net's fitOffloads,
 * which passes them on whole when the receiver accepts their offloads and
 * otherwise checksums and segments them in software.
 */
import type { NetHdr } from "../net/hdr.js";
import { VIRTIO_NET_HDR_F_DATA_VALID } from "../virtio/devices/net/constants.js";
import { fitOffloads } from "../net/fit.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../net/offloads.js";

/**
 * Delivers one packet, or one segment of it, and counts the outcome itself:
 * a packet may become many frames, each taken or refused on its own, so one
 * result per packet could not say what happened to them.
 */
export type Emit = (frame: Uint8Array, hdr: Readonly<NetHdr>) => void;

/** What fitFor needs to know about a receiver. */
export interface FitTarget {
  accepts(): Readonly<Offloads>;
  maxFrame(): number;
}

/** Whether a header may be passed on unchanged: no offload, and nothing else in it (see fitFor). */
function asIs(hdr: Readonly<NetHdr>): boolean {
  return (hdr.flags === 0 || hdr.flags === VIRTIO_NET_HDR_F_DATA_VALID) && hdr.gsoType === 0 && hdr.hdrLen === 0;
}

/**
 * Sends `frame` to `target` through `emit` in a form the target accepts:
 * whole, or checksummed and segmented (see fitOffloads). Returns null when
 * it was handed to emit (as one frame or every segment), or why it could not
 * be made acceptable, in which case emit was not called. A packet is never
 * partly emitted (fitOffloads checks the longest segment first), so each
 * packet is counted either here or in emit, never both.
 *
 * A packet whose header is all zero (but perhaps DATA_VALID) skips
 * fitOffloads and goes on with the sender's header object, so forwarding it
 * copies nothing; a DATA_VALID flag therefore reaches the receiver as the
 * sender set it, where fitOffloads would have cleared it. Any other header,
 * even one that asks for no offload (isPlain), goes through fitOffloads,
 * which drops what receivers reject and rebuilds the rest. Passed on as it
 * is, a GSO_ECN bit on GSO_NONE would be refused by Linux's
 * virtio_net_hdr_to_skb (in a guest's driver and in tap), an hdr_len beyond
 * the frame by tap's tun_get_user, and unknown flag bits would mean to the
 * receiver whatever a later virtio version makes them mean.
 */
export function fitFor(target: FitTarget, frame: Uint8Array, hdr: Readonly<NetHdr>, emit: Emit): DropReason | null {
  if (asIs(hdr)) {
    if (frame.length > target.maxFrame()) return "too-long";
    emit(frame, hdr);
    return null;
  }
  return fitOffloads(frame, hdr, target.accepts(), target.maxFrame(), emit);
}

/**
 * Longest frame handed to a mirror: an IP packet of the largest length its
 * 16-bit total-length field allows, behind an Ethernet header and one VLAN tag.
 */
export const MIRROR_MAX_FRAME = 0xffff + 14 + 4;

const MIRROR_TARGET: FitTarget = { accepts: () => NO_OFFLOADS, maxFrame: () => MIRROR_MAX_FRAME };

/** The fit path for a mirror: a pcap writer wants complete, segmented frames. */
export function fitForMirror(frame: Uint8Array, hdr: Readonly<NetHdr>, emit: Emit): DropReason | null {
  return fitFor(MIRROR_TARGET, frame, hdr, emit);
}
