/**
 * Locates the real model fixtures in ../shared/models (never copied into the repo). A missing
 * fixture fails the test with a message saying where it was looked for, never a silent pass.
 * Also the shared assertion for parser errors, and the helpers of the forward-pass tests.
 */
import assert from "@specdec/assert";
import { FormatError, type LoadedModel } from "../models/types.ts";
import { tensorToF32 } from "../models/convert.ts";
import { LlamaGpu } from "../models/llama.ts";
import { WeightStore } from "../engine/weights.ts";
import { readLlama2c } from "../models/llama2c.ts";
import type { Gpu } from "../engine/gpu.ts";
import { processLogits } from "../engine/speculative_math.ts";

/** The fixtures folder: SPECDEC_MODELS, else ../shared/models beside the checkout. */
export const FIXTURES = Deno.env.get("SPECDEC_MODELS") ??
  new URL("../../shared/models/", import.meta.url).pathname;

/** The path of fixture `rel`; throws a clear error if it does not exist. */
export async function fixture(rel: string): Promise<string> {
  const path = `${FIXTURES.replace(/\/$/, "")}/${rel}`;
  try {
    await Deno.stat(path);
  } catch {
    throw new Error(
      `fixture missing: ${path} (the real models live in ../shared/models beside the checkout; ` +
        `set SPECDEC_MODELS to another folder that has them)`,
    );
  }
  return path;
}

/** The bytes of fixture `rel`. */
export async function fixtureBytes(rel: string): Promise<Uint8Array> {
  return await Deno.readFile(await fixture(rel));
}

/** The text of fixture `rel`. */
export async function fixtureText(rel: string): Promise<string> {
  return await Deno.readTextFile(await fixture(rel));
}

/** Asserts that `fn` throws a FormatError whose message starts with `file` and matches `what`. */
export function assertFormatError(
  fn: () => unknown,
  file: string,
  what: RegExp,
  label = file,
): void {
  try {
    fn();
  } catch (e) {
    checkFormatError(e, file, what, label);
    return;
  }
  assert.fail(`${label}: no error`);
}

/** Like {@linkcode assertFormatError} for a function returning a promise. */
export async function assertFormatErrorAsync(
  fn: () => unknown,
  file: string,
  what: RegExp,
  label = file,
): Promise<void> {
  try {
    await fn();
  } catch (e) {
    checkFormatError(e, file, what, label);
    return;
  }
  assert.fail(`${label}: no error`);
}

function checkFormatError(e: unknown, file: string, what: RegExp, label: string): void {
  if (!(e instanceof FormatError)) {
    throw new Error(`${label}: expected a FormatError, got ${(e as Error)?.name}: ${e}`);
  }
  assert.ok(e.message.startsWith(`${file}: `), `${label}: message lacks ${file}: ${e.message}`);
  assert.match(e.message, what, label);
}

/** `model`'s tensors as named f32 arrays (converted once each), for the CPU reference forward. */
export function refWeights(model: LoadedModel): (name: string) => Float32Array {
  const cache = new Map<string, Float32Array>();
  return (name) => {
    let w = cache.get(name);
    if (!w) {
      const t = model.tensors.get(name);
      if (!t) throw new Error(`missing tensor ${name}`);
      cache.set(name, w = tensorToF32(t));
    }
    return w;
  };
}

/** Reads the first `rows` logit rows of `m` back from the GPU. */
export async function readLogits(gpu: Gpu, m: LlamaGpu, rows: number): Promise<Float32Array> {
  return new Float32Array(await gpu.read(m.logits, 0, rows * m.config.vocabSize * 4));
}

/** Greedy sampling settings for `Decoder.generate`. */
export const GREEDY = { temperature: 0, topK: 0, topP: 1, seed: 0 };

/** Decode events that ignore streamed tokens and never cancel. */
export const QUIET = { onTokens: () => {}, cancelled: () => false };

/**
 * The target's processed distribution after `prompt` plus its likeliest next token t*: the exact
 * law a sampled speculative cycle's first token must follow, among runs whose first emitted token
 * (the target's own sampler) was t*.
 */
export async function likeliestNext(
  gpu: Gpu,
  t: LlamaGpu,
  prompt: number[],
  s: { temperature: number; topK: number; topP: number },
): Promise<{ tStar: number; p1: Float32Array }> {
  const V = t.config.vocabSize;
  const logitsAfter = async (seq: number[]) => {
    const buf = gpu.upload("test.seq", new Uint32Array(seq));
    t.setPosition(0);
    await gpu.run("p", await t.plan(seq.length, { buffer: buf, offset: 0 }, "last"));
    buf.destroy();
    return new Float32Array(await gpu.read(t.logits, 0, V * 4));
  };
  const p0 = processLogits(await logitsAfter(prompt), s);
  const tStar = p0.indexOf(Math.max(...p0));
  return { tStar, p1: processLogits(await logitsAfter([...prompt, tStar]), s) };
}

/** A llama2.c fixture (`rel` under ../shared/models) as a loaded model. */
export async function llama2c(rel: string): Promise<LoadedModel> {
  const path = await fixture(rel);
  const { config, tensors } = readLlama2c(await Deno.readFile(path), path);
  return { source: path, format: "llama2c", config, tensors };
}

/**
 * Target and draft on the GPU in one store with `maxSeq` cache rows (the target producing up to
 * `targetLogitRows` logit rows, default the model's), and one `destroy()` for all three.
 */
export async function gpuPair(
  gpu: Gpu,
  target: LoadedModel,
  draft: LoadedModel,
  maxSeq: number,
  targetLogitRows?: number,
): Promise<{ t: LlamaGpu; d: LlamaGpu; destroy(): void }> {
  const store = new WeightStore(gpu);
  const t = await LlamaGpu.create(gpu, store, target, {
    label: "target",
    maxSeq,
    maxLogitRows: targetLogitRows,
  });
  const d = await LlamaGpu.create(gpu, store, draft, { label: "draft", maxSeq });
  return {
    t,
    d,
    destroy() {
      t.destroy();
      d.destroy();
      store.destroy();
    },
  };
}
