/** A command-line mistake: the command prints it with its help and exits 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** Walks argv flag by flag; value readers check and explain their ranges. */
export class ArgReader {
  private i = -1;
  flag = "";
  private readonly argv: readonly string[];

  constructor(argv: readonly string[]) {
    this.argv = argv;
  }

  next(): boolean {
    this.i++;
    if (this.i >= this.argv.length) return false;
    this.flag = this.argv[this.i]!;
    return true;
  }

  value(): string {
    const v = this.argv[++this.i];
    if (v === undefined) throw new UsageError(`${this.flag} needs a value`);
    return v;
  }

  int(lo: number, hi: number): number {
    const n = Number(this.value());
    if (!Number.isInteger(n) || n < lo || n > hi) throw new UsageError(`${this.flag} takes an integer in [${lo}, ${hi}]`);
    return n;
  }

  /** A number in (lo, hi]. */
  positive(hi: number): number {
    const n = Number(this.value());
    if (!(n > 0 && n <= hi)) throw new UsageError(`${this.flag} takes a number in (0, ${hi}]`);
    return n;
  }

  oneOf<T extends string>(choices: readonly T[]): T {
    const v = this.value();
    if (!(choices as readonly string[]).includes(v)) throw new UsageError(`${this.flag} is one of ${choices.join(", ")}`);
    return v as T;
  }

  /** A comma-separated subset of `choices`, returned in the order of `choices`. */
  subset<T extends string>(choices: readonly T[]): T[] {
    const names = this.value().split(",");
    for (const n of names)
      if (!(choices as readonly string[]).includes(n)) throw new UsageError(`${this.flag}: unknown '${n}' (known: ${choices.join(", ")})`);
    return choices.filter((c) => names.includes(c));
  }

  unknown(): never {
    throw new UsageError(`unknown option ${this.flag}`);
  }
}

/**
 * Runs a parser. Returns its result, or the exit code when there is nothing
 * to run: 0 after printing the help, 2 after explaining a usage error.
 */
export function parseOrExplain<T extends object>(command: string, help: string, parse: () => T | "help"): T | number {
  try {
    const o = parse();
    if (o !== "help") return o;
    process.stdout.write(help);
    return 0;
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`${command}: ${e.message}\n\n${help}`);
    return 2;
  }
}

/**
 * A command word and the arguments its arity says it takes, read from `r`
 * and appended to `commands` (`drv blk|net|nvme COMMAND [ARGS] ...`); an
 * unknown word is a UsageError that names the known ones.
 */
export function takeCommand(r: ArgReader, word: string, arity: Readonly<Record<string, number>>, commands: string[][]): void {
  const n = arity[word];
  if (n === undefined) throw new UsageError(`unknown command '${word}' (known: ${Object.keys(arity).join(", ")})`);
  const cmd = [word];
  for (let i = 0; i < n; i++) cmd.push(r.value());
  commands.push(cmd);
}
