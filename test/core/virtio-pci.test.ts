import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { GuestError, IovirtUsageError } from "../../src/core/errors.js";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import {
  PCI_CAP_ID_MSIX,
  PCI_CFG,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  readMsixCapability,
  walkCapabilities,
  type MmioRegion,
  type PciConfig,
} from "../../src/core/pci/index.js";
import { createBlkPciPair, PCI_PAIR_CONFIG_VECTOR } from "../../src/core/loopback/index.js";
import { enableBusMaster } from "../../src/core/pci/command.js";
import { VirtioDevice } from "../../src/core/virtio/lifecycle/device.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  bit,
  features,
  hasFeature,
} from "../../src/core/virtio/lifecycle/features.js";
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
} from "../../src/core/virtio/lifecycle/status.js";
import { BLK_CFG } from "../../src/core/virtio/devices/blk/constants.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { NetDevice } from "../../src/core/virtio/devices/net/device.js";
import { MemoryPacketPort } from "../../src/core/virtio/devices/net/port.js";
import { decodeNotificationData, type DeviceQueue } from "../../src/core/virtio/queue/index.js";
import {
  COMMON_CFG,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP,
  VIRTIO_PCI_MODEL,
  VIRTIO_PCI_MODEL_CAPS,
  VirtioPciDevice,
  VirtioPciDriverTransport,
  readVirtioCaps,
  virtioPciLayout,
} from "../../src/core/virtio/transport/pci/index.js";

const M = VIRTIO_PCI_MODEL;
const FULL_STATUS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

/** One access the driver made to a BAR. */
interface Access {
  bar: number;
  op: "r" | "w";
  width: number;
  offset: number;
  value: number;
}

/** Wraps a BAR so every driver access is recorded (and optionally hooked). */
function spy(bar: number, r: MmioRegion, log: Access[], onRead?: (a: Access) => void): MmioRegion {
  const rd = (width: number, offset: number, value: number): number => {
    const a: Access = { bar, op: "r", width, offset, value };
    log.push(a);
    onRead?.(a);
    return value;
  };
  const wr = (width: number, offset: number, value: number): void => {
    log.push({ bar, op: "w", width, offset, value });
  };
  return {
    size: r.size,
    read8: (o) => rd(1, o, r.read8(o)),
    read16: (o) => rd(2, o, r.read16(o)),
    read32: (o) => rd(4, o, r.read32(o)),
    write8: (o, v) => (wr(1, o, v), r.write8(o, v)),
    write16: (o, v) => (wr(2, o, v), r.write16(o, v)),
    write32: (o, v) => (wr(4, o, v), r.write32(o, v)),
  };
}

/** A config space view with some bytes replaced (what a broken or hostile device presents). */
function patched(cfg: PciConfig, bytes: Record<number, number>): PciConfig {
  const b = (o: number): number => bytes[o] ?? cfg.read8(o);
  return {
    size: cfg.size,
    read8: b,
    read16: (o) => b(o) | (b(o + 1) << 8),
    read32: (o) => (b(o) | (b(o + 1) << 8) | (b(o + 2) << 16) | (b(o + 3) << 24)) >>> 0,
    write8: (o, v) => cfg.write8(o, v),
    write16: (o, v) => cfg.write16(o, v),
    write32: (o, v) => cfg.write32(o, v),
  };
}

function le32(v: number): Record<number, number> {
  return { 0: v & 0xff, 1: (v >>> 8) & 0xff, 2: (v >>> 16) & 0xff, 3: v >>> 24 };
}
function at(base: number, bytes: Record<number, number>): Record<number, number> {
  return Object.fromEntries(Object.entries(bytes).map(([k, v]) => [base + Number(k), v]));
}

function pattern(n: number, seed: number): Uint8Array {
  return new Uint8Array(n).map((_, i) => (i * 31 + seed * 7) & 0xff);
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 0));

/** write, flush, read back, and a second region: the data path works. */
async function roundTrip(p: ReturnType<typeof createBlkPciPair>): Promise<void> {
  const a = pattern(8192, 1);
  const b = pattern(1024, 2);
  await p.driver.write(8, a);
  await p.driver.write(100, b);
  await p.driver.flush();
  assert.deepEqual(await p.driver.read(8, 16), a);
  assert.deepEqual(await p.driver.read(100, 2), b);
  assert.deepEqual(await p.driver.read(0, 1), new Uint8Array(512), "untouched sectors read as zeros");
}

/** A device with no configuration space and an id that has no PCI class of its own. */
class EchoDevice extends VirtioDevice {
  readonly deviceId = 42;
  constructor() {
    super({ numQueues: 2, maxQueueSize: 16, configSize: 0, features: features(VIRTIO_F_RING_RESET) });
  }
  protected override processQueue(index: number, q: DeviceQueue): void {
    for (let c = q.pop(); c !== null; c = q.pop()) this.complete(q, index, c.head, 0, c.descCount, this.epoch);
  }
}

