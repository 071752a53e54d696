/**
 * Shared set-up of the `iovirt switch` tests with real peers: the switch as a
 * child process, network namespaces with a tap or a kernel VXLAN device, and
 * the QEMU arguments that attach a guest to a vhost-user port.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { waitForPath } from "../../tools/child.js";

export const CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

export interface SwitchProc {
  child: ChildProcess;
  /** Everything the switch printed so far (stdout and stderr). */
  log(): string;
  /** Sends SIGUSR1 and resolves with the counters it prints. */
  stats(): Promise<string>;
}

/** Starts `iovirt switch ARGS` and waits until it serves (every vhost-user socket given exists). */
export async function startSwitch(args: string[], sockets: string[]): Promise<SwitchProc> {
  const child = spawn(process.execPath, [CLI, "switch", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (s: string) => (out += s));
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (out += s));
  for (const s of sockets) await waitForPath(s, child, "iovirt switch", 10_000);
  const started = Date.now();
  while (!out.includes("switch running")) {
    if (child.exitCode !== null) throw new Error(`iovirt switch exited with ${child.exitCode}:\n${out}`);
    if (Date.now() - started > 10_000) throw new Error(`iovirt switch did not start:\n${out}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    child,
    log: () => out,
    stats: async () => {
      const mark = out.length;
      child.kill("SIGUSR1");
      const t = Date.now();
      while (!/mac table:.*\n/.test(out.slice(mark)) && Date.now() - t < 3000) await new Promise((r) => setTimeout(r, 25));
      return out.slice(mark);
    },
  };
}

/** QEMU arguments for a virtio-net-pci device on a vhost-user socket (INTx: QEMU 7.2/TCG crashes with MSI-X here). */
export function netDeviceArgs(o: {
  id: string;
  sock: string;
  mac: string;
  queues?: number;
  device?: string;
  reconnect?: boolean;
}): string[] {
  const mq = (o.queues ?? 1) > 1;
  return [
    "-chardev",
    `socket,id=${o.id},path=${o.sock}${o.reconnect === true ? ",reconnect=1" : ""}`,
    "-netdev",
    `vhost-user,id=${o.id}n,chardev=${o.id}${mq ? `,queues=${o.queues}` : ""}`,
    "-device",
    `virtio-net-pci,netdev=${o.id}n,mac=${o.mac},vectors=0${mq ? ",mq=on" : ""}${o.device ?? ""}`,
  ];
}

export function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Runs `ip ARGS`, ignoring failure when `tolerant` (clean-up of what may not exist). */
export function ip(args: string[], tolerant = false): void {
  try {
    sh("ip", args);
  } catch (e) {
    if (!tolerant) throw e;
  }
}

/** A TCP receiver in a network namespace: reads `bytes` bytes on `port`, prints "<n> <md5>". */
export function nsReceiver(ns: string, port: number, bytes: number): { done: Promise<string>; child: ChildProcess } {
  const js =
    `const c=require("crypto"),n=require("net");const h=c.createHash("md5");let got=0;` +
    `const s=n.createServer((k)=>{k.on("data",(d)=>{const t=d.subarray(0,Math.max(0,${bytes}-got));h.update(t);got+=t.length;` +
    `if(got>=${bytes}){console.log(got+" "+h.digest("hex"));k.destroy();s.close();}});});s.listen(${port},"0.0.0.0",()=>console.log("listening"));`;
  const child = spawn("ip", ["netns", "exec", ns, process.execPath, "-e", js], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (s: string) => (out += s));
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (out += s));
  const done = new Promise<string>((resolve) => child.once("exit", () => resolve(out)));
  return { done, child };
}

export async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const t = Date.now();
  while (!cond()) {
    if (Date.now() - t > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
