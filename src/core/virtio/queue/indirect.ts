import type { GuestMemory } from "../../memory/guest-memory.js";
import { MAX_QUEUE_SIZE } from "./constants.js";
import { QueueError } from "./errors.js";

/**
 * Resolves an indirect descriptor table (§2.7.5.3, §2.8.12) to u32 words.
 *
 * The length must be a non-zero multiple of 16. Tables are capped at 32768
 * entries (the largest queue size) so a hostile length cannot make one pop
 * walk for seconds. A table that is not 4-byte aligned in its region is
 * copied once, which also freezes it against concurrent rewrites.
 */
export function indirectTable(mem: GuestMemory, addr: number, len: number): { u32: Uint32Array; base: number } {
  if (len === 0 || len % 16 !== 0)
    throw new QueueError("INDIRECT_BAD_LENGTH", `indirect table length ${len} is not a non-zero multiple of 16`);
  if (len / 16 > MAX_QUEUE_SIZE)
    throw new QueueError("INDIRECT_BAD_LENGTH", `indirect table of ${len / 16} entries exceeds ${MAX_QUEUE_SIZE}`);
  const region = mem.windowFor(addr, len);
  if (region === undefined) {
    if (!mem.covers(addr, len))
      throw new QueueError("BUFFER_ADDRESS", `indirect table [0x${addr.toString(16)}, +${len}) is outside guest memory`);
    return copied(mem, addr, len);
  }
  const off = addr - region.gpa;
  if ((off & 3) !== 0) return copied(mem, addr, len);
  return { u32: region.u32, base: off >>> 2 };
}

function copied(mem: GuestMemory, addr: number, len: number): { u32: Uint32Array; base: number } {
  const u32 = new Uint32Array(len >>> 2);
  mem.read(addr, new Uint8Array(u32.buffer));
  return { u32, base: 0 };
}
