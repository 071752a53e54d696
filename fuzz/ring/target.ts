import { ddmin, simplify } from "../minimise.js";
import type { CaseResult, FuzzTarget } from "../target.js";
import { captureCase, loadCase, type RingCase } from "./case.js";
import { RingGenerator } from "./generate.js";
import { RingRunner, type DeviceWriter } from "./run.js";

/** The ring fuzzer as the shared loop sees it. */
export class RingTarget implements FuzzTarget<RingCase> {
  readonly name = "ring";
  private readonly runner: RingRunner;
  private readonly gen: RingGenerator;
  private buffers = 0;

  constructor(writer?: DeviceWriter) {
    this.runner = new RingRunner(writer);
    this.gen = new RingGenerator(this.runner.mem);
  }

  runSeed(seed: number): CaseResult {
    const r = this.runner.run(this.gen.generate(seed));
    this.buffers += r.buffers;
    return r;
  }

  caseFor(seed: number): RingCase {
    const mem = this.runner.mem;
    const c = captureCase(mem, this.gen.generate(seed));
    mem.reset();
    return c;
  }

  replay(c: RingCase): CaseResult {
    return this.runner.run(loadCase(this.runner.mem, c));
  }

  /** Delta-debugs the non-zero memory words, then tries plainer ring state and features one at a time. */
  minimise(c: RingCase, keep: (r: CaseResult) => boolean, deadline: number): RingCase {
    const fails = (x: RingCase): boolean => keep(this.replay(x));
    const words = ddmin(c.words, (w) => fails({ ...c, words: [...w] }), deadline);
    const plainer: ((v: RingCase) => RingCase | null)[] = [
      (v) => (v.notify.mode === "none" ? null : { ...v, notify: { mode: "none" } }),
      (v) => (v.batch === 1 ? null : { ...v, batch: 1 }),
      (v) => ({ ...v, features: { ...v.features, indirect: false } }),
      (v) => ({ ...v, features: { ...v.features, eventIdx: false } }),
      (v) => ({ ...v, features: { ...v.features, inOrder: false } }),
      (v) => ({ ...v, state: { ...v.state, nextAvail: 0 } }),
      (v) => ({ ...v, state: { ...v.state, nextUsed: 0 } }),
      (v) => ({ ...v, state: { ...v.state, availWrap: true, usedWrap: true } }),
    ];
    return simplify({ ...c, words }, plainer, fails);
  }

  counters(): Record<string, number> {
    return { buffers: this.buffers };
  }
}
