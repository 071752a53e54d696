import { test, describe } from "node:test";
import assert from "node:assert/strict";
import {
  BlkDevice,
  DmaAllocator,
  DriverInitError,
  GuestMemory,
  MMIO,
  MMIO_INT_CONFIG,
  MMIO_INT_VRING,
  MMIO_MAGIC,
  MmioDriverTransport,
  MmioTransport,
  RamDisk,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  VirtioDevice,
  VirtioDriver,
  bit,
  decodeNotificationData,
  features,
  layoutQueue,
  type DeviceQueue,
  type GuestError,
  type MmioBus,
} from "../../src/core/index.js";

const ACK = STATUS_ACKNOWLEDGE;
const DRV = STATUS_DRIVER;
const FOK = STATUS_FEATURES_OK;
const DOK = STATUS_DRIVER_OK;

/** A minimal device: echoes every buffer back with len 0 and records which queue served it. */
class EchoDevice extends VirtioDevice {
  readonly deviceId = 42;
  readonly served: number[] = [];
  constructor(offer: bigint = features(VIRTIO_F_RING_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED) | bit(3)) {
    super({ numQueues: 2, maxQueueSize: 16, configSize: 8, features: offer });
  }
  protected override processQueue(index: number, q: DeviceQueue): void {
    for (let c = q.pop(); c !== null; c = q.pop()) {
      this.served.push(index);
      this.complete(q, index, c.head, 0, c.descCount, this.epoch);
    }
  }
  /** Host side change of the config space. */
  setConfigWord(v: number): void {
    this.configView.setUint32(0, v, true);
    this.configChanged();
  }
}

interface Rig<D extends VirtioDevice> {
  dev: D;
  mem: GuestMemory;
  mmio: MmioTransport;
  irqs: () => number;
  badWrites: GuestError[];
  status: () => number;
  w: (reg: number, v: number) => void;
  r: (reg: number) => number;
}

function rig<D extends VirtioDevice>(dev: D): Rig<D> {
  const mem = GuestMemory.create(1 << 22);
  dev.attachMemory(mem);
  const badWrites: GuestError[] = [];
  dev.events = { guestError: (e) => badWrites.push(e) };
  let irqs = 0;
  const mmio = new MmioTransport(dev, { interrupt: () => irqs++ });
  return {
    dev,
    mem,
    mmio,
    irqs: () => irqs,
    badWrites,
    status: () => mmio.read32(MMIO.Status),
    w: (reg, v) => mmio.write32(reg, v),
    r: (reg) => mmio.read32(reg),
  };
}

function lastErrorCode(dev: VirtioDevice): string | undefined {
  return dev.errors[dev.errors.length - 1]?.err.code;
}

/** Steps 1-5 of the driver initialization sequence through the registers, accepting `f`. */
function negotiate(t: Rig<VirtioDevice>, f: bigint): void {
  t.w(MMIO.Status, 0);
  t.w(MMIO.Status, ACK);
  t.w(MMIO.Status, ACK | DRV);
  for (const sel of [0, 1]) {
    t.w(MMIO.DriverFeaturesSel, sel);
    t.w(MMIO.DriverFeatures, Number((f >> BigInt(32 * sel)) & 0xffff_ffffn));
  }
  t.w(MMIO.Status, ACK | DRV | FOK);
}

function programQueue(t: Rig<VirtioDevice>, i: number, size: number, desc: number, driver: number, device: number): void {
  t.w(MMIO.QueueSel, i);
  t.w(MMIO.QueueNum, size);
  for (const [lo, v] of [
    [MMIO.QueueDescLow, desc],
    [MMIO.QueueDriverLow, driver],
    [MMIO.QueueDeviceLow, device],
  ] as const) {
    t.w(lo, v >>> 0);
    t.w(lo + 4, Math.floor(v / 2 ** 32));
  }
  t.w(MMIO.QueueReady, 1);
}

