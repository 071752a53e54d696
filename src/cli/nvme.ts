import { readFileSync, writeFileSync } from "node:fs";
import { ArgReader, UsageError, parseOrExplain } from "./args.js";
import { guestPatternRange } from "../core/selfcheck/pattern.js";
import { OACS_NS_MGMT, OACS_VIRT_MGMT, ONCS_DSM, ONCS_WRITE_ZEROES } from "../core/nvme/constants.js";
import type { NamespaceIdentity } from "../core/nvme/identify.js";
import { NvmeVfio } from "../node/nvme/vfio.js";

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
  const o: Partial<NvmeArgs> & { commands: string[][] } = { queues: 1, queueSize: 64, polled: false, timeoutMs: 30_000, commands: [] };
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
    else if (f === "--timeout-ms") o.timeoutMs = r.int(1, 3_600_000);
    else if (f.startsWith("-")) r.unknown();
    else {
      const n = ARITY[f];
      if (n === undefined) throw new UsageError(`unknown command '${f}' (known: ${Object.keys(ARITY).join(", ")})`);
      const cmd = [f];
      for (let i = 0; i < n; i++) cmd.push(r.value());
      o.commands.push(cmd);
    }
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
          `nvme: max transfer ${ctl.maxTransfer >> 10} KiB, queues of up to ${ctl.cap.maxQueueEntries} entries, doorbell stride ${ctl.cap.doorbellStride}, ${d.vectors > 0 ? `MSI-X (${d.vectors} vectors)` : "polled"}, ${queues} I/O queue pair(s)`,
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
          const want = guestPatternRange(l * bs, k * bs);
          for (let i = 0; i < got.length; i++) {
            if (got[i] !== want[i]) {
              if (bad < 0 || l * bs + i < bad) bad = l * bs + i;
              break;
            }
          }
        });
        if (bad >= 0) {
          failures++;
          say(`verify-pattern: MISMATCH at byte ${bad} (sector ${Math.floor(bad / 512)})`);
        } else say(`verify-pattern: ${n} sectors at ${s} match the pattern (${took()})`);
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