/** A bare function model over a blk device, memory decoding on, no driver. */
function bareBlk(opts: { numQueues?: number } = {}): { pci: VirtioPciDevice; bar: MmioRegion; dev: BlkDevice } {
  const dev = new BlkDevice({ port: new RamDisk(1 << 20), ...(opts.numQueues === undefined ? {} : { numQueues: opts.numQueues }) });
  dev.attachMemory(GuestMemory.create(1 << 20));
  const pci = new VirtioPciDevice(dev);
  pci.config.write16(PCI_CFG.COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
  return { pci, bar: pci.bar(4)!, dev };
}

describe("virtio-pci: BlkDriver over VirtioPciDriverTransport and VirtioPciDevice", () => {
  for (const packed of [false, true]) {
    for (const eventIdx of [false, true]) {
      for (const irq of ["intx", "msix"] as const) {
        test(`${packed ? "packed" : "split"} ${eventIdx ? "with" : "without"} EVENT_IDX, ${irq}: read/write/flush round trip, no bad access`, async () => {
          const log: Access[] = [];
          const p = createBlkPciPair({
            irq,
            driver: { preferPacked: packed, without: eventIdx ? 0n : bit(VIRTIO_F_EVENT_IDX) },
            tapBar: (i, r) => spy(i, r, log),
          });
          assert.equal(p.driver.virtio.layout, packed ? "packed" : "split");
          assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_EVENT_IDX), eventIdx);
          assert.equal(p.device.getStatus(), FULL_STATUS);
          assert.equal(p.driver.capacity, (8 << 20) / 512);
          await roundTrip(p);
          assert.equal(p.pci.badAccesses, 0, `no access the device refused (last: ${p.pci.lastBadAccess})`);
          assert.ok(
            log.some((a) => a.op === "w" && a.offset >= M.notify && a.offset < M.notify + 4),
            "the driver notified queue 0",
          );
          assert.ok(
            log.every((a) => a.bar === 4),
            "the driver touches only BAR 4",
          );
          if (irq === "intx") {
            assert.ok(p.interrupts.intx >= 5, `INTx interrupts: ${p.interrupts.intx}`);
            assert.equal(p.interrupts.msix.size, 0);
            assert.ok(log.some((a) => a.op === "r" && a.offset === M.isr && a.width === 1));
          } else {
            assert.equal(p.interrupts.intx, 0);
            assert.ok((p.interrupts.msix.get(1) ?? 0) >= 5, "queue 0 interrupts arrive on vector 1");
            // §4.1.4.5.2: with MSI-X the driver does not read the ISR for queue interrupts.
            assert.ok(!log.some((a) => a.op === "r" && a.offset === M.isr));
          }
          assert.equal(p.device.errors.length, 0, JSON.stringify(p.device.errors.map((e) => e.err.message)));
        });
      }
    }
  }

  test("the driver accesses every register with its field width (§4.1.3.1), 64-bit addresses as low then high halves", () => {
    const log: Access[] = [];
    createBlkPciPair({ tapBar: (i, r) => spy(i, r, log) });
    const widths = new Map<number, number>([
      [COMMON_CFG.device_feature_select, 4],
      [COMMON_CFG.device_feature, 4],
      [COMMON_CFG.driver_feature_select, 4],
      [COMMON_CFG.driver_feature, 4],
      [COMMON_CFG.num_queues, 2],
      [COMMON_CFG.device_status, 1],
      [COMMON_CFG.config_generation, 1],
      [COMMON_CFG.queue_select, 2],
      [COMMON_CFG.queue_size, 2],
      [COMMON_CFG.queue_enable, 2],
      [COMMON_CFG.queue_notify_off, 2],
      [COMMON_CFG.queue_desc, 4],
      [COMMON_CFG.queue_desc + 4, 4],
      [COMMON_CFG.queue_driver, 4],
      [COMMON_CFG.queue_driver + 4, 4],
      [COMMON_CFG.queue_device, 4],
      [COMMON_CFG.queue_device + 4, 4],
    ]);
    const common = log.filter((a) => a.offset < COMMON_CFG.SIZE);
    assert.ok(common.length > 20);
    for (const a of common) assert.equal(a.width, widths.get(a.offset), `${a.op}${a.width * 8} at ${a.offset}`);
    for (const base of [COMMON_CFG.queue_desc, COMMON_CFG.queue_driver, COMMON_CFG.queue_device]) {
      const i = common.findIndex((a) => a.op === "w" && a.offset === base);
      assert.ok(i >= 0 && common[i + 1]?.offset === base + 4, `low half of ${base} is followed by its high half`);
    }
    // §4.1.5.1.3: queue_enable is written last, after the addresses.
    const enable = common.findIndex((a) => a.op === "w" && a.offset === COMMON_CFG.queue_enable);
    const lastArea = common.findIndex((a) => a.op === "w" && a.offset === COMMON_CFG.queue_device + 4);
    assert.ok(enable > lastArea && lastArea > 0);
  });

  test("diagnostics: layout, notify multiplier and per-queue notify offsets", () => {
    const p = createBlkPciPair({ device: { numQueues: 2 }, driver: { queues: 2 } });
    const t = p.transport;
    assert.equal(t.deviceId, 2);
    assert.equal(t.layout.common.bar, 4);
    assert.equal(t.layout.isr.offset, M.isr);
    assert.equal(t.layout.device?.length, BLK_CFG.SIZE);
    assert.equal(t.notifyMultiplier, 4);
    assert.equal(t.notifyOffset(0), M.notify);
    assert.equal(t.notifyOffset(1), M.notify + 4);
    assert.equal(t.notifyOffset(2), undefined);
    assert.equal(t.msixInUse, false);
  });

  for (const packed of [false, true]) {
    test(`NOTIFICATION_DATA (${packed ? "packed" : "split"}): every notify is one 32-bit write carrying the queue and the next available position (§4.1.5.2)`, async () => {
      const log: Access[] = [];
      const p = createBlkPciPair({
        driver: { preferPacked: packed, queueSize: 4, without: bit(VIRTIO_F_EVENT_IDX) },
        tapBar: (i, r) => spy(i, r, log),
      });
      assert.ok(hasFeature(p.driver.negotiated, VIRTIO_F_NOTIFICATION_DATA));
      const notifies = (): Access[] => log.filter((a) => a.op === "w" && a.offset >= M.notify && a.offset < M.notify + 0x1000);
      // Each request is one (indirect) descriptor, so after k requests the next position is k (mod 4 for packed, with the wrap counter).
      for (let k = 1; k <= 7; k++) {
        if (k % 3 === 0) await p.driver.flush();
        else if (k % 2 === 0) await p.driver.write(k, pattern(512, k));
        else await p.driver.read(k, 1);
        const n = notifies();
        assert.equal(n.length, k, "one notification per request");
        const last = n[n.length - 1]!;
        assert.equal(last.width, 4);
        assert.equal(last.offset, M.notify);
        const d = decodeNotificationData(packed ? "packed" : "split", last.value);
        assert.equal(d.queue, 0);
        if (packed) {
          assert.equal(d.next, k % 4, `request ${k}`);
          assert.equal(d.wrap, Math.floor(k / 4) % 2 === 0, `wrap counter after request ${k}`);
        } else {
          assert.equal(d.next, k, `avail idx after request ${k}`);
        }
      }
      assert.ok(notifies().every((a) => a.width === 4));
      assert.equal(p.pci.badAccesses, 0);
    });
  }

  test("without NOTIFICATION_DATA every notify is a 16-bit write of the queue index to its own slot", async () => {
    const log: Access[] = [];
    const p = createBlkPciPair({
      device: { numQueues: 2 },
      driver: { queues: 2, without: bit(VIRTIO_F_NOTIFICATION_DATA) },
      tapBar: (i, r) => spy(i, r, log),
    });
    await Promise.all([p.driver.write(0, pattern(512, 1)), p.driver.write(1, pattern(512, 2)), p.driver.flush()]);
    const n = log.filter((a) => a.op === "w" && a.offset >= M.notify && a.offset < M.notify + 0x1000);
    assert.ok(n.length >= 2);
    for (const a of n) assert.deepEqual({ width: a.width, value: a.value }, { width: 2, value: (a.offset - M.notify) / 4 });
    assert.deepEqual(new Set(n.map((a) => a.offset)), new Set([M.notify, M.notify + 4]), "both queues notified at their own addresses");
    assert.equal(p.pci.badAccesses, 0);
  });
});