/** A full, correct init of queue 0 (split, size 8) of an EchoDevice. */
function liveEcho(): Rig<EchoDevice> & { q0: ReturnType<typeof layoutQueue>["state"] } {
  const t = rig(new EchoDevice());
  negotiate(t, bit(VIRTIO_F_VERSION_1));
  const { state } = layoutQueue("split", 8, 0x1000);
  programQueue(t, 0, 8, state.descTable, state.driverArea, state.deviceArea);
  t.w(MMIO.Status, ACK | DRV | FOK | DOK);
  return { ...t, q0: state };
}

/** Publishes one one-descriptor buffer on a hand-driven split ring (head 0) and notifies. */
function echoOnce(t: Rig<EchoDevice> & { q0: ReturnType<typeof layoutQueue>["state"] }, queue = 0): void {
  const s = t.q0;
  t.mem.writeU64(s.descTable, 0x10000);
  t.mem.writeU32(s.descTable + 8, 16);
  t.mem.writeU16(s.descTable + 12, 0);
  const idx = t.mem.readU16(s.driverArea + 2);
  t.mem.writeU16(s.driverArea + 4 + 2 * (idx % 8), 0);
  t.mem.writeU16(s.driverArea + 2, (idx + 1) & 0xffff);
  t.w(MMIO.QueueNotify, queue);
}

describe("virtio-mmio identification registers", () => {
  test("MagicValue is 'virt', Version is 2, DeviceID and VendorID are reported", () => {
    const t = rig(new EchoDevice());
    assert.equal(t.r(MMIO.MagicValue), MMIO_MAGIC);
    assert.equal(t.r(MMIO.MagicValue), 0x74726976);
    assert.equal(t.r(MMIO.Version), 2);
    assert.equal(t.r(MMIO.DeviceID), 42);
    assert.equal(t.r(MMIO.VendorID), 0x54564f49);
    const blk = rig(new BlkDevice({ port: new RamDisk(1 << 20) }));
    assert.equal(blk.r(MMIO.DeviceID), 2);
    const vend = new MmioTransport(new EchoDevice(), { vendorId: 0x1af4 });
    assert.equal(vend.read32(MMIO.VendorID), 0x1af4);
  });

  test("DeviceFeatures shows the 32-bit word chosen by DeviceFeaturesSel, VERSION_1 always offered", () => {
    const t = rig(new EchoDevice(bit(3)));
    t.w(MMIO.DeviceFeaturesSel, 0);
    assert.equal(t.r(MMIO.DeviceFeatures), 1 << 3);
    t.w(MMIO.DeviceFeaturesSel, 1);
    assert.equal(t.r(MMIO.DeviceFeatures), 1, "VERSION_1 is bit 32");
    t.w(MMIO.DeviceFeaturesSel, 2);
    assert.equal(t.r(MMIO.DeviceFeatures), 0);
  });

  test("QueueNumMax reports the maximum for existing queues and 0 beyond them", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.QueueSel, 1);
    assert.equal(t.r(MMIO.QueueNumMax), 16);
    t.w(MMIO.QueueSel, 2);
    assert.equal(t.r(MMIO.QueueNumMax), 0);
    assert.equal(t.r(MMIO.QueueReady), 0);
  });

  test("a write to a read-only or unknown register is reported, never thrown", () => {
    const t = rig(new EchoDevice());
    assert.doesNotThrow(() => t.w(MMIO.MagicValue, 1));
    assert.doesNotThrow(() => t.w(0x0d0, 1));
    assert.deepEqual(
      t.badWrites.map((e) => e.code),
      ["MMIO_BAD_WRITE", "MMIO_BAD_WRITE"],
    );
    assert.equal(t.r(MMIO.MagicValue), MMIO_MAGIC);
  });
});

