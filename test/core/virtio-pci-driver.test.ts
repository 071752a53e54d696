import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { BlkDriver } from "../../src/core/virtio/driver/blk.js";
import { DmaAllocator } from "../../src/core/virtio/driver/dma.js";
import { MmioTransport } from "../../src/core/virtio/transport/mmio/device.js";
import { MMIO } from "../../src/core/virtio/transport/mmio/registers.js";
import { COMMON_CFG, PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP, VirtioPciDriverTransport } from "../../src/core/virtio/transport/pci/index.js";
import { PCI_CAP_ID_MSIX, enableBusMaster, readMsixCapability, type MmioRegion, type PciConfig } from "../../src/core/pci/index.js";
import { GuestError, IovirtUsageError } from "../../src/core/errors.js";
import { STATUS_DEVICE_NEEDS_RESET } from "../../src/core/virtio/device/status.js";
import { VIRTIO_F_NOTIFICATION_DATA, bit, hasFeature } from "../../src/core/virtio/device/features.js";

// A virtio-pci function for unit tests: QEMU's layout (caps on BAR 4: common
// +0, ISR +0x1000, device +0x2000, notify +0x3000 with multiplier 4; MSI-X
// table on BAR 1), with the register semantics forwarded to the virtio-mmio
// device model. Every access is checked against its field's width; a
// mismatch is recorded (QEMU would read 0 / drop it), so `bad` proves the
// driver's width discipline.

const W: Record<number, number> = {
  [COMMON_CFG.device_feature_select]: 4,
  [COMMON_CFG.device_feature]: 4,
  [COMMON_CFG.driver_feature_select]: 4,
  [COMMON_CFG.driver_feature]: 4,
  [COMMON_CFG.config_msix_vector]: 2,
  [COMMON_CFG.num_queues]: 2,
  [COMMON_CFG.device_status]: 1,
  [COMMON_CFG.config_generation]: 1,
  [COMMON_CFG.queue_select]: 2,
  [COMMON_CFG.queue_size]: 2,
  [COMMON_CFG.queue_msix_vector]: 2,
  [COMMON_CFG.queue_enable]: 2,
  [COMMON_CFG.queue_notify_off]: 2,
  [COMMON_CFG.queue_desc]: 4,
  [COMMON_CFG.queue_desc + 4]: 4,
  [COMMON_CFG.queue_driver]: 4,
  [COMMON_CFG.queue_driver + 4]: 4,
  [COMMON_CFG.queue_device]: 4,
  [COMMON_CFG.queue_device + 4]: 4,
  [COMMON_CFG.queue_reset]: 2,
};

const AREA_TO_MMIO: Record<number, number> = {
  [COMMON_CFG.queue_desc]: MMIO.QueueDescLow,
  [COMMON_CFG.queue_desc + 4]: MMIO.QueueDescHigh,
  [COMMON_CFG.queue_driver]: MMIO.QueueDriverLow,
  [COMMON_CFG.queue_driver + 4]: MMIO.QueueDriverHigh,
  [COMMON_CFG.queue_device]: MMIO.QueueDeviceLow,
  [COMMON_CFG.queue_device + 4]: MMIO.QueueDeviceHigh,
};

class FakeVirtioPci {
  readonly bad: string[] = [];
  readonly notifies: { queue: number; width: number; value: number }[] = [];
  readonly cfgBytes = new Uint8Array(256);
  msixConfig = 0xffff;
  readonly msixQueue = new Map<number, number>();
  /** Vectors the device refuses (reads back NO_VECTOR). */
  refuseVectors = new Set<number>();
  private sel = 0;
  private readonly sizes = new Map<number, number>();

  constructor(
    readonly mmio: MmioTransport,
    opts: { barSize?: number } = {},
  ) {
    const b = this.cfgBytes;
    const v = new DataView(b.buffer);
    v.setUint16(0, 0x1af4, true);
    v.setUint16(2, 0x1040 + mmio.device.deviceId, true);
    v.setUint16(6, 1 << 4, true);
    b[0x34] = 0x40;
    const vcap = (at: number, next: number, type: number, off: number, len: number, capLen = 16): void => {
      b.set([PCI_CAP_ID_VNDR, next, capLen, type, 4], at);
      v.setUint32(at + 8, off, true);
      v.setUint32(at + 12, len, true);
    };
    vcap(0x40, 0x50, VIRTIO_PCI_CAP.COMMON_CFG, 0, COMMON_CFG.SIZE);
    vcap(0x50, 0x60, VIRTIO_PCI_CAP.ISR_CFG, 0x1000, 4);
    vcap(0x60, 0x70, VIRTIO_PCI_CAP.DEVICE_CFG, 0x2000, 0x100);
    vcap(0x70, 0x84, VIRTIO_PCI_CAP.NOTIFY_CFG, 0x3000, 0x1000, 20);
    v.setUint32(0x70 + 16, 4, true);
    b.set([PCI_CAP_ID_MSIX, 0], 0x84);
    v.setUint16(0x86, 3, true); // 4 vectors
    v.setUint32(0x88, 1, true); // table in BAR 1 at 0
    v.setUint32(0x8c, 0x801, true); // PBA in BAR 1 at 0x800
    this.barSize = opts.barSize ?? 0x4000;
  }
  readonly barSize: number;

