/**
 * Makes a packet acceptable to its receiver before it is sent: the one place
 * the switch asks "can this port take this packet as it is?". Plain packets
 * take a short path; offloaded ones go through src/core/net's fitOffloads,
 * which passes them on whole when the receiver accepts their offloads and
 * otherwise checksums and segments them in software.
 */
import { isPlain, type NetHdr } from "../net/hdr.js";
import { fitOffloads } from "../net/fit.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../net/offloads.js";

/** Delivers one packet (or one segment of it); null when taken, else why not. */
export type Emit = (frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null;

/** What fitFor needs to know about a receiver. */
export interface FitTarget {
  accepts(): Readonly<Offloads>;
  maxFrame(): number;
}

/**
 * Sends `frame` to `target` through `emit` in a form the target accepts.
 * Returns null when it was taken, or why not: a reason of its own when
 * nothing was emitted, else what emit returned. (The switch counts results in
 * its emit and counts this return only when emit was not called, so either
 * convention of the final fitOffloads counts each drop once.)
 */
export function fitFor(target: FitTarget, frame: Uint8Array, hdr: Readonly<NetHdr>, emit: Emit): DropReason | null {
  if (isPlain(hdr)) return frame.length > target.maxFrame() ? "too-long" : emit(frame, hdr);
  return fitOffloads(frame, hdr, target.accepts(), target.maxFrame(), (f, h) => void emit(f, h));
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