describe("device status state machine (Device Status Field, Device Initialization)", () => {
  test("DRIVER before ACKNOWLEDGE is refused and reported in device.errors", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.Status, DRV);
    assert.equal(t.status(), 0);
    assert.equal(lastErrorCode(t.dev), "BAD_STATUS");
  });

  test("clearing a status bit without a reset is refused", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.Status, ACK);
    t.w(MMIO.Status, ACK | DRV);
    t.w(MMIO.Status, ACK);
    assert.equal(t.status(), ACK | DRV);
    assert.equal(lastErrorCode(t.dev), "BAD_STATUS");
  });

  test("FEATURES_OK before DRIVER and DRIVER_OK before FEATURES_OK are refused", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.Status, ACK);
    t.w(MMIO.Status, ACK | FOK);
    assert.equal(t.status(), ACK);
    t.w(MMIO.Status, ACK | DRV);
    t.w(MMIO.Status, ACK | DRV | DOK);
    assert.equal(t.status(), ACK | DRV);
    assert.equal(t.dev.errors.filter((e) => e.err.code === "BAD_STATUS").length, 2);
  });

  test("the driver may not set DEVICE_NEEDS_RESET", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.Status, ACK | STATUS_DEVICE_NEEDS_RESET);
    assert.equal(t.status(), 0);
    assert.equal(lastErrorCode(t.dev), "BAD_STATUS");
  });

  test("FAILED can be set at any point and sticks until reset", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.Status, ACK);
    t.w(MMIO.Status, ACK | STATUS_FAILED);
    assert.equal(t.status(), ACK | STATUS_FAILED);
    t.w(MMIO.Status, 0);
    assert.equal(t.status(), 0);
  });

  test("FEATURES_OK is refused when the driver accepts a bit that was not offered; the re-read shows it clear", () => {
    const t = rig(new EchoDevice(bit(3)));
    negotiate(t, bit(VIRTIO_F_VERSION_1) | bit(3) | bit(50));
    assert.equal(t.status() & FOK, 0);
    assert.equal(t.status(), ACK | DRV);
    assert.equal(lastErrorCode(t.dev), "FEATURES_REFUSED");
    assert.equal(t.dev.features, 0n, "nothing was negotiated");
    // and DRIVER_OK cannot follow
    t.w(MMIO.Status, ACK | DRV | FOK | DOK);
    assert.equal(t.status() & DOK, 0);
  });

  test("FEATURES_OK is refused when the driver drops VERSION_1", () => {
    const t = rig(new EchoDevice(bit(3)));
    negotiate(t, bit(3));
    assert.equal(t.status() & FOK, 0);
    assert.equal(lastErrorCode(t.dev), "FEATURES_REFUSED");
  });

  test("a refused FEATURES_OK can be retried with an acceptable subset", () => {
    const t = rig(new EchoDevice(bit(3)));
    negotiate(t, bit(VIRTIO_F_VERSION_1) | bit(4));
    assert.equal(t.status() & FOK, 0);
    t.w(MMIO.DriverFeaturesSel, 0);
    t.w(MMIO.DriverFeatures, 1 << 3);
    t.w(MMIO.Status, ACK | DRV | FOK);
    assert.equal(t.status(), ACK | DRV | FOK);
    assert.equal(t.dev.features, bit(VIRTIO_F_VERSION_1) | bit(3));
  });

  test("driver feature writes after FEATURES_OK are ignored and reported", () => {
    const t = rig(new EchoDevice(bit(3)));
    negotiate(t, bit(VIRTIO_F_VERSION_1) | bit(3));
    assert.equal(t.status(), ACK | DRV | FOK);
    t.w(MMIO.DriverFeaturesSel, 0);
    t.w(MMIO.DriverFeatures, 0);
    t.w(MMIO.DriverFeaturesSel, 1);
    t.w(MMIO.DriverFeatures, 0);
    assert.equal(t.dev.features, bit(VIRTIO_F_VERSION_1) | bit(3));
    assert.equal(t.dev.readDriverFeatures(0), 1 << 3);
    assert.equal(t.dev.readDriverFeatures(1), 1);
    assert.equal(lastErrorCode(t.dev), "FEATURES_LOCKED");
  });

  test("writing 0 resets status, features, queues and the interrupt status", () => {
    const t = liveEcho();
    echoOnce(t);
    assert.equal(t.r(MMIO.InterruptStatus) & MMIO_INT_VRING, MMIO_INT_VRING);
    assert.notEqual(t.dev.queueState(0), null);
    t.w(MMIO.Status, 0);
    assert.equal(t.status(), 0);
    assert.equal(t.r(MMIO.InterruptStatus), 0);
    assert.equal(t.dev.features, 0n);
    assert.equal(t.dev.readDriverFeatures(1), 0);
    assert.equal(t.dev.queueState(0), null);
    for (const q of [0, 1]) {
      t.w(MMIO.QueueSel, q);
      assert.equal(t.r(MMIO.QueueReady), 0, `queue ${q} ready`);
      const regs = t.dev.queueRegisters(q)!;
      assert.deepEqual([regs.size, regs.descTable, regs.driverArea, regs.deviceArea], [16, 0, 0, 0]);
    }
    // a notify after the reset touches nothing
    const served = t.dev.served.length;
    t.w(MMIO.QueueNotify, 0);
    assert.equal(t.dev.served.length, served);
  });

  test("after a reset the whole init sequence works again", () => {
    const t = liveEcho();
    echoOnce(t);
    t.w(MMIO.Status, 0);
    t.mem.fill(0x1000, 0x1000, 0);
    negotiate(t, bit(VIRTIO_F_VERSION_1));
    programQueue(t, 0, 8, t.q0.descTable, t.q0.driverArea, t.q0.deviceArea);
    t.w(MMIO.Status, ACK | DRV | FOK | DOK);
    echoOnce(t);
    assert.deepEqual(t.dev.served, [0, 0]);
    assert.equal(t.mem.readU16(t.q0.deviceArea + 2), 1, "the used ring restarted from 0");
  });
});

