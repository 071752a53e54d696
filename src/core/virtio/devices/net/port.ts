/**
 * What virtio-net needs from a network (docs/architecture.md, principle 5): a place to
 * send frames and a way to be handed frames. Frames are whole Ethernet frames
 * without FCS and without the virtio_net_hdr.
 */
export interface PacketPort {
  /** A frame the guest sent. The device hands over a fresh copy; the port may keep it. */
  transmit(frame: Uint8Array): void;
  /**
   * The device registers where incoming frames go. The port may call
   * `receive` at any time; the device copies the bytes before it returns.
   * `receive` returns false when the frame was dropped (no driver, too long,
   * too many frames already waiting for receive buffers), so that a port can
   * count or apply back-pressure.
   */
  attach(receive: (frame: Uint8Array) => boolean): void;
}

/** An in-memory PacketPort for tests and demos: records transmitted frames and injects received ones. */
export class MemoryPacketPort implements PacketPort {
  readonly transmitted: Uint8Array[] = [];
  /** Called after each transmitted frame is recorded. */
  onTransmit: ((frame: Uint8Array) => void) | null = null;
  private receive: ((frame: Uint8Array) => boolean) | null = null;

  transmit(frame: Uint8Array): void {
    this.transmitted.push(frame);
    this.onTransmit?.(frame);
  }

  attach(receive: (frame: Uint8Array) => boolean): void {
    this.receive = receive;
  }

  /** Delivers a frame to the attached device; false when no device is attached or the device dropped it. */
  inject(frame: Uint8Array): boolean {
    return this.receive !== null && this.receive(frame);
  }
}
