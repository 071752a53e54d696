import { test } from "node:test";
import assert from "node:assert/strict";
import { createNetPair } from "../../src/core/loopback/index.js";
import { flowFrame } from "./net-frames.js";

// A guest owns its memory and may rewrite a transmit buffer while the
// device handles it (another vCPU). The device checks and passes on a copy,
// so the port gets exactly what was checked.

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const MIB = 1 << 20;

/** Overwrites every place in guest memory where `bytes` lies, as the guest's other vCPU would. */
function scribble(mem: ReturnType<typeof createNetPair>["mem"], bytes: Uint8Array): number {
  let found = 0;
  mem.forEachView(0, 16 * MIB, (view) => {
    const b = Buffer.from(view.buffer, view.byteOffset, view.length);
    for (let at = b.indexOf(bytes); at >= 0; at = b.indexOf(bytes, at + 1)) {
      view.fill(0xee, at, at + bytes.length);
      found++;
    }
  });
  return found;
}

for (const packed of [false, true]) {
  test(`virtio-net transmit (${packed ? "packed" : "split"}): rewriting the guest's buffer during the port's call changes nothing the port holds`, async () => {
    const p = createNetPair({ driver: { preferPacked: packed } });
    const spec = { proto: "tcp" as const, payload: 1000, seed: 11 };
    const sent = flowFrame(spec);
    let rewritten = 0;
    let intact: boolean | null = null;
    p.port.onTransmit = (frame) => {
      rewritten = scribble(p.mem, sent);
      intact = Buffer.compare(frame, sent) === 0;
    };
    assert.ok(p.driver.send(sent), "sent");
    for (let i = 0; i < 10 && intact === null; i++) await tick();
    assert.ok(rewritten > 0, "the frame was found in guest memory and overwritten");
    assert.equal(intact, true, "the port's frame is the one that was checked, not a view of guest memory");
    assert.equal(p.device.stats.txFrames, 1);
  });
}