describe("queue registers", () => {
  test("queue registers are refused while the queue is enabled", () => {
    const t = liveEcho();
    t.w(MMIO.QueueSel, 0);
    t.w(MMIO.QueueNum, 4);
    t.w(MMIO.QueueDescLow, 0x8000);
    const regs = t.dev.queueRegisters(0)!;
    assert.equal(regs.size, 8);
    assert.equal(regs.descTable, t.q0.descTable);
    assert.equal(lastErrorCode(t.dev), "QUEUE_ENABLED");
  });

  test("64-bit ring addresses are assembled from the Low/High register pairs", () => {
    const t = rig(new EchoDevice());
    t.w(MMIO.QueueSel, 1);
    t.w(MMIO.QueueDescLow, 0x1000);
    t.w(MMIO.QueueDescHigh, 0x2);
    t.w(MMIO.QueueDriverHigh, 0x3);
    t.w(MMIO.QueueDriverLow, 0x2000);
    const regs = t.dev.queueRegisters(1)!;
    assert.equal(regs.descTable, 0x2_0000_1000);
    assert.equal(regs.driverArea, 0x3_0000_2000);
  });

  test("a queue enabled with a size over the maximum or a bad ring address makes the device DEVICE_NEEDS_RESET at DRIVER_OK", () => {
    for (const [size, desc] of [
      [32, 0x1000],
      [8, 0x1008],
    ] as const) {
      const t = rig(new EchoDevice());
      negotiate(t, bit(VIRTIO_F_VERSION_1));
      const { state } = layoutQueue("split", 8, 0x1000);
      programQueue(t, 0, size, desc, state.driverArea, state.deviceArea);
      t.w(MMIO.Status, ACK | DRV | FOK | DOK);
      assert.equal(t.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET, `size ${size} desc ${desc}`);
      assert.equal(t.r(MMIO.InterruptStatus) & MMIO_INT_CONFIG, MMIO_INT_CONFIG);
      assert.ok(t.dev.errors.some((e) => e.queue === 0 && (e.err.code === "BAD_QUEUE_SIZE" || e.err.code === "RING_ADDRESS")));
    }
  });

  test("writing 0 to QueueReady stops the queue: it reads back 0 and is not served (MMIO Device Register Layout)", () => {
    const t = liveEcho();
    t.w(MMIO.QueueSel, 0);
    t.w(MMIO.QueueReady, 0);
    assert.equal(t.r(MMIO.QueueReady), 0, "QueueReady returns the last value written");
    echoOnce(t);
    assert.deepEqual(t.dev.served, [], "the device must not access a queue whose QueueReady is 0");
  });
  test("writing 1 to QueueReady of a live queue again does not restart its ring indices", () => {
    const t = liveEcho();
    echoOnce(t);
    echoOnce(t);
    const before = t.dev.queueState(0);
    assert.equal(before?.nextAvail, 2);
    t.w(MMIO.QueueSel, 0);
    t.w(MMIO.QueueReady, 1);
    assert.deepEqual(t.dev.queueState(0), before);
    echoOnce(t);
    assert.deepEqual(t.dev.served, [0, 0, 0], "only the new buffer is served, nothing twice");
    assert.equal(t.mem.readU16(t.q0.deviceArea + 2), 3);
  });
});

