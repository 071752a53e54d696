/**
 * A small, fast, deterministic random source for the fuzzers: one case is
 * fully determined by its seed, so a finding can be reproduced and
 * minimised from the seed alone.
 */
export class Rng {
  private s: number;

  constructor(seed: number) {
    this.s = 0;
    this.reseed(seed);
  }

  /** Starts the sequence for `seed` again (generators reuse one Rng per case). */
  reseed(seed: number): void {
    // Mix the seed first: xorshift states from consecutive seeds would start out correlated.
    let z = (seed + 0x9e3779b9) | 0;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    this.s = z ^ (z >>> 16) || 0x2545f491;
  }

  /** xorshift32: a uniformly distributed u32. The state stays an int32, which V8 keeps unboxed. */
  u32(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x;
    return x >>> 0;
  }

  /** An integer in [0, n), n <= 2^32 (multiply and floor: no slow double modulo). */
  int(n: number): number {
    return Math.floor(this.u32() * n * 2.3283064365386963e-10);
  }

  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }

  chance(p: number): boolean {
    return this.u32() < p * 0x1_0000_0000;
  }
}