  config(): PciConfig {
    const b = this.cfgBytes;
    const v = new DataView(b.buffer);
    return {
      size: 256,
      read8: (o) => b[o]!,
      read16: (o) => v.getUint16(o, true),
      read32: (o) => v.getUint32(o, true),
      write8: (o, x) => void (b[o] = x),
      write16: (o, x) => v.setUint16(o, x, true),
      write32: (o, x) => v.setUint32(o, x, true),
    };
  }

  bar4(): MmioRegion {
    const rd = (o: number, w: number): number => this.read(o, w);
    const wr = (o: number, w: number, x: number): void => this.write(o, w, x);
    return {
      size: this.barSize,
      read8: (o) => rd(o, 1),
      read16: (o) => rd(o, 2),
      read32: (o) => rd(o, 4),
      write8: (o, x) => wr(o, 1, x),
      write16: (o, x) => wr(o, 2, x),
      write32: (o, x) => wr(o, 4, x),
    };
  }

  private numQueues(): number {
    let n = 0;
    for (; n < 64; n++) {
      this.mmio.write32(MMIO.QueueSel, n);
      if (this.mmio.read32(MMIO.QueueNumMax) === 0) break;
    }
    this.mmio.write32(MMIO.QueueSel, this.sel);
    return n;
  }

  private read(o: number, w: number): number {
    const m = this.mmio;
    if (o >= 0x2000 && o < 0x2100) return m.readConfig(o - 0x2000, w as 1 | 2 | 4);
    if (o === 0x1000 && w === 1) {
      const isr = m.read32(MMIO.InterruptStatus);
      m.write32(MMIO.InterruptACK, isr);
      return isr;
    }
    if (W[o] !== w) {
      this.bad.push(`read${w * 8} at 0x${o.toString(16)}`);
      return 0;
    }
    switch (o) {
      case COMMON_CFG.device_feature:
        return m.read32(MMIO.DeviceFeatures);
      case COMMON_CFG.config_msix_vector:
        return this.msixConfig;
      case COMMON_CFG.num_queues:
        return this.numQueues();
      case COMMON_CFG.device_status:
        return m.read32(MMIO.Status);
      case COMMON_CFG.config_generation:
        return m.read32(MMIO.ConfigGeneration) & 0xff;
      case COMMON_CFG.queue_select:
        return this.sel;
      case COMMON_CFG.queue_size:
        return this.sizes.get(this.sel) ?? m.read32(MMIO.QueueNumMax);
      case COMMON_CFG.queue_msix_vector:
        return this.msixQueue.get(this.sel) ?? 0xffff;
      case COMMON_CFG.queue_enable:
        return m.read32(MMIO.QueueReady);
      case COMMON_CFG.queue_notify_off:
        return this.sel;
      case COMMON_CFG.queue_reset:
        return m.read32(MMIO.QueueReset);
      default:
        return 0;
    }
  }

  private write(o: number, w: number, x: number): void {
    const m = this.mmio;
    if (o >= 0x3000 && o < 0x4000) {
      const queue = (o - 0x3000) / 4;
      this.notifies.push({ queue, width: w, value: x });
      m.write32(MMIO.QueueNotify, w === 2 ? queue : x);
      return;
    }
    if (o >= 0x2000 && o < 0x2100) return m.writeConfig(o - 0x2000, w as 1 | 2 | 4, x);
    if (W[o] !== w) {
      this.bad.push(`write${w * 8} at 0x${o.toString(16)}`);
      return;
    }
    const area = AREA_TO_MMIO[o];
    if (area !== undefined) return m.write32(area, x);
    switch (o) {
      case COMMON_CFG.device_feature_select:
        return m.write32(MMIO.DeviceFeaturesSel, x);
      case COMMON_CFG.driver_feature_select:
        return m.write32(MMIO.DriverFeaturesSel, x);
      case COMMON_CFG.driver_feature:
        return m.write32(MMIO.DriverFeatures, x);
      case COMMON_CFG.config_msix_vector:
        this.msixConfig = this.refuseVectors.has(x) ? 0xffff : x;
        return;
      case COMMON_CFG.device_status:
        return m.write32(MMIO.Status, x);
      case COMMON_CFG.queue_select:
        this.sel = x;
        return m.write32(MMIO.QueueSel, x);
      case COMMON_CFG.queue_size:
        this.sizes.set(this.sel, x);
        return m.write32(MMIO.QueueNum, x);
      case COMMON_CFG.queue_msix_vector:
        this.msixQueue.set(this.sel, this.refuseVectors.has(x) ? 0xffff : x);
        return;
      case COMMON_CFG.queue_enable:
        return m.write32(MMIO.QueueReady, x);
      case COMMON_CFG.queue_reset:
        return m.write32(MMIO.QueueReset, x);
    }
  }
}

