/**
 * Self-checking Ethernet test frames, exchanged between iovirt's net driver
 * in a guest and a peer on the host. Frame `seq` in direction `dir` has a
 * length and payload that follow from (dir, seq) alone, so either side can
 * verify every byte it receives without keeping a copy of what was sent.
 *
 *   0..5 destination MAC, 6..11 source MAC, 12..13 EtherType 0x88B5
 *   (IEEE local experimental), then "iovirt <dir> <seq>\n", then filler.
 */
export const TEST_ETHERTYPE = 0x88b5;
export type FrameDirection = "g2h" | "h2g";
export const BROADCAST_MAC = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);

/** 60 (minimum untagged frame without FCS) .. 1514 bytes, varying with seq. */
export function testFrameLength(dir: FrameDirection, seq: number): number {
  return 60 + ((seq * 97 + (dir === "g2h" ? 0 : 13)) % 1455);
}

function filler(dir: FrameDirection, seq: number, i: number): number {
  return (seq * 31 + i * 7 + (dir === "g2h" ? 0x5a : 0xa5)) & 0xff;
}

export function testFrame(dir: FrameDirection, seq: number, src: Uint8Array, dst: Uint8Array = BROADCAST_MAC): Uint8Array {
  const f = new Uint8Array(testFrameLength(dir, seq));
  f.set(dst.subarray(0, 6), 0);
  f.set(src.subarray(0, 6), 6);
  f[12] = TEST_ETHERTYPE >> 8;
  f[13] = TEST_ETHERTYPE & 0xff;
  const head = new TextEncoder().encode(`iovirt ${dir} ${seq}\n`);
  f.set(head, 14);
  for (let i = 14 + head.length; i < f.length; i++) f[i] = filler(dir, seq, i);
  return f;
}

/** (dir, seq) of a test frame, or null when the frame is not one. */
export function parseTestFrame(f: Uint8Array): { dir: FrameDirection; seq: number } | null {
  if (f.length < 20 || f[12] !== TEST_ETHERTYPE >> 8 || f[13] !== (TEST_ETHERTYPE & 0xff)) return null;
  const nl = f.indexOf(0x0a, 14);
  if (nl < 0 || nl > 64) return null;
  const m = /^iovirt (g2h|h2g) (\d+)$/.exec(new TextDecoder().decode(f.subarray(14, nl)));
  if (m === null) return null;
  return { dir: m[1] as FrameDirection, seq: Number(m[2]) };
}

/** Null when `f` is exactly test frame (dir, seq) (MACs aside); else what is wrong. */
export function checkTestFrame(f: Uint8Array, dir: FrameDirection, seq: number): string | null {
  const id = parseTestFrame(f);
  if (id === null) return "not an iovirt test frame";
  if (id.dir !== dir || id.seq !== seq) return `expected ${dir} ${seq}, got ${id.dir} ${id.seq}`;
  const want = testFrameLength(dir, seq);
  if (f.length !== want) return `${dir} ${seq}: ${f.length} bytes, expected ${want}`;
  const start = f.indexOf(0x0a, 14) + 1;
  for (let i = start; i < f.length; i++) {
    if (f[i] !== filler(dir, seq, i))
      return `${dir} ${seq}: byte ${i} is 0x${f[i]!.toString(16)}, expected 0x${filler(dir, seq, i).toString(16)}`;
  }
  return null;
}
