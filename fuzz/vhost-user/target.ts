import { ddmin, simplify } from "../minimise.js";
import type { CaseResult, FuzzTarget } from "../target.js";
import { fromJson, toJson, type Step, type VuCase, type VuCaseJson } from "./case.js";
import { generateVuCase } from "./generate.js";
import { VuRunner, type PlatformWrap } from "./run.js";

/** The vhost-user message fuzzer as the shared loop sees it. */
export class VuTarget implements FuzzTarget<VuCaseJson> {
  readonly name = "vhost-user";
  private readonly runner: VuRunner;

  constructor(wrap?: PlatformWrap) {
    this.runner = new VuRunner(wrap);
  }

  runSeed(seed: number): CaseResult {
    return this.runner.run(generateVuCase(seed));
  }

  caseFor(seed: number): VuCaseJson {
    return toJson(generateVuCase(seed));
  }

  replay(c: VuCaseJson): CaseResult {
    return this.runner.run(fromJson(c));
  }

  /** Delta-debugs the step list, then drops fds one message at a time. */
  minimise(c: VuCaseJson, keep: (r: CaseResult) => boolean, deadline: number): VuCaseJson {
    const base = fromJson(c);
    const fails = (x: VuCase): boolean => keep(this.runner.run(x));
    const steps = ddmin(base.steps, (s) => fails({ ...base, steps: [...s] }), deadline);
    const fewerFds = steps.map(
      (_, i) =>
        (v: VuCase): VuCase | null =>
          dropFd(v, i),
    );
    return toJson(simplify({ ...base, steps }, [...fewerFds, ...fewerFds], fails));
  }

  counters(): Record<string, number> {
    return { messages: this.runner.messages };
  }
}

/** The case with the last fd of step i removed, or null when it has none. */
function dropFd(v: VuCase, i: number): VuCase | null {
  const s = v.steps[i];
  if (s === undefined || s.kind !== "msg" || s.fds.length === 0) return null;
  const steps: Step[] = [...v.steps];
  steps[i] = { ...s, fds: s.fds.slice(0, -1) };
  return { ...v, steps };
}