describe("interrupts and configuration space", () => {
  test("a used buffer raises InterruptStatus bit 0; InterruptACK clears only the bits written", () => {
    const t = liveEcho();
    echoOnce(t);
    assert.equal(t.r(MMIO.InterruptStatus), MMIO_INT_VRING);
    assert.equal(t.irqs(), 1);
    t.dev.setConfigWord(7);
    assert.equal(t.r(MMIO.InterruptStatus), MMIO_INT_VRING | MMIO_INT_CONFIG);
    assert.equal(t.irqs(), 1, "no new edge while InterruptStatus was already non-zero");
    t.w(MMIO.InterruptACK, MMIO_INT_VRING);
    assert.equal(t.r(MMIO.InterruptStatus), MMIO_INT_CONFIG);
    t.w(MMIO.InterruptACK, MMIO_INT_CONFIG);
    assert.equal(t.r(MMIO.InterruptStatus), 0);
    echoOnce(t);
    assert.equal(t.irqs(), 2, "a new edge once InterruptStatus went back to 0");
  });

  test("ConfigGeneration changes with every config change and the new value is readable at 0x100", () => {
    const t = liveEcho();
    const g0 = t.r(MMIO.ConfigGeneration);
    t.dev.setConfigWord(0xdeadbeef);
    const g1 = t.r(MMIO.ConfigGeneration);
    assert.notEqual(g1, g0);
    assert.equal(t.r(MMIO.Config), 0xdeadbeef);
    assert.equal(t.mmio.readConfig(1, 2), 0xadbe);
    assert.equal(t.mmio.readConfig(3, 1), 0xde);
    t.dev.setConfigWord(1);
    assert.notEqual(t.r(MMIO.ConfigGeneration), g1);
    assert.equal(t.r(MMIO.InterruptStatus) & MMIO_INT_CONFIG, MMIO_INT_CONFIG);
  });

  test("config reads beyond the config space return 0; writes to a read-only config are reported", () => {
    const t = liveEcho();
    assert.equal(t.r(MMIO.Config + 8), 0);
    assert.equal(t.mmio.readConfig(7, 2), 0);
    t.w(MMIO.Config, 5);
    assert.equal(lastErrorCode(t.dev), "CONFIG_READ_ONLY");
    t.mmio.writeConfig(100, 4, 5);
    assert.equal(lastErrorCode(t.dev), "CONFIG_WRITE");
  });

  test("writeConfig() says whether the device took the write, also when the error log is full", () => {
    const dev = new EchoDevice();
    for (let i = 0; i < 1200; i++) assert.equal(dev.writeConfig(0, 1, 1), false);
    assert.equal(dev.errors.length, 1000, "the log is capped");
    assert.equal(dev.writeConfig(0, 4, 1), false, "refused after the cap too");
    assert.equal(dev.writeConfig(8, 1, 1), false, "out of range");
    assert.equal(dev.readConfig(0, 4), 0, "nothing was written");
  });

  test("virtio-blk capacity is readable through the MMIO config window", () => {
    const t = rig(new BlkDevice({ port: new RamDisk(3 << 20) }));
    assert.equal(t.r(MMIO.Config), (3 << 20) / 512);
    assert.equal(t.r(MMIO.Config + 4), 0);
  });
});

