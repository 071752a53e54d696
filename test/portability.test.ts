import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

// docs/architecture.md: src/core runs in a browser too. This holds even if lint is skipped.
const root = fileURLToPath(new URL("../../src/core", import.meta.url));

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

test("src/core imports no Node modules", () => {
  const all = files(root);
  assert.ok(all.length > 20, `expected the core sources under ${root}`);
  const bad = /from\s+["'](node:[^"']+|fs|path|os|net|child_process|worker_threads|crypto|util|events|stream|url|module)["']/;
  const offenders = all.filter((f) => bad.test(readFileSync(f, "utf8")));
  assert.deepEqual(offenders, []);
});

test("src/core uses no Node globals", () => {
  const offenders = files(root).filter((f) => /\b(Buffer\.|process\.|require\()/.test(readFileSync(f, "utf8")));
  assert.deepEqual(offenders, []);
});
