/**
 * What virtio-net needs from a network (DESIGN.md, principle 5): a place to
 * send frames and a way to be handed frames. Frames are whole Ethernet frames
 * without FCS and without the virtio_net_hdr.
 */
export interface PacketPort {
  /** A frame the guest sent. The device hands over a fresh copy; the port may keep it. */
  transmit(frame: Uint8Array): void;
  /**
   * The device registers where incoming frames go. The port may call
   * `receive` at any time; the device copies the bytes before it returns.
   */
  attach(receive: (frame: Uint8Array) => void): void;
}

/** An in-memory PacketPort for tests and demos: records transmitted frames and injects received ones. */
export class MemoryPacketPort implements PacketPort {
  readonly transmitted: Uint8Array[] = [];
  /** Called after each transmitted frame is recorded. */
  onTransmit: ((frame: Uint8Array) => void) | null = null;
  private receive: ((frame: Uint8Array) => void) | null = null;

  transmit(frame: Uint8Array): void {
    this.transmitted.push(frame);
    this.onTransmit?.(frame);
  }

  attach(receive: (frame: Uint8Array) => void): void {
    this.receive = receive;
  }

  /** Delivers a frame to the attached device; false when no device is attached. */
  inject(frame: Uint8Array): boolean {
    if (this.receive === null) return false;
    this.receive(frame);
    return true;
  }
}
