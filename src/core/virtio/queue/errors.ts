import { GuestError } from "../../errors.js";

/**
 * Stable codes for everything a driver can get wrong in a ring. Tests, logs
 * and callers match on these, never on message text.
 */
export type QueueErrorCode =
  | "DESC_INDEX_OUT_OF_RANGE" // next or head >= queue size (§2.7.5)
  | "CHAIN_LOOP" // more hops than the table has entries (§2.7.5.3.1)
  | "CHAIN_TOO_LONG" // more than 2^32 bytes in total (§2.7.5.2)
  | "INDIRECT_NOT_NEGOTIATED" // §2.7.5.3.1
  | "INDIRECT_NESTED" // INDIRECT inside an indirect table
  | "INDIRECT_WITH_NEXT" // INDIRECT together with NEXT
  | "INDIRECT_BAD_LENGTH" // table length zero or not a multiple of 16
  | "READABLE_AFTER_WRITABLE" // §2.7.4.2: device-readable before device-writable
  | "AVAIL_IDX_JUMP" // avail.idx moved more than the queue size (§2.7.6)
  | "DESC_NOT_AVAILABLE" // packed list continues into a slot the driver did not make available (§2.8.6)
  | "BAD_BUFFER_ID" // used/avail id out of range or not outstanding
  | "RING_ADDRESS" // ring area outside guest memory or misaligned (§2.6, §2.7)
  | "BUFFER_ADDRESS" // a descriptor's buffer outside guest memory
  | "BAD_QUEUE_SIZE"
  | "BAD_QUEUE_STATE"
  | "QUEUE_BROKEN"; // an earlier error made this queue unusable until reset

export class QueueError extends GuestError {
  override name = "QueueError";
  declare readonly code: QueueErrorCode;
  constructor(code: QueueErrorCode, message: string) {
    super(code, message);
  }
}