describe("virtio-pci: interrupts", () => {
  test("MSI-X: each queue's used buffers arrive on its own vector, configuration changes on the config vector", async () => {
    const log: Access[] = [];
    const p = createBlkPciPair({
      irq: "msix",
      device: { numQueues: 2 },
      driver: { queues: 2 },
      tapBar: (i, r) => spy(i, r, log),
    });
    assert.equal(p.transport.msixInUse, true);
    assert.equal(p.pci.msixEnabled, true);
    await Promise.all([p.driver.write(0, pattern(512, 1)), p.driver.write(1, pattern(512, 2))]);
    assert.ok((p.interrupts.msix.get(1) ?? 0) >= 1, "queue 0 on vector 1");
    assert.ok((p.interrupts.msix.get(2) ?? 0) >= 1, "queue 1 on vector 2");
    assert.equal(p.interrupts.msix.get(PCI_PAIR_CONFIG_VECTOR), undefined);
    // The vectors the driver mapped, as the device reports them.
    const bar = p.pci.bar(4)!;
    assert.equal(bar.read16(COMMON_CFG.config_msix_vector), 0);
    bar.write16(COMMON_CFG.queue_select, 1);
    assert.equal(bar.read16(COMMON_CFG.queue_msix_vector), 2);
    // Each mapping was read back (§4.1.5.1.2.2).
    const vectorReads = log.filter(
      (a) => a.op === "r" && (a.offset === COMMON_CFG.queue_msix_vector || a.offset === COMMON_CFG.config_msix_vector),
    );
    assert.equal(vectorReads.length, 3);
    // A resized disk: a configuration change on vector 0 makes the driver re-read the capacity.
    (p.port as RamDisk).resize(16 << 20);
    p.device.refreshCapacity();
    await tick();
    assert.equal(p.interrupts.msix.get(PCI_PAIR_CONFIG_VECTOR), 1);
    assert.equal(p.driver.capacity, (16 << 20) / 512);
    assert.equal(p.interrupts.intx, 0);
    assert.equal(p.pci.badAccesses, 0);
  });

  test("MSI-X: a vector the device cannot map reads back NO_VECTOR and setup fails clearly", () => {
    assert.throws(
      () => createBlkPciPair({ irq: "msix", pci: { msixVectors: 2 }, queueVector: () => 5 }),
      (e: unknown) =>
        e instanceof IovirtUsageError && e.code === "MSIX_VECTOR" && /vector 5 for queue 0 \(read back 0xffff\)/.test(e.message),
    );
    const p = createBlkPciPair({ irq: "msix", init: false });
    p.transport.useMsix(9, () => 1);
    assert.throws(
      () => p.driver.init(),
      (e: unknown) => e instanceof IovirtUsageError && /vector 9 for configuration changes/.test(e.message),
    );
    assert.throws(() => p.transport.useMsix(0x800, () => 1), RangeError);
  });

  test("MSI-X: a masked vector is held pending in the PBA and delivered when unmasked (PCI 3.0 §6.8.2.9)", async () => {
    const p = createBlkPciPair({ irq: "msix" });
    const msix = readMsixCapability(p.pci.config)!;
    const table = p.pci.bar(msix.tableBar)!;
    table.write32(msix.tableOffset + 16 * 1 + 12, 1); // mask vector 1
    let done = false;
    const w = p.driver.write(3, pattern(512, 3)).then(() => (done = true));
    await tick();
    assert.equal(done, false, "no interrupt while masked");
    assert.equal(table.read32(msix.pbaOffset) & 0b10, 0b10, "vector 1 pending");
    table.write32(msix.tableOffset + 16 * 1 + 12, 0);
    await w;
    assert.equal(table.read32(msix.pbaOffset), 0);
    // Function Mask holds every vector the same way.
    const ctl = msix.capOffset + 2;
    p.pci.config.write16(ctl, p.pci.config.read16(ctl) | 0x4000);
    done = false;
    const r = p.driver.read(3, 1).then(() => (done = true));
    await tick();
    assert.equal(done, false);
    p.pci.config.write16(ctl, p.pci.config.read16(ctl) & ~0x4000);
    await r;
    assert.equal(p.pci.badAccesses, 0);
  });

  test("INTx: the ISR carries the cause, reading it clears it and de-asserts the line; Interrupt Disable holds the line", async () => {
    const p = createBlkPciPair();
    const cfg = p.pci.config;
    assert.equal(p.pci.msixEnabled, false);
    const w = p.driver.write(0, pattern(512, 9));
    // The device completed synchronously; the interrupt is queued, the ISR not yet read.
    assert.equal(p.pci.intxAsserted, true);
    assert.equal(cfg.read16(PCI_CFG.STATUS) & 0x8, 0x8, "Status.Interrupt Status mirrors the ISR");
    await w;
    assert.equal(p.pci.intxAsserted, false);
    assert.equal(cfg.read16(PCI_CFG.STATUS) & 0x8, 0);
    const before = p.interrupts.intx;
    cfg.write16(PCI_CFG.COMMAND, cfg.read16(PCI_CFG.COMMAND) | PCI_COMMAND_INTX_DISABLE);
    let done = false;
    const r = p.driver.read(0, 1).then(() => (done = true));
    await tick();
    assert.equal(done, false);
    assert.equal(p.interrupts.intx, before);
    assert.equal(cfg.read16(PCI_CFG.STATUS) & 0x8, 0x8, "the status bit is set regardless of Interrupt Disable");
    cfg.write16(PCI_CFG.COMMAND, cfg.read16(PCI_CFG.COMMAND) & ~PCI_COMMAND_INTX_DISABLE);
    await r;
    assert.equal(p.interrupts.intx, before + 1);
    // Configuration change: ISR bit 1.
    const bar = p.pci.bar(4)!;
    (p.port as RamDisk).resize(4 << 20);
    p.device.refreshCapacity();
    assert.equal(bar.read8(M.isr), 2);
    assert.equal(bar.read8(M.isr), 0, "read clears");
    assert.equal(p.pci.badAccesses, 0);
  });
});

