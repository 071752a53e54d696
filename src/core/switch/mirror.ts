/**
 * Mirrors: taps on the switch for packet captures (a pcap writer).
 *
 * Without a filter a mirror sees every packet the switch accepted, once, as
 * it entered (in the form the ingress port sent it), with `to` naming the
 * one port a known unicast went to, or null when it was flooded. Packets
 * dropped on input are not shown; their counters are in the port stats.
 *
 * With `{ port: P }` a mirror sees both directions of P, as P's wire would
 * show them, each packet once: packets from P as they entered, and packets
 * the switch offered to P in the form P was offered them (after a VLAN tag
 * was pushed or popped for P), whether or not P's send() then took them.
 * Both directions are what a capture "on port P" is expected to show,
 * like tcpdump on an interface.
 */
import type { NetHdr } from "../net/hdr.js";
import { fitForMirror, type Emit } from "./fit.js";

export interface MirrorInfo {
  /** Name of the port the packet came from. */
  from: string;
  /** Name of the port it goes to, or null when it is flooded. */
  to: string | null;
}

/**
 * Receives mirrored packets as plain frames: an offloaded packet arrives with
 * its checksum completed and, if it was a GSO packet, as its segments, each
 * a call of its own (as a capture on a wire would show it). `hdr` is then
 * always plain. `frame`, `hdr` and `info` are valid only during the call.
 */
export type MirrorSink = (frame: Uint8Array, hdr: Readonly<NetHdr>, info: Readonly<MirrorInfo>) => void;

export interface MirrorFilter {
  /** Capture only this port's traffic, both directions. */
  port: string;
}

export class MirrorHandle {
  /** Frames handed to the sink: a segmented packet counts once per segment. */
  packets = 0;
  /** Packets not handed over (once per packet): too long or malformed offload state, or the sink threw. */
  drops = 0;
  private readonly info: MirrorInfo = { from: "", to: null };
  private readonly emit: Emit;

  constructor(
    sink: MirrorSink,
    readonly filter: Readonly<MirrorFilter> | null,
    private readonly onError: (err: unknown, where: string) => void,
  ) {
    this.emit = (frame, hdr) => {
      this.packets++;
      sink(frame, hdr, this.info);
    };
  }

  /** Shows one packet to the sink; never throws. */
  offer(frame: Uint8Array, hdr: Readonly<NetHdr>, from: string, to: string | null): void {
    this.info.from = from;
    this.info.to = to;
    try {
      if (fitForMirror(frame, hdr, this.emit) !== null) this.drops++;
    } catch (err) {
      this.drops++;
      this.onError(err, "mirror");
    }
  }
}
