import type { ChildProcess } from "node:child_process";
import { closeSync, existsSync, openSync, readSync } from "node:fs";

/** Waits until `path` exists (a back end's socket), failing early if `child` exits first. */
export async function waitForPath(path: string, child: ChildProcess, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (child.exitCode !== null) throw new Error(`${what} exited with code ${child.exitCode} before creating ${path}`);
    if (Date.now() > deadline) throw new Error(`${what} did not create ${path} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * SIGTERM, then the exit code (null when killed by a signal). With
 * `killAfterMs`, a child still running that long after SIGTERM gets SIGKILL.
 */
export async function stopChild(child: ChildProcess, killAfterMs?: number): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const done = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  child.kill("SIGTERM");
  if (killAfterMs === undefined) return done;
  const timer = setTimeout(() => child.kill("SIGKILL"), killAfterMs);
  try {
    return await done;
  } finally {
    clearTimeout(timer);
  }
}

/** `n` bytes of a file from `offset` (an image file, checked from the host side). */
export function readFileRange(path: string, offset: number, n: number): Uint8Array {
  const fd = openSync(path, "r");
  try {
    const b = new Uint8Array(n);
    readSync(fd, b, 0, n, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}
