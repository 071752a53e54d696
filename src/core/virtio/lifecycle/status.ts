/** Device status bits (virtio 1.2 §2.1). */
export const STATUS_ACKNOWLEDGE = 1;
export const STATUS_DRIVER = 2;
export const STATUS_DRIVER_OK = 4;
export const STATUS_FEATURES_OK = 8;
export const STATUS_DEVICE_NEEDS_RESET = 64;
export const STATUS_FAILED = 128;

const NAMES: [number, string][] = [
  [STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"],
  [STATUS_DRIVER, "DRIVER"],
  [STATUS_FEATURES_OK, "FEATURES_OK"],
  [STATUS_DRIVER_OK, "DRIVER_OK"],
  [STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"],
  [STATUS_FAILED, "FAILED"],
];

export function describeStatus(s: number): string {
  const names = NAMES.filter(([b]) => (s & b) !== 0).map(([, n]) => n);
  return names.length === 0 ? "RESET" : names.join("|");
}

/**
 * Why a driver's status write is refused, or null when it is a legal step of
 * the init sequence (§3.1.1): bits are only ever added, never cleared (except
 * by writing 0, a reset); DRIVER needs ACKNOWLEDGE, FEATURES_OK needs DRIVER,
 * DRIVER_OK needs FEATURES_OK. FAILED may be set at any time. The driver never
 * sets DEVICE_NEEDS_RESET: only the device does (§2.1.1).
 */
export function statusTransitionError(from: number, to: number): string | null {
  const driverBits = from & ~STATUS_DEVICE_NEEDS_RESET;
  if ((to & STATUS_DEVICE_NEEDS_RESET) !== 0 && (from & STATUS_DEVICE_NEEDS_RESET) === 0) {
    return "the driver may not set DEVICE_NEEDS_RESET";
  }
  const want = to & ~STATUS_DEVICE_NEEDS_RESET;
  if ((want & driverBits) !== driverBits)
    return `status bits may only be cleared by a reset (${describeStatus(from)} -> ${describeStatus(to)})`;
  if ((want & STATUS_DRIVER) !== 0 && (want & STATUS_ACKNOWLEDGE) === 0) return "DRIVER before ACKNOWLEDGE";
  if ((want & STATUS_FEATURES_OK) !== 0 && (want & STATUS_DRIVER) === 0) return "FEATURES_OK before DRIVER";
  if ((want & STATUS_DRIVER_OK) !== 0 && (want & STATUS_FEATURES_OK) === 0) return "DRIVER_OK before FEATURES_OK";
  if ((want & ~0xcf) !== 0) return `reserved status bits 0x${(want & ~0xcf).toString(16)}`;
  return null;
}