function setup(opts: { msix?: boolean; barSize?: number } = {}): {
  fake: FakeVirtioPci;
  drv: BlkDriver;
  t: VirtioPciDriverTransport;
  port: RamDisk;
} {
  const mem = GuestMemory.create(8 << 20);
  const port = new RamDisk(4 << 20);
  const device = new BlkDevice({ port });
  device.attachMemory(mem);
  const holder: { drv?: BlkDriver } = {};
  const mmio = new MmioTransport(device, {
    interrupt: () => queueMicrotask(() => holder.drv?.virtio.handleInterrupt()),
  });
  const fake = new FakeVirtioPci(mmio, opts.barSize === undefined ? {} : { barSize: opts.barSize });
  const bar4 = fake.bar4();
  const t = new VirtioPciDriverTransport(fake.config(), (i) => {
    if (i !== 4) throw new Error(`driver touched BAR ${i}`);
    return bar4;
  });
  if (opts.msix === true) t.useMsix(0, (q) => 1 + q);
  const drv = new BlkDriver(t, mem, new DmaAllocator(0x10000, (8 << 20) - 0x10000));
  holder.drv = drv;
  return { fake, drv, t, port };
}

for (const [packed, data32] of [
  [false, false],
  [false, true],
  [true, false],
  [true, true],
] as const) {
  test(`blk driver over the virtio-pci transport (${packed ? "packed" : "split"}, ${data32 ? "NOTIFICATION_DATA" : "queue-index notify"}): data round trip, widths exact`, async () => {
    const { fake, drv, t } = setup();
    drv.init({ preferPacked: packed, ...(data32 ? {} : { without: bit(VIRTIO_F_NOTIFICATION_DATA) }) });
    assert.equal(hasFeature(drv.negotiated, VIRTIO_F_NOTIFICATION_DATA), data32);
    assert.equal(t.deviceId, 2);
    assert.equal(drv.virtio.layout, packed ? "packed" : "split");
    assert.equal(drv.capacity, (4 << 20) / 512);
    const data = new Uint8Array(8192).map((_, i) => (i * 13) & 0xff);
    await drv.write(10, data);
    await drv.flush();
    assert.deepEqual(await drv.read(10, 16), data);
    assert.deepEqual(fake.bad, [], "every register was accessed with its own width");
    assert.ok(fake.notifies.length > 0, "the driver notified");
    for (const n of fake.notifies) {
      // §4.1.5.2: NOTIFICATION_DATA is a 32-bit write whose low 16 bits are the queue index; else the 16-bit index.
      if (data32) assert.ok(n.width === 4 && (n.value & 0xffff) === 0 && n.value >>> 16 > 0, JSON.stringify(n));
      else assert.deepEqual(n, { queue: 0, width: 2, value: 0 });
    }
    assert.equal(t.notifyOffset(0), 0x3000);
  });
}

test("MSI-X: vectors are assigned through the common configuration and checked", () => {
  const { fake, drv } = setup({ msix: true });
  drv.init();
  assert.equal(fake.msixConfig, 0);
  assert.equal(fake.msixQueue.get(0), 1);
  const refused = setup({ msix: true });
  refused.fake.refuseVectors.add(1);
  assert.throws(
    () => refused.drv.init(),
    (e: Error) => e instanceof IovirtUsageError && /refused MSI-X vector 1 for queue 0/.test(e.message),
  );
});

test("a structure that overruns its BAR is refused before any access", () => {
  assert.throws(
    () => setup({ barSize: 0x2000 }),
    (e: Error) => e instanceof GuestError && /overruns the BAR/.test(e.message),
  );
});

test("bus master enable and MSI-X decoding on the function's config space", () => {
  const { fake } = setup();
  const cfg = fake.config();
  enableBusMaster(cfg);
  assert.equal(cfg.read16(4) & 0x6, 0x6);
  const m = readMsixCapability(cfg);
  assert.deepEqual(m, {
    capOffset: 0x84,
    tableSize: 4,
    enabled: false,
    functionMask: false,
    tableBar: 1,
    tableOffset: 0,
    pbaBar: 1,
    pbaOffset: 0x800,
  });
});

test("a device reporting DEVICE_NEEDS_RESET is seen, and the init sequence recovers it", async () => {
  const { drv, t } = setup();
  drv.init();
  t.setStatus(t.getStatus() | STATUS_DEVICE_NEEDS_RESET);
  drv.init();
  assert.equal(drv.virtio.needsReset(), false);
  const data = new Uint8Array(512).fill(7);
  await drv.write(0, data);
  assert.deepEqual(await drv.read(0, 1), data);
});
