/**
 * What the vhost-user-blk tests with real back ends share: deterministic
 * data and the qemu-storage-daemon command line (its users' usual export).
 * Not a test file itself.
 */
import { spawn, type ChildProcess } from "node:child_process";

/** n bytes from a small LCG seeded with `seed`: different seeds, different data. */
export function seededBytes(seed: number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed * 2654435761;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** qemu-storage-daemon exporting `image` (raw, writable) as vhost-user-blk on `sock`. */
export function startQsd(sock: string, image: string): ChildProcess {
  return spawn(
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,node-name=f0,filename=${image}`,
      "--export",
      `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${sock},writable=on`,
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
}
