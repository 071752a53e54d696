/**
 * MAC addresses as numbers. A 48-bit address is exact in a double (53-bit
 * mantissa), so the switch keys its table on numbers and builds no strings
 * per packet. The VLAN ID is not folded in: 48 + 12 bits would need 60, past
 * what a double holds exactly, so the table keeps one map per VLAN instead.
 */

/** 2^32: the weight of the top 16 bits of an address. */
const HI = 0x1_0000_0000;

/**
 * The address at frame[off..off+6] as a number. The caller has checked that
 * the six bytes exist.
 */
export function macAt(frame: Uint8Array, off: number): number {
  return macKey(macHiAt(frame, off), macLoAt(frame, off));
}

/**
 * The top 16 bits of the address at frame[off..]. With macLoAt, the packet
 * path's form of an address: two small integers, which V8 keeps unboxed,
 * where a 48-bit number would be a heap allocation each time it leaves a
 * function that was not inlined.
 */
export function macHiAt(frame: Uint8Array, off: number): number {
  return (frame[off]! << 8) | frame[off + 1]!;
}

/** The low 32 bits of the address at frame[off..], as a signed 32-bit integer. */
export function macLoAt(frame: Uint8Array, off: number): number {
  return (frame[off + 2]! << 24) | (frame[off + 3]! << 16) | (frame[off + 4]! << 8) | frame[off + 5]!;
}

/** The address as one number, from macHiAt and macLoAt. */
export function macKey(hi: number, lo: number): number {
  return hi * HI + (lo >>> 0);
}

/**
 * IEEE Std 802 (MAC address format): the individual/group bit is the least
 * significant bit of the first octet; set means a group (multicast or
 * broadcast) address.
 */
export function isGroupAt(frame: Uint8Array, off: number): boolean {
  return (frame[off]! & 1) !== 0;
}

/** "02:00:00:00:00:01" for a numeric address. */
export function formatMac(mac: number): string {
  let s = "";
  for (let i = 5; i >= 0; i--) {
    const byte = Math.floor(mac / 2 ** (8 * i)) % 256;
    s += (i === 5 ? "" : ":") + byte.toString(16).padStart(2, "0");
  }
  return s;
}

/** Parses "02:00:00:00:00:01" (or with dashes); throws RangeError on anything else. */
export function parseMac(text: string): number {
  const m = /^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$/i.exec(text);
  if (m === null) throw new RangeError(`not a MAC address: ${JSON.stringify(text)}`);
  let mac = 0;
  for (let i = 1; i <= 6; i++) mac = mac * 256 + parseInt(m[i]!, 16);
  return mac;
}

/** Writes a numeric address into frame[off..off+6]. */
export function writeMac(frame: Uint8Array, off: number, mac: number): void {
  if (!Number.isInteger(mac) || mac < 0 || mac >= 2 ** 48) throw new RangeError(`not a 48-bit MAC address: ${mac}`);
  const hi = Math.floor(mac / HI);
  const lo = mac % HI;
  frame[off] = hi >>> 8;
  frame[off + 1] = hi & 0xff;
  frame[off + 2] = lo >>> 24;
  frame[off + 3] = (lo >>> 16) & 0xff;
  frame[off + 4] = (lo >>> 8) & 0xff;
  frame[off + 5] = lo & 0xff;
}