// ---- with the real driver over the MMIO registers ----

interface Live {
  dev: BlkDevice;
  mmio: MmioTransport;
  drv: VirtioDriver;
  mem: GuestMemory;
  notifies: number[];
  irqs: () => number;
}

function liveBlk(opts: { packed: boolean; wanted?: bigint; queues?: number }): Live {
  const mem = GuestMemory.create(4 << 20);
  const port = new RamDisk(1 << 20);
  port.write(0, new Uint8Array(512).fill(0x5a));
  const dev = new BlkDevice({ port, numQueues: 2, queueSize: 16 });
  dev.attachMemory(mem);
  let irqs = 0;
  const mmio = new MmioTransport(dev, { interrupt: () => irqs++ });
  const notifies: number[] = [];
  const bus: MmioBus = {
    read32: (o) => mmio.read32(o),
    write32: (o, v) => {
      if (o === MMIO.QueueNotify) notifies.push(v);
      mmio.write32(o, v);
    },
    readConfig: (o, s) => mmio.readConfig(o, s),
    writeConfig: (o, s, v) => mmio.writeConfig(o, s, v),
  };
  const drv = new VirtioDriver(new MmioDriverTransport(bus), mem, new DmaAllocator(0x10000, (4 << 20) - 0x10000));
  drv.init({
    wanted:
      opts.wanted ??
      features(VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_NOTIFICATION_DATA),
    preferPacked: opts.packed,
    queues: opts.queues ?? 2,
    queueSize: 8,
  });
  return { dev, mmio, drv, mem, notifies, irqs: () => irqs };
}

/** A one-sector virtio-blk read on driver queue q; returns the status byte, or -1 when nothing came back. */
function blkRead(l: Live, q: number): number {
  const { drv, mem } = l;
  const hdr = drv.dma.alloc(32, 16);
  const data = drv.dma.alloc(512, 512);
  mem.writeU32(hdr, VIRTIO_BLK_T_IN);
  mem.writeU32(hdr + 4, 0);
  mem.writeU64(hdr + 8, 0);
  mem.writeU8(hdr + 16, 0xff);
  const dq = drv.queue<number>(q);
  assert.ok(
    dq.add(
      [
        { addr: hdr, len: 16, writable: false },
        { addr: data, len: 512, writable: true },
        { addr: hdr + 16, len: 1, writable: true },
      ],
      q,
    ),
  );
  drv.kick(q);
  let n = 0;
  dq.drainUsed(() => n++);
  const status = n === 1 ? mem.readU8(hdr + 16) : -1;
  if (status === 0) assert.equal(mem.readU8(data), 0x5a);
  drv.dma.release(hdr);
  drv.dma.release(data);
  return status;
}

/** Writes a broken buffer on queue 0 behind the driver's back and notifies. */
function corruptQueue0(l: Live): void {
  const regs = l.dev.queueRegisters(0)!;
  if (l.drv.layout === "split") {
    // descriptor 0 chains to itself
    l.mem.writeU64(regs.descTable, 0x20000);
    l.mem.writeU32(regs.descTable + 8, 8);
    l.mem.writeU16(regs.descTable + 12, 1);
    l.mem.writeU16(regs.descTable + 14, 0);
    const idx = l.mem.readU16(regs.driverArea + 2);
    l.mem.writeU16(regs.driverArea + 4 + 2 * (idx % regs.size), 0);
    l.mem.writeU16(regs.driverArea + 2, idx + 1);
  } else {
    // an available descriptor whose buffer id is out of range, where the device looks next
    const st = l.dev.queueState(0)!;
    const at = regs.descTable + 16 * st.nextAvail;
    l.mem.writeU64(at, 0x20000);
    l.mem.writeU32(at + 8, 8);
    l.mem.writeU16(at + 12, 200);
    l.mem.writeU16(at + 14, st.availWrap ? 1 << 7 : 1 << 15);
  }
  l.mmio.write32(MMIO.QueueNotify, 0);
}

