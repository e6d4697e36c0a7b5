/**
 * NormalFloat-4 (NF4), the 4-bit data type of QLoRA (Dettmers et al., 2023, "QLoRA: Efficient
 * Finetuning of Quantized LLMs", arXiv:2305.14314): sixteen levels placed at quantiles of a
 * standard normal distribution, scaled per block by the block's absolute maximum.
 *
 * The codebook is the one bitsandbytes ships (`csrc/kernels.cu`, the NF4 lookup table used by
 * `dequantize_nf4`; the same values are listed in the QLoRA paper's appendix), in the same index
 * order: index 0 is -1, index 7 is 0, index 15 is +1.
 *
 * Host layout (NF4 has no GGUF type; this is specdec's own), little-endian, blocks of
 * {@linkcode NF4_BLOCK} = 64 values in {@linkcode NF4_BLOCK_BYTES} = 34 bytes:
 * `d: half` (the block's absmax, rounded to f16), then `qs: u8[32]`: the low nibble of byte j
 * holds the code index of value j, the high nibble that of value j + 32 (the q4_0 convention, not
 * bitsandbytes' adjacent-pair packing). `y = d * NF4_CODEBOOK[index]`, one f32 rounding.
 *
 * Quantization: `d = f16(min(absmax, 65504))`; each value is divided by `d` and mapped to the
 * nearest codebook entry (a value exactly halfway between two entries takes the lower one).
 * A block whose `d` is 0 stores index 7 (zero) everywhere. NaN inputs are not supported.
 *
 * @module
 */

/**
 * The 16 NF4 levels in [-1, 1] (f32 values), bitsandbytes' index order.
 *
 * @example
 * ```ts
 * import { NF4_CODEBOOK } from "./nf4.ts";
 * console.log(NF4_CODEBOOK[0], NF4_CODEBOOK[7], NF4_CODEBOOK[15]); // -1 0 1
 * ```
 */
export const NF4_CODEBOOK: readonly number[] = Object.freeze([
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
].map(Math.fround));

/** Values per NF4 block. */
export const NF4_BLOCK = 64;
/** Bytes per NF4 block: an f16 absmax and 32 bytes of nibbles. */
export const NF4_BLOCK_BYTES = 34;

/** Largest finite f16: absmax values above it are clipped so the scale stays finite. */
const F16_MAX = 65504;

/** Midpoints between consecutive codebook entries (decision thresholds). */
const MIDPOINTS = NF4_CODEBOOK.slice(1).map((c, i) => (c + NF4_CODEBOOK[i]) / 2);

/** Index of the codebook entry nearest to `x` (ties go to the lower entry; clamps outside ±1). */
function nearest(x: number): number {
  let lo = 0, hi = 15; // binary search: count the midpoints strictly below x
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (x > MIDPOINTS[mid]) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function checkCount(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0 || n % NF4_BLOCK !== 0) {
    throw new RangeError(`nf4: ${what} ${n} is not a multiple of the block size ${NF4_BLOCK}`);
  }
}

/**
 * Quantizes `values` (a whole number of 64-value blocks) to NF4 blocks in the host layout
 * described in the module doc. Throws a `RangeError` if the length is not a multiple of 64.
 *
 * @example
 * ```ts
 * import { dequantizeNf4, NF4_CODEBOOK, quantizeNf4 } from "./nf4.ts";
 * const x = Float32Array.from({ length: 64 }, (_, i) => 2 * NF4_CODEBOOK[i % 16]);
 * const y = dequantizeNf4(quantizeNf4(x), 64);
 * console.log(y[3] === x[3]); // true: codebook values times a power of two round-trip exactly
 * ```
 */
export function quantizeNf4(values: Float32Array): Uint8Array {
  checkCount(values.length, "value count");
  const nb = values.length / NF4_BLOCK;
  const out = new Uint8Array(nb * NF4_BLOCK_BYTES);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < nb; b++) {
    const x = values.subarray(b * NF4_BLOCK, (b + 1) * NF4_BLOCK), o = b * NF4_BLOCK_BYTES;
    let amax = 0;
    for (let j = 0; j < NF4_BLOCK; j++) amax = Math.max(amax, Math.abs(x[j]));
    dv.setFloat16(o, Math.min(amax, F16_MAX), true);
    const d = dv.getFloat16(o, true);
    for (let j = 0; j < NF4_BLOCK / 2; j++) {
      const lo = d > 0 ? nearest(x[j] / d) : 7;
      const hi = d > 0 ? nearest(x[j + NF4_BLOCK / 2] / d) : 7;
      out[o + 2 + j] = lo | (hi << 4);
    }
  }
  return out;
}

/**
 * Dequantizes the first `n` values (a multiple of 64) of NF4 blocks in the host layout:
 * `y = f32(d * NF4_CODEBOOK[index])`. Throws a `RangeError` if `n` is not a whole number of
 * blocks or `bytes` is too short.
 *
 * @example
 * ```ts
 * import { dequantizeNf4 } from "./nf4.ts";
 * const block = new Uint8Array(34);
 * block[1] = 0x3c; // d = 1 (f16 0x3c00)
 * block.fill(0x7f, 2); // low nibble 15 -> +1, high nibble 7 -> 0
 * const y = dequantizeNf4(block, 64);
 * console.log(y[0], y[32]); // 1 0
 * ```
 */
export function dequantizeNf4(bytes: Uint8Array, n: number): Float32Array {
  checkCount(n, "value count");
  const nb = n / NF4_BLOCK;
  if (bytes.byteLength < nb * NF4_BLOCK_BYTES) {
    throw new RangeError(
      `nf4: ${n} values need ${nb * NF4_BLOCK_BYTES} bytes, got ${bytes.byteLength}`,
    );
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const y = new Float32Array(n);
  for (let b = 0; b < nb; b++) {
    const o = b * NF4_BLOCK_BYTES, d = dv.getFloat16(o, true), base = b * NF4_BLOCK;
    for (let j = 0; j < NF4_BLOCK / 2; j++) {
      const q = bytes[o + 2 + j];
      y[base + j] = d * NF4_CODEBOOK[q & 0xf];
      y[base + j + NF4_BLOCK / 2] = d * NF4_CODEBOOK[q >> 4];
    }
  }
  return y;
}
