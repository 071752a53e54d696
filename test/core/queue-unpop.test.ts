import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { DescriptorChain, type Segment } from "../../src/core/index.js";
import { createRingPair } from "../../src/core/loopback/index.js";

// DeviceQueue.unpop: buffers a device popped and gives back unused become
// available again, exactly as they were, across ring wraps and both layouts.

for (const layout of ["split", "packed"] as const) {
  for (const eventIdx of [false, true]) {
    test(`${layout}${eventIdx ? " + EVENT_IDX" : ""}: unpopped buffers are popped again unchanged and then used normally`, () => {
      fc.assert(
        fc.property(
          fc.array(fc.tuple(fc.integer({ min: 1, max: 6 }), fc.integer({ min: 0, max: 6 })), { minLength: 1, maxLength: 25 }),
          (rounds) => {
            const r = createRingPair<number>({ layout, size: 8, features: { eventIdx } });
            let token = 0;
            const chain = new DescriptorChain();
            for (const [adds, taken] of rounds) {
              // The driver makes `adds` buffers of one to three segments available (as many as fit).
              const made: { token: number; segs: Segment[] }[] = [];
              for (let i = 0; i < adds; i++) {
                const n = 1 + ((token * 7) % 3);
                const segs = Array.from({ length: n }, (_, k) => ({ addr: r.dataBase + 0x100 * k, len: 16 + k, writable: true }));
                if (!r.driver.add(segs, token)) break;
                made.push({ token, segs });
                token++;
              }
              r.driver.publish();
              // The device looks at some of them and gives them back.
              const first: { head: number; segs: string }[] = [];
              let descs = 0;
              for (let i = 0; i < Math.min(taken, made.length) && r.device.popInto(chain); i++) {
                first.push({ head: chain.head, segs: JSON.stringify(segments(chain)) });
                descs += chain.descCount;
              }
              r.device.unpop!(first.length, descs);
              // Popping again finds the same buffers, then uses them all.
              const again: { head: number; segs: string }[] = [];
              let popped = 0;
              while (r.device.popInto(chain)) {
                if (popped < first.length) again.push({ head: chain.head, segs: JSON.stringify(segments(chain)) });
                r.device.pushUsed(chain.head, 0, chain.descCount);
                popped++;
              }
              r.device.publishUsed();
              assert.deepEqual(again, first);
              assert.equal(popped, made.length);
              const back: number[] = [];
              r.driver.drainUsed((t) => back.push(t));
              assert.deepEqual(
                back,
                made.map((m) => m.token),
              );
            }
          },
        ),
        { numRuns: 60 },
      );
    });
  }
}

function segments(c: DescriptorChain): { addr: number; len: number }[] {
  return Array.from({ length: c.count }, (_, i) => ({ addr: c.addr(i), len: c.len(i) }));
}
