import type { VirtioDevice } from "../virtio/lifecycle/device.js";
import type { Vring } from "./vring.js";

export interface SchedulerOptions {
  /** See VhostUserPlatform.defer; without it a kick serves the ring until empty and there is no adaptive polling. */
  defer: ((fn: () => void) => void) | undefined;
  /** Most buffers per ring per pass. */
  passBudget: number;
  /** Adaptive polling after a kick, in milliseconds (0: none). */
  pollMs: number;
  now: () => number;
  /** Called after ring work; true when guest memory was lost, which stops every ring. */
  afterPass: () => boolean;
  /** Ring work threw a host-side error (the port failed): that ring must stop serving. */
  failed: (i: number, e: unknown) => void;
}

/**
 * When ring work runs: the poll scheduler. A kick gets one bounded pass at
 * once, for latency; a ring with more work, or one being polled adaptively
 * (QEMU's idea: keep looking for 32 µs with kicks suppressed), continues in
 * deferred passes, one per event-loop turn, so a control message waits
 * behind at most one pass per ring and never behind a ring the driver keeps
 * full (docs/architecture.md, principle 7). Busy-poll mode bypasses it:
 * the owner calls pollAll() in a loop.
 */
export class RingScheduler<F> {
  constructor(
    private readonly rings: readonly Vring<F>[],
    private readonly device: VirtioDevice,
    private readonly opts: SchedulerOptions,
  ) {}

  /** The ring's kick fd was signalled. */
  kicked(i: number): void {
    const ring = this.rings[i]!;
    if (ring.enabled && !ring.failed) this.guarded(i, () => this.serve(i));
    this.opts.afterPass();
  }

  /** A ring started or was enabled: buffers may already be waiting (reconnect), so look once. */
  started(i: number): void {
    if (this.rings[i]!.enabled) this.serve(i);
    this.opts.afterPass();
  }

  /** Busy-poll mode: one pass over every started, enabled ring. Returns how many rings had work. */
  pollAll(): number {
    let busy = 0;
    for (let i = 0; i < this.rings.length; i++) {
      const r = this.rings[i]!;
      if (r.started && r.enabled && !r.failed && this.device.queueHasAvailable(i)) {
        // As in event mode (guarded): a host-side failure ends this ring, not the polling thread.
        try {
          this.device.poll(i, this.opts.passBudget);
        } catch (e) {
          this.opts.failed(i, e);
        }
        busy++;
      }
    }
    if (busy > 0) this.opts.afterPass();
    return busy;
  }

  /** The ring stopped: a pass deferred before now must do nothing, and the next owner expects kicks enabled. */
  stopped(i: number): void {
    const ring = this.rings[i]!;
    ring.generation++;
    if (ring.scheduled) this.device.setQueueNotification(i, { mode: "enable" });
    ring.scheduled = false;
  }

  /** One bounded pass now; more in deferred passes if the ring has more or adaptive polling is on. */
  serve(i: number): void {
    const ring = this.rings[i]!;
    if (ring.scheduled) return;
    const d = this.device;
    const { passBudget, pollMs } = this.opts;
    d.poll(i, passBudget);
    if (this.opts.defer === undefined) {
      while (ring.started && ring.enabled && !ring.failed && d.queueHasAvailable(i)) d.poll(i, passBudget);
      return;
    }
    // Done, kicks on (a ring restarted from polling state may still have them off): wait for the next kick.
    if (pollMs <= 0 && !d.queueHasAvailable(i) && !d.setQueueNotification(i, { mode: "enable" })) return;
    d.setQueueNotification(i, { mode: "disable" });
    ring.pollUntil = this.opts.now() + pollMs;
    this.schedule(i, ring);
  }

  private schedule(i: number, ring: Vring<F>): void {
    ring.scheduled = true;
    const generation = ring.generation;
    this.opts.defer!(() => {
      if (this.rings[i] !== ring || ring.generation !== generation) return;
      ring.scheduled = false;
      this.guarded(i, () => this.step(i, ring));
    });
  }

  /** One deferred pass: work if there is some, else poll until pollUntil, then wait for kicks again. */
  private step(i: number, ring: Vring<F>): void {
    const d = this.device;
    const { now, pollMs } = this.opts;
    if (!ring.started || !ring.enabled || ring.failed) {
      // Not ours to serve now; leave the driver kicking so a re-enabled ring is not left waiting.
      d.setQueueNotification(i, { mode: "enable" });
      return;
    }
    if (d.queueHasAvailable(i)) {
      d.poll(i, this.opts.passBudget);
      // Memory lost during the pass stops every ring (and so this one): nothing to continue.
      if (this.opts.afterPass()) return;
      ring.pollUntil = now() + pollMs;
    } else if (now() >= ring.pollUntil) {
      // Re-enable kicks; if buffers slipped in meanwhile, keep polling (§2.7.10: re-check after enabling).
      if (!d.setQueueNotification(i, { mode: "enable" })) return;
      d.setQueueNotification(i, { mode: "disable" });
      ring.pollUntil = now() + pollMs;
    }
    this.schedule(i, ring);
  }

  /** Runs ring work from an event-loop callback: a host-side failure (e.g. of the port) ends that ring and nothing else. */
  private guarded(i: number, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      // Guest errors never get here: the device absorbs them (DEVICE_NEEDS_RESET).
      this.opts.failed(i, e);
    }
  }
}
