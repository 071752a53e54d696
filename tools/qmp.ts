/**
 * A small QMP client (QEMU's JSON control protocol, docs/interop/qmp-spec
 * in QEMU) for tests that drive QEMU at run time: migrations, status.
 *
 *   const qmp = await Qmp.connect("/tmp/vm.qmp");
 *   await qmp.execute("migrate", { uri: "tcp:127.0.0.1:4444" });
 *   const info = await qmp.execute("query-migrate");
 *
 * QEMU must run with `-qmp unix:PATH,server=on,wait=off`.
 */
import { createConnection, type Socket } from "node:net";

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = "QmpError";
  }
}

type Reply = { return?: unknown; error?: { class: string; desc: string }; event?: string };

export class Qmp {
  private buf = "";
  private readonly waiting: ((r: Reply) => void)[] = [];
  /** Events QEMU sent (name and data), in order. */
  readonly events: { event: string; data: unknown }[] = [];
  private closedWith: Error | null = null;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (chunk: string) => {
      this.buf += chunk;
      let nl: number;
      while ((nl = this.buf.indexOf("\n")) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (line === "") continue;
        const msg = JSON.parse(line) as Reply & { QMP?: unknown; data?: unknown };
        if (msg.QMP !== undefined) continue; // the greeting
        if (msg.event !== undefined) this.events.push({ event: msg.event, data: msg.data });
        else this.waiting.shift()?.(msg);
      }
    });
    const gone = (e?: Error): void => {
      this.closedWith ??= e ?? new Error("QMP connection closed");
      for (const w of this.waiting.splice(0)) w({ error: { class: "Disconnected", desc: this.closedWith.message } });
    };
    sock.on("error", gone);
    sock.on("close", () => gone());
  }

  /** Connects (retrying while QEMU creates the socket, up to `timeoutMs`) and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 10_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path);
          s.once("connect", () => resolve(s));
          s.once("error", reject);
        });
        const q = new Qmp(sock);
        await q.execute("qmp_capabilities");
        return q;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`cannot connect to QMP at ${path}: ${(e as Error).message}`, { cause: e });
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedWith !== null) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => {
      this.waiting.push((r) => (r.error !== undefined ? reject(new QmpError(command, r.error.class, r.error.desc)) : resolve(r.return)));
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + "\n");
    });
  }

  close(): void {
    this.sock.destroy();
  }
}
