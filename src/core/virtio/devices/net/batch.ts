/**
 * Publication of received packets, batched across devices. When one device's
 * transmit pass hands packets to a switch that delivers them to other
 * devices, each delivery would publish its receive ring's used index (and
 * maybe interrupt the driver) packet by packet. Devices that share an
 * RxBatch instead publish once, when the pass that produced the packets ends:
 * fewer index stores and notifications, and the driver finds the whole burst
 * at once (what a polling driver such as DPDK's wants). Nothing waits past the
 * end of the synchronous pass, so a packet is never held.
 */
export class RxBatch {
  private depth = 0;
  private readonly flushes: (() => void)[] = [];

  /** Whether a pass is open (deliveries made now are published when it ends). */
  get open(): boolean {
    return this.depth > 0;
  }

  /** A pass starts; passes nest (a delivery may start another device's pass). */
  begin(): void {
    this.depth++;
  }

  /** The pass ends; the outermost end runs every publication deferred meanwhile. */
  end(): void {
    if (--this.depth > 0) return;
    // A flush may deliver (and defer) again: run until none is left.
    for (let i = 0; i < this.flushes.length; i++) this.flushes[i]!();
    this.flushes.length = 0;
  }

  /** Runs `flush` when the open pass ends. Only call while open. */
  defer(flush: () => void): void {
    this.flushes.push(flush);
  }
}
