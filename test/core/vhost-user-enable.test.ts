import { test } from "node:test";
import assert from "node:assert/strict";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { VhostUserBackend } from "../../src/core/vhost-user/backend.js";
import { VhostUserError, encodeSingleRegion, encodeU64, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION } from "../../src/core/vhost-user/protocol.js";
import { FakeFd, fakePlatform } from "./fake-platform.js";

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
  assert.throws(
    () => enable(be, 0),
    (e: unknown) => e instanceof VhostUserError && e.code === "WRONG_STATE",
  );
});

test("ADD_MEM_REG of a region already mapped is counted, not refused (one vhost_dev per virtio-net queue pair); REM_MEM_REG unmaps it after the last", () => {
  const buf = new ArrayBuffer(1 << 16);
  const be = new VhostUserBackend(new BlkDevice({ port: new RamDisk(1 << 20) }), fakePlatform(new Map()));
  const ack = (request: number, payload: Uint8Array, fds: FakeFd[] = []): bigint => {
    const out = be.handle({ request, flags: VERSION | FLAG_NEED_REPLY, size: payload.length }, payload, fds);
    return new DataView(out[0]!.bytes.buffer, out[0]!.bytes.byteOffset + 12).getBigUint64(0, true);
  };
  const pf = (1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.CONFIGURE_MEM_SLOTS));
  be.handle({ request: Req.SET_PROTOCOL_FEATURES, flags: VERSION, size: 8 }, encodeU64(pf), []);
  const region = encodeSingleRegion({ guestAddr: 0, size: buf.byteLength, userAddr: 0x7000_0000, mmapOffset: 0 });
  const first = new FakeFd(buf);
  const second = new FakeFd(buf);
  assert.equal(ack(Req.ADD_MEM_REG, region, [first]), 0n);
  assert.equal(ack(Req.ADD_MEM_REG, region, [second]), 0n, "the same region again is accepted");
  assert.equal(second.closed, true, "its fd is not kept");
  assert.equal(first.closed, false);
  be.memory.writeU32(0x100, 0xabcd);
  // A region that overlaps without being the same is still refused.
  const other = encodeSingleRegion({ guestAddr: 0x10000, size: buf.byteLength, userAddr: 0x7000_8000, mmapOffset: 0 });
  assert.equal(ack(Req.ADD_MEM_REG, other, [new FakeFd(buf)]), 1n);
  assert.equal(ack(Req.REM_MEM_REG, region), 0n);
  assert.equal(first.closed, false, "one ADD still stands: the region stays mapped");
  assert.equal(be.memory.readU32(0x100), 0xabcd);
  assert.equal(ack(Req.REM_MEM_REG, region), 0n);
  assert.equal(first.closed, true, "the last REM_MEM_REG unmaps it");
  assert.throws(() => be.memory.readU32(0x100));
});
