import { VhostUserBackend } from "../../src/core/vhost-user/backend.js";
import type { VhostUserPlatform } from "../../src/core/vhost-user/platform.js";
import { VhostUserError, decodeHeader, encodeMessage, reqName, type Header } from "../../src/core/vhost-user/codec.js";
import { FLAG_REPLY, HEADER_SIZE } from "../../src/core/vhost-user/protocol.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { describeError } from "../report.js";
import type { CaseResult } from "../target.js";
import type { FdSpec, Step, VuCase } from "./case.js";
import { DEFER_LIMIT, FakePlatform, type FakeFd } from "./fake-platform.js";
import { fillGuest } from "./guest.js";

/** How the platform the back end sees is made from the checking fake (tests wrap it to plant bugs). */
export type PlatformWrap = (fake: FakePlatform) => VhostUserPlatform<FakeFd>;

/** The result of one step: go on, the connection closed (with the error code), or a finding. */
type StepResult = { closed: string } | { finding: string } | null;

/**
 * Runs vhost-user cases against VhostUserBackend over a BlkDevice, as the
 * node connection would: every message framed and header-checked by the
 * codec, handed to handle() with its fds; a VhostUserError, or the back
 * end reporting a fatal fd failure (onFatal), ends the connection; work
 * the back end defers runs between messages, as the event loop would.
 * Invariants: handle() throws nothing but VhostUserError and kicks and
 * deferred passes throw nothing at all; deferred passes end; replies are
 * well-formed replies carrying fds the back end holds; the fake platform
 * sees no double close, use after close or bad unmap; while connected the
 * back end holds no more fds and mappings than its state can use; after
 * close() (and any deferred pass still queued) no fd, mapping or watch is
 * left.
 */
export class VuRunner {
  private readonly disk = new RamDisk(1 << 20);
  messages = 0;

  constructor(private readonly wrap: PlatformWrap = (fake) => fake) {}

  run(c: VuCase): CaseResult {
    const fake = new FakePlatform();
    const device = new BlkDevice({ port: this.disk, numQueues: c.queues });
    let clock = 0;
    let fatal: string | null = null;
    const backend = new VhostUserBackend(device, this.wrap(fake), {
      // A clock that moves 10 µs per look keeps the back end's adaptive polling short and deterministic.
      now: () => (clock += 0.01),
      // Like the connection: note it, close after the current step (never from inside the call).
      onFatal: (err) => (fatal ??= err.code),
    });
    let outcome = "OPEN";
    let finding: string | null = null;
    for (const [i, step] of c.steps.entries()) {
      const r = this.step(backend, fake, step);
      const bad = r !== null && "finding" in r ? r.finding : (settle(fake) ?? overHeld(backend, fake, c.queues));
      if (bad !== null) finding = `step ${i} (${step.kind === "msg" ? reqName(step.request) : step.kind}): ${bad}`;
      else if (r !== null && "closed" in r) outcome = r.closed;
      else if (fatal !== null) outcome = fatal;
      if (finding !== null || r !== null || fatal !== null) break;
    }
    try {
      backend.close();
    } catch (e) {
      finding ??= `close() threw ${describeError(e)}`;
    }
    const late = settle(fake);
    if (finding === null && late !== null) finding = `close(): ${late}`;
    const leaks = fake.leaks();
    if (finding === null && leaks.length > 0) finding = `after close(): ${leaks.join("; ")}`;
    return { finding, outcome };
  }

  private step(backend: VhostUserBackend<FakeFd>, fake: FakePlatform, s: Step): StepResult {
    if (s.kind === "shrink") {
      fake.shrink(s.fd);
      return null;
    }
    if (s.kind === "kick") {
      try {
        fake.kick(s.watch);
      } catch (e) {
        return { finding: `a kick threw ${describeError(e)}` };
      }
      return null;
    }
    this.messages++;
    const bytes = encodeMessage(s.request, 0, s.payload);
    new DataView(bytes.buffer).setUint32(4, s.flags, true);
    let h: Header;
    try {
      h = decodeHeader(bytes);
    } catch (e) {
      return e instanceof VhostUserError ? { closed: e.code } : { finding: `decodeHeader threw ${describeError(e)}` };
    }
    const fds = s.fds.map((spec) => fake.receive(openFd(fake, spec)));
    let out;
    try {
      out = backend.handle(h, bytes.subarray(HEADER_SIZE, HEADER_SIZE + h.size), fds);
    } catch (e) {
      return e instanceof VhostUserError ? { closed: e.code } : { finding: `handle() threw ${describeError(e)}` };
    }
    if (out.length > 1) return { finding: `${out.length} replies to one message` };
    for (const o of out) {
      const bad =
        checkReply(h, o.bytes) ?? (o.fds.some((fd) => !fake.isOpen(fd)) ? "a reply carries an fd the back end does not hold" : null);
      if (bad !== null) return { finding: bad };
    }
    return null;
  }
}

/** Runs the deferred work the event loop would run next; the first problem it (or the step) left, or null. */
function settle(fake: FakePlatform): string | null {
  try {
    if (!fake.runDeferred()) return `deferred ring passes did not end after ${DEFER_LIMIT}`;
  } catch (e) {
    return `a deferred pass threw ${describeError(e)}`;
  }
  return fake.problems[0] ?? null;
}

/**
 * A leak while connected, which close() would hide: the back end may hold one mapping and
 * one fd per memory region, the in-flight area's, three fds per ring and the back-end channel.
 */
function overHeld(backend: VhostUserBackend<FakeFd>, fake: FakePlatform, queues: number): string | null {
  const regions = backend.memory.listRegions().length;
  const { fds, maps } = fake.held();
  if (maps > regions + 1) return `${maps} mappings live for ${regions} memory regions and an in-flight area`;
  const most = regions + 1 + 3 * queues + 1;
  return fds > most ? `${fds} fds open, at most ${most} can be in use` : null;
}

function openFd(fake: FakePlatform, spec: FdSpec): FakeFd {
  if (spec.kind !== "memfd") return fake.open(spec.kind);
  const fd = fake.open("memfd", spec.size);
  if (spec.guest !== undefined) fillGuest(fd.data!, spec.guest);
  return fd;
}

/** A reply must be a well-formed message with the reply flag, for the request it answers. */
function checkReply(h: Header, bytes: Uint8Array): string | null {
  let r: Header;
  try {
    r = decodeHeader(bytes);
  } catch (e) {
    return `malformed reply: ${describeError(e)}`;
  }
  if (r.request !== h.request || (r.flags & FLAG_REPLY) === 0)
    return `reply to ${reqName(h.request)} is ${reqName(r.request)} flags 0x${r.flags.toString(16)}`;
  if (r.size !== bytes.length - HEADER_SIZE) return `reply header says ${r.size} bytes, carries ${bytes.length - HEADER_SIZE}`;
  return null;
}
