import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { VhostUserBlkClient } from "../../src/node/vhost-user/blk-client.js";
import { VhostUserError } from "../../src/core/vhost-user/codec.js";
import { guestPatternRange } from "../../src/core/selfcheck/pattern.js";
import { stopChild, waitForPath } from "../../tools/child.js";
import { VIRTIO_F_INDIRECT_DESC, hasFeature } from "../../src/core/virtio/lifecycle/features.js";

// iovirt vdpa with its in-process virtio-blk-pci model as the function
// (--loopback): the bridge's control plane, its direct path and its shadow
// rings, without VFIO. The real function (QEMU's virtio-blk-pci behind a
// vIOMMU) is in test/guest/userspace-drivers.test.ts.

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "iovirt-vdpa-"));
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

interface Bridge {
  sock: string;
  child: ChildProcess;
  /** Everything the bridge logged so far. */
  log: () => string;
}

async function startBridge(env: NodeJS.ProcessEnv = process.env): Promise<Bridge> {
  const sock = join(dir, `vdpa-${children.length}.sock`);
  const child = spawn(process.execPath, [cli, "vdpa", "--socket", sock, "--loopback", "16"], { stdio: ["ignore", "ignore", "pipe"], env });
  children.push(child);
  let text = "";
  child.stderr!.on("data", (d: Buffer) => (text += d.toString()));
  await waitForPath(sock, child, "iovirt vdpa");
  return { sock, child, log: () => text };
}

/** Waits (2 s at most) until the bridge has logged a line matching `re`. */
async function logged(b: Bridge, re: RegExp): Promise<void> {
  for (let i = 0; i < 80 && !re.test(b.log()); i++) await new Promise((r) => setTimeout(r, 25));
  assert.match(b.log(), re);
}

