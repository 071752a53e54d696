import { spawn, type ChildProcess } from "node:child_process";
import { connect, createServer } from "node:net";
import { join } from "node:path";
import { stopChild } from "../../tools/child.js";

/** A real NBD server (qemu-nbd or nbdkit) started by a test. */
export interface NbdServer {
  readonly url: string;
  readonly child: ChildProcess;
  /** What the server wrote to stderr so far (for assertion messages). */
  stderr(): string;
  stop(): Promise<void>;
}

/** A TCP port nobody listens on right now (the kernel picks it). */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

type Where = { unix: string } | { tcp: number };

/**
 * Waits until the server accepts a connection (a socket file can exist
 * before listen()), failing early with its stderr if it exits.
 */
async function waitForListener(where: Where, child: ChildProcess, what: string, err: () => string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let spawnError: Error | null = null;
  child.once("error", (e) => (spawnError = e));
  for (;;) {
    if (spawnError !== null) throw new Error(`${what}: ${(spawnError as Error).message}`);
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`${what} exited (${child.exitCode ?? child.signalCode}): ${err()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = "unix" in where ? connect(where.unix) : connect(where.tcp, "127.0.0.1");
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} is not accepting connections after ${timeoutMs} ms: ${err()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function start(what: string, cmd: string, args: string[], where: Where, exportName: string): Promise<NbdServer> {
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  try {
    await waitForListener(where, child, what, () => err);
  } catch (e) {
    child.kill("SIGKILL");
    throw e;
  }
  const name = encodeURIComponent(exportName);
  return {
    url: "unix" in where ? `nbd+unix:///${name}?socket=${where.unix}` : `nbd://127.0.0.1:${where.tcp}/${name}`,
    child,
    stderr: () => err,
    stop: async () => {
      // stopChild waits for 'exit', which a child that already died (a test killed it) will not emit again.
      if (child.exitCode === null && child.signalCode === null) await stopChild(child);
    },
  };
}

export interface QemuNbdOptions {
  image: string;
  format: "raw" | "qcow2";
  exportName?: string;
  readOnly?: boolean;
  /** Extra arguments, e.g. ["--cache=none"]. */
  extra?: string[];
}

/**
 * qemu-nbd on a Unix socket in `dir`. `-t` keeps it serving after a client
 * leaves (by default it exits after the first one), `--shared=8` lets the
 * tests' connections overlap, `--discard=unmap` passes TRIM to the image.
 */
export function startQemuNbd(dir: string, name: string, o: QemuNbdOptions): Promise<NbdServer> {
  const sock = join(dir, `${name}.sock`);
  const args = ["-k", sock, "-f", o.format, "-t", "--shared=8", "--discard=unmap"];
  if (o.exportName !== undefined) args.push("-x", o.exportName);
  if (o.readOnly === true) args.push("-r");
  args.push(...(o.extra ?? []), o.image);
  return start(`qemu-nbd ${name}`, "qemu-nbd", args, { unix: sock }, o.exportName ?? "");
}

/**
 * nbdkit in the foreground with `args` (plugin, filters, parameters), on a
 * Unix socket in `dir` or on 127.0.0.1 at a free TCP port.
 */
export async function startNbdkit(
  dir: string,
  name: string,
  args: string[],
  opts: { tcp?: boolean; exportName?: string } = {},
): Promise<NbdServer> {
  const common = ["--foreground", "--exit-with-parent"];
  if (opts.tcp === true) {
    // freePort() can race with another process taking the port; try a few.
    for (let attempt = 0; ; attempt++) {
      const port = await freePort();
      try {
        return await start(
          `nbdkit ${name}`,
          "nbdkit",
          [...common, "-i", "127.0.0.1", "-p", String(port), ...args],
          { tcp: port },
          opts.exportName ?? "",
        );
      } catch (e) {
        if (attempt >= 3) throw e;
      }
    }
  }
  const sock = join(dir, `${name}.sock`);
  return start(`nbdkit ${name}`, "nbdkit", [...common, "--unix", sock, ...args], { unix: sock }, opts.exportName ?? "");
}
