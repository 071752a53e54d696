import type { GuestMemory } from "../memory/guest-memory.js";
import type { QueueState } from "../virtio/queue/index.js";

/** The fds of one ring as the front end gave them. */
export interface RingFds<F> {
  kick: F;
  call: F | null;
  err: F | null;
}

/**
 * A data path outside the back end's JavaScript (vDPA, docs/vdpa.md): a
 * device that reads the guest's rings itself, takes the kick fd and raises
 * the call fd. The back end keeps the control plane and asks here first
 * whenever a ring starts; a ring this object declines (or hands back with
 * VhostUserBackend.serveInSoftware) is served by the device's processQueue
 * like any other. Every method runs inside the handling of one message.
 */
export interface ExternalRings<F> {
  /**
   * Ring i starts at `state` (SET_VRING_KICK). True: served outside; the
   * back end neither watches the kick fd nor touches the ring until stop().
   */
  start(i: number, state: QueueState, fds: RingFds<F>): boolean;
  /** SET_VRING_CALL for a ring served outside: interrupts go to `call` from now on. */
  callChanged(i: number, call: F | null): void;
  /**
   * Stops a ring served outside and says where it stopped (GET_VRING_BASE,
   * reset, close): every buffer the device took has completed into the used
   * ring by the time this returns.
   */
  stop(i: number): QueueState;
  /**
   * VHOST_F_LOG_ALL is being switched: while on, every page a device writes
   * must be marked. Returns a reason to refuse (SET_FEATURES then fails and
   * nothing changes), or null.
   */
  logging(on: boolean): string | null;
  /** The memory table changed: rings served outside keep running and see `mem` from now on. */
  memoryChanged(mem: GuestMemory): void;
}