for (const packed of [false, true]) {
  const layout = packed ? "packed" : "split";
  describe(`${layout}: device errors, per-queue reset and notification data`, () => {
    test("a bad chain on queue 0 sets DEVICE_NEEDS_RESET with a config interrupt while queue 1 keeps serving", () => {
      const l = liveBlk({ packed });
      assert.equal(l.drv.layout, layout);
      assert.equal(blkRead(l, 0), 0);
      assert.equal(blkRead(l, 1), 0);
      corruptQueue0(l);
      assert.equal(l.drv.needsReset(), true);
      assert.equal(l.mmio.read32(MMIO.Status) & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
      assert.equal(l.mmio.read32(MMIO.InterruptStatus) & MMIO_INT_CONFIG, MMIO_INT_CONFIG);
      const err = l.dev.errors.find((e) => e.queue === 0);
      assert.ok(err, "the error is recorded against queue 0");
      assert.equal(err.err.code, packed ? "BAD_BUFFER_ID" : "CHAIN_LOOP");
      for (let i = 0; i < 3; i++) assert.equal(blkRead(l, 1), 0, "queue 1 still serves");
      assert.equal(l.dev.queueState(0), null, "queue 0 is offline");
    });

    test("RING_RESET: VirtioDriver.resetQueue() resets one queue and it serves again", () => {
      const l = liveBlk({ packed });
      assert.equal(blkRead(l, 0), 0);
      const oldDesc = l.dev.queueRegisters(0)!.descTable;
      l.drv.resetQueue(0);
      l.mmio.write32(MMIO.QueueSel, 0);
      assert.equal(l.mmio.read32(MMIO.QueueReady), 1);
      assert.equal(l.mmio.read32(MMIO.QueueReset), 0);
      assert.notEqual(l.dev.queueRegisters(0)!.descTable, oldDesc, "fresh rings");
      assert.deepEqual(l.dev.queueState(0)!.nextAvail, 0);
      for (let i = 0; i < 3; i++) assert.equal(blkRead(l, 0), 0);
      assert.equal(blkRead(l, 1), 0);
    });

    test("VirtioDriver.resetQueue() gives the old rings back to the DMA window", () => {
      const l = liveBlk({ packed });
      const free0 = l.drv.dma.bytesFree;
      for (let i = 0; i < 3; i++) l.drv.resetQueue(0);
      assert.equal(l.drv.dma.bytesFree, free0);
      assert.equal(blkRead(l, 0), 0);
    });

    test("RING_RESET brings a queue broken by a bad chain back into service", () => {
      const l = liveBlk({ packed });
      corruptQueue0(l);
      assert.equal(l.dev.queueState(0), null);
      l.drv.resetQueue(0);
      assert.equal(blkRead(l, 0), 0);
    });

    test("a completed per-queue reset shows 0 in QueueReset and QueueReady until re-enabled (MMIO Device Register Layout)", () => {
      const l = liveBlk({ packed });
      l.mmio.write32(MMIO.QueueSel, 1);
      l.mmio.write32(MMIO.QueueReset, 1);
      assert.equal(l.mmio.read32(MMIO.QueueReset), 0);
      assert.equal(l.mmio.read32(MMIO.QueueReady), 0);
      assert.equal(l.dev.queueState(1), null);
      // the registers may be programmed again now
      l.mmio.write32(MMIO.QueueNum, 4);
      assert.equal(l.dev.queueRegisters(1)!.size, 4);
    });

    test("without RING_RESET negotiated a QueueReset write is refused and the queue keeps serving", () => {
      const l = liveBlk({ packed, wanted: features(VIRTIO_F_RING_PACKED) });
      l.mmio.write32(MMIO.QueueSel, 0);
      l.mmio.write32(MMIO.QueueReset, 1);
      assert.equal(lastErrorCode(l.dev), "RING_RESET_REFUSED");
      assert.equal(l.mmio.read32(MMIO.QueueReady), 1);
      assert.equal(blkRead(l, 0), 0);
    });

    test("NOTIFICATION_DATA: the driver writes the queue index with the next avail position when negotiated", () => {
      const l = liveBlk({ packed });
      assert.ok((l.drv.negotiated & bit(VIRTIO_F_NOTIFICATION_DATA)) !== 0n);
      l.notifies.length = 0;
      assert.equal(blkRead(l, 1), 0);
      assert.equal(l.notifies.length, 1);
      const v = l.notifies[0]!;
      // one 3-descriptor buffer added to a fresh queue 1: split avail idx 1, or packed offset 3 with wrap counter 1
      assert.deepEqual(decodeNotificationData(layout, v), { queue: 1, next: packed ? 3 : 1, wrap: packed });
      assert.notEqual(v, 1);
    });

    test("without NOTIFICATION_DATA the driver writes the bare queue index", () => {
      const l = liveBlk({ packed, wanted: features(VIRTIO_F_RING_PACKED, VIRTIO_F_EVENT_IDX) });
      l.notifies.length = 0;
      assert.equal(blkRead(l, 1), 0);
      assert.deepEqual(l.notifies, [1]);
    });

    test("with NOTIFICATION_DATA the device routes a notification by its low 16 bits", () => {
      const l = liveBlk({ packed });
      const dq = l.drv.queue<number>(1);
      const hdr = l.drv.dma.alloc(32, 16);
      l.mem.writeU32(hdr, VIRTIO_BLK_T_IN);
      l.mem.writeU64(hdr + 8, 0);
      const data = l.drv.dma.alloc(512, 512);
      assert.ok(
        dq.add(
          [
            { addr: hdr, len: 16, writable: false },
            { addr: data, len: 512, writable: true },
            { addr: hdr + 16, len: 1, writable: true },
          ],
          0,
        ),
      );
      dq.publish();
      l.mmio.write32(MMIO.QueueNotify, (1 | (0x1234 << 16)) >>> 0);
      assert.equal(
        dq.drainUsed(() => {}),
        1,
      );
    });
  });
}

describe("driver initialization", () => {
  test("a device lacking a required feature makes init fail with FEATURES_MISSING and status FAILED", () => {
    const mem = GuestMemory.create(1 << 20);
    const dev = new EchoDevice(0n);
    dev.attachMemory(mem);
    const mmio = new MmioTransport(dev);
    const drv = new VirtioDriver(new MmioDriverTransport(mmio), mem, new DmaAllocator(0x10000, 0x80000));
    assert.throws(
      () => drv.init({ wanted: bit(VIRTIO_F_EVENT_IDX), required: bit(VIRTIO_F_EVENT_IDX) }),
      (e: unknown) => e instanceof DriverInitError && e.code === "FEATURES_MISSING",
    );
    assert.equal(mmio.read32(MMIO.Status) & STATUS_FAILED, STATUS_FAILED);
  });

  test("init negotiates offered & wanted, sets DRIVER_OK and enables every queue", () => {
    const mem = GuestMemory.create(1 << 20);
    const dev = new EchoDevice();
    dev.attachMemory(mem);
    const mmio = new MmioTransport(dev);
    const drv = new VirtioDriver(new MmioDriverTransport(mmio), mem, new DmaAllocator(0x10000, 0x80000));
    drv.init({ wanted: features(VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC), preferPacked: false });
    assert.equal(drv.negotiated, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX));
    assert.equal(dev.features, drv.negotiated);
    assert.equal(mmio.read32(MMIO.Status), ACK | DRV | FOK | DOK);
    assert.equal(drv.queues.length, 2);
    for (const q of [0, 1]) {
      mmio.write32(MMIO.QueueSel, q);
      assert.equal(mmio.read32(MMIO.QueueReady), 1);
    }
    const dq = drv.queue<number>(1);
    assert.ok(dq.addOne(0x9000, 8, false, 5));
    assert.equal(drv.kick(1), true);
    const got: number[] = [];
    dq.drainUsed((t) => got.push(t));
    assert.deepEqual(got, [5]);
    assert.deepEqual(dev.served, [1]);
  });
});
