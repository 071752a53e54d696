/**
 * A PCI function opened through VFIO for a userspace driver: its container
 * and IOMMU group, the device fd, configuration space with bus mastering on,
 * and a DMA window mapped in the IOMMU. Shared by the virtio-pci and NVMe
 * drivers; interrupts are theirs to set up.
 */
import { IovirtUsageError } from "../../core/errors.js";
import type { PciConfig } from "../../core/pci/access.js";
import { enableBusMaster } from "../../core/pci/command.js";
import { vfioDmaWindow, type DmaWindow } from "../dma-memory.js";
import { VfioContainer, VfioGroup, type VfioDevice } from "../vfio/vfio.js";
import { PciSysfs } from "./sysfs.js";

export interface VfioFunctionOptions {
  sysfs?: PciSysfs;
  /** DMA window size (default 4 MiB). */
  dmaBytes?: number;
  /** Put the DMA window at the top of the IOVA space (default false). */
  dmaHigh?: boolean;
  /** The VF token, for a VF of a PF bound to vfio-pci. */
  vfToken?: string;
}

export interface VfioFunction {
  readonly bdf: string;
  readonly container: VfioContainer;
  readonly group: VfioGroup;
  readonly device: VfioDevice;
  readonly config: PciConfig;
  readonly dma: DmaWindow;
  close(): void;
}

/** Opens `bdf`, which must be bound to vfio-pci; on any failure everything opened so far is closed again. */
export function openVfioFunction(bdf: string, opts: VfioFunctionOptions = {}): VfioFunction {
  const sysfs = opts.sysfs ?? new PciSysfs();
  bdf = sysfs.parseBdf(bdf);
  const info = sysfs.get(bdf);
  if (info.driver !== "vfio-pci") {
    throw new IovirtUsageError(
      "NOT_BOUND",
      `${bdf} is bound to ${info.driver ?? "no driver"}, not vfio-pci: run 'iovirt pci bind vfio ${bdf}' first`,
    );
  }
  if (info.iommuGroup === null)
    throw new IovirtUsageError("NO_IOMMU_GROUP", `${bdf} has no IOMMU group: boot with the IOMMU on (intel_iommu=on) or use --uio`);
  const container = VfioContainer.open();
  const cleanup: (() => void)[] = [() => container.close()];
  try {
    const group = VfioGroup.open(info.iommuGroup, {
      explainNotViable: (id) =>
        sysfs
          .groupViability(id)
          .blockers.map((b) => `${b.bdf} is bound to ${b.driver}`)
          .join(", "),
    });
    container.attach(group);
    const device = group.openDevice(bdf, opts.vfToken);
    cleanup.push(() => device.close());
    const config = device.config();
    enableBusMaster(config);
    const dma = vfioDmaWindow(container, opts.dmaBytes ?? 4 << 20, { high: opts.dmaHigh === true });
    return {
      bdf,
      container,
      group,
      device,
      config,
      dma,
      close: () => {
        dma.close();
        device.close();
        container.close();
      },
    };
  } catch (e) {
    for (const c of cleanup.reverse()) c();
    throw e;
  }
}