describe("virtio-pci: configuration and queues", () => {
  test("config_generation: a change between the reads makes the driver read the configuration again (§2.5.1)", () => {
    const log: Access[] = [];
    let armed = true;
    let port: RamDisk | null = null;
    let dev: BlkDevice | null = null;
    const p = createBlkPciPair({
      init: false,
      tapBar: (i, r) =>
        spy(i, r, log, (a) => {
          if (armed && a.op === "r" && a.offset === M.device + BLK_CFG.capacity && port !== null && dev !== null) {
            armed = false;
            port.resize(12 << 20);
            dev.refreshCapacity();
          }
        }),
    });
    port = p.port as RamDisk;
    dev = p.device;
    const gen0 = p.device.configGeneration;
    p.driver.init();
    assert.equal(armed, false);
    assert.equal(p.device.configGeneration, gen0 + 1);
    assert.equal(p.driver.capacity, (12 << 20) / 512);
    const genReads = log.filter((a) => a.op === "r" && a.offset === COMMON_CFG.config_generation);
    assert.ok(genReads.length >= 4, `generation read before and after each of two passes: ${genReads.length}`);
    assert.ok(genReads.every((a) => a.width === 1));
    assert.equal(p.pci.badAccesses, 0);
  });

  for (const irq of ["intx", "msix"] as const) {
    test(`queue reset (RING_RESET, ${irq}): queue_reset polled until 0, queue set up again and working (§4.1.4.3.2)`, async () => {
      const log: Access[] = [];
      const p = createBlkPciPair({ irq, pci: { queueResetReads: 3 }, tapBar: (i, r) => spy(i, r, log) });
      assert.ok(hasFeature(p.driver.negotiated, VIRTIO_F_RING_RESET));
      await p.driver.write(5, pattern(1024, 5));
      const bar = p.pci.bar(4)!;
      // The reset alone: the queue is back in its default state (§2.6.1.1), disabled and unmapped.
      p.transport.resetQueue(0);
      bar.write16(COMMON_CFG.queue_select, 0);
      assert.equal(bar.read16(COMMON_CFG.queue_enable), 0);
      assert.equal(bar.read16(COMMON_CFG.queue_msix_vector), VIRTIO_MSI_NO_VECTOR);
      assert.equal(bar.read16(COMMON_CFG.queue_size), 256, "the maximum again");
      log.length = 0;
      p.driver.virtio.resetQueue(0);
      const resets = log.filter((a) => a.offset === COMMON_CFG.queue_reset);
      assert.deepEqual(
        resets.map((a) => `${a.op}${a.width * 8}=${a.value}`),
        ["w16=1", "r16=1", "r16=1", "r16=1", "r16=0"],
      );
      bar.write16(COMMON_CFG.queue_select, 0);
      assert.equal(bar.read16(COMMON_CFG.queue_enable), 1, "enabled again");
      assert.equal(bar.read16(COMMON_CFG.queue_msix_vector), irq === "msix" ? 1 : VIRTIO_MSI_NO_VECTOR, "vector mapped again");
      assert.deepEqual(await p.driver.read(5, 2), pattern(1024, 5));
      assert.equal(p.pci.badAccesses, 0);
    });
  }

  test("a queue reset that never completes is a bounded error", () => {
    const p = createBlkPciPair({ pci: { queueResetReads: 5_000_000 } });
    assert.throws(
      () => p.transport.resetQueue(0),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "QUEUE_RESET_TIMEOUT",
    );
  });

  test("device configuration: range-checked on the driver side, missing structure is an error", () => {
    const p = createBlkPciPair();
    assert.equal(p.transport.readConfig(BLK_CFG.blk_size, 4), 512);
    assert.throws(
      () => p.transport.readConfig(BLK_CFG.SIZE, 1),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "CONFIG_RANGE",
    );
    assert.throws(
      () => p.transport.readConfig(2, 4),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "CONFIG_RANGE",
    );
    assert.throws(
      () => p.transport.writeConfig(-1, 1, 0),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "CONFIG_RANGE",
    );
    const echo = new VirtioPciDevice(new EchoDevice());
    echo.config.write16(PCI_CFG.COMMAND, PCI_COMMAND_MEMORY);
    assert.equal(virtioPciLayout(echo.config).device, null, "no DEVICE_CFG capability without a configuration space");
    const t = new VirtioPciDriverTransport(echo.config, (i) => echo.bar(i)!);
    assert.equal(t.deviceId, 42);
    assert.throws(
      () => t.readConfig(0, 1),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "NO_DEVICE_CFG",
    );
    assert.equal(echo.badAccesses, 0);
  });
});