/** The counters the bridge printed at the n-th front-end disconnect (0-based). */
async function statsAt(b: Bridge, n: number): Promise<Record<string, string>> {
  for (let i = 0; i < 200; i++) {
    const lines = b
      .log()
      .split("\n")
      .filter((l) => l.includes("vdpa: stats "));
    if (lines.length > n) {
      const l = lines[n]!;
      return Object.fromEntries(
        l
          .slice(l.indexOf("vdpa: stats ") + 12)
          .split(" ")
          .map((kv) => kv.split("=") as [string, string]),
      );
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no stats line ${n}:\n${b.log()}`);
}

async function writeVerify(c: VhostUserBlkClient, sector: number, count: number): Promise<void> {
  await c.blk.write(sector, guestPatternRange(sector * 512, count * 512));
  const got = await c.blk.read(sector, count);
  assert.ok(Buffer.from(got).equals(Buffer.from(guestPatternRange(sector * 512, count * 512))), `sectors ${sector}+${count}`);
}

function drv(sock: string, args: string[], env: NodeJS.ProcessEnv = process.env): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [cli, "drv", "blk", "--vhost-user", sock, ...args], { encoding: "utf8", env, timeout: 120_000 });
  return { status: r.status, out: r.stdout + r.stderr };
}

test("split and packed rings start direct: the function reads the front end's rings, nothing is relayed", async () => {
  const b = await startBridge();
  for (const packed of [false, true]) {
    const c = VhostUserBlkClient.connect(b.sock, { packed, queueSize: 64, memoryBytes: 16 << 20 });
    try {
      assert.equal(c.frontend.layoutUsed(), packed ? "packed" : "split");
      for (let i = 0; i < 20; i++) await writeVerify(c, i * 64, 64);
    } finally {
      c.close();
    }
  }
  const s = await statsAt(b, 1);
  assert.equal(s["shadow-buffers"], "0", JSON.stringify(s));
  assert.equal(s["to-shadow"], "0");
  assert.match(b.log(), /ring 0 \(split, 64 entries\) starts direct/);
  assert.match(b.log(), /ring 0 \(packed, 64 entries\) starts direct/);
  await stopChild(b.child);
});

test("GET_VRING_BASE of a direct ring: the position learnt by resetting the function is where the driver stands", async () => {
  const b = await startBridge();
  for (const packed of [false, true]) {
    const c = VhostUserBlkClient.connect(b.sock, { packed, queueSize: 64, memoryBytes: 16 << 20 });
    try {
      for (let i = 0; i < 37; i++) await writeVerify(c, i * 8, 8);
      const [base] = c.frontend.stopRings();
      // Split counts buffers; packed counts ring slots: one per request with an indirect table, else three.
      const n = c.blk.submitted;
      if (!packed) assert.equal(base, n);
      else {
        const slots = (hasFeature(c.frontend.negotiated, VIRTIO_F_INDIRECT_DESC) ? 1 : 3) * n;
        const pos = (slots % 64) | (Math.floor(slots / 64) % 2 === 0 ? 0x8000 : 0);
        assert.equal(base, (pos | (pos << 16)) >>> 0, `packed base 0x${base!.toString(16)} after ${n} requests`);
      }
    } finally {
      c.close();
    }
  }
  await stopChild(b.child);
});

test("dirty logging under I/O: the ring is shadowed, exactly the pages the function wrote are marked, then the ring goes direct again", async () => {
  const b = await startBridge();
  const r = drv(b.sock, [
    "--split",
    "--queue-size",
    "64",
    "write-pattern",
    "0",
    "4096",
    "log-cycle",
    "0",
    "4096",
    "verify-pattern",
    "0",
    "4096",
  ]);
  assert.equal(r.status, 0, r.out);
  assert.match(r.out, /log-cycle: \d+ reads of 8 sectors, 0 mismatches/);
  assert.match(r.out, / 0 others; 0 written but not marked;/);
  const s = await statsAt(b, 0);
  assert.equal(s["to-shadow"], "1", JSON.stringify(s));
  assert.equal(s["to-direct"], "1", JSON.stringify(s));
  assert.ok(Number(s["shadow-buffers"]) > 2000, JSON.stringify(s));
  assert.match(b.log(), /dirty logging on: ring\(s\) 0 now shadowed/);
  assert.match(b.log(), /ring 0 back on the direct path/);
  await stopChild(b.child);
});

test("negative control: with marking switched off (IOVIRT_TEST_NO_DIRTY_LOG=1) the ring stays direct and the check finds the unmarked pages", async () => {
  const env = { ...process.env, IOVIRT_TEST_NO_DIRTY_LOG: "1" };
  const b = await startBridge(env);
  const r = drv(b.sock, ["--split", "--queue-size", "64", "write-pattern", "0", "4096", "log-cycle", "0", "4096"]);
  assert.equal(r.status, 1, r.out);
  assert.match(r.out, /log-cycle: pages written but not marked: \d+/);
  const s = await statsAt(b, 0);
  assert.equal(s["to-shadow"], "0", JSON.stringify(s));
  await stopChild(b.child);
});

test("a ring that resumes where a fresh queue cannot start is shadowed, and goes direct once its index wraps to 0", async () => {
  const b = await startBridge();
  const c = VhostUserBlkClient.connect(b.sock, { queueSize: 64, memoryBytes: 16 << 20 });
  try {
    for (let i = 0; i < 10; i++) await writeVerify(c, i * 8, 8);
    // The same back end again, from where the rings stopped: SET_VRING_BASE 20.
    c.frontend.handOver(b.sock);
    await logged(b, /ring 0 \(split, 64 entries\) starts shadowed \(it resumes at index 20, where a fresh queue cannot start\)/);
    const reads: Promise<Uint8Array>[] = [];
    while (c.blk.submitted < 65536 + 64) {
      reads.push(c.blk.read(0, 8));
      if (reads.length === 32) await Promise.all(reads.splice(0));
    }
    await Promise.all(reads);
    await writeVerify(c, 512, 8);
  } finally {
    c.close();
  }
  await logged(b, /ring 0 back on the direct path/);
  await stopChild(b.child);
});

test("packed rings running direct refuse dirty logging (their position cannot be learnt while the guest runs); I/O goes on", async () => {
  const b = await startBridge();
  const c = VhostUserBlkClient.connect(b.sock, { packed: true, queueSize: 64, memoryBytes: 16 << 20 });
  try {
    await writeVerify(c, 0, 8);
    assert.throws(
      () => c.frontend.startLogging(),
      (e: unknown) => e instanceof VhostUserError,
    );
    await writeVerify(c, 8, 8);
  } finally {
    c.close();
  }
  await logged(b, /LOGGING_REFUSED: dirty logging cannot start: ring\(s\) 0 run direct on packed rings/);
  await stopChild(b.child);
});

test("a DMA to an address the function cannot reach fails the device (DEVICE_NEEDS_RESET), not the bridge; the next front end is served", async () => {
  const b = await startBridge();
  const r = drv(b.sock, ["--split", "dma-fault"]);
  assert.equal(r.status, 0, r.out);
  assert.match(r.out, /DEVICE_NEEDS_RESET; the request did not complete/);
  await logged(b, /VDPA_DEVICE_FAILED: the function set DEVICE_NEEDS_RESET/);
  const after = drv(b.sock, ["--split", "write-pattern", "0", "64", "verify-pattern", "0", "64"]);
  assert.equal(after.status, 0, after.out);
  await logged(b, /ring 0 \(split, 128 entries\) starts direct[^]*ring 0 \(split, 128 entries\) starts direct/);
  await stopChild(b.child);
});

test("iovirt vdpa explains itself", () => {
  const h = spawnSync(process.execPath, [cli, "vdpa", "--help"], { encoding: "utf8" });
  assert.equal(h.status, 0);
  assert.match(h.stdout, /--vfio BDF/);
  assert.match(h.stdout, /shadow/);
  const u = spawnSync(process.execPath, [cli, "vdpa", "--socket", join(dir, "x.sock")], { encoding: "utf8" });
  assert.equal(u.status, 2);
  assert.match(u.stderr, /give one of --vfio BDF and --loopback MIB/);
});
