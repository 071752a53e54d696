import { test } from "node:test";
import assert from "node:assert/strict";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { VhostUserBackend } from "../../src/core/vhost-user/backend.js";
import type { ExternalRings } from "../../src/core/vhost-user/external.js";
import { encodeLogBase, encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { VIRTIO_F_VERSION_1 } from "../../src/core/virtio/lifecycle/features.js";
import type { QueueState } from "../../src/core/virtio/queue/index.js";
import { FakeFd, fakePlatform } from "./fake-platform.js";

// VhostUserBackend's hook for a data path outside JavaScript (vDPA): which
// messages reach it, and that what it marks while dirty logging switches on
// reaches the front end's bitmap.

const USER = 0x7000_0000;
const BASE_FEATURES = (1n << BigInt(VIRTIO_F_VERSION_1)) | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));

class Outside implements ExternalRings<FakeFd> {
  calls: string[] = [];
  refuse: string | null = null;
  /** What logging(true) marks, as the vDPA bridge marks buffers in flight while it switches. */
  markOnSwitch: (() => void) | null = null;
  start(i: number, state: QueueState): boolean {
    this.calls.push(`start ${i} at ${state.nextAvail}`);
    return true;
  }
  callChanged(i: number): void {
    this.calls.push(`call ${i}`);
  }
  stop(i: number): QueueState {
    this.calls.push(`stop ${i}`);
    return {
      layout: "split",
      size: 16,
      descTable: 0x1000,
      driverArea: 0x2000,
      deviceArea: 0x3000,
      nextAvail: 7,
      nextUsed: 7,
      availWrap: true,
      usedWrap: true,
    };
  }
  logging(on: boolean): string | null {
    this.calls.push(`logging ${on}`);
    if (this.refuse !== null) return this.refuse;
    if (on) this.markOnSwitch?.();
    return null;
  }
  memoryChanged(): void {
    this.calls.push("memory");
  }
}

function rig(): {
  be: VhostUserBackend<FakeFd>;
  out: Outside;
  kicks: Map<FakeFd, () => void>;
  send: (req: number, p?: Uint8Array, fds?: FakeFd[]) => bigint | null;
} {
  const kicks = new Map<FakeFd, () => void>();
  const out = new Outside();
  const be = new VhostUserBackend(new BlkDevice({ port: new RamDisk(1 << 20) }), fakePlatform(kicks), { externalRings: out });
  /** Sends with NEED_REPLY; returns the ack (or the reply's u64), null when there is none. */
  const send = (request: number, p: Uint8Array = new Uint8Array(0), fds: FakeFd[] = []): bigint | null => {
    const r = be.handle({ request, flags: VERSION | FLAG_NEED_REPLY, size: p.length }, p, fds);
    if (r.length === 0) return null;
    return new DataView(r[0]!.bytes.buffer, r[0]!.bytes.byteOffset + 12).getBigUint64(0, true);
  };
  send(Req.SET_PROTOCOL_FEATURES, encodeU64((1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.LOG_SHMFD))));
  send(Req.SET_FEATURES, encodeU64(BASE_FEATURES));
  const mem = new FakeFd(new ArrayBuffer(1 << 16));
  send(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: 1 << 16, userAddr: USER, mmapOffset: 0 }]), [mem]);
  send(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 16 }));
  send(
    Req.SET_VRING_ADDR,
    encodeVringAddr({ index: 0, flags: 0, desc: USER + 0x1000, avail: USER + 0x2000, used: USER + 0x3000, log: 0x3000 }),
  );
  return { be, out, kicks, send };
}

test("a ring served outside: started there, its kick fd not watched, its call fd passed on, stopped there with its position", () => {
  const { out, kicks, send } = rig();
  const kick = new FakeFd(new ArrayBuffer(8));
  assert.equal(send(Req.SET_VRING_KICK, encodeU64(0), [kick]), 0n);
  assert.equal(kicks.size, 0, "the back end does not watch a kick fd the data path outside took");
  assert.equal(send(Req.SET_VRING_CALL, encodeU64(0), [new FakeFd(new ArrayBuffer(8))]), 0n);
  assert.equal(send(Req.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 })), (7n << 32n) | 0n, "reply: ring 0, base 7");
  assert.deepEqual(
    out.calls,
    ["memory", "memory", "start 0 at 0", "call 0", "stop 0"],
    "memory: the empty table at construction, then SET_MEM_TABLE",
  );
});

test("marks the data path outside makes while logging switches on reach the bitmap; a refusal changes nothing", () => {
  const { be, out, send } = rig();
  send(Req.SET_VRING_KICK, encodeU64(0), [new FakeFd(new ArrayBuffer(8))]);
  const bitmap = new FakeFd(new ArrayBuffer(8));
  assert.equal(send(Req.SET_LOG_BASE, encodeLogBase({ size: 8, offset: 0 }), [bitmap]), 0n);
  out.refuse = "not now";
  assert.equal(send(Req.SET_FEATURES, encodeU64(BASE_FEATURES | (1n << BigInt(VHOST_F_LOG_ALL)))), 1n, "refused: nack");
  assert.equal(be.dirtyLog.enabled, false);
  out.refuse = null;
  out.markOnSwitch = () => be.dirtyLog.mark(0x5000, 1);
  assert.equal(send(Req.SET_FEATURES, encodeU64(BASE_FEATURES | (1n << BigInt(VHOST_F_LOG_ALL)))), 0n);
  assert.equal(new Uint8Array(bitmap.buffer)[0], 1 << 5, "page 5, marked during the switch, is in the front end's bitmap");
  assert.equal(send(Req.SET_FEATURES, encodeU64(BASE_FEATURES)), 0n);
  assert.deepEqual(
    out.calls.filter((c) => c.startsWith("logging")),
    ["logging true", "logging true", "logging false"],
  );
});
