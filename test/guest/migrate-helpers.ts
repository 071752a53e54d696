/**
 * Shared pieces of the live-migration tests: QEMU processes whose serial
 * output is watched while they run (bootGuest waits for the end), and QMP
 * polling of a migration.
 */
import { before, after } from "node:test";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { guestPaths, type GuestPaths } from "../../tools/guest/run.js";
import type { Qmp } from "../../tools/qmp.js";

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface Vm {
  child: ChildProcess;
  output: () => string;
  qmpPath: string;
  exited: Promise<number | null>;
}

/** Starts QEMU from a full argv (qemuArgv); its serial output and stderr are collected. */
export function startVm(argv: string[], qmpPath: string): Vm {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (d: string) => (out += d.replace(/\r/g, "")));
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => (out += `[qemu stderr] ${d}`));
  const exited = new Promise<number | null>((resolve) =>
    child.once("close", (code, signal) => {
      // A QEMU that dies of a signal prints nothing itself: say so, for the failure report.
      if (signal !== null) out += `[qemu killed by ${signal}]\n`;
      resolve(code);
    }),
  );
  return { child, output: () => out, qmpPath, exited };
}

export async function waitForOutput(vm: Vm, text: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!vm.output().includes(text)) {
    if (vm.child.exitCode !== null) throw new Error(`QEMU exited (${vm.child.exitCode}) before printing "${text}"`);
    if (Date.now() > deadline) throw new Error(`no "${text}" within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export /** Polls query-migrate until the migration ends; returns its final status and the whole reply. */
async function migrationResult(qmp: Qmp, timeoutMs: number): Promise<{ status: string; info: Record<string, unknown> }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = (await qmp.execute("query-migrate")) as Record<string, unknown>;
    const status = String(info["status"]);
    if (status === "completed" || status === "failed" || status === "cancelled") return { status, info };
    if (Date.now() > deadline) throw new Error(`migration still ${status} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export interface MigrationRig {
  /** A scratch directory, removed after the file's tests. */
  dir: string;
  /** The guest kernel and initramfs (built before the first test). */
  paths: () => GuestPaths;
  /** Runs `f` after the file's tests (kills what a failed test left running). */
  onCleanup: (f: () => void) => void;
}

/** Registers the before/after hooks a migration test file needs. */
export function migrationRig(prefix: string): MigrationRig {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  let paths: GuestPaths | null = null;
  const cleanup: (() => void)[] = [];
  before(async () => {
    paths = await guestPaths();
  });
  after(() => {
    for (const f of cleanup.splice(0)) f();
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, paths: () => paths!, onCleanup: (f) => cleanup.push(f) };
}
