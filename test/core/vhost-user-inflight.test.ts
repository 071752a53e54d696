import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk, type BlockPort } from "../../src/core/virtio/devices/blk/port.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import { VhostUserBackend } from "../../src/core/vhost-user/backend.js";
import { FakeFd, fakePlatform } from "./fake-platform.js";
import {
  decodeInflight,
  decodeVringState,
  encodeInflight,
  encodeMemTable,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  type Header,
} from "../../src/core/vhost-user/codec.js";
import type { QueueState } from "../../src/core/virtio/queue/state.js";
import { FLAG_NEED_REPLY, PF, Req, VERSION } from "../../src/core/vhost-user/protocol.js";

// "A restarted back end resumes without losing I/O": back end A dies with
// requests in flight; back end B gets the same in-flight area (SET_INFLIGHT_FD)
// and the ring base QEMU sends after a crash (its used idx), resubmits exactly
// the lost requests, and every request completes once with its data on disk.

/** A port whose writes wait until the test lets them finish. */
class StallingPort implements BlockPort {
  readonly pending: (() => void)[] = [];
  constructor(readonly disk: RamDisk) {}
  get sizeBytes(): number {
    return this.disk.sizeBytes;
  }
  read(offset: number, dst: Uint8Array): Promise<void> {
    return new Promise((r) => this.pending.push(() => (this.disk.read(offset, dst), r())));
  }
  write(offset: number, src: Uint8Array): Promise<void> {
    const copy = src.slice();
    return new Promise((r) => this.pending.push(() => (this.disk.write(offset, copy), r())));
  }
  flush(): void {}
}

const UA = 0x5000_0000;
const QSIZE = 32;
const guestBuf = new ArrayBuffer(1 << 20);
const guestFd = new FakeFd(guestBuf);
const mem = new GuestMemory([{ gpa: 0, size: guestBuf.byteLength, buffer: guestBuf }]);

function msg(
  be: VhostUserBackend<FakeFd>,
  request: number,
  payload: Uint8Array = new Uint8Array(0),
  fds: FakeFd[] = [],
): Uint8Array | null {
  const h: Header = { request, flags: VERSION | FLAG_NEED_REPLY, size: payload.length };
  const out = be.handle(h, payload, fds);
  const reply = out[0];
  if (reply === undefined) return null;
  const body = reply.bytes.subarray(12);
  if (request === Req.GET_INFLIGHT_FD) {
    inflightFd = reply.fds[0]!;
    return body;
  }
  return body;
}
let inflightFd: FakeFd | null = null;

function ack(be: VhostUserBackend<FakeFd>, request: number, payload?: Uint8Array, fds: FakeFd[] = []): void {
  const r = msg(be, request, payload, fds);
  assert.ok(r !== null && new DataView(r.buffer, r.byteOffset).getBigUint64(0, true) === 0n, `request ${request} acknowledged`);
}

/** The set-up QEMU does on (re)connect, with the ring base it would send. */
function connect(
  be: VhostUserBackend<FakeFd>,
  kicks: Map<FakeFd, () => void>,
  base: number,
  fresh: boolean,
  state: QueueState,
): () => void {
  be.handle(
    { request: Req.SET_PROTOCOL_FEATURES, flags: VERSION, size: 8 },
    encodeU64((1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.INFLIGHT_SHMFD))),
    [],
  );
  ack(be, Req.SET_FEATURES, encodeU64((1n << 32n) | (1n << 30n) | (state.layout === "packed" ? 1n << 34n : 0n)));
  if (fresh) {
    const d = decodeInflight(
      Req.GET_INFLIGHT_FD,
      msg(be, Req.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: QSIZE }))!,
    );
    assert.ok(d.mmapSize > 0);
  }
  ack(be, Req.SET_INFLIGHT_FD, encodeInflight({ mmapSize: inflightFd!.buffer.byteLength, mmapOffset: 0, numQueues: 1, queueSize: QSIZE }), [
    inflightFd!,
  ]);
  ack(be, Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: guestBuf.byteLength, userAddr: UA, mmapOffset: 0 }]), [guestFd]);
  ack(be, Req.SET_VRING_NUM, encodeVringState({ index: 0, num: QSIZE }));
  ack(be, Req.SET_VRING_BASE, encodeVringState({ index: 0, num: base }));
  ack(
    be,
    Req.SET_VRING_ADDR,
    encodeVringAddr({ index: 0, flags: 0, desc: UA + state.descTable, used: UA + state.deviceArea, avail: UA + state.driverArea, log: 0 }),
  );
  const kick = new FakeFd(new ArrayBuffer(8));
  ack(be, Req.SET_VRING_KICK, encodeU64(0), [kick]);
  ack(be, Req.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
  return () => kicks.get(kick)!();
}

