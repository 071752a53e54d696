/**
 * Delta debugging (Zeller's ddmin, complement variant): the smallest subset
 * of `items` found for which `fails` still holds, trying ever finer chunks
 * until no single item can go. Stops early, keeping the best so far, when
 * the clock passes `deadline` (ms since the epoch).
 */
export function ddmin<T>(items: readonly T[], fails: (subset: readonly T[]) => boolean, deadline: number): T[] {
  let cur = [...items];
  let n = 2;
  while (cur.length >= 2 && Date.now() < deadline) {
    const chunk = Math.ceil(cur.length / n);
    let reduced = false;
    for (let start = 0; start < cur.length && Date.now() < deadline; start += chunk) {
      const rest = [...cur.slice(0, start), ...cur.slice(start + chunk)];
      if (fails(rest)) {
        cur = rest;
        n = Math.max(n - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (chunk === 1) break;
      n = Math.min(n * 2, cur.length);
    }
  }
  if (cur.length === 1 && fails([])) return [];
  return cur;
}

/** Applies each simplification that keeps `fails` true, in order; returns the simplest value found. */
export function simplify<T>(value: T, steps: readonly ((v: T) => T | null)[], fails: (v: T) => boolean): T {
  let cur = value;
  for (const step of steps) {
    const next = step(cur);
    if (next !== null && fails(next)) cur = next;
  }
  return cur;
}
