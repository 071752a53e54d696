// Helpers the real-guest tests share: an `iovirt blk` back end in a child
// process, the io_uring counters the kernel shows for it, and host-side
// checks of an ext4 image.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, readdirSync, readlinkSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { waitForPath } from "../../tools/child.js";

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

export interface BlkBackend {
  child: ChildProcess;
  pid: number;
  /** Its stderr so far (the log). */
  log: () => string;
}

/**
 * Starts `iovirt blk --socket SOCK --image IMAGE ...args` (or `--nbd URL` for
 * a source of `{ nbd: URL }`) and waits for its
 * socket and its start-up line ("serving virtio-blk (...)": the socket can
 * exist before that line has come through the pipe). If it fails to start,
 * it is killed and the error carries its log.
 */
export async function startBlkBackend(
  sock: string,
  source: string | { nbd: string },
  args: readonly string[] = [],
  env: NodeJS.ProcessEnv = process.env,
): Promise<BlkBackend> {
  let err = "";
  const from = typeof source === "string" ? ["--image", source] : ["--nbd", source.nbd];
  const child = spawn(process.execPath, [cli, "blk", "--socket", sock, ...from, ...args], {
    stdio: ["ignore", "ignore", "pipe"],
    env,
  });
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  try {
    await waitForPath(sock, child, "iovirt blk");
    const deadline = Date.now() + 5000;
    while (!err.includes("serving virtio-blk")) {
      if (child.exitCode !== null) throw new Error(`iovirt blk exited with code ${child.exitCode}`);
      if (Date.now() > deadline) throw new Error("iovirt blk did not log its start-up line within 5 s");
      await new Promise((r) => setTimeout(r, 10));
    }
  } catch (e) {
    child.kill("SIGKILL");
    throw new Error(`${(e as Error).message}\n${err}`);
  }
  return { child, pid: child.pid!, log: () => err };
}

/**
 * The I/O engine a back end's start-up line names: "io_uring" or the thread
 * pool with the reason io_uring was not used. Null when the line is missing.
 */
export function blkEngine(log: string): { engine: "io_uring" | "threads"; detail: string } | null {
  const m = /I\/O: (io_uring \(\d+ in flight\)|thread pool \(io_uring unavailable: [^)]*\))/.exec(log);
  if (m === null) return null;
  return { engine: m[1]!.startsWith("io_uring") ? "io_uring" : "threads", detail: m[1]! };
}

/**
 * An io_uring instance's counters from /proc/PID/fdinfo/FD. All four are
 * free-running u32 ring indices: the kernel advances sqHead when it takes a
 * submission and cqTail when it posts a completion; the process advances
 * sqTail (queued) and cqHead (reaped).
 */
export interface UringCounters {
  sqHead: number;
  sqTail: number;
  cqHead: number;
  cqTail: number;
}

/** Submissions the kernel took and has not completed yet. */
export const inKernel = (c: UringCounters): number => (c.sqHead - c.cqTail) >>> 0;
/** Submissions the kernel took whose completions the process has not reaped. */
export const unreaped = (c: UringCounters): number => (c.sqHead - c.cqHead) >>> 0;

/** The fds of `pid` that are io_uring instances (their /proc link is "anon_inode:[io_uring]"). */
export function ioUringFds(pid: number): number[] {
  const fds: number[] = [];
  for (const name of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${name}`) === "anon_inode:[io_uring]") fds.push(Number(name));
    } catch {
      // closed meanwhile
    }
  }
  return fds;
}

/** Null when the fd is gone or the kernel prints no such fields. */
export function uringCounters(pid: number, fd: number): UringCounters | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8");
  } catch {
    return null;
  }
  const field = (name: string): number | null => {
    const m = new RegExp(`^${name}:\\s*(\\d+)`, "m").exec(text);
    return m === null ? null : Number(m[1]);
  };
  const sqHead = field("SqHead");
  const sqTail = field("SqTail");
  const cqHead = field("CqHead");
  const cqTail = field("CqTail");
  if (sqHead === null || sqTail === null || cqHead === null || cqTail === null) return null;
  return { sqHead, sqTail, cqHead, cqTail };
}

/** The state letter of /proc/PID/stat ("R", "S", "T" stopped, ...), or null when the process is gone. */
export function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  } catch {
    return null;
  }
}

/** e2fsprogs on the host: /sbin or /usr/sbin, which a non-root PATH may lack. */
export function e2fsprogsTool(name: "e2fsck" | "debugfs"): string {
  for (const dir of ["/sbin", "/usr/sbin"]) if (existsSync(`${dir}/${name}`)) return `${dir}/${name}`;
  return name;
}

/** `e2fsck -fn IMAGE` on the host: exit status and output. */
export function hostFsck(image: string): { status: number | null; output: string } {
  const r = spawnSync(e2fsprogsTool("e2fsck"), ["-f", "-n", image], { encoding: "utf8" });
  if (r.error !== undefined) throw r.error;
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

/** A file's content read out of an ext2/3/4 image on the host (debugfs, without mounting). */
export function hostFsRead(image: string, path: string): Buffer {
  const r = spawnSync(e2fsprogsTool("debugfs"), ["-R", `cat /${path}`, image], { maxBuffer: 64 << 20 });
  if (r.error !== undefined) throw r.error;
  if (r.status !== 0) throw new Error(`debugfs cat /${path} ${image}: exit ${r.status}: ${r.stderr.toString()}`);
  return r.stdout;
}
