import { test } from "node:test";
import assert from "node:assert/strict";
import { createNetPair } from "../../src/core/loopback/index.js";
import { RxBatch } from "../../src/core/virtio/devices/net/batch.js";
import { VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_OK } from "../../src/core/virtio/devices/net/constants.js";
import { features } from "../../src/core/virtio/lifecycle/features.js";

// Devices that share an RxBatch publish packets received during a transmit
// pass when the pass ends, as one burst, instead of packet by packet.

function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function frame(n: number, seed: number): Uint8Array {
  const f = new Uint8Array(n).fill(seed);
  f.set([0x02, 0, 0, 0, 0, 0x02], 0); // to the device's station address (unicast)
  return f;
}

for (const layout of ["split", "packed"] as const) {
  test(`received packets wait for the end of an open batch pass, then reach the driver together, in order (${layout})`, async () => {
    const batch = new RxBatch();
    const p = createNetPair({ device: { rxBatch: batch }, driver: { preferPacked: layout === "packed" } });
    const rx: Uint8Array[] = [];
    p.driver.onFrame = (f) => rx.push(f);
    let notified = 0;
    const events = p.device.events;
    const used = events.usedBuffer;
    events.usedBuffer = (q) => {
      if (q === 0) notified++;
      used?.(q);
    };
    await tick();
    batch.begin();
    for (let i = 0; i < 5; i++) assert.equal(p.port.inject(frame(60 + i, i + 1)), null);
    await tick();
    assert.equal(rx.length, 0, "nothing is published while the pass is open");
    assert.equal(notified, 0, "and the driver is not interrupted");
    batch.end();
    await tick();
    assert.equal(rx.length, 5, "all five arrive when the pass ends");
    assert.deepEqual(
      rx.map((f) => f.length),
      [60, 61, 62, 63, 64],
    );
    assert.equal(notified, 1, "one notification for the burst, not one per packet");
    // Outside a pass, packets are published at once.
    assert.equal(p.port.inject(frame(70, 9)), null);
    await tick();
    assert.equal(rx.length, 6);
  });
}

test("batch passes nest: only the outermost end publishes", () => {
  const batch = new RxBatch();
  const order: string[] = [] as string[];
  batch.begin();
  batch.begin();
  batch.defer(() => order.push("a"));
  batch.end();
  assert.equal(order.length, 0);
  assert.equal(batch.open, true);
  batch.defer(() => order.push("b"));
  batch.end();
  assert.deepEqual(order, ["a", "b"]);
  assert.equal(batch.open, false);
});

test("a control command leaves a shared batch closed: packets received afterwards still reach the driver", async () => {
  const batch = new RxBatch();
  const p = createNetPair({ device: { rxBatch: batch }, driver: { extra: features(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX) } });
  const rx: Uint8Array[] = [];
  p.driver.onFrame = (f) => rx.push(f);
  await tick();
  assert.equal(p.driver.setPromisc(true), VIRTIO_NET_OK);
  await tick();
  assert.equal(batch.open, false, "the control queue's pass does not leave the batch open");
  assert.equal(p.port.inject(frame(60, 3)), null);
  await tick();
  assert.equal(rx.length, 1);
});
