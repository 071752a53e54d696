import { test } from "node:test";
import assert from "node:assert/strict";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { VhostUserBackend } from "../../src/core/vhost-user/backend.js";
import { VhostUserError, encodeU64, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION } from "../../src/core/vhost-user/protocol.js";
import { fakePlatform } from "./fake-platform.js";

function backend(): VhostUserBackend<unknown> {
  const device = new BlkDevice({ port: new RamDisk(1 << 20) });
  return new VhostUserBackend(device, fakePlatform(new Map()) as never);
}

function enable(be: VhostUserBackend<unknown>, index: number): void {
  const p = encodeVringState({ index, num: 0 });
  be.handle({ request: Req.SET_VRING_ENABLE, flags: VERSION, size: p.length }, p, []);
}

test("SET_VRING_ENABLE is accepted after SET_PROTOCOL_FEATURES, before SET_FEATURES (QEMU vhost-user-net's order)", () => {
  const be = backend();
  const f = encodeU64(1n << BigInt(PF.REPLY_ACK));
  be.handle({ request: Req.SET_PROTOCOL_FEATURES, flags: VERSION, size: 8 }, f, []);
  enable(be, 0);
  const p = encodeVringState({ index: 0, num: 1 });
  const out = be.handle({ request: Req.SET_VRING_ENABLE, flags: VERSION | FLAG_NEED_REPLY, size: p.length }, p, []);
  assert.equal(new DataView(out[0]!.bytes.buffer, out[0]!.bytes.byteOffset + 12).getBigUint64(0, true), 0n);
});

test("SET_VRING_ENABLE is refused when the front end never used protocol features", () => {
  const be = backend();
  assert.throws(() => enable(be, 0), (e: unknown) => e instanceof VhostUserError && e.code === "WRONG_STATE");
});
