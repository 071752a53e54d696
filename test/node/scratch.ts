import { mkdirSync, statfsSync } from "node:fs";
import { tmpdir } from "node:os";
import { fileURLToPath } from "node:url";

const TMPFS_MAGIC = 0x01021994;

/**
 * A directory on a real file system for test images: O_DIRECT and
 * fallocate need one, and /tmp is tmpfs on many machines. The system
 * temporary directory when it qualifies, else .cache/scratch in the checkout.
 */
export function scratchDir(): string {
  const tmp = tmpdir();
  if (statfsSync(tmp).type !== TMPFS_MAGIC) return tmp;
  const dir = fileURLToPath(new URL("../../../.cache/scratch", import.meta.url));
  mkdirSync(dir, { recursive: true });
  return dir;
}
