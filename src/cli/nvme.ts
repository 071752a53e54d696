import { readFileSync, writeFileSync } from "node:fs";
import { ArgReader, UsageError, parseOrExplain, takeCommand } from "./args.js";
import { firstPatternMismatch, guestPatternRange, verifyVerdict } from "../core/selfcheck/pattern.js";
import { randomUUID } from "node:crypto";
import { OACS_NS_MGMT, OACS_VIRT_MGMT, ONCS_DSM, ONCS_WRITE_ZEROES, VIRT_ACT, VIRT_RT } from "../core/nvme/constants.js";
import { parsePrimaryCapabilities, parseSecondaryControllers, type NamespaceIdentity } from "../core/nvme/identify.js";
import { enableBusMaster } from "../core/pci/command.js";
import { NvmeVfio } from "../node/nvme/vfio.js";
import { PciError, PciSysfs } from "../node/pci/sysfs.js";

const DRV_HELP = `iovirt drv nvme — a userspace NVMe driver on a real controller (PF or VF) through VFIO

Usage:
  iovirt drv nvme --vfio BDF [options] COMMAND [ARGS] [COMMAND [ARGS] ...]

Commands (run in order; SECTOR and COUNT are in 512-byte sectors, like 'drv blk',
and must be whole logical blocks of the namespace):
  info                         controller identity, limits, namespaces, queues, interrupts
  write-pattern SECTOR COUNT   write iovirt's test pattern (16-byte lines naming their own offset)
  verify-pattern SECTOR COUNT  read and compare with the pattern
  read SECTOR COUNT FILE       read sectors into FILE
  write SECTOR FILE            write FILE (whole blocks) at SECTOR
  flush                        Flush
  write-zeroes SECTOR COUNT    Write Zeroes (where the controller supports it)
  deallocate SECTOR COUNT      Dataset Management, deallocate (where supported)

Options:
  --vfio BDF          the controller, bound to vfio-pci ('iovirt pci bind vfio BDF')
  --vf-token UUID     the VF token of its PF, for a VF of a PF bound to vfio-pci
  --nsid N            namespace (default: the first active one)
  --queues N          I/O queue pairs to ask for (default 1)
  --queue-size N      entries per I/O queue (default 64)
  --polled            poll for completions instead of MSI-X interrupts
  --prp               describe data buffers with PRPs even where the controller takes SGLs
  --timeout-ms N      command timeout (default 30000)
  --help              this text
`;

interface NvmeArgs {
  bdf: string;
  vfToken: string | undefined;
  nsid: number | undefined;
  queues: number;
  queueSize: number;
  polled: boolean;
  prp: boolean;
  timeoutMs: number;
  commands: string[][];
}

const ARITY: Record<string, number> = {
  info: 0,
  "write-pattern": 2,
  "verify-pattern": 2,
  read: 3,
  write: 2,
  flush: 0,
  "write-zeroes": 2,
  deallocate: 2,
};

function parse(args: string[]): NvmeArgs | "help" {
  const o: Partial<NvmeArgs> & { commands: string[][] } = {
    queues: 1,
    queueSize: 64,
    polled: false,
    prp: false,
    timeoutMs: 30_000,
    commands: [],
  };
  const r = new ArgReader(args);
  while (r.next()) {
    const f = r.flag;
    if (f === "--help" || f === "-h") return "help";
    if (f === "--vfio") o.bdf = r.value();
    else if (f === "--vf-token") o.vfToken = r.value();
    else if (f === "--nsid") o.nsid = r.int(1, 0xfffffffe);
    else if (f === "--queues") o.queues = r.int(1, 64);
    else if (f === "--queue-size") o.queueSize = r.int(2, 4096);
    else if (f === "--polled") o.polled = true;
    else if (f === "--prp") o.prp = true;
    else if (f === "--timeout-ms") o.timeoutMs = r.int(1, 3_600_000);
    else if (f.startsWith("-")) r.unknown();
    else takeCommand(r, f, ARITY, o.commands);
  }
  if (o.bdf === undefined) throw new UsageError("which controller? --vfio BDF");
  if (o.commands.length === 0) throw new UsageError("no command given");
  return o as NvmeArgs;
}

const say = (s: string): void => {
  process.stdout.write(`${s}\n`);
};

function count(s: string, what: string): number {
  const n = Number(s);
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`${what} must be a non-negative integer, got '${s}'`);
  return n;
}

