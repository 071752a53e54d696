import { GuestError } from "../../../errors.js";
import type { MmioRegion, PciConfig } from "../../../pci/access.js";
import { PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY } from "../../../pci/command.js";
import { PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CFG, PCI_STATUS_CAP_LIST } from "../../../pci/config.js";
import type { VirtioDevice } from "../../lifecycle/device.js";
import { VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_RESET, hasFeature } from "../../lifecycle/features.js";
import { STATUS_FEATURES_OK } from "../../lifecycle/status.js";
import { COMMON_CFG, VIRTIO_PCI_CAP, VIRTIO_PCI_MODERN_DEVICE_BASE, VIRTIO_PCI_VENDOR } from "./caps.js";
import { VIRTIO_MSI_NO_VECTOR } from "./driver.js";

export interface VirtioPciDeviceOptions {
  /**
   * Raised for each interrupt the function signals: the MSI-X table entry
   * number when MSI-X is enabled (and the vector is not masked), or null
   * when the INTx line goes from de-asserted to asserted. Reading the ISR
   * de-asserts it.
   */
  interrupt?: (vector: number | null) => void;
  /** MSI-X table size (0: no MSI-X capability). Default: one vector per queue plus one for configuration changes. */
  msixVectors?: number;
  /** The BAR holding the MSI-X table and PBA: 1 (a 32-bit BAR of its own, as QEMU does; default) or 4. */
  msixBar?: 1 | 4;
  /** PCI Device ID; default the modern 0x1040 + device id. A transitional ID (0x1000..0x103f) gets revision 0. */
  pciDeviceId?: number;
  /**
   * Subsystem ID; default the virtio device id, which §4.1.2.3 requires of
   * transitional devices (§4.1.2.1 suggests 0x40 or higher for modern ones).
   */
  subsystemId?: number;
  /** Reads of queue_reset that still return 1 after a queue reset (default 0: resets complete at once). */
  queueResetReads?: number;
}

/** Where the model puts the virtio structures in BAR 4: one 4 KiB page each, as QEMU does. */
export const VIRTIO_PCI_MODEL = {
  bar: 4,
  common: 0x0000,
  isr: 0x1000,
  device: 0x2000,
  notify: 0x3000,
  notifyOffMultiplier: 4,
} as const;

/** Configuration-space offsets of the model's capabilities. */
export const VIRTIO_PCI_MODEL_CAPS = {
  common: 0x40,
  isr: 0x50,
  device: 0x60,
  notify: 0x70,
  pciCfg: 0x84,
  msix: 0x98,
} as const;

const CONFIG_SPACE_SIZE = 4096;
const HALF = 0x1_0000_0000;
const BAR_MEM_64 = 0x4;
const PCI_STATUS_INTERRUPT = 1 << 3;
const MSIX_CTRL_ENABLE = 0x8000;
const MSIX_CTRL_MASKALL = 0x4000;
/** Command bits the model implements; the rest read 0 (PCI 3.0 §6.2.2). */
const COMMAND_WRITABLE = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | 0x40 /* parity */ | 0x100 /* SERR */ | PCI_COMMAND_INTX_DISABLE;

/** PCI class codes by virtio device id (blk: mass storage/other, net: Ethernet; the rest: unassigned). */
const CLASS_BY_DEVICE: Readonly<Record<number, number>> = { 1: 0x020000, 2: 0x018000 };

/** Width of each field of struct virtio_pci_common_cfg (§4.1.4.3); 64-bit fields as two 32-bit halves (§4.1.3). */
const COMMON_WIDTH: ReadonlyMap<number, number> = new Map([
  [COMMON_CFG.device_feature_select, 4],
  [COMMON_CFG.device_feature, 4],
  [COMMON_CFG.driver_feature_select, 4],
  [COMMON_CFG.driver_feature, 4],
  [COMMON_CFG.config_msix_vector, 2],
  [COMMON_CFG.num_queues, 2],
  [COMMON_CFG.device_status, 1],
  [COMMON_CFG.config_generation, 1],
  [COMMON_CFG.queue_select, 2],
  [COMMON_CFG.queue_size, 2],
  [COMMON_CFG.queue_msix_vector, 2],
  [COMMON_CFG.queue_enable, 2],
  [COMMON_CFG.queue_notify_off, 2],
  [COMMON_CFG.queue_desc, 4],
  [COMMON_CFG.queue_desc + 4, 4],
  [COMMON_CFG.queue_driver, 4],
  [COMMON_CFG.queue_driver + 4, 4],
  [COMMON_CFG.queue_device, 4],
  [COMMON_CFG.queue_device + 4, 4],
  [COMMON_CFG.queue_notif_config_data, 2],
  [COMMON_CFG.queue_reset, 2],
]);

