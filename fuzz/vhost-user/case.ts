import type { RingLayout } from "../../src/core/virtio/queue/index.js";

/** Guest RAM a memfd holds: rings and virtio-blk requests placed as a driver would (see guest.ts). */
export interface GuestFill {
  /** Guest address of the file's byte at `fileOffset`. */
  gpa: number;
  fileOffset: number;
  layout: RingLayout;
  /** One entry per ring: its queue size and guest address (areas contiguous, as layoutQueue places them). */
  rings: { size: number; gpa: number }[];
  /** Requests per ring. */
  requests: number;
  seed: number;
}

/** An fd the front end sends with a message. */
export type FdSpec = { kind: "memfd"; size: number; guest?: GuestFill } | { kind: "eventfd" } | { kind: "socket" } | { kind: "pipe" };

/** One thing the front end does: send a message, or signal a kick eventfd. */
export type Step =
  | {
      kind: "msg";
      request: number;
      /** The header's flags word exactly (version bits included). */
      flags: number;
      payload: Uint8Array;
      fds: FdSpec[];
    }
  /** Signals the k-th live kick watch (mod their number). */
  | { kind: "kick"; watch: number }
  /** Truncates the k-th memfd the back end maps (mod their number) under its mappings. */
  | { kind: "shrink"; fd: number };

export interface VuCase {
  strategy: string;
  seed: number;
  /** Queues of the BlkDevice behind the back end. */
  queues: number;
  steps: Step[];
}

/** A step as JSON: the payload in hex. */
type StepJson = Exclude<Step, { kind: "msg" }> | (Omit<Extract<Step, { kind: "msg" }>, "payload"> & { payload: string });

export interface VuCaseJson extends Omit<VuCase, "steps"> {
  steps: StepJson[];
}

export function toJson(c: VuCase): VuCaseJson {
  return { ...c, steps: c.steps.map((s) => (s.kind === "msg" ? { ...s, payload: Buffer.from(s.payload).toString("hex") } : s)) };
}

export function fromJson(c: VuCaseJson): VuCase {
  return {
    ...c,
    steps: c.steps.map((s) => (s.kind === "msg" ? { ...s, payload: Uint8Array.from(Buffer.from(s.payload, "hex")) } : s)),
  };
}
