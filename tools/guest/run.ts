/**
 * Boots the minimal iovirt test guest (built by tools/guest/build.sh) under
 * QEMU/TCG and collects its serial console output.
 *
 *   const { kernel, initrd } = await guestPaths();
 *   const r = await bootGuest({
 *     kernel, initrd,
 *     append: "iovirt.script=blk-pattern iovirt.mode=guest-writes iovirt.mib=4",
 *     qemuArgs: ["-drive", `file=${img},if=virtio,format=raw`],
 *     timeoutMs: 120_000,
 *   });
 *   // r.markers: ["init start ...", ..., "write-md5 <hex>", "read-md5 <hex>", "RESULT PASS", ...]
 *
 * For a vhost-user back end pass `sharedMemory: true` (guest RAM in a shared
 * memfd) and the chardev/device arguments in `qemuArgs`.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** Prefix of every line the guest prints for the host. */
export const GUEST_MARKER = "IOVIRT-GUEST:";

export interface BootGuestOptions {
  kernel: string;
  initrd: string;
  /** Extra kernel command line, appended after "console=ttyS0 panic=-1 quiet". */
  append?: string;
  /** Extra QEMU arguments (drives, chardevs, devices, ...). */
  qemuArgs: string[];
  /** QEMU is killed (SIGTERM, then SIGKILL) when it runs longer than this. */
  timeoutMs: number;
  /** Guest RAM in MiB (default 256). */
  memMiB?: number;
  /**
   * Back guest RAM by a shared memfd (`memory-backend-memfd,share=on`), as a
   * vhost-user back end needs to map it. Default false.
   */
  sharedMemory?: boolean;
  /** QEMU binary (default $IOVIRT_QEMU or "qemu-system-x86_64"). */
  qemu?: string;
  /**
   * Machine type and properties (default "q35"), e.g.
   * "q35,kernel-irqchip=split" for a guest with a virtual intel-iommu.
   */
  machine?: string;
  /** Called for every complete serial line (without the line ending), e.g. for live logging. */
  onLine?: (line: string) => void;
}

export interface BootGuestResult {
  /** Everything the guest printed on the serial console (QEMU stdout), "\r" removed. */
  output: string;
  /** The text after "IOVIRT-GUEST: " of each marker line, in order. */
  markers: string[];
  /** QEMU's exit code; null when it was ended by a signal. */
  exitCode: number | null;
  /** True when QEMU was killed because timeoutMs passed. */
  timedOut: boolean;
  /** QEMU's stderr (its own error messages). */
  stderr: string;
  /** Signal that ended QEMU, if any. */
  signal: NodeJS.Signals | null;
  /** Wall time from spawn to exit. */
  durationMs: number;
  /** The full QEMU command line that was run. */
  argv: string[];
}

/** Marker texts found in serial output (the part after "IOVIRT-GUEST: "). */
export function parseMarkers(output: string): string[] {
  const markers: string[] = [];
  for (const line of output.split("\n")) {
    const at = line.indexOf(GUEST_MARKER);
    if (at >= 0) markers.push(line.slice(at + GUEST_MARKER.length).trim());
  }
  return markers;
}

/** Value of the last marker "<key> <value>", e.g. markerValue(m, "read-md5"). */
export function markerValue(markers: readonly string[], key: string): string | undefined {
  for (let i = markers.length - 1; i >= 0; i--) {
    const m = markers[i];
    if (m !== undefined && m.startsWith(`${key} `)) return m.slice(key.length + 1).trim();
  }
  return undefined;
}

export function qemuArgv(opts: BootGuestOptions): string[] {
  const mem = opts.memMiB ?? 256;
  if (!Number.isInteger(mem) || mem < 64) throw new RangeError(`memMiB must be an integer >= 64, got ${mem}`);
  const append = ["console=ttyS0", "panic=-1", "quiet", opts.append ?? ""].join(" ").trim();
  const base = opts.machine ?? "q35";
  const machine = opts.sharedMemory === true ? `${base},memory-backend=iovirt-mem` : base;
  const argv = [
    opts.qemu ?? process.env["IOVIRT_QEMU"] ?? "qemu-system-x86_64",
    "-machine",
    machine,
    "-accel",
    "tcg",
    "-m",
    String(mem),
    "-nographic",
    "-no-reboot",
    "-nic",
    "none",
  ];
  if (opts.sharedMemory === true) {
    argv.push("-object", `memory-backend-memfd,id=iovirt-mem,size=${mem}M,share=on`);
  }
  argv.push("-kernel", opts.kernel, "-initrd", opts.initrd, "-append", append, ...opts.qemuArgs);
  return argv;
}

