/** How a fuzzer names an unexpected exception: class, code, message and where it came from. */
export function describeError(e: unknown): string {
  if (!(e instanceof Error)) return `a non-Error value ${String(e)}`;
  const code = (e as { code?: unknown }).code;
  const frames = (e.stack ?? "")
    .split("\n")
    .filter((l) => l.trimStart().startsWith("at "))
    .slice(0, 3)
    .map((l) => l.trim())
    .join(" < ");
  return `${e.name}${typeof code === "string" ? ` ${code}` : ""}: ${e.message}${frames === "" ? "" : ` (${frames})`}`;
}

/** A finding's kind, with numbers and addresses blanked: two cases with the same signature are one bug. */
export function signature(finding: string): string {
  return finding
    .replace(/\(at .*$/, "")
    .replace(/0x[0-9a-f]+|\d+/gi, "#")
    .slice(0, 100);
}
