import { test } from "node:test";
import assert from "node:assert/strict";
import { createNetPair } from "../../src/core/loopback/index.js";
import { flowFrame } from "./net-frames.js";
import { encodeHdr, frame, rawTx } from "./net-helpers.js";
import { PLAIN_HDR } from "../../src/core/net/hdr.js";

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

// The device copies a buffer where 64-bit words can move it (at the buffer's offset modulo 8
// when that is 4): every placement and length must still arrive exact.
test("virtio-net transmit: buffers at every offset modulo 8 and of many lengths reach the port exactly", async () => {
  const p = createNetPair({ memoryBytes: 32 * MIB });
  const seen: Uint8Array[] = [];
  p.port.onTransmit = (f) => seen.push(f.slice());
  const sent: Uint8Array[] = [];
  for (let offset = 0; offset < 8; offset++) {
    for (const len of [14, 60, 61, 63, 64, 77, 255, 256, 300, 1514]) {
      const f = frame(len, offset * 1000 + len);
      f[0] = 2; // unicast destination, so nothing reads it as a group address
      f[6] = 2;
      sent.push(f);
      rawTx(p, encodeHdr(PLAIN_HDR), f, 0, offset);
      for (let i = 0; i < 10 && seen.length < sent.length; i++) await tick();
    }
  }
  assert.equal(seen.length, sent.length);
  for (let i = 0; i < sent.length; i++) assert.deepEqual(seen[i], sent[i], `frame ${i}`);
});
