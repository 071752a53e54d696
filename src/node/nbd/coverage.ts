/**
 * Which bytes of a structured READ reply have arrived. proto.md: content
 * chunks MAY come in any order but MUST NOT overlap earlier content or error
 * chunks, and a reply without errors MUST cover the whole request; a server
 * that breaks either rule gets a hard disconnect rather than leaving stale
 * bytes in the caller's buffer unnoticed.
 *
 * Runs are kept merged and sorted, so a server sending in order (every known
 * one) costs one comparison per chunk; a server scattering chunks is bounded
 * by `maxRuns` so it cannot make bookkeeping quadratic.
 */
export class Coverage {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  covered = 0;

  constructor(
    readonly length: number,
    private readonly maxRuns = 1024,
  ) {}

  get complete(): boolean {
    return this.covered === this.length;
  }

  /** Marks [from, to) (relative to the request) as received. */
  add(from: number, to: number): "ok" | "overlap" | "fragmented" {
    const n = this.ends.length;
    if (n > 0 && this.ends[n - 1] === from) {
      this.ends[n - 1] = to;
    } else if (n === 0 || this.ends[n - 1]! < from) {
      if (n >= this.maxRuns) return "fragmented";
      this.starts.push(from);
      this.ends.push(to);
    } else {
      // First run that ends after `from`: the only one that could overlap.
      let lo = 0;
      let hi = n;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (this.ends[mid]! <= from) lo = mid + 1;
        else hi = mid;
      }
      if (this.starts[lo]! < to) return "overlap";
      const joinsLeft = lo > 0 && this.ends[lo - 1] === from;
      const joinsRight = this.starts[lo] === to;
      if (joinsLeft && joinsRight) {
        this.ends[lo - 1] = this.ends[lo]!;
        this.starts.splice(lo, 1);
        this.ends.splice(lo, 1);
      } else if (joinsLeft) {
        this.ends[lo - 1] = to;
      } else if (joinsRight) {
        this.starts[lo] = from;
      } else {
        if (n >= this.maxRuns) return "fragmented";
        this.starts.splice(lo, 0, from);
        this.ends.splice(lo, 0, to);
      }
    }
    this.covered += to - from;
    return "ok";
  }
}
