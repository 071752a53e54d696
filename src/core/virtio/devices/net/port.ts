import { PLAIN_HDR, copyHdr, plainHdr, type NetHdr } from "../../../net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../../../net/offloads.js";

/**
 * What virtio-net needs from a network (docs/architecture.md, principle 5): a
 * place to send packets and a way to be handed packets. A packet is a whole
 * Ethernet frame without FCS and without the virtio_net_hdr, plus its offload
 * state as a NetHdr (src/core/net/hdr.ts): a partial checksum still to
 * finish, a TCP segment still to cut. A switch, a tap device or a test are
 * ports.
 */
export interface PacketPort {
  /**
   * A packet the guest sent, checked against the offloads it negotiated.
   * `frame` and `hdr` are valid only during the call: the frame lies in a
   * buffer the device reuses for the next packet (a copy out of guest
   * memory, so it holds exactly what was checked). Copy what you keep.
   */
  transmit(frame: Uint8Array, hdr: Readonly<NetHdr>): void;
  /**
   * The device registers where packets for the guest go. The port may call
   * `receive` at any time; the device copies what it keeps before it
   * returns. `receive` returns null when the packet was taken (delivered, or
   * waiting for a receive buffer) and otherwise why it was dropped, so that
   * a port can count or apply back-pressure.
   */
  attach(receive: (frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null): void;
  /**
   * What the driver accepts without help, from its GUEST_* features (virtio
   * 1.2 §5.1.3): called when a driver negotiates features and on reset
   * (NO_OFFLOADS). A packet that asks for more is resolved in software or
   * dropped by the device, so a port that tells its senders saves that work.
   */
  offloadsChanged?(accepts: Readonly<Offloads>): void;
  /**
   * Whether the device takes packets now: its link is up and a driver is
   * live (DRIVER_OK, or features set over vhost-user). Called on every change.
   */
  linkChanged?(up: boolean): void;
}

/** An in-memory PacketPort for tests and demos: records transmitted packets and injects received ones. */
export class MemoryPacketPort implements PacketPort {
  readonly transmitted: Uint8Array[] = [];
  /** The header of each transmitted frame (copies), in the same order. */
  readonly transmittedHdrs: NetHdr[] = [];
  /** The last offloads the device reported (offloadsChanged). */
  accepts: Readonly<Offloads> = NO_OFFLOADS;
  /** The last link state the device reported (linkChanged); false before the first report. */
  link = false;
  /** Called after each transmitted packet is recorded. */
  onTransmit: ((frame: Uint8Array, hdr: Readonly<NetHdr>) => void) | null = null;
  private receive: ((frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null) | null = null;

  transmit(frame: Uint8Array, hdr: Readonly<NetHdr>): void {
    this.transmitted.push(frame.slice());
    this.transmittedHdrs.push(copyHdr(hdr, plainHdr()));
    this.onTransmit?.(frame, hdr);
  }

  attach(receive: (frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null): void {
    this.receive = receive;
  }

  offloadsChanged(accepts: Readonly<Offloads>): void {
    this.accepts = accepts;
  }

  linkChanged(up: boolean): void {
    this.link = up;
  }

  /** Delivers a packet to the attached device: null when it was taken, else why not ("link-down" with no device attached). */
  inject(frame: Uint8Array, hdr: Readonly<NetHdr> = PLAIN_HDR): DropReason | null {
    return this.receive === null ? "link-down" : this.receive(frame, hdr);
  }
}
