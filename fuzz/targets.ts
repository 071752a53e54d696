import { RingTarget } from "./ring/target.js";
import { VuTarget } from "./vhost-user/target.js";
import type { FuzzTarget, FuzzerName } from "./target.js";

/** A fresh instance of the named fuzzer. */
export function makeTarget(name: FuzzerName): FuzzTarget<unknown> {
  switch (name) {
    case "ring":
      return new RingTarget() as FuzzTarget<unknown>;
    case "vhost-user":
      return new VuTarget() as FuzzTarget<unknown>;
  }
}
