import type { QueueState } from "../virtio/queue/index.js";
import type { VringAddr } from "./codec.js";

/** What the back end knows of one ring: the front end's settings, its fds, and whether and how it is served. */
export interface Vring<F> {
  size: number;
  addr: VringAddr | null;
  base: number;
  kick: F | null;
  call: F | null;
  err: F | null;
  watch: { stop(): void } | null;
  started: boolean;
  /** Started and served outside the back end's JavaScript (BackendOptions.externalRings). */
  external: boolean;
  enabled: boolean;
  /** One of its fds failed; the ring serves no more (see ringFailed). */
  failed: boolean;
  /** A deferred pass is pending: kicks need not start another. */
  scheduled: boolean;
  /** Bumped when the ring stops, so a pass deferred before that does nothing. */
  generation: number;
  /** Adaptive polling: keep polling with kicks suppressed until this time (BackendOptions.now). */
  pollUntil: number;
}

export function freshRing<F>(): Vring<F> {
  return {
    size: 0,
    addr: null,
    base: 0,
    kick: null,
    call: null,
    err: null,
    watch: null,
    started: false,
    external: false,
    enabled: false,
    failed: false,
    scheduled: false,
    generation: 0,
    pollUntil: 0,
  };
}

/**
 * The ring base as GET_VRING_BASE reports it: split rings, the next avail
 * index; packed rings, avail offset | wrap << 15 in the low half and the
 * same for used in the high half.
 */
export function encodeRingBase(s: QueueState): number {
  if (s.layout === "split") return s.nextAvail;
  const avail = s.nextAvail | (s.availWrap ? 0x8000 : 0);
  const used = s.nextUsed | (s.usedWrap ? 0x8000 : 0);
  return (avail | (used << 16)) >>> 0;
}
