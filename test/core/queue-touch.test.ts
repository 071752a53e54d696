import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { DescriptorChain, QueueError } from "../../src/core/index.js";
import { createRingPair } from "../../src/core/loopback/index.js";

// DeviceQueue.touchAhead: a read-ahead hint. It reads the first byte of the
// next available buffers (exactly those), changes nothing a pop sees, and
// never throws, whatever the driver wrote.

for (const layout of ["split", "packed"] as const) {
  test(`${layout}: touchAhead reads the first byte of exactly the next available buffers (split: each once), across wraps, and pops are unchanged`, () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: 0, max: 8 }), fc.integer({ min: 0, max: 10 })), { minLength: 1, maxLength: 20 }),
        (rounds) => {
          const r = createRingPair<number>({ layout, size: 8 });
          const chain = new DescriptorChain();
          let token = 0;
          const firstBytes: number[] = []; // of the buffers available and not popped, in order
          let touched = 0; // split: how many of those were read ahead already
          for (const [adds, count] of rounds) {
            for (let i = 0; i < adds; i++) {
              const addr = r.dataBase + 0x40 * (token % 64);
              const byte = (token * 37 + 11) & 0xff;
              r.mem.writeU8(addr, byte);
              if (!r.driver.add([{ addr, len: 64, writable: true }], token)) break;
              firstBytes.push(byte);
              token++;
            }
            r.driver.publish();
            // Split rings read each buffer ahead once (until it is popped); packed rings the first `count` each time.
            const from = layout === "split" ? Math.min(touched, count) : 0;
            const want = firstBytes.slice(from, count).reduce((x, b) => x ^ b, 0);
            assert.equal(r.device.touchAhead!(count), want);
            if (layout === "split") touched = Math.max(touched, Math.min(count, firstBytes.length));
            // Use half of what is there; the rest stays for the next round.
            const use = Math.ceil(firstBytes.length / 2);
            touched = Math.max(0, touched - use);
            for (let i = 0; i < use; i++) {
              assert.ok(r.device.popInto(chain));
              assert.equal(r.mem.readU8(chain.addr(0)), firstBytes.shift());
              r.device.pushUsed(chain.head, 0, chain.descCount);
            }
            r.device.publishUsed();
            r.driver.drainUsed(() => {});
          }
        },
      ),
      { numRuns: 100 },
    );
  });

  test(`${layout}: touchAhead over hostile descriptors (address outside memory, bad head) reads nothing there and throws nothing; popInto still reports them`, () => {
    const r = createRingPair<number>({ layout, size: 8 });
    assert.ok(r.driver.add([{ addr: r.dataBase, len: 64, writable: true }], 1));
    r.driver.publish();
    const s = r.state;
    // The descriptor's address moved far outside guest memory.
    r.mem.writeU64(s.descTable, 2 ** 50);
    if (layout === "split") r.mem.writeU16(s.driverArea + 4, 200); // and the avail ring's head past the table
    assert.equal(r.device.touchAhead!(8), 0);
    assert.throws(() => r.device.popInto(new DescriptorChain()), QueueError);
  });
}
