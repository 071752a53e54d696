import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import type { DriverQueue } from "../../src/core/virtio/driver/driver-queue.js";
import { VhostUserBackend, type BackendOptions } from "../../src/core/vhost-user/backend.js";
import { FakeFd, fakePlatform } from "./fake-platform.js";
import { encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION } from "../../src/core/vhost-user/protocol.js";

// The back end's poll scheduler (issue 8, defect 8): a kick runs one bounded
// pass; more work continues in passes the platform defers to its event loop,
// so the loop can read the socket between them.

const UA = 0x5000_0000;
const QSIZE = 256;
const REQUESTS = 120; // FLUSH: 2 descriptors each

interface Rig {
  be: VhostUserBackend<FakeFd>;
  driver: DriverQueue<number>;
  device: BlkDevice;
  kick: () => void;
  /** Makes n FLUSH requests available (publishes them) and returns whether the driver should kick. */
  submit: (n: number) => boolean;
  deferred: (() => void)[];
  /** Runs the deferred passes queued so far (one event-loop turn); returns how many ran. */
  turn: () => number;
  clock: { now: number };
}

function rig(withDefer: boolean, opts: BackendOptions<FakeFd> = {}): Rig {
  const buf = new ArrayBuffer(1 << 20);
  const mem = new GuestMemory([{ gpa: 0, size: buf.byteLength, buffer: buf }]);
  const kicks = new Map<FakeFd, () => void>();
  const deferred: (() => void)[] = [];
  const platform = fakePlatform(kicks, withDefer ? (fn) => void deferred.push(fn) : undefined);
  const clock = { now: 0 };
  const device = new BlkDevice({ port: new RamDisk(1 << 20), queueSize: QSIZE });
  const be = new VhostUserBackend(device, platform, { now: () => clock.now, ...opts });
  const send = (request: number, payload: Uint8Array, fds: FakeFd[] = []): void => {
    const out = be.handle({ request, flags: VERSION | FLAG_NEED_REPLY, size: payload.length }, payload, fds);
    const r = out[0]!;
    assert.equal(new DataView(r.bytes.buffer, r.bytes.byteOffset + 12).getBigUint64(0, true), 0n, `request ${request} acked`);
  };
  be.handle({ request: Req.SET_PROTOCOL_FEATURES, flags: VERSION, size: 8 }, encodeU64(1n << BigInt(PF.REPLY_ACK)), []);
  send(Req.SET_FEATURES, encodeU64((1n << 32n) | (1n << 30n)));
  send(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: buf.byteLength, userAddr: UA, mmapOffset: 0 }]), [new FakeFd(buf)]);
  const { state } = layoutQueue("split", QSIZE, 0x1000);
  send(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: QSIZE }));
  send(
    Req.SET_VRING_ADDR,
    encodeVringAddr({ index: 0, flags: 0, desc: UA + state.descTable, used: UA + state.deviceArea, avail: UA + state.driverArea, log: 0 }),
  );
  const kickFd = new FakeFd(new ArrayBuffer(8));
  send(Req.SET_VRING_KICK, encodeU64(0), [kickFd]);
  send(Req.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
  const driver = createDriverQueue<number>(mem, state, { indirect: false, eventIdx: false, inOrder: false });
  let next = 0;
  const submit = (n: number): boolean => {
    for (let k = 0; k < n; k++, next++) {
      const hdr = 0x20000 + (next % QSIZE) * 32;
      mem.writeU32(hdr, 4); // VIRTIO_BLK_T_FLUSH
      assert.ok(
        driver.add(
          [
            { addr: hdr, len: 16, writable: false },
            { addr: hdr + 16, len: 1, writable: true },
          ],
          next,
        ),
      );
    }
    driver.publish();
    return driver.needsKick();
  };
  const turn = (): number => {
    const now = deferred.splice(0);
    for (const fn of now) fn();
    return now.length;
  };
  return { be, driver, device, kick: () => kicks.get(kickFd)!(), submit, deferred, turn, clock };
}

test("a kick runs one pass of at most passBudget buffers and defers the rest, one pass per event-loop turn", () => {
  const r = rig(true, { passBudget: 50, pollNs: 0 });
  assert.equal(r.submit(REQUESTS), true);
  r.kick();
  assert.equal(r.device.stats.ok, 50, "the kick's own pass stops at the budget");
  assert.equal(r.deferred.length, 1, "the rest is left for the event loop");
  // A control message between passes is handled at once.
  const out = r.be.handle({ request: Req.GET_FEATURES, flags: VERSION, size: 0 }, new Uint8Array(0), []);
  assert.equal(out.length, 1);
  r.kick(); // a kick while a pass is pending adds no pass of its own
  assert.equal(r.device.stats.ok, 50);
  assert.equal(r.turn(), 1);
  assert.equal(r.device.stats.ok, 100);
  assert.equal(r.turn(), 1);
  assert.equal(r.device.stats.ok, REQUESTS);
  // Empty and no adaptive polling: kicks are re-enabled and nothing more is deferred.
  assert.equal(r.turn(), 1);
  assert.equal(r.deferred.length, 0);
  assert.equal(
    r.driver.drainUsed(() => {}),
    REQUESTS,
  );
  assert.equal(r.submit(1), true, "the driver is asked to kick again");
});

test("adaptive polling runs as deferred passes until pollNs passes without work, then waits for kicks", () => {
  const r = rig(true, { passBudget: 1000, pollNs: 50_000 });
  // Enabling the ring started a polling window; it ends without work.
  r.clock.now += 1;
  r.turn();
  assert.equal(r.deferred.length, 0);
  assert.equal(r.submit(REQUESTS), true, "kicks are on while the back end is not polling");
  r.kick();
  assert.equal(r.device.stats.ok, REQUESTS);
  for (let i = 0; i < 5; i++) assert.equal(r.turn(), 1, "still polling inside the window");
  r.driver.drainUsed(() => {});
  assert.equal(r.submit(10), false, "kicks are suppressed while polling");
  r.turn();
  assert.equal(r.device.stats.ok, REQUESTS + 10, "a deferred pass took them without a kick");
  r.clock.now += 0.05;
  r.turn();
  assert.equal(r.deferred.length, 0, "polling ended");
  assert.equal(r.submit(1), true);
});

test("a ring stopped while a pass is deferred is not touched by it, and is handed back with kicks enabled", () => {
  const r = rig(true, { passBudget: 64, pollNs: 0 });
  r.submit(REQUESTS);
  r.kick();
  assert.equal(r.deferred.length, 1);
  r.be.handle({ request: Req.GET_VRING_BASE, flags: VERSION, size: 8 }, encodeVringState({ index: 0, num: 0 }), []);
  r.turn();
  assert.equal(r.device.stats.ok, 64, "no buffers taken after the stop");
  assert.equal(r.submit(1), true);
});

test("without a defer hook a kick still empties the ring", () => {
  const r = rig(false, { passBudget: 64 });
  r.submit(REQUESTS);
  r.kick();
  assert.equal(r.device.stats.ok, REQUESTS);
});