for (const layout of ["split", "packed"] as const) {
  test(`a back end restarted with requests in flight resubmits exactly those, and none is lost or doubled (${layout} ring)`, async () => {
    const { state } = layoutQueue(layout, QSIZE, 0x1000);
    mem.fill(0x1000, 0xf000, 0);
    const disk = new RamDisk(1 << 20);
    const driver = createDriverQueue<number>(mem, state, { indirect: false, eventIdx: false, inOrder: false });
    // Six 512-byte writes to sectors 0..5, each a distinct byte value.
    const submit = (k: number): void => {
      const hdr = 0x10000 + k * 0x1000;
      mem.writeU32(hdr, 1); // VIRTIO_BLK_T_OUT
      mem.writeU32(hdr + 4, 0);
      mem.writeU64(hdr + 8, k);
      mem.fill(hdr + 0x200, 512, 0xa0 + k);
      mem.writeU8(hdr + 0x100, 0xff);
      assert.ok(
        driver.add(
          [
            { addr: hdr, len: 16, writable: false },
            { addr: hdr + 0x200, len: 512, writable: false },
            { addr: hdr + 0x100, len: 1, writable: true },
          ],
          k,
        ),
      );
    };
    const done: number[] = [];
    const drain = (): number => driver.drainUsed((k) => done.push(k));

    // Back end A: takes all six, finishes two out of order, then dies.
    const kicksA = new Map<FakeFd, () => void>();
    const portA = new StallingPort(disk);
    const a = new VhostUserBackend(new BlkDevice({ port: portA, queueSize: QSIZE }), fakePlatform(kicksA), { pollNs: 0 });
    const kickA = connect(a, kicksA, layout === "split" ? 0 : 0x80008000, true, state);
    for (let k = 0; k < 6; k++) submit(k);
    driver.publish();
    kickA();
    assert.equal(portA.pending.length, 6, "A popped all six");
    portA.pending[3]!();
    portA.pending[1]!();
    await new Promise((r) => setTimeout(r, 0));
    assert.equal(drain(), 2);
    assert.deepEqual(done.sort(), [1, 3]);
    // What QEMU sends after a crash: its used position (split: used idx; packed: offset | wrap << 15 in both halves).
    const usedIdx = layout === "split" ? mem.readU16(state.deviceArea + 2) : 6 | 0x8000 | ((6 | 0x8000) << 16);
    if (layout === "split") assert.equal(usedIdx, 2);

    // Back end B: QEMU reconnects and, after a crash, sends its used idx as the ring base.
    const kicksB = new Map<FakeFd, () => void>();
    const b = new VhostUserBackend(new BlkDevice({ port: disk, queueSize: QSIZE }), fakePlatform(kicksB), { pollNs: 0 });
    const kickB = connect(b, kicksB, usedIdx >>> 0, false, state);
    assert.equal(drain(), 4, "the four lost requests were resubmitted and completed");
    assert.deepEqual(done.sort(), [0, 1, 2, 3, 4, 5]);
    for (let k = 0; k < 6; k++) {
      const sector = new Uint8Array(512);
      disk.read(k * 512, sector);
      assert.ok(
        sector.every((v) => v === 0xa0 + k),
        `sector ${k} holds request ${k}'s data`,
      );
      assert.equal(mem.readU8(0x10000 + k * 0x1000 + 0x100), 0, `request ${k} status OK`);
    }
    // New requests after the restart are served from where the ring really is.
    submit(6);
    driver.publish();
    kickB();
    assert.equal(drain(), 1);
    assert.deepEqual(done.sort(), [0, 1, 2, 3, 4, 5, 6]);
    // GET_VRING_BASE reports the ring position after everything.
    const base = decodeVringState(Req.GET_VRING_BASE, msg(b, Req.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }))!);
    assert.equal(base.num, layout === "split" ? 7 : (21 | 0x8000 | ((21 | 0x8000) << 16)) >>> 0);
  });
}
