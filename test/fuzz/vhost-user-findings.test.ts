import { test } from "node:test";
import assert from "node:assert/strict";
import { encodeInflight, encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { VIRTIO_F_VERSION_1 } from "../../src/core/virtio/lifecycle/features.js";
import type { FdSpec, Step } from "../../fuzz/vhost-user/case.js";
import { FakeSysError, patched } from "../../fuzz/vhost-user/fake-platform.js";
import { VuRunner } from "../../fuzz/vhost-user/run.js";

// Back-end bugs the vhost-user fuzzer found, as readable message sequences.
// VuRunner checks fd/mapping discipline with its fake platform.

const USER = 0x7f00_0000_0000;
const RAM = 0x1_0000;

function msg(request: number, payload: Uint8Array = new Uint8Array(0), fds: FdSpec[] = []): Step {
  return { kind: "msg", request, flags: VERSION | FLAG_NEED_REPLY, payload, fds };
}

function table(userAddr: number): Step {
  return msg(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: RAM, userAddr, mmapOffset: 0 }]), [{ kind: "memfd", size: RAM }]);
}

/** Negotiation, memory at USER, ring 0 of size 8 started. */
function running(): Step[] {
  const features = (1n << BigInt(VIRTIO_F_VERSION_1)) | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));
  return [
    msg(Req.SET_PROTOCOL_FEATURES, encodeU64(1n << BigInt(PF.REPLY_ACK))),
    msg(Req.SET_FEATURES, encodeU64(features)),
    table(USER),
    msg(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 8 })),
    msg(
      Req.SET_VRING_ADDR,
      encodeVringAddr({ index: 0, flags: 0, desc: USER + 0x1000, used: USER + 0x1100, avail: USER + 0x1080, log: 0 }),
    ),
    msg(Req.SET_VRING_KICK, encodeU64(0), [{ kind: "eventfd" }]),
  ];
}

test("a memory table on which a running ring cannot restart is refused without closing its fds twice", () => {
  // The new table moves guest RAM to another user address, so the ring's addresses no longer
  // translate: the table is installed, the restart fails, and handle() used to close the
  // installed region's fd, which close() (or the next table) closed again.
  const r = new VuRunner().run({ strategy: "test", seed: 0, queues: 1, steps: [...running(), table(USER + 0x100_0000)] });
  assert.equal(r.finding, null);
});

test("a platform call the OS refuses is a VhostUserError, not the platform's error", () => {
  const enomem = (): never => {
    throw new FakeSysError("ENOMEM", "planted");
  };
  const cases = [
    { patch: { mmap: enomem }, steps: running().slice(0, 3), code: "MMAP_FAILED" },
    { patch: { fileInfo: enomem }, steps: running().slice(0, 3), code: "FSTAT_FAILED" },
    {
      patch: { createShared: enomem },
      steps: [
        msg(Req.SET_PROTOCOL_FEATURES, encodeU64(1n << BigInt(PF.INFLIGHT_SHMFD))),
        msg(Req.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 8 })),
      ],
      code: "SHM_FAILED",
    },
  ];
  for (const { patch, steps, code } of cases) {
    const run = new VuRunner((fake) => patched(fake, patch));
    const last = steps.length - 1;
    const noAck = steps.map((s, i) => (i === last && s.kind === "msg" ? { ...s, flags: VERSION } : s));
    assert.deepEqual(run.run({ strategy: "test", seed: 0, queues: 1, steps: noAck }), { finding: null, outcome: code });
  }
});
