/** In-memory ports and frame builders shared by the switch tests. */
import assert from "node:assert/strict";
import { copyHdr, plainHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../../src/core/net/offloads.js";
import { parseMac, writeMac, type SwitchPort } from "../../src/core/switch/index.js";
import { F_NEEDS_CSUM, checkPacket, decode, type BuiltPacket } from "./net-packets.js";

export interface Received {
  frame: Uint8Array;
  hdr: NetHdr;
  /** The object send() was given, to check that the switch did not copy. */
  original: Uint8Array;
}

/** A port that records what it is sent (copies, as the contract asks) and can be told to refuse or go down. */
export class FakePort implements SwitchPort {
  readonly received: Received[] = [];
  up = true;
  offloads: Readonly<Offloads> = NO_OFFLOADS;
  max = 1514;
  /** What send() answers; null takes the packet. */
  verdict: DropReason | null = null;
  /** Called inside send() after recording, e.g. to feed the switch again. */
  onSend: ((frame: Uint8Array, hdr: Readonly<NetHdr>) => void) | null = null;

  constructor(readonly name: string) {}

  accepts(): Readonly<Offloads> {
    return this.offloads;
  }
  maxFrame(): number {
    return this.max;
  }
  linkUp(): boolean {
    return this.up;
  }
  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    if (this.verdict !== null) return this.verdict;
    this.received.push({ frame: frame.slice(), hdr: copyHdr(hdr, plainHdr()), original: frame });
    this.onSend?.(frame, hdr);
    return null;
  }
  /** Forgets what was received; returns it. */
  take(): Received[] {
    return this.received.splice(0);
  }
}

export const BROADCAST = "ff:ff:ff:ff:ff:ff";

export interface FrameOptions {
  /** Adds an 802.1Q tag with this VID. */
  vid?: number;
  /** Priority bits of the tag (default 0). */
  pcp?: number;
  /** EtherType after the addresses (and tag); default 0x0800. */
  type?: number;
  /** Payload length (default 46, the minimum) or bytes. */
  payload?: number | Uint8Array;
}

/** An Ethernet frame from `src` to `dst`, payload bytes counting up from a seed so copies are recognisable. */
export function eth(dst: string, src: string, o: FrameOptions = {}): Uint8Array {
  const payload = o.payload instanceof Uint8Array ? o.payload : Uint8Array.from({ length: o.payload ?? 46 }, (_, i) => (i * 7 + 3) & 0xff);
  const tagged = o.vid !== undefined;
  const f = new Uint8Array(14 + (tagged ? 4 : 0) + payload.length);
  writeMac(f, 0, parseMac(dst));
  writeMac(f, 6, parseMac(src));
  let off = 12;
  if (tagged) {
    f[12] = 0x81;
    f[13] = 0x00;
    const tci = ((o.pcp ?? 0) << 13) | o.vid!;
    f[14] = tci >> 8;
    f[15] = tci & 0xff;
    off = 16;
  }
  const type = o.type ?? 0x0800;
  f[off] = type >> 8;
  f[off + 1] = type & 0xff;
  f.set(payload, off + 2);
  return f;
}

/** The VID of a tagged frame, or null if untagged. */
export function vidOf(frame: Uint8Array): number | null {
  return frame[12] === 0x81 && frame[13] === 0x00 ? ((frame[14]! << 8) | frame[15]!) & 0xfff : null;
}

/** The frame with its tag removed (or itself if untagged), to compare payloads across tag changes. */
export function untag(frame: Uint8Array): Uint8Array {
  if (vidOf(frame) === null) return frame;
  const out = new Uint8Array(frame.length - 4);
  out.set(frame.subarray(0, 12));
  out.set(frame.subarray(16), 12);
  return out;
}

export function mac(i: number): string {
  return `02:00:00:00:${((i >> 8) & 0xff).toString(16).padStart(2, "0")}:${(i & 0xff).toString(16).padStart(2, "0")}`;
}

/** A controllable clock for ageing tests. */
export class Clock {
  t = 1_000;
  readonly now = (): number => this.t;
}

/** The payloads of `parts` one after another. */
export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export interface SegmentsExpected {
  /** Payload bytes per segment (the sender's gso_size). */
  mss: number;
  /** Checksums left partial (NEEDS_CSUM at the transport header) rather than completed. */
  partial: boolean;
  /** No frame may be longer. */
  maxFrame: number;
}

/**
 * Asserts that `got` is packet `p` cut into segments as a receiver should
 * see them: as many as `mss` makes, each a valid packet (checkPacket) of at
 * most maxFrame bytes laid out like `p`, with a header that asks for no
 * segmentation and, when `partial`, names the transport checksum; payloads
 * that concatenate to p's, and TCP sequence numbers that follow the payload.
 * `p` is the packet as this receiver sees it (tagged if it gets a tag).
 */
export function assertSegments(got: readonly Received[], p: BuiltPacket, e: SegmentsExpected): void {
  const count = Math.max(1, Math.ceil(p.payload.length / e.mss));
  assert.equal(got.length, count, "segment count");
  const seq0 = decode(p.frame, p).seq;
  let offset = 0;
  got.forEach((s, i) => {
    const where = `segment ${i + 1} of ${count}`;
    assert.ok(s.frame.length <= e.maxFrame, `${where}: ${s.frame.length} bytes, maxFrame ${e.maxFrame}`);
    assert.equal(checkPacket(s.frame, p, e.partial), null, where);
    assert.deepEqual(s.frame.subarray(0, p.l3Offset), p.frame.subarray(0, p.l3Offset), `${where} keeps the Ethernet header`);
    const want: NetHdr = e.partial
      ? { flags: F_NEEDS_CSUM, gsoType: 0, hdrLen: p.payloadOffset, gsoSize: 0, csumStart: p.l4Offset, csumOffset: p.proto === 6 ? 16 : 6 }
      : plainHdr();
    assert.deepEqual(s.hdr, want, `${where} header`);
    const d = decode(s.frame, p);
    if (p.proto === 6) assert.equal(d.seq, (seq0 + offset) >>> 0, `${where} sequence number`);
    offset += d.payload.length;
  });
  assert.deepEqual(concat(got.map((s) => decode(s.frame, p).payload)), p.payload, "payloads concatenate to the original");
}