type Width = 1 | 2 | 4;
type AreaKey = "descTable" | "driverArea" | "deviceArea";

function aligned(offset: number, width: number, size: number): boolean {
  return Number.isInteger(offset) && offset >= 0 && offset + width <= size && offset % width === 0;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function pow2AtLeast(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

function getLE(b: Uint8Array, at: number, w: number): number {
  let v = 0;
  for (let i = w - 1; i >= 0; i--) v = v * 256 + (b[at + i] ?? 0);
  return v;
}

function setLE(b: Uint8Array, at: number, w: number, v: number): void {
  for (let i = 0; i < w; i++) b[at + i] = (v >>> (8 * i)) & 0xff;
}

/**
 * The device side of the virtio-pci modern transport (virtio 1.2 §4.1) over
 * a VirtioDevice: a PCIe configuration space with the virtio capabilities,
 * MSI-X and the PCI configuration access window, and BAR 4 with the common
 * configuration, ISR, device configuration and notification structures.
 *
 * Every access is guest-controlled and never throws (docs/architecture.md, principle 3).
 * Register files decode by offset and width (§4.1.3.1): an access whose
 * width is not the field's, or that hits no field, reads 0, is dropped if a
 * write, and is counted in `badAccesses`; so are writes to read-only
 * registers and register values the driver must not write.
 *
 * Memory Space decoding (Command bit 1) gates BAR accesses; Bus Master
 * Enable is not modelled: the device reaches memory through the GuestMemory
 * it was given.
 */
export class VirtioPciDevice {
  readonly device: VirtioDevice;
  /** The function's configuration space, as the driver reaches it. */
  readonly config: PciConfig;
  /** Guest accesses refused: wrong width, no such register, read-only, out of range, memory decoding off. */
  badAccesses = 0;
  /** The last refused access, for diagnostics. */
  lastBadAccess: string | null = null;
  /** MSI-X table size (0: no MSI-X). */
  readonly msixVectors: number;
  readonly msixBar: 1 | 4 | null;
  readonly msixTableOffset: number;
  readonly msixPbaOffset: number;

  private readonly opts: VirtioPciDeviceOptions;
  private readonly cfg = new Uint8Array(CONFIG_SPACE_SIZE);
  private readonly wmask = new Uint8Array(CONFIG_SPACE_SIZE);
  private readonly barSizes = new Map<number, number>();
  private readonly regions = new Map<number, MmioRegion>();
  private readonly notifyLength: number;

  // Common configuration state that is the transport's, not the device's (§4.1.4.3).
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private queueSelect = 0;
  private configVector = VIRTIO_MSI_NO_VECTOR;
  private readonly queueVectors: Uint16Array;
  private readonly resetReads: Uint32Array;
  private isr = 0;
  private intxLevel = false;

  // MSI-X table (4 dwords per entry) and pending bits (PCI 3.0 §6.8.2.6-§6.8.2.10).
  private readonly msixTable: Uint32Array;
  private readonly msixPending: Uint8Array;
  private msixPendingCount = 0;

  constructor(device: VirtioDevice, opts: VirtioPciDeviceOptions = {}) {
    this.device = device;
    this.opts = opts;
    const nq = device.numQueues;
    const vectors = opts.msixVectors ?? Math.min(nq + 1, 0x800);
    if (!(Number.isInteger(vectors) && vectors >= 0 && vectors <= 0x800)) throw new RangeError(`msixVectors ${vectors}`);
    this.msixVectors = vectors;
    if (opts.msixBar !== undefined && opts.msixBar !== 1 && opts.msixBar !== 4) throw new RangeError(`msixBar ${String(opts.msixBar)}`);
    this.queueVectors = new Uint16Array(nq).fill(VIRTIO_MSI_NO_VECTOR);
    this.resetReads = new Uint32Array(nq);
    this.msixTable = new Uint32Array(vectors * 4);
    // PCI 3.0 §6.8.2.9: every vector comes out of reset masked.
    for (let i = 0; i < vectors; i++) this.msixTable[i * 4 + 3] = 1;
    this.msixPending = new Uint8Array(vectors);
    // §4.1.4.4.1: with NOTIFICATION_DATA each queue's slot is 4 bytes.
    this.notifyLength = nq * VIRTIO_PCI_MODEL.notifyOffMultiplier;

    // BAR layout: the virtio structures in BAR 4; the MSI-X table and PBA each on a page of their own.
    const tableBytes = roundUp(vectors * 16, 0x1000);
    const pbaBytes = roundUp(Math.ceil(vectors / 64) * 8, 0x1000);
    let bar4End = VIRTIO_PCI_MODEL.notify + roundUp(this.notifyLength, 0x1000);
    this.msixBar = vectors === 0 ? null : (opts.msixBar ?? 1);
    if (this.msixBar === 4) {
      this.msixTableOffset = bar4End;
      this.msixPbaOffset = bar4End + tableBytes;
      bar4End += tableBytes + pbaBytes;
    } else {
      this.msixTableOffset = 0;
      this.msixPbaOffset = tableBytes;
      if (this.msixBar === 1) this.barSizes.set(1, pow2AtLeast(tableBytes + pbaBytes));
    }
    this.barSizes.set(4, pow2AtLeast(Math.max(bar4End, 0x4000)));

    this.buildConfigSpace(opts);
    this.config = {
      size: CONFIG_SPACE_SIZE,
      read8: (o) => this.cfgRead(o, 1),
      read16: (o) => this.cfgRead(o, 2),
      read32: (o) => this.cfgRead(o, 4),
      write8: (o, v) => this.cfgWrite(o, 1, v),
      write16: (o, v) => this.cfgWrite(o, 2, v),
      write32: (o, v) => this.cfgWrite(o, 4, v),
    };
    for (const [bar, size] of this.barSizes) this.regions.set(bar, this.makeRegion(bar, size));

    const prev = device.events;
    device.events = {
      ...prev,
      usedBuffer: (q) => {
        prev.usedBuffer?.(q);
        this.queueInterrupt(q);
      },
      configChange: () => {
        prev.configChange?.();
        this.configInterrupt();
      },
    };
  }

  /** Memory BAR `index` as the driver sees it (through its mapping), or null for an unimplemented BAR. */
  bar(index: number): MmioRegion | null {
    return this.regions.get(index) ?? null;
  }

  /** Size in bytes of BAR `index` (0 when unimplemented). */
  barSize(index: number): number {
    return this.barSizes.get(index) ?? 0;
  }

  /** MSI-X is enabled in Message Control (§4.1.5.1.2: then the ISR carries no queue interrupts). */
  get msixEnabled(): boolean {
    return this.msixVectors > 0 && (this.msixControl() & MSIX_CTRL_ENABLE) !== 0;
  }

  /** Whether the INTx line is asserted now. */
  get intxAsserted(): boolean {
    return this.intxLevel;
  }

  // ---- configuration space ----

  private buildConfigSpace(opts: VirtioPciDeviceOptions): void {
    const d = this.device;
    const pciDevice = opts.pciDeviceId ?? VIRTIO_PCI_MODERN_DEVICE_BASE + d.deviceId;
    const transitional = pciDevice >= 0x1000 && pciDevice <= 0x103f;
    const c = this.cfg;
    const put = (at: number, w: number, v: number, writable = 0): void => {
      setLE(c, at, w, v);
      setLE(this.wmask, at, w, writable);
    };
    // PCI 3.0 §6.2.1 header; virtio identity per §4.1.2.
    put(PCI_CFG.VENDOR_ID, 2, VIRTIO_PCI_VENDOR);
    put(PCI_CFG.DEVICE_ID, 2, pciDevice);
    put(PCI_CFG.COMMAND, 2, 0, COMMAND_WRITABLE);
    put(PCI_CFG.STATUS, 2, PCI_STATUS_CAP_LIST);
    // §4.1.2.1: non-transitional devices have revision 1 or higher; §4.1.2.3: transitional ones 0.
    put(PCI_CFG.REVISION_ID, 1, transitional ? 0 : 1);
    put(PCI_CFG.CLASS_PROG, 3, CLASS_BY_DEVICE[d.deviceId] ?? 0xff0000);
    put(0x0c, 1, 0, 0xff); // cache line size
    put(PCI_CFG.HEADER_TYPE, 1, 0);
    if (this.msixBar === 1) put(PCI_CFG.BAR0 + 4, 4, 0, ~(this.barSize(1) - 1) & 0xfffffff0);
    // BAR 4/5: one 64-bit memory BAR; the size probe works through the writable mask.
    put(PCI_CFG.BAR0 + 16, 4, BAR_MEM_64, ~(this.barSize(4) - 1) & 0xfffffff0);
    put(PCI_CFG.BAR0 + 20, 4, 0, 0xffffffff);
    put(PCI_CFG.SUBSYSTEM_VENDOR_ID, 2, VIRTIO_PCI_VENDOR);
    put(PCI_CFG.SUBSYSTEM_ID, 2, opts.subsystemId ?? d.deviceId);
    put(PCI_CFG.CAPABILITIES_POINTER, 1, VIRTIO_PCI_MODEL_CAPS.common);
    put(PCI_CFG.INTERRUPT_LINE, 1, 0, 0xff);
    put(PCI_CFG.INTERRUPT_PIN, 1, 1); // INTA#

    // §4.1.4: struct virtio_pci_cap { cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length }.
    const K = VIRTIO_PCI_MODEL_CAPS;
    const vcap = (at: number, next: number, type: number, offset: number, length: number, capLen = 16): void => {
      put(at, 1, PCI_CAP_ID_VNDR);
      put(at + 1, 1, next);
      put(at + 2, 1, capLen);
      put(at + 3, 1, type);
      put(at + 4, 1, VIRTIO_PCI_MODEL.bar);
      put(at + 8, 4, offset);
      put(at + 12, 4, length);
    };
    const hasDeviceCfg = d.configSize > 0;
    vcap(K.common, K.isr, VIRTIO_PCI_CAP.COMMON_CFG, VIRTIO_PCI_MODEL.common, COMMON_CFG.SIZE);
    vcap(K.isr, hasDeviceCfg ? K.device : K.notify, VIRTIO_PCI_CAP.ISR_CFG, VIRTIO_PCI_MODEL.isr, 1);
    if (hasDeviceCfg) vcap(K.device, K.notify, VIRTIO_PCI_CAP.DEVICE_CFG, VIRTIO_PCI_MODEL.device, d.configSize);
    vcap(K.notify, K.pciCfg, VIRTIO_PCI_CAP.NOTIFY_CFG, VIRTIO_PCI_MODEL.notify, this.notifyLength, 20);
    put(K.notify + 16, 4, VIRTIO_PCI_MODEL.notifyOffMultiplier);
    // §4.1.4.9: bar, offset, length and pci_cfg_data of the PCI_CFG capability are read-write.
    vcap(K.pciCfg, this.msixVectors > 0 ? K.msix : 0, VIRTIO_PCI_CAP.PCI_CFG, 0, 0, 20);
    put(K.pciCfg + 4, 1, 0, 0xff);
    put(K.pciCfg + 8, 4, 0, 0xffffffff);
    put(K.pciCfg + 12, 4, 0, 0xffffffff);
    put(K.pciCfg + 16, 4, 0, 0xffffffff);
    if (this.msixVectors > 0) {
      // PCI 3.0 §6.8.2: Message Control (Table Size N-1, read-only; Function Mask and Enable writable), Table and PBA BIR/offset.
      put(K.msix, 1, PCI_CAP_ID_MSIX);
      put(K.msix + 1, 1, 0);
      put(K.msix + 2, 2, this.msixVectors - 1, MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL);
      put(K.msix + 4, 4, (this.msixTableOffset | this.msixBar!) >>> 0);
      put(K.msix + 8, 4, (this.msixPbaOffset | this.msixBar!) >>> 0);
    }
  }

  private cfgRead(offset: number, w: Width): number {
    if (!aligned(offset, w, CONFIG_SPACE_SIZE)) return this.badRead(`config read${w * 8} at ${offset}`);
    // Status bit 3 mirrors the INTx condition: the ISR is non-zero and MSI-X is off (§4.1.4.5.1), whatever Interrupt Disable says.
    const st = PCI_STATUS_CAP_LIST | (this.isr !== 0 && !this.msixEnabled ? PCI_STATUS_INTERRUPT : 0);
    setLE(this.cfg, PCI_CFG.STATUS, 2, st);
    const data = VIRTIO_PCI_MODEL_CAPS.pciCfg + 16;
    if (offset < data + 4 && offset + w > data) this.windowAccess(false);
    return getLE(this.cfg, offset, w);
  }

  private cfgWrite(offset: number, w: Width, value: number): void {
    if (!aligned(offset, w, CONFIG_SPACE_SIZE)) {
      this.badWrite(`config write${w * 8} at ${offset}`);
      return;
    }
    // Read-only bits keep their value; writes to them are ordinary (whole-dword writes) and not an error.
    for (let i = 0; i < w; i++) {
      const m = this.wmask[offset + i]!;
      const b = (value >>> (8 * i)) & 0xff;
      this.cfg[offset + i] = (this.cfg[offset + i]! & ~m) | (b & m);
    }
    const data = VIRTIO_PCI_MODEL_CAPS.pciCfg + 16;
    if (offset < data + 4 && offset + w > data) this.windowAccess(true);
    // Interrupt Disable, MSI-X Enable and Function Mask change where interrupts go.
    this.updateInterrupts();
  }

  /**
   * §4.1.4.9.1: a read of pci_cfg_data reads cap.length bytes at cap.offset
   * of BAR cap.bar into it; a write writes its first cap.length bytes there.
   * The window reaches the registers without memory decoding.
   */
  private windowAccess(write: boolean): void {
    const at = VIRTIO_PCI_MODEL_CAPS.pciCfg;
    const bar = this.cfg[at + 4]!;
    const offset = getLE(this.cfg, at + 8, 4);
    const len = getLE(this.cfg, at + 12, 4);
    if (!(len === 1 || len === 2 || len === 4) || !aligned(offset, len, this.barSize(bar))) {
      this.bad(`PCI_CFG window ${write ? "write" : "read"} of ${len} bytes at BAR${bar} +0x${offset.toString(16)}`);
      return;
    }
    if (write) this.barWrite(bar, offset, len, getLE(this.cfg, at + 16, len));
    else setLE(this.cfg, at + 16, len, this.barRead(bar, offset, len));
  }

  private msixControl(): number {
    return getLE(this.cfg, VIRTIO_PCI_MODEL_CAPS.msix + 2, 2);
  }

  // ---- BARs ----

  private makeRegion(bar: number, size: number): MmioRegion {
    const read = (o: number, w: Width): number => {
      // PCI 3.0 §6.2.2: with Memory Space decoding off the function ignores the access; the read completes as all ones.
      if ((this.cfg[PCI_CFG.COMMAND]! & PCI_COMMAND_MEMORY) === 0) {
        this.bad(`BAR${bar} read${w * 8} at 0x${o.toString(16)} with memory decoding off`);
        return w === 4 ? 0xffffffff : (1 << (8 * w)) - 1;
      }
      if (!aligned(o, w, size)) return this.badRead(`BAR${bar} read${w * 8} at ${o}`);
      return this.barRead(bar, o, w);
    };
    const write = (o: number, w: Width, v: number): void => {
      if ((this.cfg[PCI_CFG.COMMAND]! & PCI_COMMAND_MEMORY) === 0) {
        this.bad(`BAR${bar} write${w * 8} at 0x${o.toString(16)} with memory decoding off`);
        return;
      }
      if (!aligned(o, w, size)) {
        this.badWrite(`BAR${bar} write${w * 8} at ${o}`);
        return;
      }
      const mask = w === 4 ? 0xffffffff : (1 << (8 * w)) - 1;
      this.barWrite(bar, o, w, (Number(v) & mask) >>> 0);
    };
    return {
      size,
      read8: (o) => read(o, 1),
      read16: (o) => read(o, 2),
      read32: (o) => read(o, 4),
      write8: (o, v) => write(o, 1, v),
      write16: (o, v) => write(o, 2, v),
      write32: (o, v) => write(o, 4, v),
    };
  }

  /** Offset and width already checked against the BAR. */
  private barRead(bar: number, o: number, w: Width): number {
    if (bar === this.msixBar) {
      const t = o - this.msixTableOffset;
      if (t >= 0 && t < this.msixVectors * 16) return this.msixTableRead(t, w);
      const p = o - this.msixPbaOffset;
      if (p >= 0 && p < Math.ceil(this.msixVectors / 64) * 8) return this.pbaRead(p, w);
    }
    if (bar !== VIRTIO_PCI_MODEL.bar) return this.badRead(`BAR${bar} read${w * 8} at 0x${o.toString(16)}`);
    const M = VIRTIO_PCI_MODEL;
    if (o < M.common + COMMON_CFG.SIZE) return this.commonRead(o - M.common, w);
    if (o === M.isr && w === 1) return this.isrRead();
    if (o >= M.device && o < M.device + this.device.configSize) return this.deviceCfgRead(o - M.device, w);
    return this.badRead(`BAR4 read${w * 8} at 0x${o.toString(16)}`);
  }

  private barWrite(bar: number, o: number, w: Width, v: number): void {
    if (bar === this.msixBar) {
      const t = o - this.msixTableOffset;
      if (t >= 0 && t < this.msixVectors * 16) return this.msixTableWrite(t, w, v);
    }
    if (bar !== VIRTIO_PCI_MODEL.bar) return this.badWrite(`BAR${bar} write${w * 8} at 0x${o.toString(16)}`);
    const M = VIRTIO_PCI_MODEL;
    if (o < M.common + COMMON_CFG.SIZE) return this.commonWrite(o - M.common, w, v);
    if (o >= M.notify && o < M.notify + this.notifyLength) return this.notifyWrite(o - M.notify, w, v);
    if (o >= M.device && o < M.device + this.device.configSize) {
      const rel = o - M.device;
      if (rel % w !== 0 || rel + w > this.device.configSize) return this.badWrite(`device config write${w * 8} at ${rel}`);
      this.device.writeConfig(rel, w, v);
      return;
    }
    this.badWrite(`BAR4 write${w * 8} at 0x${o.toString(16)}`);
  }

  // ---- common configuration (§4.1.4.3) ----

  private commonRead(o: number, w: Width): number {
    if (COMMON_WIDTH.get(o) !== w) return this.badRead(`common cfg read${w * 8} at ${o}`);
    const d = this.device;
    const q = this.queueSelect;
    const r = d.queueRegisters(q);
    switch (o) {
      case COMMON_CFG.device_feature_select:
        return this.deviceFeatureSelect;
      case COMMON_CFG.device_feature:
        return d.readDeviceFeatures(this.deviceFeatureSelect);
      case COMMON_CFG.driver_feature_select:
        return this.driverFeatureSelect;
      case COMMON_CFG.driver_feature:
        return d.readDriverFeatures(this.driverFeatureSelect);
      case COMMON_CFG.config_msix_vector:
        return this.configVector;
      case COMMON_CFG.num_queues:
        return d.numQueues;
      case COMMON_CFG.device_status:
        return d.getStatus();
      case COMMON_CFG.config_generation:
        return d.configGeneration & 0xff;
      case COMMON_CFG.queue_select:
        return q;
      case COMMON_CFG.queue_size:
        // §4.1.4.3.1: 0 for a queue that does not exist.
        return r === undefined ? 0 : r.size & 0xffff;
      case COMMON_CFG.queue_msix_vector:
        return r === undefined ? VIRTIO_MSI_NO_VECTOR : this.queueVectors[q]!;
      case COMMON_CFG.queue_enable:
        return r?.enabled === true ? 1 : 0;
      case COMMON_CFG.queue_notify_off:
        // Each queue has its own notify slot: cap.offset + index * multiplier.
        return r === undefined ? 0 : q;
      case COMMON_CFG.queue_notif_config_data:
        return 0; // VIRTIO_F_NOTIF_CONFIG_DATA is not offered
      case COMMON_CFG.queue_reset:
        // §4.1.4.3.1: 1 while the reset is in progress, then 0.
        if (r === undefined || this.resetReads[q] === 0) return 0;
        this.resetReads[q]!--;
        return 1;
      default: {
        if (r === undefined) return 0;
        const { key, high } = areaField(o);
        const cur = r[key];
        return high ? Math.floor(cur / HALF) >>> 0 : cur % HALF;
      }
    }
  }

  private commonWrite(o: number, w: Width, v: number): void {
    if (COMMON_WIDTH.get(o) !== w) return this.badWrite(`common cfg write${w * 8} at ${o}`);
    const d = this.device;
    const q = this.queueSelect;
    const r = d.queueRegisters(q);
    switch (o) {
      case COMMON_CFG.device_feature_select:
        this.deviceFeatureSelect = v;
        return;
      case COMMON_CFG.driver_feature_select:
        this.driverFeatureSelect = v;
        return;
      case COMMON_CFG.driver_feature:
        d.writeDriverFeatures(this.driverFeatureSelect, v);
        return;
      case COMMON_CFG.config_msix_vector:
        this.configVector = this.mapVector(v);
        return;
      case COMMON_CFG.device_status:
        d.setStatus(v);
        if (v === 0) this.resetTransport();
        return;
      case COMMON_CFG.queue_select:
        // Selecting a queue that does not exist is allowed; its queue_size then reads 0.
        this.queueSelect = v;
        return;
      case COMMON_CFG.device_feature:
      case COMMON_CFG.num_queues:
      case COMMON_CFG.config_generation:
      case COMMON_CFG.queue_notify_off:
      case COMMON_CFG.queue_notif_config_data:
        // §4.1.4.3.2: the driver must not write these.
        return this.badWrite(`write to read-only common cfg field at ${o}`);
    }
    if (r === undefined) return this.badWrite(`common cfg write at ${o} for queue ${q}, which does not exist`);
    switch (o) {
      case COMMON_CFG.queue_msix_vector:
        this.queueVectors[q] = this.mapVector(v);
        return;
      case COMMON_CFG.queue_enable:
        // §4.1.4.3.2: the driver must not write 0 to queue_enable.
        if (v !== 1) return this.badWrite(`queue_enable ${v} for queue ${q}`);
        d.enableQueue(q);
        return;
      case COMMON_CFG.queue_reset:
        if (!hasFeature(d.features, VIRTIO_F_RING_RESET) || v > 1) return this.badWrite(`queue_reset ${v} without VIRTIO_F_RING_RESET`);
        if (v === 1) {
          d.resetQueue(q);
          // §2.6.1.1.1: the queue returns to its default state, its vector unmapped.
          this.queueVectors[q] = VIRTIO_MSI_NO_VECTOR;
          this.resetReads[q] = this.opts.queueResetReads ?? 0;
        }
        return;
    }
    if (r.enabled) return this.badWrite(`queue ${q} register at ${o} written while the queue is enabled`);
    if (o === COMMON_CFG.queue_size) {
      // §4.1.4.3.2: not 0, not above the maximum, a power of 2 for split rings. The device still
      // records the value, so enabling the queue with it puts the device in DEVICE_NEEDS_RESET.
      const split = (d.getStatus() & STATUS_FEATURES_OK) !== 0 && d.layout() === "split";
      if (v === 0 || v > r.maxSize || (split && (v & (v - 1)) !== 0)) this.badWrite(`queue_size ${v} for queue ${q} (max ${r.maxSize})`);
      d.setQueueRegister(q, "size", v);
      return;
    }
    const { key, high } = areaField(o);
    const cur = r[key];
    const lo = cur % HALF;
    const hi = Math.floor(cur / HALF);
    // Addresses are numbers; a high half >= 2^21 makes an address no memory region can hold.
    const next = high ? (v < 0x20_0000 ? v * HALF + lo : Number.MAX_SAFE_INTEGER) : hi * HALF + v;
    d.setQueueRegister(q, key, next);
  }

  /** §4.1.5.1.2.1: a vector outside the MSI-X table cannot be mapped; the field then reads NO_VECTOR. */
  private mapVector(v: number): number {
    return v !== VIRTIO_MSI_NO_VECTOR && v < this.msixVectors ? v : VIRTIO_MSI_NO_VECTOR;
  }

  private resetTransport(): void {
    // §4.1.5.1.2.1: a reset unmaps every event; the ISR goes back to 0.
    this.deviceFeatureSelect = 0;
    this.driverFeatureSelect = 0;
    this.queueSelect = 0;
    this.configVector = VIRTIO_MSI_NO_VECTOR;
    this.queueVectors.fill(VIRTIO_MSI_NO_VECTOR);
    this.resetReads.fill(0);
    this.isr = 0;
    this.updateInterrupts();
  }

  // ---- notifications, ISR, device configuration ----

  /** §4.1.5.2: a 16-bit queue index, or with VIRTIO_F_NOTIFICATION_DATA the 32-bit notification data. */
  private notifyWrite(rel: number, w: Width, v: number): void {
    const d = this.device;
    if (rel % VIRTIO_PCI_MODEL.notifyOffMultiplier !== 0) return this.badWrite(`notify write at +${rel}`);
    const q = rel / VIRTIO_PCI_MODEL.notifyOffMultiplier;
    const withData = hasFeature(d.features, VIRTIO_F_NOTIFICATION_DATA);
    if (w !== (withData ? 4 : 2)) return this.badWrite(`notify write${w * 8} for queue ${q} (${withData ? "32" : "16"}-bit expected)`);
    // The slot names the queue; a value naming another one is the driver's mistake, the slot wins.
    if ((v & 0xffff) !== q) {
      this.badWrite(`notify value 0x${v.toString(16)} in the slot of queue ${q}`);
      d.notify(q);
      return;
    }
    if (withData) d.notify(q, v);
    else d.notify(q);
  }

  /** §4.1.4.5: reading the ISR returns and clears it, de-asserting INTx. */
  private isrRead(): number {
    const v = this.isr;
    this.isr = 0;
    this.updateInterrupts();
    return v;
  }

  private deviceCfgRead(rel: number, w: Width): number {
    if (rel % w !== 0 || rel + w > this.device.configSize) return this.badRead(`device config read${w * 8} at ${rel}`);
    return this.device.readConfig(rel, w);
  }

  // ---- interrupts ----

  /** §4.1.5.3: MSI-X vector of the queue when MSI-X is on (none for NO_VECTOR), else ISR bit 0 and INTx. */
  private queueInterrupt(q: number): void {
    if (this.msixEnabled) {
      const v = this.queueVectors[q];
      if (v !== undefined && v !== VIRTIO_MSI_NO_VECTOR) this.signalMsix(v);
      return;
    }
    this.isr |= 1;
    this.updateInterrupts();
  }

  /** §4.1.5.4: ISR bit 1 always; then the config vector, or INTx when MSI-X is off. */
  private configInterrupt(): void {
    this.isr |= 2;
    if (this.msixEnabled) {
      if (this.configVector !== VIRTIO_MSI_NO_VECTOR) this.signalMsix(this.configVector);
      return;
    }
    this.updateInterrupts();
  }

  /** PCI 3.0 §6.8.2.9: a masked vector (or a masked function) records the message as pending instead. */
  private signalMsix(v: number): void {
    if ((this.msixControl() & MSIX_CTRL_MASKALL) !== 0 || (this.msixTable[v * 4 + 3]! & 1) !== 0) {
      if (this.msixPending[v] === 0) this.msixPendingCount++;
      this.msixPending[v] = 1;
      return;
    }
    this.opts.interrupt?.(v);
  }

  /** Re-evaluates the INTx level and delivers pending MSI-X messages that were unmasked. */
  private updateInterrupts(): void {
    const intxDisabled = (getLE(this.cfg, PCI_CFG.COMMAND, 2) & PCI_COMMAND_INTX_DISABLE) !== 0;
    const level = this.isr !== 0 && !this.msixEnabled && !intxDisabled;
    const rising = level && !this.intxLevel;
    this.intxLevel = level;
    if (rising) this.opts.interrupt?.(null);
    if (this.msixPendingCount > 0 && this.msixEnabled && (this.msixControl() & MSIX_CTRL_MASKALL) === 0) {
      for (let v = 0; v < this.msixVectors; v++)
        if (this.msixPending[v] === 1 && (this.msixTable[v * 4 + 3]! & 1) === 0) this.deliverPending(v);
    }
  }

  private deliverPending(v: number): void {
    this.msixPending[v] = 0;
    this.msixPendingCount--;
    this.opts.interrupt?.(v);
  }

  // ---- MSI-X table and PBA (PCI 3.0 §6.8.2.6-§6.8.2.10): dword access ----

  private msixTableRead(t: number, w: Width): number {
    if (w !== 4) return this.badRead(`MSI-X table read${w * 8} at ${t}`);
    return this.msixTable[t >> 2]!;
  }

  private msixTableWrite(t: number, w: Width, v: number): void {
    if (w !== 4) return this.badWrite(`MSI-X table write${w * 8} at ${t}`);
    const word = (t >> 2) & 3;
    const entry = t >> 4;
    // Vector Control: only bit 0 (Mask) is implemented.
    this.msixTable[t >> 2] = word === 3 ? v & 1 : v;
    if (word === 3 && (v & 1) === 0 && this.msixPending[entry] === 1) this.updateInterrupts();
  }

  private pbaRead(p: number, w: Width): number {
    if (w !== 4) return this.badRead(`MSI-X PBA read${w * 8} at ${p}`);
    let bits = 0;
    for (let i = 0; i < 32; i++) if (this.msixPending[p * 8 + i] === 1) bits |= 1 << i;
    return bits >>> 0;
  }

  // ---- bad accesses ----

  private badRead(what: string): number {
    this.bad(what);
    return 0;
  }
  private badWrite(what: string): void {
    this.bad(what);
  }
  private bad(what: string): void {
    this.badAccesses++;
    this.lastBadAccess = what;
    this.device.events.guestError?.(new GuestError("PCI_BAD_ACCESS", what), null);
  }
}

function areaField(o: number): { key: AreaKey; high: boolean } {
  const key: AreaKey = o < COMMON_CFG.queue_driver ? "descTable" : o < COMMON_CFG.queue_device ? "driverArea" : "deviceArea";
  return { key, high: (o & 4) !== 0 };
}
