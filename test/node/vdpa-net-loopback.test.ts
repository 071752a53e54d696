import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { NetDevice } from "../../src/core/virtio/devices/net/device.js";
import { MemoryPacketPort } from "../../src/core/virtio/devices/net/port.js";
import { checkTestFrame, parseTestFrame, testFrame } from "../../src/core/selfcheck/frames.js";
import { VdpaDevice } from "../../src/node/vdpa/device.js";
import { LoopbackVdpaHardware } from "../../src/node/vdpa/loopback.js";
import { VhostUserServer } from "../../src/node/vhost-user/server.js";

// iovirt vdpa on a virtio-net function: iovirt's own virtio-net-pci model
// (with a control queue, as QEMU's has) stands in for the hardware, in this
// process; the front end is `iovirt drv net --vhost-user` in another. The
// port answers each test frame g2h i with h2g i. QEMU's virtio-net-pci as
// the function is in test/guest/userspace-drivers.test.ts.

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "iovirt-vdpa-net-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const PEER_MAC = new Uint8Array([0x02, 0, 0, 0, 0x0f, 0x01]);

interface Rig {
  sock: string;
  port: MemoryPacketPort;
  hw: LoopbackVdpaHardware;
  dev: VdpaDevice;
  log: string[];
  removed: string[];
  close: () => void;
}

function bridge(): Rig {
  const removed: string[] = [];
  const port = new MemoryPacketPort();
  const net = new NetDevice({ port, queuePairs: 1, controlQueue: true, queueSize: 256 });
  const hw = new LoopbackVdpaHardware(net, { name: "loopback virtio-net-pci" });
  const log: string[] = [];
  const dev = new VdpaDevice(hw, { log: (l) => log.push(l), onRemoved: (why) => removed.push(why) });
  const sock = join(dir, `net-${Date.now()}.sock`);
  const server = new VhostUserServer(sock, dev, { externalRings: dev, onConnect: (c) => dev.bind(c.backend), log: (l) => log.push(l) });
  port.onTransmit = (f) => {
    const id = parseTestFrame(f);
    if (id === null || id.dir !== "g2h" || checkTestFrame(f, "g2h", id.seq) !== null) return;
    setImmediate(() => port.inject(testFrame("h2g", id.seq, PEER_MAC, f.subarray(6, 12))));
  };
  return {
    sock,
    port,
    hw,
    dev,
    log,
    removed,
    close: () => {
      server.close();
      dev.close();
    },
  };
}

/** Runs `iovirt drv net --vhost-user` without blocking this process's event loop (the bridge runs in it). */
function drv(sock: string, args: string[]): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [cli, "drv", "net", "--vhost-user", sock, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (out += d.toString()));
    const t = setTimeout(() => c.kill("SIGKILL"), 60_000);
    c.on("close", (status) => {
      clearTimeout(t);
      resolve({ status, out });
    });
  });
}

for (const layout of ["split", "packed"] as const) {
  test(`virtio-net through the bridge, ${layout} rings: one rx/tx pair direct on the function, frames both ways checked, nothing relayed in software`, async () => {
    const b = bridge();
    try {
      // GET_QUEUE_NUM counts pairs; the function's control queue and what needs it are not offered.
      assert.equal(b.dev.hostQueueNum, 1);
      assert.equal(b.dev.numQueues, 2);
      const r = await drv(b.sock, [`--${layout}`, "info", "ping-peer", "40"]);
      assert.equal(r.status, 0, r.out);
      assert.match(r.out, new RegExp(`${layout} rings, 2 queue\\(s\\)`));
      assert.doesNotMatch(r.out, /CTRL_VQ|NET_MQ/);
      assert.match(r.out, /ping-peer: 40\/40 frames verified/);
      // The disconnect's GET_VRING_BASE on ring 0 resets the function to learn its position, which moves
      // ring 1 to a shadow ring until its own GET_VRING_BASE; while the front end ran, nothing was relayed.
      const s = b.dev.stats;
      assert.equal(s.shadowBuffers, 0, b.log.join("\n"));
      assert.equal(s.forwardedKicks, 0);
      assert.ok(
        b.log.some((l) => new RegExp(`ring 0 \\(${layout}, 128 entries\\) starts direct`).test(l)),
        b.log.join("\n"),
      );
      assert.ok(
        b.log.some((l) => new RegExp(`ring 1 \\(${layout}, 128 entries\\) starts direct`).test(l)),
        b.log.join("\n"),
      );
      assert.equal(b.port.transmitted.filter((f) => parseTestFrame(f)?.dir === "g2h").length, 40);
    } finally {
      b.close();
    }
  });
}

test("virtio-net rings resumed where a fresh queue cannot start run shadowed: receive buffers posted before the reconnect still take frames", async () => {
  const b = bridge();
  try {
    const r = await drv(b.sock, ["--packed", "ping-peer", "20", "reconnect", "ping-peer", "250"]);
    assert.equal(
      r.status,
      0,
      `${r.out}\n${b.log.filter((l) => !l.includes("<-")).join("\n")}\nport sent ${b.port.transmitted.length}; ${JSON.stringify(b.dev.stats)}`,
    );
    assert.match(r.out, /ping-peer: 20\/20 frames verified/);
    assert.match(r.out, /ping-peer: 250\/250 frames verified/);
    const shadowed = b.log.filter((l) => /ring [01] \(packed, 128 entries\) starts shadowed/.test(l));
    assert.equal(shadowed.length, 2, b.log.join("\n"));
    assert.ok(b.dev.stats.shadowBuffers > 0);
    // Both rings reach a fresh queue's position (offset 0, wrap set: 20 + 250 frames > two laps of 128) and go back on the direct path.
    for (const i of [0, 1])
      assert.ok(
        b.log.some((l) => new RegExp(`ring ${i} back on the direct path`).test(l)),
        b.log.join("\n"),
      );
    assert.equal(b.dev.stats.toDirect, 2);
  } finally {
    b.close();
  }
});

test("a function taken away under a running front end: it is told (DEVICE_NEEDS_RESET), the bridge's owner is called to release it", async () => {
  const b = bridge();
  try {
    const run = drv(b.sock, ["--split", "ping-peer", "4", "watch-status", "20"]);
    for (let i = 0; i < 400 && b.port.transmitted.length < 4; i++) await new Promise((r) => setTimeout(r, 25));
    assert.equal(b.port.transmitted.length, 4);
    b.hw.remove("unbound in a test");
    assert.deepEqual(b.removed, ["unbound in a test"]);
    const r = await run;
    assert.equal(r.status, 0, r.out);
    assert.match(r.out, /watch-status: device status 0x[0-9a-f]+ after \d+ ms: DEVICE_NEEDS_RESET/);
    assert.ok(
      b.log.some((l) => /is going away \(unbound in a test\); the front end must reset the device/.test(l)),
      b.log.join("\n"),
    );
  } finally {
    b.close();
  }
});

test("watch-status fails when the device stays well, and needs --vhost-user", async () => {
  const b = bridge();
  try {
    const r = await drv(b.sock, ["watch-status", "1"]);
    assert.equal(r.status, 1, r.out);
    assert.match(r.out, /watch-status: device status unchanged for 1 s/);
  } finally {
    b.close();
  }
  const u = spawnSync(process.execPath, [cli, "drv", "net", "--vfio", "0000:00:04.0", "watch-status", "1"], { encoding: "utf8" });
  assert.equal(u.status, 2, u.stderr);
  assert.match(u.stderr, /need --vhost-user/);
});
