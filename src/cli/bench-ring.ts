export function benchRingMain(_a: string[]): number { return 0; }
