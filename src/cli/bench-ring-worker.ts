import { parentPort, workerData } from "node:worker_threads";
import { GuestMemory } from "../core/memory/guest-memory.js";
import { DescriptorChain, createDeviceQueue, type QueueState, type RingFeatures } from "../core/virtio/queue/index.js";
import { createDriverQueue } from "../core/virtio/driver/create.js";
import { layoutQueue } from "../core/virtio/driver/layout.js";
import type { RingBenchConfig } from "./bench-ring.js";

/**
 * One benchmark configuration, run in a fresh worker so every configuration
 * gets its own JIT state. Roles: "both" (one thread does driver and device),
 * "driver" and "device" (two threads sharing a SharedArrayBuffer).
 */
interface Job {
  role: "both" | "driver" | "device";
  cfg: RingBenchConfig;
  sab: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
}

const QUEUE_SIZE = 256;
const BUF_LEN = 1500;
const job = workerData as Job;
const mem = new GuestMemory([{ gpa: 0, size: job.sab.byteLength, buffer: job.sab }]);
const ctl = new Int32Array(job.ctl); // [0] go, [1] stop, [2] device ready
const features: RingFeatures = { indirect: false, eventIdx: job.cfg.eventIdx, inOrder: false };
const { state, end } = layoutQueue(job.cfg.layout, QUEUE_SIZE, 0x1000);
const dataBase = Math.ceil(end / 4096) * 4096;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

/**
 * Warm-up, then three timed trials of `round` (one batch round trip,
 * returning descriptors completed); the median rate in descriptors/s.
 */
function measure(round: () => number): number {
  const trial = (ms: number): number => {
    let done = 0;
    const t0 = performance.now();
    let now = t0;
    while (now - t0 < ms) {
      for (let r = 0; r < 64; r++) done += round();
      now = performance.now();
    }
    return (done / (now - t0)) * 1000;
  };
  trial(100); // let the JIT settle before measuring
  return median([0, 1, 2].map(() => trial((job.cfg.seconds * 1000) / 3)));
}

function runBoth(): number {
  const driver = createDriverQueue<number>(mem, state, features);
  const device = createDeviceQueue(mem, state, features);
  const chain = new DescriptorChain();
  const batch = job.cfg.batch;
  let sink = 0;
  const onUsed = (t: number, l: number): void => {
    sink += t ^ l;
  };
  const rate = measure(() => {
    for (let i = 0; i < batch; i++) driver.addOne(dataBase + i * 2048, BUF_LEN, true, i);
    driver.publish();
    driver.needsKick();
    while (device.popInto(chain)) device.pushUsed(chain.head, BUF_LEN, chain.descCount);
    device.publishUsed();
    device.needsNotification();
    return driver.drainUsed(onUsed);
  });
  if (sink === -1) console.log(sink);
  return rate;
}

function runDriver(): number {
  const driver = createDriverQueue<number>(mem, state, features);
  Atomics.store(ctl, 0, 1);
  while (Atomics.load(ctl, 2) === 0) {
    /* wait for the device thread */
  }
  const batch = job.cfg.batch;
  let sink = 0;
  const onUsed = (t: number, l: number): void => {
    sink += t ^ l;
  };
  let slot = 0;
  const rate = measure(() => {
    let n = Math.min(batch, driver.numFree);
    while (n-- > 0) {
      driver.addOne(dataBase + slot * 2048, BUF_LEN, true, slot);
      slot = (slot + 1) & (QUEUE_SIZE - 1);
    }
    driver.publish();
    driver.needsKick();
    return driver.drainUsed(onUsed);
  });
  Atomics.store(ctl, 1, 1);
  if (sink === -1) console.log(sink);
  return rate;
}

function runDevice(): number {
  while (Atomics.load(ctl, 0) === 0) {
    /* wait until the driver initialized the rings */
  }
  const device = createDeviceQueue(mem, state as QueueState, features);
  const chain = new DescriptorChain();
  const batch = job.cfg.batch;
  Atomics.store(ctl, 2, 1);
  let polls = 0;
  for (;;) {
    let n = 0;
    while (n < batch && device.popInto(chain)) {
      device.pushUsed(chain.head, BUF_LEN, chain.descCount);
      n++;
    }
    if (n > 0) {
      device.publishUsed();
      device.needsNotification();
    }
    if ((++polls & 1023) === 0 && Atomics.load(ctl, 1) !== 0) return 0;
  }
}

const rate = job.role === "both" ? runBoth() : job.role === "driver" ? runDriver() : runDevice();
parentPort?.postMessage(rate);
