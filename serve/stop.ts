/**
 * Stop strings over streamed text: text is released as soon as it can no longer be the start of
 * a stop string, so a stop split across tokens (or across UTF-8 pieces) is still found, and the
 * stop string itself is never released.
 *
 * @module
 */

/** What {@linkcode StopMatcher.push} releases. */
export interface StopStep {
  /** Text safe to send now (never part of a stop string). */
  text: string;
  /** Whether a stop string was completed; nothing after it is released. */
  stopped: boolean;
}

/**
 * Finds the earliest of `stops` in a stream of text pieces.
 *
 * @example
 * ```ts
 * import { StopMatcher } from "./stop.ts";
 * const m = new StopMatcher(["\n\n"]);
 * console.log(m.push("one\n"), m.push("\ntwo")); // {text:"one",stopped:false} {text:"",stopped:true}
 * ```
 */
export class StopMatcher {
  readonly #stops: readonly string[];
  #held = "";
  #stopped = false;

  /** `stops`: the stop strings (empty strings are ignored). */
  constructor(stops: readonly string[]) {
    this.#stops = stops.filter((s) => s.length > 0);
  }

  /** Whether a stop string has been seen. */
  get stopped(): boolean {
    return this.#stopped;
  }

  /** Adds `piece`; returns the text that can be released. */
  push(piece: string): StopStep {
    if (this.#stopped) return { text: "", stopped: true };
    const buf = this.#held + piece;
    let cut = -1;
    for (const s of this.#stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      this.#stopped = true;
      this.#held = "";
      return { text: buf.slice(0, cut), stopped: true };
    }
    // Hold back the longest tail of buf that is a proper prefix of some stop string.
    let hold = 0;
    for (const s of this.#stops) {
      for (let k = Math.min(s.length - 1, buf.length); k > hold; k--) {
        if (buf.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    this.#held = buf.slice(buf.length - hold);
    return { text: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** At the end of the stream: the held-back text (it did not become a stop string). */
  flush(): string {
    const t = this.#stopped ? "" : this.#held;
    this.#held = "";
    return t;
  }
}
