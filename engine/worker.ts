/**
 * The GPU worker: a Deno Worker that owns the device and the loaded models, so Deno's blocking
 * device poll (DESIGN.md) never freezes the caller. It speaks a small message protocol; the
 * main-thread side is `Engine` in engine/engine.ts.
 *
 * @module
 */
/// <reference lib="deno.worker" />
import { Session } from "./session.ts";
import type { Request, Response } from "./protocol.ts";

let session: Session | undefined;
const cancelled = new Set<number>();

function send(msg: Response): void {
  self.postMessage(msg);
}

function fail(id: number, e: unknown): void {
  const err = e instanceof Error ? e : new Error(String(e));
  send({ id, type: "error", name: err.name, message: err.message, stack: err.stack ?? "" });
}

self.onmessage = async (ev: MessageEvent<Request>) => {
  const req = ev.data;
  try {
    switch (req.type) {
      case "load":
        session = await Session.load(
          req.options,
          (message) => send({ id: req.id, type: "progress", message }),
        );
        send({ id: req.id, type: "loaded", info: session.info() });
        break;
      case "tokenize":
        send({
          id: req.id,
          type: "result",
          value: need(session).tokenize(req.text, req.bos, req.specials),
        });
        break;
      case "generate": {
        const stats = await need(session).generate(
          req.options,
          (chunk) => send({ id: req.id, type: "chunk", chunk }),
          () => cancelled.has(req.id),
        );
        cancelled.delete(req.id);
        send({ id: req.id, type: "done", stats });
        break;
      }
      case "cancel":
        cancelled.add(req.target);
        break;
      case "batchLoad":
        send({ id: req.id, type: "result", value: need(session).batchLoad() });
        break;
      case "dispose":
        // Destroy the device and wait until wgpu has processed it before replying: the caller
        // may exit the process right after, and a driver torn down mid-destruction crashes.
        await session?.dispose();
        session = undefined;
        send({ id: req.id, type: "result", value: null });
        // End this thread from the inside, so it unwinds its GPU objects before the caller's
        // terminate() (a Vulkan/EGL teardown racing a live thread has crashed at exit).
        self.close();
        break;
    }
  } catch (e) {
    fail(req.id, e);
  }
};

function need(s: Session | undefined): Session {
  if (!s) throw new Error("no model loaded in the GPU worker (send a load request first)");
  return s;
}
