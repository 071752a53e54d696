import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { DmaAllocator } from "../../src/core/virtio/driver/dma.js";
import { NvmeController } from "../../src/core/nvme/controller.js";
import { NvmeControllerError, NvmeDeviceError, NvmeStatusError, NvmeTimeoutError } from "../../src/core/nvme/errors.js";
import { NVM } from "../../src/core/nvme/constants.js";
import { NvmeModel } from "./nvme-model.js";
import {
  encodeControllerList,
  parseControllerList,
  parseNamespaceList,
  parsePrimaryCapabilities,
  parseSecondaryControllers,
} from "../../src/core/nvme/identify.js";

// iovirt's NVMe driver against a controller model (test/core/nvme-model.ts):
// the init sequence, queues, PRP lists, the NVM commands, and a controller
// that lies: wrong phase tags, unknown and duplicate command ids, absurd
// identify data, commands never completed, a fatal status.

interface Rig {
  model: NvmeModel;
  ctl: NvmeController;
  mem: GuestMemory;
  dma: DmaAllocator;
  errors: Error[];
  stop: () => void;
}

async function rig(timeoutMs = 30_000, opts: { sgl?: boolean } = {}): Promise<Rig> {
  const mem = GuestMemory.create(8 << 20);
  const dma = new DmaAllocator(0x10000, (8 << 20) - 0x10000);
  const model = new NvmeModel(mem);
  if (opts.sgl === true) model.knobs.sgl = true;
  const ctl = new NvmeController(
    { regs: model, mem, dma, delay: (ms) => new Promise((r) => setTimeout(r, ms)), now: () => performance.now() },
    { commandTimeoutMs: timeoutMs },
  );
  const errors: Error[] = [];
  ctl.onDeviceError = (e) => errors.push(e);
  // What the node glue does: completions from interrupts (here a fast poll), timeouts from a timer.
  const poll = setInterval(() => {
    ctl.processCompletions();
    ctl.checkTimeouts();
  }, 2);
  await ctl.enable();
  return { model, ctl, mem, dma, errors, stop: () => clearInterval(poll) };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

async function writeRead(r: Rig, qid: number, lba: number, data: Uint8Array): Promise<Uint8Array> {
  const blocks = data.length / 512;
  const buf = r.dma.alloc(data.length, 4096);
  try {
    r.mem.write(buf, data);
    await r.ctl.write(qid, 1, lba, blocks, buf, data.length);
    r.mem.fill(buf, data.length, 0);
    await r.ctl.read(qid, 1, lba, blocks, buf, data.length);
    const out = new Uint8Array(data.length);
    r.mem.read(buf, out);
    return out;
  } finally {
    r.dma.release(buf);
  }
}

test("enable: identify controller and namespace, checked; the transfer limit follows MDTS", async () => {
  const r = await rig();
  try {
    assert.equal(r.ctl.identity!.model, "iovirt test model");
    assert.equal(r.ctl.identity!.serial, "MODEL-SN-1");
    assert.equal(r.ctl.maxTransfer, 32 * 4096); // MDTS 5 with 4 KiB pages
    assert.deepEqual(await r.ctl.activeNamespaces(), [1]);
    const ns = await r.ctl.namespace(1);
    assert.equal(ns.blockSize, 512);
    assert.equal(ns.size, 4096);
  } finally {
    r.stop();
  }
});

test("I/O queues: writes and reads through one page, two pages and a PRP list; many commands wrap the queues; flush, write zeroes, deallocate; queues deleted and created again", async () => {
  const r = await rig();
  try {
    assert.equal(await r.ctl.createIoQueues(2, 16), 2);
    for (const [bytes, qid] of [
      [512, 1],
      [8192, 2],
      [128 * 1024, 1],
    ] as const) {
      const data = pattern(bytes, bytes);
      assert.deepEqual(await writeRead(r, qid, 8, data), data, `${bytes} bytes`);
      assert.deepEqual(r.model.disk.subarray(8 * 512, 8 * 512 + bytes), data);
    }
    // 100 commands on a 16-entry queue, 40 in flight at once: submissions wait for slots.
    const bufs = Array.from({ length: 40 }, () => r.dma.alloc(4096, 4096));
    for (let round = 0; round < 3; round++) {
      bufs.forEach((b, i) => r.mem.write(b, pattern(4096, round * 100 + i)));
      await Promise.all(bufs.map((b, i) => r.ctl.write(1 + (i % 2), 1, 64 + 8 * i, 8, b, 4096)));
    }
    for (let i = 0; i < 40; i++) assert.deepEqual(r.model.disk.subarray((64 + 8 * i) * 512, (72 + 8 * i) * 512), pattern(4096, 200 + i));
    await r.ctl.flush(1, 1);
    await r.ctl.writeZeroes(1, 1, 64, 8);
    assert.ok(r.model.disk.subarray(64 * 512, 72 * 512).every((b) => b === 0));
    await r.ctl.deallocate(2, 1, 72, 8);
    assert.ok(r.model.disk.subarray(72 * 512, 80 * 512).every((b) => b === 0));
    assert.deepEqual(r.errors, []);
    assert.equal(r.ctl.outstanding, 0);
    // Delete I/O SQ before its CQ, highest queue first; then the queues are gone.
    await r.ctl.deleteIoQueues();
    assert.deepEqual(
      r.model.log.filter((l) => l.startsWith("delete")),
      ["delete sq 2", "delete cq 2", "delete sq 1", "delete cq 1"],
    );
    assert.equal(r.ctl.ioQueues, 0);
    await assert.rejects(r.ctl.flush(1, 1), (e) => e instanceof NvmeControllerError && e.code === "NVME_NO_QUEUE");
    assert.equal(await r.ctl.createIoQueues(1, 16), 1);
    await r.ctl.flush(1, 1);
  } finally {
    r.stop();
  }
});

test("a controller that supports SGLs gets one SGL data block per read and write instead of PRPs", async () => {
  const r = await rig(30_000, { sgl: true });
  try {
    assert.equal(r.ctl.usesSgl, true);
    await r.ctl.createIoQueues(1, 16);
    const data = pattern(128 * 1024, 11);
    assert.deepEqual(await writeRead(r, 1, 32, data), data);
    assert.equal(r.model.sglUsed, 2);
    assert.deepEqual(r.model.disk.subarray(32 * 512, 32 * 512 + data.length), data);
  } finally {
    r.stop();
  }
});

test("a failed command rejects with its status; bad arguments are refused before anything is submitted", async () => {
  const r = await rig();
  try {
    await r.ctl.createIoQueues(1, 16);
    const buf = r.dma.alloc(4096, 4096);
    await assert.rejects(
      r.ctl.read(1, 1, 4095, 8, buf, 4096),
      (e) => e instanceof NvmeStatusError && e.sc === 0x80 && /LBA out of range/.test(e.message),
    );
    assert.throws(() => r.ctl.read(1, 1, 0, 8, buf + 2, 4096), RangeError);
    assert.throws(() => r.ctl.read(1, 1, 0, 512, buf, 256 * 1024), /at most 131072/);
    await assert.rejects(r.ctl.read(7, 1, 0, 8, buf, 4096), (e) => e instanceof NvmeControllerError && e.code === "NVME_NO_QUEUE");
  } finally {
    r.stop();
  }
});

test("hostile: completions with the wrong phase tag are not taken; the command times out instead of hanging", async () => {
  const r = await rig(200);
  try {
    await r.ctl.createIoQueues(1, 16);
    r.model.knobs.wrongPhase = true;
    const buf = r.dma.alloc(4096, 4096);
    await assert.rejects(r.ctl.read(1, 1, 0, 8, buf, 4096), NvmeTimeoutError);
    assert.equal(r.ctl.stats.completions, 4); // identify, set features, create CQ, create SQ
    assert.ok(r.ctl.stats.timeouts >= 1);
  } finally {
    r.stop();
  }
});

test("hostile: a completion for a command id that is not outstanding is refused and reported; so is the second of a duplicate", async () => {
  const r = await rig(300);
  try {
    await r.ctl.createIoQueues(1, 16);
    const buf = r.dma.alloc(4096, 4096);
    r.model.knobs.duplicate = true;
    const data = pattern(4096, 5);
    assert.deepEqual(await writeRead(r, 1, 0, data), data);
    assert.equal(r.ctl.stats.badCompletions, 2);
    assert.ok(r.errors.every((e) => e instanceof NvmeDeviceError && e.code === "NVME_UNKNOWN_CID"));
    r.model.knobs.duplicate = false;
    r.model.knobs.foreignCid = 999;
    await assert.rejects(r.ctl.read(1, 1, 0, 8, buf, 4096), NvmeTimeoutError);
    assert.equal(r.ctl.stats.badCompletions, 3);
  } finally {
    r.stop();
  }
});

test("hostile: identify namespace with an absurd block size is a typed error, not a value", async () => {
  const r = await rig();
  try {
    r.model.knobs.lbads = 40;
    await assert.rejects(r.ctl.namespace(1), (e) => e instanceof NvmeDeviceError && /2\^40/.test(e.message));
  } finally {
    r.stop();
  }
});

test("a command the controller never completes: it times out, the driver aborts it; others go on", async () => {
  const r = await rig(300);
  try {
    await r.ctl.createIoQueues(1, 16);
    r.model.knobs.silentIo = new Set([NVM.FLUSH]);
    await assert.rejects(r.ctl.flush(1, 1), NvmeTimeoutError);
    for (let i = 0; i < 50 && !r.model.log.some((l) => l.startsWith("abort")); i++) await new Promise((res) => setTimeout(res, 10));
    assert.ok(
      r.model.log.some((l) => /^abort cid \d+ sq 1$/.test(l)),
      r.model.log.join("\n"),
    );
    const data = pattern(4096, 9);
    assert.deepEqual(await writeRead(r, 1, 16, data), data);
  } finally {
    r.stop();
  }
});

test("controller fatal status: commands in flight fail, the controller is reset and its I/O queues come back", async () => {
  const r = await rig();
  try {
    await r.ctl.createIoQueues(2, 16);
    const resets: string[] = [];
    r.ctl.onReset = (why) => resets.push(why);
    r.model.knobs.fatalAfterIo = true;
    const data = pattern(4096, 3);
    const buf = r.dma.alloc(4096, 4096);
    r.mem.write(buf, data);
    await r.ctl.write(1, 1, 0, 8, buf, 4096); // completes, then CFS
    r.model.knobs.fatalAfterIo = false;
    for (let i = 0; i < 200 && resets.length === 0; i++) await new Promise((res) => setTimeout(res, 5));
    assert.deepEqual(resets, ["controller fatal status (CSTS.CFS)"]);
    assert.equal(r.ctl.ioQueues, 2);
    assert.deepEqual(await writeRead(r, 2, 0, data), data);
    assert.ok(r.errors.some((e) => e instanceof NvmeControllerError && e.code === "NVME_CFS"));
  } finally {
    r.stop();
  }
});

test("identify data for SR-IOV and namespaces is decoded and checked: primary capabilities, secondary controllers, namespace and controller lists", () => {
  const page = (): { b: Uint8Array; v: DataView } => {
    const b = new Uint8Array(4096);
    return { b, v: new DataView(b.buffer) };
  };
  const p = page();
  p.v.setUint16(0, 0, true);
  p.b[4] = 3;
  p.v.setUint32(32, 4, true);
  p.v.setUint32(36, 2, true);
  p.v.setUint16(40, 1, true);
  p.v.setUint16(42, 5, true);
  p.v.setUint16(44, 2, true);
  p.v.setUint32(64, 2, true);
  p.v.setUint16(74, 63, true);
  p.v.setUint16(76, 1, true);
  const caps = parsePrimaryCapabilities(p.b);
  assert.deepEqual(
    [caps.crt, caps.vqFlexibleTotal, caps.vqFlexibleOnSecondaries, caps.vqFlexibleOnPrimary, caps.vqPrivate, caps.vqMaxPerSecondary],
    [3, 4, 2, 1, 5, 2],
  );
  assert.deepEqual([caps.viFlexibleTotal, caps.viPrivate, caps.viMaxPerSecondary], [2, 63, 1]);
  const s = page();
  s.b[0] = 2;
  for (const [i, [scid, online, vf, vq, vi]] of [
    [1, 1, 1, 2, 1],
    [2, 0, 2, 0, 0],
  ].entries()) {
    const at = 32 + 32 * i;
    s.v.setUint16(at, scid!, true);
    s.b[at + 4] = online!;
    s.v.setUint16(at + 8, vf!, true);
    s.v.setUint16(at + 10, vq!, true);
    s.v.setUint16(at + 12, vi!, true);
  }
  assert.deepEqual(parseSecondaryControllers(s.b), [
    { scid: 1, pcid: 0, online: true, vfNumber: 1, vq: 2, vi: 1 },
    { scid: 2, pcid: 0, online: false, vfNumber: 2, vq: 0, vi: 0 },
  ]);
  s.b[0] = 200;
  assert.throws(() => parseSecondaryControllers(s.b), NvmeDeviceError);
  const l = page();
  l.v.setUint32(0, 1, true);
  l.v.setUint32(4, 3, true);
  assert.deepEqual(parseNamespaceList(l.b, 8), [1, 3]);
  l.v.setUint32(8, 2, true); // out of order
  assert.throws(() => parseNamespaceList(l.b, 8), NvmeDeviceError);
  assert.throws(() => parseNamespaceList(l.b, 2), NvmeDeviceError); // NSID 3 beyond NN 2
  assert.deepEqual(parseControllerList(encodeControllerList([2, 0, 1])), [0, 1, 2]);
});
