/**
 * Our dequantization references (models/quant.ts, and kernels/qformats.ts' GPU-layout decoder)
 * against llama.cpp's own: every ggml block type specdec reads is quantized by ggml itself
 * (`ggml_quantize_chunk`, the code llama-quantize runs) from normal data on ragged shapes, then
 * dequantized by ggml (`to_float`) and by us. The floats must be equal bit for bit.
 *
 * llama.cpp missing fails these tests (with the install command), never skips them.
 */
import assert from "@specdec/assert";
import { ggmlDequantize, ggmlQuantize, openLlamaCpp } from "./llama_cpp.ts";
import { GGML_TYPE_IDS } from "../models/gguf.ts";
import { dequantize, quantize, tensorBytes } from "../models/quant.ts";
import type { DType } from "../models/types.ts";
import {
  decodeWeights,
  type GgufWeightFormat,
  isBlockFormat,
  isGgufFormat,
  packGguf,
  WEIGHT_FORMATS,
} from "../kernels/qformats.ts";
import { rng } from "./harness.ts";

/** Every GGUF block type (f32/f16 are not block types). */
const TYPES = WEIGHT_FORMATS.filter((f): f is GgufWeightFormat =>
  isBlockFormat(f) && isGgufFormat(f)
);

/** `n` seeded normal values with a few outliers (as real weights have). */
function weights(n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, (_, i) => {
    const g = Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r());
    return (i % 97 === 0 ? 8 : 1) * 0.02 * g;
  });
}

function bits(a: Float32Array): Uint32Array {
  return new Uint32Array(a.buffer, a.byteOffset, a.length);
}

/** Index of the first differing float, or -1. */
function firstDiff(a: Float32Array, b: Float32Array): number {
  const x = bits(a), y = bits(b);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return x.length === y.length ? -1 : x.length;
}

for (const f of TYPES) {
  Deno.test(`${f}: dequantize() and decodeWeights() equal ggml's to_float on ggml-quantized rows`, () => {
    const cpp = openLlamaCpp("cpu");
    const block = f.endsWith("_k") ? 256 : 32;
    for (const [rows, cols] of [[1, block], [3, 3 * block], [7, 5 * block]]) {
      const n = rows * cols, values = weights(n, rows * 1000 + cols);
      const type = GGML_TYPE_IDS[f as DType];
      const data = ggmlQuantize(cpp, type, values, rows, cols, tensorBytes(f, n));
      const theirs = ggmlDequantize(cpp, type, data, n);
      const mine = dequantize(f, data, n);
      const at = firstDiff(mine, theirs);
      assert.equal(
        at,
        -1,
        `${f} ${rows}x${cols}: value ${at}: ours ${mine[at]}, ggml ${theirs[at]}`,
      );
      const gpu = decodeWeights(f, packGguf(f, data, rows, cols), rows, cols);
      assert.equal(firstDiff(gpu, theirs), -1, `${f} ${rows}x${cols}: decodeWeights() differs`);
      // Our own quantizer writes bytes ggml reads as we do.
      const ours = quantize(f, values);
      const a = dequantize(f, ours, n), b = ggmlDequantize(cpp, type, ours, n);
      assert.equal(firstDiff(a, b), -1, `${f} ${rows}x${cols}: ggml reads our bytes differently`);
    }
  });
}
