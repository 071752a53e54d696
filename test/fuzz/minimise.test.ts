import { test } from "node:test";
import assert from "node:assert/strict";
import { ddmin, simplify } from "../../fuzz/minimise.js";

const all = Array.from({ length: 200 }, (_, i) => i);
const later = Date.now() + 60_000;

test("ddmin keeps exactly the items a failure needs", () => {
  assert.deepEqual(
    ddmin(all, (s) => s.includes(17) && s.includes(142), later),
    [17, 142],
  );
  const one = ddmin(all, (s) => s.length > 0 && s.every((x) => x !== 3), later);
  assert.ok(one.length === 1 && one[0] !== 3, `got ${one.join()}`);
  assert.deepEqual(
    ddmin(all, () => true, later),
    [],
  );
});

test("ddmin stops at its deadline with what it has", () => {
  assert.equal(ddmin(all, (s) => s.includes(5), Date.now() - 1).length, all.length);
});

test("simplify applies only the steps that keep the failure", () => {
  const steps = [(v: number): number => v - 10, (v: number): number => v * 100, (): null => null];
  assert.equal(
    simplify(50, steps, (v) => v < 1000 && v > 0),
    40,
  );
});
