#!/usr/bin/env node
import { runDemo } from "./demo.js";
import { benchRingMain } from "./bench-ring.js";
import { blkMain } from "./blk.js";
import { benchBlkMain } from "./bench-blk.js";
import { pciMain } from "./pci.js";
import { drvMain } from "./drv.js";
import { switchMain } from "./switch.js";
import { vdpaMain } from "./vdpa.js";
import { nvmeMain } from "./nvme.js";

const HELP = `iovirt — I/O virtualization toolkit

Usage:
  iovirt demo                 In-process demo: iovirt's virtio-blk driver and device
                              over virtio-mmio, split and packed rings.
  iovirt blk [opts]           Serve a virtio-blk device over vhost-user to QEMU (see 'iovirt blk --help').
  iovirt switch PORT... [opts]
                              A learning Ethernet switch: VMs and DPDK over vhost-user, the host
                              kernel (tap), VXLAN uplinks, pcap capture (see 'iovirt switch --help').
  iovirt vdpa --socket PATH --vfio BDF
                              vDPA in userspace: serve a real virtio-pci function over vhost-user with
                              its data path on the front end's rings (see 'iovirt vdpa --help').
  iovirt bench ring [opts]    Virtqueue round-trip benchmark (see 'iovirt bench ring --help').
  iovirt bench blk [opts]     Load a vhost-user-blk back end (see 'iovirt bench blk --help').
  iovirt pci ls [BDF...]      PCI functions, drivers, IOMMU groups, decoded virtio capabilities.
  iovirt pci bind vfio|uio|kernel BDF
                              Hand a function to vfio-pci or uio_pci_generic, or back to the kernel.
  iovirt drv blk|net (--vfio BDF | --uio BDF | --vhost-user SOCKET) COMMAND...
                              Userspace virtio-blk / virtio-net drivers on a real virtio-pci device
                              or a vhost-user back end (see 'iovirt drv blk --help', 'iovirt drv net --help').
  iovirt drv nvme --vfio BDF COMMAND...
                              A userspace NVMe driver on a controller or SR-IOV VF (see 'iovirt drv nvme --help').
  iovirt nvme sriov-setup PF --vfs N
                              The PF side of NVMe SR-IOV (see 'iovirt nvme sriov-setup --help').
  iovirt pci sriov PF [--vfs N]
                              Enable or disable SR-IOV virtual functions (see 'iovirt pci sriov --help').
  iovirt help | --help        This text.
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "demo":
      return (await runDemo()) ? 0 : 1;
    case "blk":
      return blkMain(rest);
    case "switch":
      return switchMain(rest);
    case "vdpa":
      return vdpaMain(rest);
    case "pci":
      return pciMain(rest);
    case "drv":
      return drvMain(rest);
    case "nvme":
      return nvmeMain(rest);
    case "bench":
      if (rest[0] === "ring") return benchRingMain(rest.slice(1));
      if (rest[0] === "blk") return benchBlkMain(rest.slice(1));
      process.stderr.write(`iovirt bench: unknown benchmark '${rest[0] ?? ""}' (known: ring, blk)\n`);
      return 2;
    case undefined:
    case "help":
    case "--help":
    case "-h":
      process.stdout.write(HELP);
      return cmd === undefined ? 2 : 0;
    default:
      process.stderr.write(`iovirt: unknown command '${cmd}'\n\n${HELP}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    // Users get the message; IOVIRT_DEBUG=1 adds the stack.
    const detail = e instanceof Error ? (process.env["IOVIRT_DEBUG"] ? (e.stack ?? e.message) : e.message) : String(e);
    process.stderr.write(`iovirt: ${detail}\n`);
    process.exitCode = 1;
  },
);
