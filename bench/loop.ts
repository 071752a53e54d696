/**
 * The timing loop of the in-process benches (switch-core, net-path): calls
 * `pass` until `seconds` have gone by, reading the clock only between
 * batches of passes (a clock read costs more than many a pass), and returns
 * the sum of what the passes returned with the seconds it took.
 */
export function timeLoop(seconds: number, passesPerRead: number, pass: () => number): { count: number; secs: number } {
  let count = 0;
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  let now = t0;
  while (now < end) {
    for (let i = 0; i < passesPerRead; i++) count += pass();
    now = performance.now();
  }
  return { count, secs: (now - t0) / 1000 };
}

/** "12.34" Mpps for `count` events in `secs`, padded for a table. */
export function mpps(count: number, secs: number): string {
  return (count / secs / 1e6).toFixed(2).padStart(6);
}

/** Nanoseconds per event, padded for a table. */
export function nsEach(count: number, secs: number): string {
  return ((secs * 1e9) / count).toFixed(0).padStart(5);
}