export async function nvmeDrvMain(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt drv nvme", DRV_HELP, () => parse(args));
  if (typeof o === "number") return o;
  const d = await NvmeVfio.open({
    bdf: o.bdf,
    polled: o.polled,
    commandTimeoutMs: o.timeoutMs,
    dataPointer: o.prp ? "prp" : "auto",
    ...(o.vfToken !== undefined ? { vfToken: o.vfToken } : {}),
  });
  try {
    const ctl = d.ctl;
    d.ctl.onDeviceError = (e) => process.stderr.write(`nvme: ${e.message}\n`);
    const active = await ctl.activeNamespaces();
    const nsid = o.nsid ?? active[0];
    if (nsid === undefined) throw new UsageError(`${d.fn.bdf} has no active namespace (attach one first)`);
    const ns = await ctl.namespace(nsid);
    const queues = await ctl.createIoQueues(o.queues, o.queueSize);
    return await run(d, ns, queues, active, o);
  } finally {
    await d.close();
  }
}

async function run(d: NvmeVfio, ns: NamespaceIdentity, queues: number, active: number[], o: NvmeArgs): Promise<number> {
  const ctl = d.ctl;
  const id = d.identity;
  const bs = ns.blockSize;
  /** Sectors of 512 bytes to blocks; both ends must fall on block boundaries. */
  const blocks = (sector: number, n: number): { lba: number; nlb: number } => {
    if ((sector * 512) % bs !== 0 || (n * 512) % bs !== 0) throw new UsageError(`sectors ${sector}+${n} are not whole ${bs}-byte blocks`);
    const lba = (sector * 512) / bs;
    const nlb = (n * 512) / bs;
    if (lba + nlb > ns.size) throw new UsageError(`sectors ${sector}+${n} run past the namespace's ${ns.size} blocks`);
    return { lba, nlb };
  };
  const chunkBlocks = Math.max(1, Math.floor(Math.min(ctl.maxTransfer, 128 * 1024) / bs));
  const dma = d.fn.dma;
  /** Runs `f` on chunks of [lba, lba+nlb) with a DMA buffer each, 8 at a time over the I/O queues. */
  const chunked = async (lba: number, nlb: number, f: (buf: number, l: number, n: number, qid: number) => Promise<void>): Promise<void> => {
    const chunks: [number, number][] = [];
    for (let l = lba; l < lba + nlb; l += chunkBlocks) chunks.push([l, Math.min(chunkBlocks, lba + nlb - l)]);
    const bufs = Array.from({ length: Math.min(8, chunks.length) }, () => dma.dma.alloc(chunkBlocks * bs, 4096));
    try {
      for (let i = 0; i < chunks.length; i += bufs.length) {
        await Promise.all(chunks.slice(i, i + bufs.length).map(([l, n], k) => f(bufs[k]!, l, n, 1 + ((i + k) % queues))));
      }
    } finally {
      for (const b of bufs) dma.dma.release(b);
    }
  };
  let failures = 0;
  for (const [cmd, ...a] of o.commands) {
    const t0 = performance.now();
    const took = (): string => `${((performance.now() - t0) / 1000).toFixed(2)} s`;
    switch (cmd) {
      case "info": {
        const flags = [
          (id.oacs & OACS_VIRT_MGMT) !== 0 ? "virtualization management" : "",
          (id.oacs & OACS_NS_MGMT) !== 0 ? "namespace management" : "",
          (id.oncs & ONCS_DSM) !== 0 ? "dataset management" : "",
          (id.oncs & ONCS_WRITE_ZEROES) !== 0 ? "write zeroes" : "",
          id.volatileWriteCache ? "volatile write cache" : "",
        ].filter(Boolean);
        const v = id.version;
        say(
          `nvme: ${d.fn.bdf} via VFIO: ${id.model} (serial ${id.serial}, firmware ${id.firmware}), vendor 0x${id.vid.toString(16)}, NVMe ${v >>> 16}.${(v >> 8) & 0xff}, controller id ${id.cntlid}`,
        );
        say(
          `nvme: max transfer ${ctl.maxTransfer >> 10} KiB, queues of up to ${ctl.cap.maxQueueEntries} entries, doorbell stride ${ctl.cap.doorbellStride}, ${d.vectors > 0 ? `MSI-X (${d.vectors} vectors)` : "polled"}, ${queues} I/O queue pair(s), data by ${ctl.usesSgl ? "SGL" : "PRP"}`,
        );
        say(`nvme: supports ${flags.join(", ") || "no optional commands"}; ${id.nn} namespace id(s), active: ${active.join(", ")}`);
        say(
          `nvme: namespace ${ns.nsid}: ${ns.size} blocks of ${bs} bytes (${((ns.size * bs) / 2 ** 20).toFixed(1)} MiB)${ns.shared ? ", shared" : ""}`,
        );
        break;
      }
      case "write-pattern": {
        const [s, n] = [count(a[0]!, "SECTOR"), count(a[1]!, "COUNT")];
        const { lba, nlb } = blocks(s, n);
        await chunked(lba, nlb, async (buf, l, k, qid) => {
          dma.mem.write(buf, guestPatternRange(l * bs, k * bs));
          await ctl.write(qid, ns.nsid, l, k, buf, k * bs);
        });
        await ctl.flush(1, ns.nsid);
        say(`write-pattern: ${n} sectors at ${s} written and flushed in ${took()}`);
        break;
      }
      case "verify-pattern": {
        const [s, n] = [count(a[0]!, "SECTOR"), count(a[1]!, "COUNT")];
        const { lba, nlb } = blocks(s, n);
        let bad = -1;
        await chunked(lba, nlb, async (buf, l, k, qid) => {
          await ctl.read(qid, ns.nsid, l, k, buf, k * bs);
          const got = new Uint8Array(k * bs);
          dma.mem.read(buf, got);
          const at = firstPatternMismatch(got, l * bs);
          if (at >= 0 && (bad < 0 || at < bad)) bad = at;
        });
        if (bad >= 0) failures++;
        say(verifyVerdict(bad, n, s, took()));
        break;
      }
      case "read": {
        const [s, n] = [count(a[0]!, "SECTOR"), count(a[1]!, "COUNT")];
        const { lba, nlb } = blocks(s, n);
        const out = new Uint8Array(nlb * bs);
        await chunked(lba, nlb, async (buf, l, k, qid) => {
          await ctl.read(qid, ns.nsid, l, k, buf, k * bs);
          dma.mem.read(buf, out.subarray((l - lba) * bs, (l - lba + k) * bs));
        });
        writeFileSync(a[2]!, out);
        say(`read: ${n} sectors at ${s} -> ${a[2]} (${took()})`);
        break;
      }
      case "write": {
        const s = count(a[0]!, "SECTOR");
        const data = new Uint8Array(readFileSync(a[1]!));
        const { lba, nlb } = blocks(s, data.length / 512);
        await chunked(lba, nlb, async (buf, l, k, qid) => {
          dma.mem.write(buf, data.subarray((l - lba) * bs, (l - lba + k) * bs));
          await ctl.write(qid, ns.nsid, l, k, buf, k * bs);
        });
        say(`write: ${a[1]} -> ${data.length / 512} sectors at ${s} (${took()})`);
        break;
      }
      case "flush":
        await ctl.flush(1, ns.nsid);
        say(`flush: done (${took()})`);
        break;
      case "write-zeroes":
      case "deallocate": {
        const need = cmd === "write-zeroes" ? ONCS_WRITE_ZEROES : ONCS_DSM;
        if ((id.oncs & need) === 0) throw new UsageError(`${d.fn.bdf} does not support ${cmd} (ONCS 0x${id.oncs.toString(16)})`);
        const [s, n] = [count(a[0]!, "SECTOR"), count(a[1]!, "COUNT")];
        const { lba, nlb } = blocks(s, n);
        for (let l = lba; l < lba + nlb; l += 0x10000) {
          const k = Math.min(0x10000, lba + nlb - l);
          if (cmd === "write-zeroes") await ctl.writeZeroes(1, ns.nsid, l, k);
          else await ctl.deallocate(1, ns.nsid, l, k);
        }
        say(`${cmd}: ${n} sectors at ${s} (${took()})`);
        break;
      }
    }
  }
  return failures === 0 ? 0 : 1;
}