/** Boots the guest and resolves when QEMU exits (or was killed on timeout). Rejects only if QEMU cannot be started. */
export async function bootGuest(opts: BootGuestOptions): Promise<BootGuestResult> {
  const argv = qemuArgv(opts);
  const [bin, ...args] = argv;
  if (bin === undefined) throw new Error("no QEMU binary");
  const started = Date.now();
  const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] });

  let output = "";
  let pending = "";
  let stderr = "";
  child.stdout.setEncoding("utf8");
  child.stderr.setEncoding("utf8");
  child.stdout.on("data", (chunk: string) => {
    const text = chunk.replace(/\r/g, "");
    output += text;
    if (opts.onLine !== undefined) {
      pending += text;
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        opts.onLine(pending.slice(0, nl));
        pending = pending.slice(nl + 1);
      }
    }
  });
  child.stderr.on("data", (chunk: string) => {
    stderr += chunk;
  });

  let timedOut = false;
  let killTimer: NodeJS.Timeout | undefined;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGTERM");
    killTimer = setTimeout(() => child.kill("SIGKILL"), 3000);
  }, opts.timeoutMs);

  try {
    const { code, signal } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolvePromise, reject) => {
      child.once("error", reject);
      child.once("close", (code, signal) => resolvePromise({ code, signal }));
    });
    if (opts.onLine !== undefined && pending !== "") opts.onLine(pending);
    return {
      output,
      markers: parseMarkers(output),
      exitCode: code,
      timedOut,
      stderr,
      signal,
      durationMs: Date.now() - started,
      argv,
    };
  } catch (err) {
    throw new Error(`cannot start ${bin}: ${(err as Error).message}`, { cause: err });
  } finally {
    clearTimeout(timer);
    if (killTimer !== undefined) clearTimeout(killTimer);
  }
}

export interface GuestPaths {
  kernel: string;
  initrd: string;
  /** Kernel release, e.g. "6.1.0-56-amd64". */
  kernelVersion: string;
}

/** tools/guest/build.sh, found from this module's location (source tree or dist/). */
export function buildScriptPath(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    for (const candidate of [join(dir, "build.sh"), join(dir, "tools", "guest", "build.sh")]) {
      if (existsSync(candidate)) return candidate;
    }
    const up = dirname(dir);
    if (up === dir) throw new Error("tools/guest/build.sh not found above " + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/** Cache directory build.sh uses: $IOVIRT_GUEST_DIR or <repo>/.cache/guest. */
export function guestCacheDir(): string {
  const env = process.env["IOVIRT_GUEST_DIR"];
  if (env !== undefined && env !== "") return resolve(env);
  return resolve(dirname(buildScriptPath()), "..", "..", ".cache", "guest");
}

function isFresh(dir: string, script: string): boolean {
  const kernel = join(dir, "vmlinuz");
  const initrd = join(dir, "initramfs.cpio.gz");
  const stamp = join(dir, "build.stamp");
  if (!existsSync(kernel) || !existsSync(initrd) || !existsSync(stamp)) return false;
  const want = createHash("sha256").update(readFileSync(script)).digest("hex");
  return readFileSync(stamp, "utf8").trim() === want;
}

/**
 * Paths of the cached guest kernel and initramfs. Runs build.sh when they are
 * missing or were built by a different version of build.sh (it may download
 * the kernel package with apt, which takes a few seconds).
 */
export async function guestPaths(opts: { force?: boolean; log?: (text: string) => void } = {}): Promise<GuestPaths> {
  const script = buildScriptPath();
  const dir = guestCacheDir();
  if (opts.force === true || !isFresh(dir, script)) {
    const args = [script, ...(opts.force === true ? ["--force"] : [])];
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>(
      (resolvePromise, reject) => {
        const child = spawn("bash", args, {
          stdio: ["ignore", "pipe", "pipe"],
          env: { ...process.env, IOVIRT_GUEST_DIR: dir },
        });
        let out = "";
        let err = "";
        child.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
        child.stderr.setEncoding("utf8").on("data", (c: string) => {
          err += c;
          opts.log?.(c);
        });
        child.once("error", reject);
        child.once("close", (c) => resolvePromise({ code: c, stdout: out, stderr: err }));
      },
    );
    if (code !== 0) throw new Error(`${script} failed (exit ${code}):\n${stderr}${stdout}`);
  }
  const kernel = join(dir, "vmlinuz");
  const initrd = join(dir, "initramfs.cpio.gz");
  if (!existsSync(kernel) || !existsSync(initrd)) throw new Error(`guest build did not produce ${kernel} and ${initrd}`);
  const versionFile = join(dir, "kernel-version");
  const kernelVersion = existsSync(versionFile) ? readFileSync(versionFile, "utf8").trim() : "unknown";
  return { kernel, initrd, kernelVersion };
}
