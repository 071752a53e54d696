import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { DmaAllocator } from "../../src/core/virtio/driver/dma.js";
import { NvmeController } from "../../src/core/nvme/controller.js";
import { NvmeBlockPort } from "../../src/node/nvme/block-port.js";
import { NvmeModel } from "../core/nvme-model.js";

// `iovirt blk --nvme`'s storage on the controller model: a request's guest
// buffers split anywhere, and more requests in flight than the DMA memory
// holds (they wait for bounce buffers instead of failing).

async function port(dmaBytes: number): Promise<{ p: NvmeBlockPort; model: NvmeModel; stop: () => void }> {
  const mem = GuestMemory.create(8 << 20);
  const base = 0x10000;
  const dma = new DmaAllocator(base, dmaBytes);
  const model = new NvmeModel(mem);
  const ctl = new NvmeController({
    regs: model,
    mem,
    dma,
    delay: (ms) => new Promise((r) => setTimeout(r, ms)),
    now: () => performance.now(),
  });
  const poll = setInterval(() => ctl.processCompletions(), 1);
  await ctl.enable();
  const queues = await ctl.createIoQueues(2, 16);
  const ns = await ctl.namespace(1);
  const p = new NvmeBlockPort({ ctl, window: { mem, dma, size: dmaBytes }, label: "model", close: async () => {} }, ns, queues);
  return { p, model, stop: () => clearInterval(poll) };
}

const bytes = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

test("a request whose guest buffers split anywhere (not on block boundaries) is written and read whole", async () => {
  const { p, model, stop } = await port(1 << 20);
  try {
    const data = bytes(4096, 1);
    const pieces = [data.subarray(0, 100), data.subarray(100, 612), data.subarray(612, 4000), data.subarray(4000)];
    await p.writev(8 * 512, pieces);
    assert.deepEqual(model.disk.subarray(8 * 512, 8 * 512 + 4096), data);
    const out = new Uint8Array(4096);
    await p.readv(8 * 512, [out.subarray(0, 7), out.subarray(7, 3333), out.subarray(3333)]);
    assert.deepEqual(out, data);
    await assert.rejects(async () => p.write(100, new Uint8Array(512)), /not whole 512-byte blocks/);
  } finally {
    stop();
  }
});

test("more requests in flight than the DMA memory holds wait for bounce buffers; none fails, none is corrupted", async () => {
  // 256 KiB of DMA memory (queues and identify pages take some of it) and 24 writes of 64 KiB at once.
  const { p, model, stop } = await port(256 * 1024);
  try {
    const writes = Array.from({ length: 24 }, (_, i) => p.write(i * 65536, bytes(65536, i)));
    await Promise.all(writes);
    for (let i = 0; i < 24; i++) assert.deepEqual(model.disk.subarray(i * 65536, (i + 1) * 65536), bytes(65536, i), `write ${i}`);
    const outs = Array.from({ length: 24 }, () => new Uint8Array(65536));
    await Promise.all(outs.map((o, i) => p.read(i * 65536, o)));
    outs.forEach((o, i) => assert.deepEqual(o, bytes(65536, i), `read ${i}`));
    await assert.rejects(p.read(0, new Uint8Array(512 * 1024)), /exceeds the 262144-byte DMA window/);
  } finally {
    stop();
  }
});

test("virtio queues map one to one onto the controller's I/O queues while it has enough, round robin beyond", async () => {
  const { p, model, stop } = await port(1 << 20);
  try {
    assert.equal(p.queues, 2);
    const d = new Uint8Array(512);
    await p.write(0, d, 0);
    await p.write(0, d, 0);
    await p.write(0, d, 1);
    assert.deepEqual([model.ioBySq.get(1), model.ioBySq.get(2)], [2, 1]);
    // Queue 5 has no NVMe queue of its own: round robin over both.
    await p.write(0, d, 5);
    await p.write(0, d, 5);
    assert.deepEqual([model.ioBySq.get(1), model.ioBySq.get(2)], [3, 2]);
  } finally {
    stop();
  }
});