const SRIOV_HELP = `iovirt nvme sriov-setup — the PF side of NVMe SR-IOV: virtual functions with queues and
interrupts of their own, online and ready for a driver

Usage:
  iovirt nvme sriov-setup PF_BDF --vfs N [options]

What it does, in order (NVMe 1.4 §8.5, Virtualization Enhancements):
  1. opens the PF (bound to vfio-pci) through VFIO and sets its VF token;
  2. if the primary controller holds flexible resources, gives them up (Virtualization
     Management: primary flexible allocation 0) and resets the PF so that this takes effect;
  3. enables N VFs through sysfs (vfio-pci's enable_sriov is switched on when needed);
  4. for each VF's secondary controller: offline, assign queue and interrupt resources,
     online; shared namespaces are attached to it where they are not yet;
  5. prints the secondary controllers and the VFs, and stays: the PF must stay open while
     its VFs are used (releasing it resets it, which takes the VFs' resources away).
     SIGINT or SIGTERM disables the VFs and releases the PF.

Options:
  --vfs N            VFs to enable (1..TotalVFs)
  --vf-token UUID    the VF token to set (default: a random one, printed); VFs are opened
                     with it ('iovirt drv nvme --vfio VF --vf-token UUID')
  --vq N             queue resources per VF (default 2: the admin queue and one I/O queue)
  --vi N             interrupt resources per VF (default 1)
  --help             this text
`;

