/**
 * The server's admission queue: the engine decodes `slots` sequences at a time (1 on the serial
 * path, `--parallel` when batching), requests wait their turn in arrival order, and past `limit`
 * waiting requests a new one is refused (503 with `Retry-After`) instead of piling up. A waiting
 * request whose client goes away leaves the queue.
 *
 * @module
 */
import { ApiError } from "./request.ts";

interface Waiter {
  resolve: (release: () => void) => void;
  reject: (e: unknown) => void;
  signal?: AbortSignal;
  onAbort: () => void;
}

/**
 * `slots` turns at a time (default 1), in arrival order, with a bounded waiting line.
 *
 * @example
 * ```ts
 * import { TurnQueue } from "./queue.ts";
 * const q = new TurnQueue(4);
 * const release = await q.acquire();
 * console.log(q.active, q.waiting); // 1 0
 * release();
 * ```
 */
export class TurnQueue {
  /** Most requests that may wait while the slots are taken. */
  readonly limit: number;
  /** Requests that may run at once. */
  readonly slots: number;
  #running = 0;
  #closed = false;
  #line: Waiter[] = [];
  #idle: (() => void)[] = [];

  /**
   * `limit`: most waiting requests (0: refuse whenever every slot is taken); `slots`: requests
   * running at once.
   */
  constructor(limit: number, slots = 1) {
    if (!Number.isInteger(limit) || limit < 0) {
      throw new RangeError(`queue limit must be an integer >= 0, got ${limit}`);
    }
    if (!Number.isInteger(slots) || slots < 1) {
      throw new RangeError(`queue slots must be an integer >= 1, got ${slots}`);
    }
    this.limit = limit;
    this.slots = slots;
  }

  /** Requests running now (0 .. slots). */
  get active(): number {
    return this.#running;
  }

  /** Requests waiting for their turn. */
  get waiting(): number {
    return this.#line.length;
  }

  /**
   * Resolves with a `release` function once it is this caller's turn. Rejects with a 503
   * {@linkcode ApiError} when the line is full or the queue is closed, and with the signal's
   * reason when `signal` aborts while waiting.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (this.#closed) {
      return Promise.reject(
        new ApiError(503, "the server is shutting down", { type: "server_error" }),
      );
    }
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#running < this.slots) {
      this.#running++;
      return Promise.resolve(this.#releaser());
    }
    if (this.#line.length >= this.limit) {
      return Promise.reject(
        new ApiError(
          503,
          `the server is busy: ${this.#line.length} requests are already waiting (--queue ` +
            `${this.limit}); retry later`,
          { type: "server_error", code: "server_busy" },
          { "Retry-After": "1" },
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          const i = this.#line.indexOf(w);
          if (i >= 0) this.#line.splice(i, 1);
          reject(signal!.reason);
        },
      };
      signal?.addEventListener("abort", w.onAbort, { once: true });
      this.#line.push(w);
    });
  }

  #releaser(): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#line.shift();
      if (next) {
        next.signal?.removeEventListener("abort", next.onAbort);
        next.resolve(this.#releaser());
        return;
      }
      this.#running--;
      if (this.#running === 0) { for (const f of this.#idle.splice(0)) f(); }
    };
  }

  /** Refuses new requests from now on; those already admitted keep their turns. */
  close(): void {
    this.#closed = true;
  }

  /** Resolves when nothing runs or waits. */
  idle(): Promise<void> {
    if (this.#running === 0 && this.#line.length === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }
}