describe("virtio-pci: the function's configuration space", () => {
  test("header: virtio identity, revision, class by device type, subsystem, capability list (§4.1.2)", () => {
    const { pci } = bareBlk();
    const c = pci.config;
    assert.equal(c.size, 4096);
    assert.equal(c.read16(PCI_CFG.VENDOR_ID), 0x1af4);
    assert.equal(c.read16(PCI_CFG.DEVICE_ID), 0x1042);
    assert.equal(c.read8(PCI_CFG.REVISION_ID), 1);
    assert.equal(c.read32(PCI_CFG.REVISION_ID) >>> 8, 0x018000);
    assert.equal(c.read8(PCI_CFG.HEADER_TYPE), 0);
    assert.equal(c.read16(PCI_CFG.SUBSYSTEM_VENDOR_ID), 0x1af4);
    assert.equal(c.read16(PCI_CFG.SUBSYSTEM_ID), 2);
    assert.equal(c.read16(PCI_CFG.STATUS) & 0x10, 0x10);
    assert.equal(c.read8(PCI_CFG.INTERRUPT_PIN), 1);
    const net = new VirtioPciDevice(new NetDevice({ port: new MemoryPacketPort() }));
    assert.equal(net.config.read16(PCI_CFG.DEVICE_ID), 0x1041);
    assert.equal(net.config.read32(PCI_CFG.REVISION_ID) >>> 8, 0x020000);
    const other = new VirtioPciDevice(new EchoDevice());
    assert.equal(other.config.read32(PCI_CFG.REVISION_ID) >>> 8, 0xff0000);
    assert.equal(other.config.read16(PCI_CFG.DEVICE_ID), 0x1040 + 42);
  });

  test("readVirtioCaps and readMsixCapability decode the model's capabilities", () => {
    const { pci } = bareBlk({ numQueues: 3 });
    const caps = readVirtioCaps(pci.config);
    assert.deepEqual(
      caps.map((c) => [c.name, c.bar, c.offset, c.length, c.capOffset]),
      [
        ["COMMON_CFG", 4, 0, COMMON_CFG.SIZE, 0x40],
        ["ISR_CFG", 4, 0x1000, 1, 0x50],
        ["DEVICE_CFG", 4, 0x2000, BLK_CFG.SIZE, 0x60],
        ["NOTIFY_CFG", 4, 0x3000, 12, 0x70],
        ["PCI_CFG", 0, 0, 0, 0x84],
      ],
    );
    assert.equal(caps[3]!.notifyOffMultiplier, 4);
    assert.deepEqual(
      walkCapabilities(pci.config).map((c) => c.id),
      [9, 9, 9, 9, 9, PCI_CAP_ID_MSIX],
    );
    assert.deepEqual(readMsixCapability(pci.config), {
      capOffset: VIRTIO_PCI_MODEL_CAPS.msix,
      tableSize: 4,
      enabled: false,
      functionMask: false,
      tableBar: 1,
      tableOffset: 0,
      pbaBar: 1,
      pbaOffset: 0x1000,
    });
    const none = new VirtioPciDevice(new BlkDevice({ port: new RamDisk(4096) }), { msixVectors: 0 });
    assert.equal(readMsixCapability(none.config), null);
    assert.equal(none.bar(1), null);
  });

  test("MSI-X table and PBA in BAR 4 at their own offsets: decoded and working", async () => {
    const p = createBlkPciPair({ irq: "msix", pci: { msixBar: 4 } });
    const m = readMsixCapability(p.pci.config)!;
    assert.equal(m.tableBar, 4);
    assert.equal(m.pbaBar, 4);
    assert.equal(m.tableOffset, 0x4000);
    assert.equal(m.pbaOffset, 0x5000);
    assert.equal(m.enabled, true);
    assert.equal(p.pci.bar(1), null);
    assert.ok(p.pci.barSize(4) >= 0x6000);
    await roundTrip(p);
    assert.ok((p.interrupts.msix.get(1) ?? 0) > 0);
    assert.equal(p.pci.badAccesses, 0);
  });

  test("BAR sizing: writing all ones reads back the size mask; BAR 4 is a 64-bit memory BAR", () => {
    const { pci } = bareBlk();
    const c = pci.config;
    const probe = (off: number): number => {
      const saved = c.read32(off);
      c.write32(off, 0xffffffff);
      const mask = c.read32(off);
      c.write32(off, saved);
      assert.equal(c.read32(off), saved);
      return mask;
    };
    const lo = probe(PCI_CFG.BAR0 + 16);
    assert.equal(lo & 0xf, 0x4, "64-bit, memory, not prefetchable");
    const hi = probe(PCI_CFG.BAR0 + 20);
    assert.equal(hi, 0xffffffff);
    const size = Number(~((BigInt(hi) << 32n) | BigInt(lo & ~0xf)) & 0xffff_ffff_ffff_ffffn) + 1;
    assert.equal(size, pci.barSize(4));
    assert.equal(size, 0x4000);
    assert.equal(pci.bar(4)!.size, size);
    const msix = probe(PCI_CFG.BAR0 + 4);
    assert.equal((~(msix & ~0xf) >>> 0) + 1, pci.barSize(1));
    for (const unimplemented of [0, 2, 3]) assert.equal(probe(PCI_CFG.BAR0 + 4 * unimplemented), 0);
    c.write32(PCI_CFG.BAR0 + 16, 0xfe00_0123);
    assert.equal(c.read32(PCI_CFG.BAR0 + 16), 0xfe00_0004, "address bits below the size and the type bits are not writable");
    assert.equal(pci.badAccesses, 0);
  });

  test("PCI_CFG capability: pci_cfg_data is a window into the BARs for reads and writes (§4.1.4.9)", () => {
    const p = createBlkPciPair();
    const c = p.pci.config;
    const cap = readVirtioCaps(c).find((x) => x.cfgType === VIRTIO_PCI_CAP.PCI_CFG)!.capOffset;
    const window = (bar: number, offset: number, len: number): void => {
      c.write8(cap + 4, bar);
      c.write32(cap + 12, len);
      c.write32(cap + 8, offset);
    };
    window(4, COMMON_CFG.device_status, 1);
    assert.equal(c.read8(cap + 16), FULL_STATUS);
    window(4, COMMON_CFG.num_queues, 2);
    assert.equal(c.read16(cap + 16), 1);
    // Writes through the window: select each feature word, then read it.
    for (const sel of [0, 1, 0]) {
      window(4, COMMON_CFG.device_feature_select, 4);
      c.write32(cap + 16, sel);
      window(4, COMMON_CFG.device_feature, 4);
      assert.equal(c.read32(cap + 16), p.device.readDeviceFeatures(sel), `feature word ${sel}`);
    }
    window(4, M.device + BLK_CFG.capacity, 4);
    assert.equal(c.read32(cap + 16), (8 << 20) / 512);
    for (const [q, size] of [
      [5, 0],
      [0, p.driver.virtio.queue(0).size],
    ] as const) {
      window(4, COMMON_CFG.queue_select, 2);
      c.write16(cap + 16, q);
      window(4, COMMON_CFG.queue_size, 2);
      assert.equal(c.read16(cap + 16), size, `queue ${q}`);
    }
    // The window works with memory decoding off: it is a configuration access.
    c.write16(PCI_CFG.COMMAND, 0);
    window(4, COMMON_CFG.device_status, 1);
    assert.equal(c.read8(cap + 16), FULL_STATUS);
    c.write16(PCI_CFG.COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    assert.equal(p.pci.badAccesses, 0);
    // Bad windows: a length other than 1/2/4, an unaligned offset, a BAR without registers, the wrong field width.
    window(4, 0, 3);
    c.read32(cap + 16);
    window(4, 2, 4);
    c.read32(cap + 16);
    window(2, 0, 4);
    c.write32(cap + 16, 7);
    window(4, COMMON_CFG.device_status, 4);
    c.read32(cap + 16);
    assert.equal(p.pci.badAccesses, 4);
  });

  test("read-only configuration fields ignore writes; writable ones keep only their implemented bits", () => {
    const { pci } = bareBlk();
    const c = pci.config;
    const snapshot = (): number[] => [0x00, 0x08, 0x2c, 0x34, 0x40, 0x44, 0x48, 0x4c, 0x70, 0x80, 0x84].map((o) => c.read32(o));
    const before = snapshot();
    for (const o of [0x00, 0x08, 0x2c, 0x34, 0x40, 0x44, 0x48, 0x4c, 0x70, 0x80, 0x84]) c.write32(o, 0xa5a5a5a5);
    const after = snapshot();
    assert.deepEqual(after, before);
    c.write16(PCI_CFG.COMMAND, 0xffff);
    assert.equal(c.read16(PCI_CFG.COMMAND), PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | 0x40 | 0x100 | PCI_COMMAND_INTX_DISABLE);
    const ctl = VIRTIO_PCI_MODEL_CAPS.msix + 2;
    c.write16(ctl, 0xffff);
    assert.equal(c.read16(ctl), 0xc000 | 1, "Enable and Function Mask writable, Table Size read-only");
    c.write16(ctl, 0);
    c.write16(PCI_CFG.STATUS, 0xffff);
    assert.equal(c.read16(PCI_CFG.STATUS), 0x10);
    assert.equal(pci.badAccesses, 0, "writes to read-only configuration bits are ordinary");
    c.read32(2);
    c.write16(0xfff, 1);
    c.read8(4096);
    assert.equal(pci.badAccesses, 3, "unaligned and out-of-range configuration accesses are refused");
  });
});

describe("virtio-pci: driver checks on the function", () => {
  test("a structure that overruns its BAR is refused before any register access", () => {
    const log: Access[] = [];
    assert.throws(
      () =>
        createBlkPciPair({
          tapBar: (i, r) => spy(i, { ...r, size: 0x2000 }, log),
        }),
      (e: unknown) => e instanceof GuestError && e.code === "VIRTIO_PCI_CAPS" && /overruns the BAR/.test(e.message),
    );
    assert.equal(log.length, 0);
  });

  test("a notify structure too short for 32-bit notifications is refused at queue setup (§4.1.4.4.1)", () => {
    const cap = VIRTIO_PCI_MODEL_CAPS.notify;
    assert.throws(
      () => createBlkPciPair({ tapConfig: (c) => patched(c, at(cap + 12, le32(2))) }),
      (e: unknown) => e instanceof GuestError && e.code === "VIRTIO_PCI_NOTIFY",
    );
    // The same structure suffices for 16-bit notifications.
    const p = createBlkPciPair({
      tapConfig: (c) => patched(c, at(cap + 12, le32(2))),
      driver: { without: bit(VIRTIO_F_NOTIFICATION_DATA) },
    });
    assert.equal(p.transport.notifyOffset(0), M.notify);
  });

  test("device ids: modern 0x1040 + id, transitional ids take the subsystem id (§4.1.2.1), others are refused", () => {
    const t = createBlkPciPair({ pci: { pciDeviceId: 0x1001 } });
    assert.equal(t.transport.deviceId, 2);
    assert.equal(t.pci.config.read8(PCI_CFG.REVISION_ID), 0, "a transitional device has revision 0");
    const sub = createBlkPciPair({ pci: { pciDeviceId: 0x1000, subsystemId: 2 } });
    assert.equal(sub.transport.deviceId, 2, "the subsystem id wins over the transitional device id");
    assert.throws(
      () => createBlkPciPair({ pci: { pciDeviceId: 0x1001, subsystemId: 1 } }),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "NOT_BLK",
    );
    assert.throws(
      () => createBlkPciPair({ pci: { pciDeviceId: 0x1100 } }),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "NOT_VIRTIO",
    );
    assert.throws(
      () => createBlkPciPair({ tapConfig: (c) => patched(c, { 0: 0x86, 1: 0x80 }) }),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "NOT_VIRTIO",
    );
  });

  test("the driver's reset clears its MSI-X and feature state: a second init maps the vectors again", async () => {
    const log: Access[] = [];
    const p = createBlkPciPair({ irq: "msix", tapBar: (i, r) => spy(i, r, log) });
    log.length = 0;
    p.driver.init({ without: bit(VIRTIO_F_NOTIFICATION_DATA) });
    assert.ok(log.some((a) => a.op === "w" && a.offset === COMMON_CFG.config_msix_vector));
    await p.driver.write(0, pattern(512, 4));
    const n = log.filter((a) => a.op === "w" && a.offset === M.notify);
    assert.ok(n.length > 0 && n.every((a) => a.width === 2), "16-bit notifications after renegotiating without NOTIFICATION_DATA");
    assert.equal(p.pci.badAccesses, 0);
  });
});

describe("virtio-pci: recovery and bus mastering", () => {
  test("a device reporting DEVICE_NEEDS_RESET is seen, and the init sequence recovers it", async () => {
    const p = createBlkPciPair();
    const t = p.transport;
    t.setStatus(t.getStatus() | STATUS_DEVICE_NEEDS_RESET);
    p.driver.init();
    assert.equal(p.driver.virtio.needsReset(), false);
    const data = new Uint8Array(512).fill(7);
    await p.driver.write(0, data);
    assert.deepEqual(await p.driver.read(0, 1), data);
    assert.equal(p.pci.badAccesses, 0);
  });

  test("enableBusMaster sets Memory Space and Bus Master with one 16-bit read-modify-write", () => {
    const p = createBlkPciPair({ init: false });
    const cfg = p.pci.config;
    cfg.write16(4, 0x400); // Interrupt Disable only
    enableBusMaster(cfg);
    assert.equal(cfg.read16(4), 0x406);
  });
});

describe("virtio-pci: the device model under hostile register traffic", () => {
  test("queue registers of a queue beyond num_queues, bad sizes and writes to read-only fields are refused and counted, never thrown", () => {
    const { pci, bar, dev } = bareBlk();
    let bad = 0;
    const expectBad = (fn: () => void, what: string): void => {
      assert.doesNotThrow(fn, what);
      bad++;
      assert.equal(pci.badAccesses, bad, what);
    };
    assert.equal(bar.read16(COMMON_CFG.num_queues), 1);
    bar.write16(COMMON_CFG.queue_select, 7);
    assert.equal(bar.read16(COMMON_CFG.queue_size), 0, "§4.1.4.3.1: an unavailable queue has size 0");
    assert.equal(bar.read16(COMMON_CFG.queue_msix_vector), VIRTIO_MSI_NO_VECTOR);
    assert.equal(bar.read16(COMMON_CFG.queue_enable), 0);
    assert.equal(pci.badAccesses, 0);
    expectBad(() => bar.write16(COMMON_CFG.queue_size, 64), "queue_size of a missing queue");
    expectBad(() => bar.write16(COMMON_CFG.queue_enable, 1), "queue_enable of a missing queue");
    expectBad(() => bar.write32(COMMON_CFG.queue_desc, 0x1000), "queue_desc of a missing queue");
    expectBad(() => bar.write16(COMMON_CFG.queue_msix_vector, 0), "queue_msix_vector of a missing queue");
    bar.write16(COMMON_CFG.queue_select, 0);
    // Negotiate split rings so queue_size knows the power-of-2 rule.
    bar.write8(COMMON_CFG.device_status, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    bar.write32(COMMON_CFG.driver_feature_select, 1);
    bar.write32(COMMON_CFG.driver_feature, Number(bit(VIRTIO_F_VERSION_1) >> 32n));
    bar.write8(COMMON_CFG.device_status, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert.equal(bar.read8(COMMON_CFG.device_status) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
    expectBad(() => bar.write16(COMMON_CFG.queue_size, 0), "queue_size 0");
    expectBad(() => bar.write16(COMMON_CFG.queue_size, 1024), "queue_size over the maximum");
    expectBad(() => bar.write16(COMMON_CFG.queue_size, 24), "split queue_size not a power of 2");
    // Read-only fields.
    for (const [o, w] of [
      [COMMON_CFG.num_queues, 2],
      [COMMON_CFG.device_feature, 4],
      [COMMON_CFG.config_generation, 1],
      [COMMON_CFG.queue_notify_off, 2],
    ] as const) {
      const before = w === 1 ? bar.read8(o) : w === 2 ? bar.read16(o) : bar.read32(o);
      expectBad(() => (w === 1 ? bar.write8(o, 0x55) : w === 2 ? bar.write16(o, 0x55) : bar.write32(o, 0x55)), `write to read-only ${o}`);
      assert.equal(w === 1 ? bar.read8(o) : w === 2 ? bar.read16(o) : bar.read32(o), before);
    }
    expectBad(() => bar.write16(COMMON_CFG.queue_enable, 0), "§4.1.4.3.2: the driver must not write 0 to queue_enable");
    expectBad(() => bar.write16(COMMON_CFG.queue_reset, 1), "queue_reset without RING_RESET");
    expectBad(() => bar.write8(M.isr, 0), "ISR is read-only");
    // The queue enabled with the bad size (24) puts the device in DEVICE_NEEDS_RESET at DRIVER_OK, not an exception.
    bar.write32(COMMON_CFG.queue_desc, 0x1000);
    bar.write32(COMMON_CFG.queue_driver, 0x2000);
    bar.write32(COMMON_CFG.queue_device, 0x3000);
    bar.write16(COMMON_CFG.queue_enable, 1);
    expectBad(() => bar.write32(COMMON_CFG.queue_desc, 0), "queue register written while enabled");
    assert.doesNotThrow(() => bar.write8(COMMON_CFG.device_status, FULL_STATUS));
    assert.equal(bar.read8(COMMON_CFG.device_status) & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
    assert.ok(dev.errors.some((e) => e.err.code === "BAD_QUEUE_SIZE"));
    // A notify of the wrong width (32-bit without NOTIFICATION_DATA), and one carrying another queue's index.
    expectBad(() => bar.write32(M.notify, 0), "32-bit notify without NOTIFICATION_DATA");
    expectBad(() => bar.write16(M.notify, 3), "notify value naming another queue");
    // A reset clears it all.
    bar.write8(COMMON_CFG.device_status, 0);
    assert.equal(bar.read8(COMMON_CFG.device_status), 0);
    assert.equal(bar.read8(M.isr), 0);
    assert.equal(pci.badAccesses, bad);
  });

  test("wrong widths, unaligned, unknown and out-of-range BAR accesses read 0 and are counted", () => {
    const { pci, bar } = bareBlk();
    const reads: [() => number, string][] = [
      [() => bar.read32(COMMON_CFG.device_status), "32-bit read of an 8-bit field"],
      [() => bar.read16(COMMON_CFG.device_feature), "16-bit read of a 32-bit field"],
      [() => bar.read8(COMMON_CFG.queue_select), "8-bit read of a 16-bit field"],
      [() => bar.read16(COMMON_CFG.device_feature + 2), "middle of a field"],
      [() => bar.read16(0x801), "unaligned"],
      [() => bar.read32(0x800), "between structures"],
      [() => bar.read32(M.isr), "32-bit ISR read"],
      [() => bar.read8(M.device + BLK_CFG.SIZE), "past the device configuration"],
      [() => bar.read16(M.device + 1), "unaligned device configuration read"],
      [() => bar.read16(M.notify), "notify read"],
      [() => bar.read32(bar.size), "past the BAR"],
      [() => bar.read8(-1), "negative"],
      [() => bar.read8(Number.NaN), "NaN"],
      [() => pci.bar(1)!.read16(0), "16-bit MSI-X table read"],
    ];
    for (const [r, what] of reads) assert.equal(r(), 0, what);
    assert.equal(pci.badAccesses, reads.length);
    assert.doesNotThrow(() => {
      bar.write8(COMMON_CFG.queue_select, 1);
      bar.write32(COMMON_CFG.device_status, 1);
      bar.write16(0x3ffe + 4, 1);
    });
    assert.equal(pci.badAccesses, reads.length + 3);
    assert.equal(bar.read8(COMMON_CFG.device_status), 0, "the 32-bit status write did nothing");
    // Memory decoding off: reads complete as all ones, writes are dropped.
    pci.config.write16(PCI_CFG.COMMAND, 0);
    assert.equal(bar.read16(COMMON_CFG.num_queues), 0xffff);
    bar.write8(COMMON_CFG.device_status, STATUS_ACKNOWLEDGE);
    pci.config.write16(PCI_CFG.COMMAND, PCI_COMMAND_MEMORY);
    assert.equal(bar.read8(COMMON_CFG.device_status), 0);
    assert.equal(pci.badAccesses, reads.length + 5);
  });

  test("random register and configuration traffic never throws", () => {
    const { pci, bar } = bareBlk({ numQueues: 2 });
    let seed = 0x1234567;
    const rnd = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return (seed >>> 8) % n;
    };
    const hot = [0, 4, 8, 12, 16, 18, 20, 21, 22, 24, 26, 28, 30, 32, 36, 40, 44, 48, 52, 56, 58, 0x1000, 0x2000, 0x2008, 0x3000, 0x3004];
    const msix = pci.bar(1)!;
    assert.doesNotThrow(() => {
      for (let i = 0; i < 20000; i++) {
        const w = [1, 2, 4][rnd(3)]!;
        const off = rnd(4) === 0 ? rnd(bar.size + 8) : hot[rnd(hot.length)]! + (rnd(8) === 0 ? 1 : 0);
        const v = rnd(5) === 0 ? rnd(0x10000) : [0, 1, 2, 3, 0xf, 0xffff, 0xffffffff][rnd(7)]!;
        const target = rnd(10);
        if (target === 0) {
          const o = rnd(0x100);
          if (rnd(2) === 0) pci.config.write32(o & ~3, v);
          else pci.config.read16(o);
        } else if (target === 1) {
          if (rnd(2) === 0) msix.write32(rnd(0x40) * 4, v);
          else msix.read32(rnd(0x800) * 4);
        } else if (rnd(2) === 0) {
          if (w === 1) bar.write8(off, v);
          else if (w === 2) bar.write16(off, v);
          else bar.write32(off, v);
        } else if (w === 1) bar.read8(off);
        else if (w === 2) bar.read16(off);
        else bar.read32(off);
      }
    });
    assert.ok(pci.badAccesses > 0);
  });
});