const NVME_HELP = `iovirt nvme — NVMe controllers

  iovirt nvme sriov-setup PF_BDF --vfs N [--vf-token UUID]   see 'iovirt nvme sriov-setup --help'
  iovirt drv nvme --vfio BDF COMMAND...                      see 'iovirt drv nvme --help'
`;

export async function nvmeMain(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  if (sub === "sriov-setup") return sriovSetup(rest);
  if (sub === undefined || sub === "--help" || sub === "-h") {
    process.stdout.write(NVME_HELP);
    return sub === undefined ? 2 : 0;
  }
  process.stderr.write(`iovirt nvme: unknown subcommand '${sub}'\n\n${NVME_HELP}`);
  return 2;
}

interface SetupArgs {
  bdf: string;
  vfs: number;
  token: string;
  vq: number;
  vi: number;
}

async function sriovSetup(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt nvme sriov-setup", SRIOV_HELP, (): SetupArgs | "help" => {
    const p: Partial<SetupArgs> = { vq: 2, vi: 1, token: randomUUID() };
    const pos: string[] = [];
    const r = new ArgReader(args);
    while (r.next()) {
      const f = r.flag;
      if (f === "--help" || f === "-h") return "help";
      if (f === "--vfs") p.vfs = r.int(1, 65535);
      else if (f === "--vf-token") p.token = r.value().toLowerCase();
      else if (f === "--vq") p.vq = r.int(2, 65535);
      else if (f === "--vi") p.vi = r.int(1, 65535);
      else if (f.startsWith("-")) r.unknown();
      else pos.push(f);
    }
    if (pos.length !== 1) throw new UsageError("give the physical function (BDF)");
    if (p.vfs === undefined) throw new UsageError("how many VFs? --vfs N");
    p.bdf = pos[0]!;
    return p as SetupArgs;
  });
  if (typeof o === "number") return o;
  const sys = new PciSysfs();
  const bdf = sys.parseBdf(o.bdf);
  const before = sys.sriov(bdf);
  if (before === null) throw new PciError("NO_SRIOV", `${bdf} has no SR-IOV capability`);
  if (o.vfs > before.totalVfs) throw new PciError("SRIOV_RANGE", `${bdf} supports ${before.totalVfs} VFs, ${o.vfs} asked`);
  if (before.numVfs > 0) await sys.setNumVfs(bdf, 0);
  enableVfioSriov();
  const d = await NvmeVfio.open({ bdf });
  try {
    const ctl = d.ctl;
    d.fn.device.setVfToken(o.token);
    say(`nvme: ${bdf}: VF token ${o.token}`);
    let caps = parsePrimaryCapabilities(await ctl.primaryCapabilities());
    say(
      `nvme: primary controller ${caps.cntlid}: queue resources ${caps.vqFlexibleTotal} flexible (${caps.vqFlexibleOnPrimary} on the primary, ${caps.vqFlexibleOnSecondaries} on secondaries) + ${caps.vqPrivate} private, ` +
        `interrupt resources ${caps.viFlexibleTotal} flexible (${caps.viFlexibleOnPrimary} on the primary, ${caps.viFlexibleOnSecondaries} on secondaries) + ${caps.viPrivate} private; ` +
        `at most ${caps.vqMaxPerSecondary} VQ / ${caps.viMaxPerSecondary} VI per secondary`,
    );
    if ((caps.crt & 3) !== 3)
      throw new PciError(
        "NVME_NO_FLEXIBLE",
        `${bdf} does not offer flexible queue and interrupt resources (CRT 0x${caps.crt.toString(16)})`,
      );
    if (caps.vqFlexibleOnPrimary > 0 || caps.viFlexibleOnPrimary > 0) {
      // §8.5.2: the primary's flexible allocation changes at its next reset (a function level reset).
      await ctl.virtualizationManagement(VIRT_ACT.PRIMARY_FLEXIBLE, VIRT_RT.VQ, caps.cntlid, 0);
      await ctl.virtualizationManagement(VIRT_ACT.PRIMARY_FLEXIBLE, VIRT_RT.VI, caps.cntlid, 0);
      await ctl.disable();
      d.fn.device.reset();
      enableBusMaster(d.fn.config);
      await ctl.enable();
      caps = parsePrimaryCapabilities(await ctl.primaryCapabilities());
      say(
        `nvme: primary flexible resources released (function reset): ${caps.vqFlexibleOnPrimary} VQ, ${caps.viFlexibleOnPrimary} VI left on it`,
      );
    }
    if (o.vq > caps.vqMaxPerSecondary || o.vi > caps.viMaxPerSecondary) {
      throw new UsageError(
        `at most ${caps.vqMaxPerSecondary} VQ and ${caps.viMaxPerSecondary} VI per secondary controller (--vq ${o.vq} --vi ${o.vi})`,
      );
    }
    const info = await sys.setNumVfs(bdf, o.vfs);
    say(`nvme: ${o.vfs} VF(s) enabled: ${info.vfs.join(", ")}`);
    const secondaries = parseSecondaryControllers(await ctl.secondaryControllers()).filter((s) => s.vfNumber >= 1 && s.vfNumber <= o.vfs);
    if (secondaries.length !== o.vfs)
      throw new PciError("NVME_SECONDARIES", `${secondaries.length} secondary controllers for ${o.vfs} VFs`);
    for (const s of secondaries) {
      await ctl.virtualizationManagement(VIRT_ACT.SECONDARY_OFFLINE, VIRT_RT.VQ, s.scid, 0);
      await ctl.virtualizationManagement(VIRT_ACT.SECONDARY_ASSIGN, VIRT_RT.VQ, s.scid, o.vq);
      await ctl.virtualizationManagement(VIRT_ACT.SECONDARY_ASSIGN, VIRT_RT.VI, s.scid, o.vi);
      await ctl.virtualizationManagement(VIRT_ACT.SECONDARY_ONLINE, VIRT_RT.VQ, s.scid, 0);
    }
    for (const nsid of await ctl.activeNamespaces()) {
      const ns = await ctl.namespace(nsid);
      if (!ns.shared) continue;
      const attached = await ctl.namespaceControllers(nsid);
      const missing = secondaries.map((s) => s.scid).filter((id) => !attached.includes(id));
      if (missing.length > 0) await ctl.attachNamespace(nsid, missing);
      say(`nvme: namespace ${nsid} (shared) attached to controllers ${[...attached, ...missing].sort((a, b) => a - b).join(", ")}`);
    }
    for (const s of parseSecondaryControllers(await ctl.secondaryControllers()).filter((x) => x.vfNumber >= 1 && x.vfNumber <= o.vfs)) {
      const vf = info.vfs[s.vfNumber - 1] ?? "?";
      const f = vf === "?" ? null : sys.get(vf);
      say(
        `nvme: secondary controller ${s.scid}: VF ${s.vfNumber} = ${vf}, ${s.online ? "online" : "OFFLINE"}, ${s.vq} VQ, ${s.vi} VI, driver=${f?.driver ?? "none"} iommu_group=${f?.iommuGroup ?? "none"}`,
      );
    }
    say(`nvme: ready; the PF stays open while its VFs are used (SIGINT/SIGTERM ends)`);
    await new Promise<void>((resolve) => {
      process.once("SIGINT", () => resolve());
      process.once("SIGTERM", () => resolve());
    });
    try {
      await sys.setNumVfs(bdf, 0);
      say(`nvme: VFs disabled`);
    } catch (e) {
      say(`nvme: VFs left enabled: ${(e as Error).message}`);
    }
    return 0;
  } finally {
    await d.close();
  }
}

/** vfio-pci creates VFs only with enable_sriov set (a runtime-writable module parameter). */
function enableVfioSriov(): void {
  const p = "/sys/module/vfio_pci/parameters/enable_sriov";
  let v: string;
  try {
    v = readFileSync(p, "utf8").trim();
  } catch {
    return; // no vfio_pci module parameters: setNumVfs reports what the kernel says
  }
  if (v === "Y" || v === "1") return;
  try {
    writeFileSync(p, "1");
  } catch (e) {
    throw new PciError("SRIOV_VFIO", `cannot switch on vfio-pci's enable_sriov (${p}): ${(e as Error).message}`);
  }
}
