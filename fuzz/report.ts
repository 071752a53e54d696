/** How a fuzzer names an unexpected exception: class, code, message and where it came from. */
export function describeError(e: unknown): string {
  if (!(e instanceof Error)) return `a non-Error value ${String(e)}`;
  const code = (e as { code?: unknown }).code;
  const frames = (e.stack ?? "")
    .split("\n")
    .filter((l) => l.trimStart().startsWith("at "))
    .slice(0, 3)
    .map((l) => l.trim().replace(/file:\/\/\S*?\/dist\//, "dist/"))
    .join(" < ");
  return `${e.name}${typeof code === "string" ? ` ${code}` : ""}: ${e.message}${frames === "" ? "" : ` (${frames})`}`;
}

/** A finding's kind, with numbers and addresses blanked: two cases with the same signature are one bug. */
export function signature(finding: string): string {
  // An unexpected exception is one bug per class and code, whatever the message and step.
  const threw = /threw (\S+(?: [A-Z][A-Z_0-9]+)?)/.exec(finding);
  if (threw !== null) return `threw ${threw[1]}`;
  return finding
    .replace(/^step \d+ \([A-Z_]+\): /, "")
    .replace(/0x[0-9a-f]+|\d+/gi, "#")
    .slice(0, 100);
}
