import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk, type BlockPort } from "../../src/core/virtio/devices/blk/port.js";
import { VIRTIO_BLK_T_OUT } from "../../src/core/virtio/devices/blk/constants.js";
import { PF, Req } from "../../src/core/vhost-user/protocol.js";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import { decodeVringState, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { VhostUserServer } from "../../src/node/vhost-user/server.js";
import { eventfd, eventfdWrite } from "../../src/node/native.js";
import { GuestRam, RawFrontend, startRing, tick, type Ring } from "./vhost-user-raw.js";

// With asynchronous storage, requests are still in flight when the front end
// stops a ring (VM pause, reboot, QEMU's vhost_dev_stop). GET_VRING_BASE must
// drain them into the used ring before it answers, or the guest never hears of them.

/** Writes wait until the test releases them. */
class HeldWrites implements BlockPort {
  readonly inner = new RamDisk(1 << 20);
  readonly sizeBytes = 1 << 20;
  readonly held: (() => void)[] = [];
  read(offset: number, dst: Uint8Array): void {
    this.inner.read(offset, dst);
  }
  write(offset: number, src: Uint8Array): Promise<void> {
    return new Promise((resolve) =>
      this.held.push(() => {
        this.inner.write(offset, src);
        resolve();
      }),
    );
  }
  flush(): void {}
}

const dir = mkdtempSync(join(tmpdir(), "iovirt-drain-"));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Three 512-byte writes (sectors 1..3) made available and kicked; returns their status addresses. */
function submitWrites(ram: GuestRam, ring: Ring, kick: ReturnType<typeof eventfd>): number[] {
  const statuses: number[] = [];
  for (let i = 1; i <= 3; i++) {
    const hdr = ram.alloc(16, 16);
    ram.mem.writeU32(hdr, VIRTIO_BLK_T_OUT);
    ram.mem.writeU32(hdr + 4, 0);
    ram.mem.writeU64(hdr + 8, i);
    const data = ram.alloc(512, 512);
    ram.mem.fill(data, 512, 0x40 + i);
    const status = ram.alloc(1, 1);
    ram.mem.writeU8(status, 0xff);
    statuses.push(status);
    assert.ok(
      ring.queue.add(
        [
          { addr: hdr, len: 16, writable: false },
          { addr: data, len: 512, writable: false },
          { addr: status, len: 1, writable: true },
        ],
        i,
      ),
    );
  }
  ring.queue.publish();
  eventfdWrite(kick, 1);
  return statuses;
}

interface Held {
  port: HeldWrites;
  device: BlkDevice;
  server: VhostUserServer;
  path: string;
  logs: string[];
  c: RawFrontend;
  ram: GuestRam;
  ring: Ring;
  /** The status bytes of the three writes, which are in the storage's hands. */
  statuses: number[];
}

/**
 * A back end on writes that wait for the test, a front end with one running
 * ring, and three writes submitted and held in flight; everything is released
 * after `body`.
 */
async function withHeldWrites(name: string, extraPF: bigint, body: (h: Held) => Promise<void>): Promise<void> {
  const port = new HeldWrites();
  const device = new BlkDevice({ port });
  const path = join(dir, `${name}.sock`);
  const logs: string[] = [];
  const server = new VhostUserServer(path, device, { log: (l) => logs.push(l) });
  const c = new RawFrontend(path);
  const ram = new GuestRam(1 << 20);
  const kick = eventfd(0, { nonblock: true });
  const call = eventfd(0, { nonblock: true });
  try {
    await c.handshake(extraPF);
    const ring = await startRing(c, ram, { size: 16, kick, call });
    const statuses = submitWrites(ram, ring, kick);
    for (let i = 0; i < 500 && port.held.length < 3; i++) await tick();
    assert.equal(port.held.length, 3, "all three writes reached the storage");
    await body({ port, device, server, path, logs, c, ram, ring, statuses });
  } finally {
    c.close();
    kick.close();
    call.close();
    ram.close();
    server.close();
  }
}

for (const order of ["in order", "out of order"] as const) {
  test(`GET_VRING_BASE answers only after the requests in flight completed into the used ring (${order})`, async () => {
    await withHeldWrites(`drain-${order.replace(/ /g, "")}`, 0n, async ({ port, logs, c, ram, ring, statuses }) => {
      c.send(Req.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
      c.send(Req.GET_FEATURES); // must not be answered before GET_VRING_BASE
      await assert.rejects(c.reply(150), /no reply/, "no answer while writes are in flight");
      assert.ok(logs.some((l) => /ring\(s\) 0: waiting for 3 request\(s\) in flight/.test(l)));

      const release = order === "in order" ? port.held.splice(0) : port.held.splice(0).reverse();
      for (const r of release) r();
      const first = await c.reply();
      assert.notEqual(first, "closed");
      if (first === "closed") return;
      assert.equal(first.request, Req.GET_VRING_BASE, "the stop is answered first");
      assert.equal(decodeVringState(Req.GET_VRING_BASE, first.payload).num, 3, "the ring stopped after the three requests");
      const second = await c.reply();
      assert.ok(second !== "closed" && second.request === Req.GET_FEATURES, "then the next message");

      const used: number[] = [];
      ring.queue.drainUsed((token) => used.push(token));
      assert.deepEqual(
        [...used].sort((a, b) => a - b),
        [1, 2, 3],
        "every request was completed before the ring stopped",
      );
      for (const s of statuses) assert.equal(ram.mem.readU8(s), 0, "status OK");
      const back = new Uint8Array(512);
      port.inner.read(2 * 512, back);
      assert.ok(back.every((b) => b === 0x42));
    });
  });
}

test("a front end that disconnects while GET_VRING_BASE waits leaves nothing behind, and the next one is served", async () => {
  await withHeldWrites("drain-gone", 0n, async ({ port, server, path, c }) => {
    c.send(Req.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
    await tick();
    c.close();
    for (let i = 0; i < 200 && server.connection !== null; i++) await tick();
    assert.equal(server.connection, null, "the connection ended");
    for (const r of port.held.splice(0)) r(); // completions after the reset are dropped, not written to a stale ring
    const d = new RawFrontend(path);
    try {
      d.send(Req.GET_FEATURES);
      const r = await d.reply();
      assert.ok(r !== "closed" && r.request === Req.GET_FEATURES);
    } finally {
      d.close();
    }
  });
});

test("RESET_DEVICE waits for the requests in flight before it resets and acks (no read lands in a reset guest's memory)", async () => {
  await withHeldWrites("drain-reset", bit(PF.RESET_DEVICE), async ({ port, device, c, ram, statuses }) => {
    const acked = c.ack(Req.RESET_DEVICE);
    const early = await Promise.race([acked.then(() => "acked"), new Promise((r) => setTimeout(() => r("waiting"), 150))]);
    assert.equal(early, "waiting", "no ack while requests are in flight");
    assert.ok(device.queueState(0) !== null, "the device is not reset yet");
    for (const r of port.held.splice(0)) r();
    assert.equal(await acked, 0, "acked once they completed");
    for (const st of statuses) assert.equal(ram.mem.readU8(st), 0, "each request completed (status OK) before the reset");
    assert.equal(device.queueState(0), null, "then the device was reset");
  });
});
