/**
 * Block quantization formats, bit-compatible with llama.cpp's ggml (`ggml-common.h`,
 * `ggml-quants.c`): sizes, dequantization references for every {@linkcode DType}, and
 * quantization for the plain floats, the legacy 32-element formats and the 256-element K formats.
 *
 * Layouts (all little-endian; `half` is IEEE f16):
 * - `q8_0` (32 values, 34 bytes): `d: half, qs: i8[32]`; `y = d * qs[j]`.
 * - `q4_0` (32 values, 18 bytes): `d: half, qs: u8[16]`; low nibbles hold values 0..15, high
 *   nibbles values 16..31; `y = d * (nibble - 8)`.
 * - `q4_1` (32, 20): `d: half, m: half, qs: u8[16]`; `y = d * nibble + m`.
 * - `q5_0` (32, 22): `d: half, qh: u32, qs: u8[16]`; bit j of `qh` is bit 4 of value j;
 *   `y = d * (q5 - 16)`.
 * - `q5_1` (32, 24): `d: half, m: half, qh: u32, qs: u8[16]`; `y = d * q5 + m`.
 * - `q2_k` (256, 84): `scales: u8[16], qs: u8[64], d: half, dmin: half`; sixteen 16-value
 *   sub-blocks (sub-block s = values 16s..16s+15), each with a 4-bit scale (low nibble of
 *   `scales[s]`) and 4-bit min (high nibble); value `e = 128n + 32j + l` (n 0..1, j 0..3,
 *   l 0..31) is bits 2j..2j+1 of `qs[32n + l]`; `y = d * sc * q2 - dmin * m`.
 * - `q3_k` (256, 110): `hmask: u8[32], qs: u8[64], scales: u8[12], d: half`; sixteen 16-value
 *   sub-blocks with 6-bit scales stored minus 32 (see `scaleQ3K`); value `e = 128n + 32j + l`
 *   takes its low 2 bits from bits 2j of `qs[32n + l]` and subtracts 4 unless bit 4n + j of
 *   `hmask[l]` is set; `y = d * (sc - 32) * (q2 - 4 * !hbit)`.
 * - `q4_k` (256, 144): `d: half, dmin: half, scales: u8[12], qs: u8[128]`; eight 32-value
 *   sub-blocks with 6-bit scale `sc` and min `m` packed in `scales` (see `scaleMinK4`);
 *   `y = d * sc * q4 - dmin * m`. Each 64 values share 32 bytes of `qs`: low nibbles first.
 * - `q5_k` (256, 176): `d, dmin, scales: u8[12], qh: u8[32], qs: u8[128]`; like `q4_k` with a
 *   fifth bit: for the 64-value group g, bit 2g of `qh[l]` completes value l and bit 2g+1 value
 *   l + 32.
 * - `q6_k` (256, 210): `ql: u8[128], qh: u8[64], scales: i8[16], d: half`; sixteen 16-value
 *   sub-blocks with int8 scales; `y = d * scale * (q6 - 32)`.
 *
 * Dequantization is bit-exact with ggml's f32 arithmetic: every product of a scale and a
 * quantized integer is exact in f32, and a single f64 operation rounded to f32 equals the f32
 * operation, so plain arithmetic stored into a `Float32Array` reproduces ggml's floats.
 *
 * @module
 */
import type { DType } from "./types.ts";

/** Values per block and bytes per block of a storage type. */
export interface BlockInfo {
  /** Values per block (1 for the plain float types). */
  readonly blockSize: number;
  /** Bytes per block. */
  readonly bytesPerBlock: number;
}

/** Block geometry of every {@linkcode DType}, as ggml defines it. */
export const BLOCK_INFO: Readonly<Record<DType, BlockInfo>> = {
  f32: { blockSize: 1, bytesPerBlock: 4 },
  f16: { blockSize: 1, bytesPerBlock: 2 },
  bf16: { blockSize: 1, bytesPerBlock: 2 },
  q8_0: { blockSize: 32, bytesPerBlock: 34 },
  q4_0: { blockSize: 32, bytesPerBlock: 18 },
  q4_1: { blockSize: 32, bytesPerBlock: 20 },
  q5_0: { blockSize: 32, bytesPerBlock: 22 },
  q5_1: { blockSize: 32, bytesPerBlock: 24 },
  q2_k: { blockSize: 256, bytesPerBlock: 84 },
  q3_k: { blockSize: 256, bytesPerBlock: 110 },
  q4_k: { blockSize: 256, bytesPerBlock: 144 },
  q5_k: { blockSize: 256, bytesPerBlock: 176 },
  q6_k: { blockSize: 256, bytesPerBlock: 210 },
};

/**
 * Bytes taken by `nElements` values stored as `dtype`. Throws a `RangeError` if `nElements` is
 * not a non-negative integer multiple of the block size.
 *
 * @example
 * ```ts
 * import { tensorBytes } from "./quant.ts";
 * console.log(tensorBytes("q4_0", 64)); // 36
 * ```
 */
export function tensorBytes(dtype: DType, nElements: number): number {
  const info = BLOCK_INFO[dtype];
  if (!info) throw new RangeError(`unknown dtype "${dtype}"`);
  if (!Number.isSafeInteger(nElements) || nElements < 0) {
    throw new RangeError(`${dtype}: element count ${nElements} is not a non-negative integer`);
  }
  if (nElements % info.blockSize !== 0) {
    throw new RangeError(
      `${dtype}: ${nElements} elements is not a multiple of the block size ${info.blockSize}`,
    );
  }
  return (nElements / info.blockSize) * info.bytesPerBlock;
}

// ---- f16 / bf16 scalars --------------------------------------------------------------------

let halfTable: Float32Array | undefined;

/** f32 value of every f16 bit pattern (built once, 256 KiB). */
function halfToFloatTable(): Float32Array {
  if (!halfTable) {
    const bits = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) bits[i] = i;
    halfTable = Float32Array.from(new Float16Array(bits.buffer));
  }
  return halfTable;
}

const scratch = new DataView(new ArrayBuffer(4));

/** The f16 bit pattern nearest to `x` (round to nearest even, as ggml's FP32_TO_FP16). */
function floatToHalfBits(x: number): number {
  scratch.setFloat16(0, x, true);
  return scratch.getUint16(0, true);
}

/** The bf16 bit pattern of `x`, rounded to nearest even (NaN stays a quiet NaN), as ggml. */
function floatToBf16Bits(x: number): number {
  scratch.setFloat32(0, x, true);
  const u = scratch.getUint32(0, true);
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 64) & 0xffff;
  return ((u + (0x7fff + ((u >>> 16) & 1))) >>> 16) & 0xffff;
}

/** Rounds half away from zero, as C's `roundf`. */
function roundAway(x: number): number {
  return x < 0 ? -Math.floor(-x + 0.5) : Math.floor(x + 0.5);
}

/** Truncation toward zero of an f32 value, as a C `(int8_t)` cast of an in-range value. */
function truncInt(x: number): number {
  return x < 0 ? Math.ceil(x) : Math.floor(x);
}

const f32 = Math.fround;

// ---- dequantization --------------------------------------------------------------------------

/**
 * Unpacks the 6-bit scale and min of K-quant sub-block `j` (0..7) from the 12 `scales` bytes at
 * `o` (ggml's `get_scale_min_k4`): sub-blocks 0-3 use the low 6 bits of bytes j and j+4;
 * sub-blocks 4-7 take their low 4 bits from byte j+4 and their top 2 bits from the top bits of
 * bytes j-4 (scale) and j (min).
 */
export function scaleMinK4(scales: Uint8Array, o: number, j: number): [number, number] {
  if (j < 4) return [scales[o + j] & 63, scales[o + j + 4] & 63];
  const sc = (scales[o + j + 4] & 0xf) | ((scales[o + j - 4] >> 6) << 4);
  const m = (scales[o + j + 4] >> 4) | ((scales[o + j] >> 6) << 4);
  return [sc, m];
}

/**
 * The signed scale of q3_K sub-block `s` (0..15) from the 12 `scales` bytes at `o`: a 6-bit
 * value whose low 4 bits are the low (s < 8) or high (s >= 8) nibble of byte s % 8 and whose
 * top 2 bits are bits 2(s / 4) of byte 8 + s % 4, minus 32.
 */
export function scaleQ3K(scales: Uint8Array, o: number, s: number): number {
  const lo = s < 8 ? scales[o + s] & 0xf : scales[o + s - 8] >> 4;
  const hi = (scales[o + 8 + (s % 4)] >> (2 * (s >> 2))) & 3;
  return (lo | (hi << 4)) - 32;
}

/**
 * Dequantizes the first `n` values stored as `dtype` in `data` to f32, exactly as ggml's
 * `dequantize_row_*`. Throws a `RangeError` if `n` is not a whole number of blocks or `data` is
 * shorter than {@linkcode tensorBytes}.
 *
 * @example
 * ```ts
 * import { dequantize } from "./quant.ts";
 * const block = new Uint8Array(18);
 * block[1] = 0x38; // d = 0.5 (f16 0x3800)
 * block.fill(0x9a, 2); // low nibble 10 -> (10-8)*0.5 = 1, high nibble 9 -> 0.5
 * const y = dequantize("q4_0", block, 32);
 * console.log(y[0], y[16]); // 1 0.5
 * ```
 */
export function dequantize(dtype: DType, data: Uint8Array, n: number): Float32Array {
  const bytes = tensorBytes(dtype, n);
  if (data.byteLength < bytes) {
    throw new RangeError(`${dtype}: ${n} values need ${bytes} bytes, got ${data.byteLength}`);
  }
  const y = new Float32Array(n);
  const h = halfToFloatTable();
  const half = (o: number) => h[data[o] | (data[o + 1] << 8)];
  const nb = n / BLOCK_INFO[dtype].blockSize;
  switch (dtype) {
    case "f32": {
      const dv = new DataView(data.buffer, data.byteOffset, bytes);
      for (let i = 0; i < n; i++) y[i] = dv.getFloat32(4 * i, true);
      break;
    }
    case "f16":
      for (let i = 0; i < n; i++) y[i] = half(2 * i);
      break;
    case "bf16": {
      const u = new Uint32Array(y.buffer);
      for (let i = 0; i < n; i++) u[i] = ((data[2 * i] | (data[2 * i + 1] << 8)) << 16) >>> 0;
      break;
    }
    case "q8_0":
      for (let b = 0; b < nb; b++) {
        const o = b * 34, d = half(o);
        for (let j = 0; j < 32; j++) y[b * 32 + j] = d * ((data[o + 2 + j] << 24) >> 24);
      }
      break;
    case "q4_0":
      for (let b = 0; b < nb; b++) {
        const o = b * 18, d = half(o);
        for (let j = 0; j < 16; j++) {
          const q = data[o + 2 + j];
          y[b * 32 + j] = d * ((q & 0xf) - 8);
          y[b * 32 + j + 16] = d * ((q >> 4) - 8);
        }
      }
      break;
    case "q4_1":
      for (let b = 0; b < nb; b++) {
        const o = b * 20, d = half(o), m = half(o + 2);
        for (let j = 0; j < 16; j++) {
          const q = data[o + 4 + j];
          y[b * 32 + j] = d * (q & 0xf) + m;
          y[b * 32 + j + 16] = d * (q >> 4) + m;
        }
      }
      break;
    case "q5_0":
    case "q5_1": {
      const withMin = dtype === "q5_1", size = withMin ? 24 : 22;
      for (let b = 0; b < nb; b++) {
        const o = b * size, d = half(o), m = withMin ? half(o + 2) : 0;
        const oh = o + (withMin ? 4 : 2), qs = oh + 4;
        const qh =
          (data[oh] | (data[oh + 1] << 8) | (data[oh + 2] << 16) | (data[oh + 3] << 24)) >>>
          0;
        for (let j = 0; j < 16; j++) {
          const q0 = (data[qs + j] & 0xf) | (((qh >>> j) & 1) << 4);
          const q1 = (data[qs + j] >> 4) | (((qh >>> (j + 16)) & 1) << 4);
          if (withMin) {
            y[b * 32 + j] = d * q0 + m;
            y[b * 32 + j + 16] = d * q1 + m;
          } else {
            y[b * 32 + j] = d * (q0 - 16);
            y[b * 32 + j + 16] = d * (q1 - 16);
          }
        }
      }
      break;
    }
    case "q2_k":
      for (let b = 0; b < nb; b++) {
        const o = b * 84, d = half(o + 80), dmin = half(o + 82);
        for (let e = 0; e < 256; e++) { // e = 128n + 32j + l; sub-block e >> 4
          const n = e >> 7, j = (e >> 5) & 3, l = e & 31, sc = data[o + (e >> 4)];
          const q = (data[o + 16 + 32 * n + l] >> (2 * j)) & 3;
          y[b * 256 + e] = f32(d * (sc & 0xf)) * q - f32(dmin * (sc >> 4));
        }
      }
      break;
    case "q3_k":
      for (let b = 0; b < nb; b++) {
        const o = b * 110, d = half(o + 108);
        for (let e = 0; e < 256; e++) {
          const n = e >> 7, j = (e >> 5) & 3, l = e & 31;
          const q = (data[o + 32 + 32 * n + l] >> (2 * j)) & 3;
          const h = (data[o + l] >> (4 * n + j)) & 1;
          y[b * 256 + e] = f32(d * scaleQ3K(data, o + 96, e >> 4)) * (q - (h ? 0 : 4));
        }
      }
      break;
    case "q4_k":
    case "q5_k": {
      const five = dtype === "q5_k", size = five ? 176 : 144;
      for (let b = 0; b < nb; b++) {
        const o = b * size, d = half(o), dmin = half(o + 2);
        const qh = o + 16, qs = five ? o + 48 : o + 16;
        for (let g = 0; g < 4; g++) { // 64 values per group: two sub-blocks of 32
          const [sc1, m1] = scaleMinK4(data, o + 4, 2 * g);
          const [sc2, m2] = scaleMinK4(data, o + 4, 2 * g + 1);
          const d1 = f32(d * sc1), min1 = f32(dmin * m1);
          const d2 = f32(d * sc2), min2 = f32(dmin * m2);
          const base = b * 256 + g * 64;
          for (let l = 0; l < 32; l++) {
            const q = data[qs + g * 32 + l];
            let lo = q & 0xf, hi = q >> 4;
            if (five) {
              const hb = data[qh + l];
              lo |= ((hb >> (2 * g)) & 1) << 4;
              hi |= ((hb >> (2 * g + 1)) & 1) << 4;
            }
            y[base + l] = d1 * lo - min1;
            y[base + 32 + l] = d2 * hi - min2;
          }
        }
      }
      break;
    }
    case "q6_k":
      for (let b = 0; b < nb; b++) {
        const o = b * 210, d = half(o + 208);
        for (let c = 0; c < 2; c++) { // 128 values per chunk: ql 64 bytes, qh 32 bytes, 8 scales
          const ql = o + 64 * c, qh = o + 128 + 32 * c, sc = o + 192 + 8 * c;
          const base = b * 256 + c * 128;
          for (let l = 0; l < 32; l++) {
            const is = l >> 4, hb = data[qh + l];
            const q1 = ((data[ql + l] & 0xf) | (((hb >> 0) & 3) << 4)) - 32;
            const q2 = ((data[ql + l + 32] & 0xf) | (((hb >> 2) & 3) << 4)) - 32;
            const q3 = ((data[ql + l] >> 4) | (((hb >> 4) & 3) << 4)) - 32;
            const q4 = ((data[ql + l + 32] >> 4) | (((hb >> 6) & 3) << 4)) - 32;
            const s = (k: number) => f32(d * ((data[sc + is + k] << 24) >> 24));
            y[base + l] = s(0) * q1;
            y[base + l + 32] = s(2) * q2;
            y[base + l + 64] = s(4) * q3;
            y[base + l + 96] = s(6) * q4;
          }
        }
      }
      break;
    default:
      throw new RangeError(`dequantize: unknown dtype "${dtype}"`);
  }
  return y;
}

// ---- quantization ----------------------------------------------------------------------------

/**
 * Quantizes `values` to `dtype`, returning the raw block bytes. Plain floats round to nearest
 * even. `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1` follow ggml's reference `quantize_row_*_ref`
 * bit for bit (f32 arithmetic emulated with `Math.fround`). The K formats use a simple
 * round-to-nearest scheme (per-sub-block min/max, 6-bit or 8-bit scale quantization), not ggml's
 * iterative search, so their bytes differ from llama-quantize's while the layout is identical
 * (q2_k and q3_k too: tests/llama_cpp_quant_test.ts dequantizes llama.cpp's own bytes).
 * Throws a `RangeError` if the length is not a whole number of blocks.
 *
 * @example
 * ```ts
 * import { dequantize, quantize } from "./quant.ts";
 * const x = Float32Array.from({ length: 32 }, (_, i) => i - 16);
 * const y = dequantize("q8_0", quantize("q8_0", x), 32);
 * console.log(Math.abs(y[5] - x[5]) < 0.07); // true
 * ```
 */
export function quantize(dtype: DType, values: Float32Array): Uint8Array {
  const n = values.length;
  const out = new Uint8Array(tensorBytes(dtype, n));
  const dv = new DataView(out.buffer);
  const nb = n / BLOCK_INFO[dtype].blockSize;
  const setHalf = (o: number, x: number) => dv.setUint16(o, floatToHalfBits(x), true);
  switch (dtype) {
    case "f32":
      for (let i = 0; i < n; i++) dv.setFloat32(4 * i, values[i], true);
      break;
    case "f16":
      for (let i = 0; i < n; i++) setHalf(2 * i, values[i]);
      break;
    case "bf16":
      for (let i = 0; i < n; i++) dv.setUint16(2 * i, floatToBf16Bits(values[i]), true);
      break;
    case "q8_0":
      for (let b = 0; b < nb; b++) {
        const x = values.subarray(b * 32, b * 32 + 32), o = b * 34;
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[j]));
        const d = f32(amax / 127), id = d ? f32(1 / d) : 0;
        setHalf(o, d);
        for (let j = 0; j < 32; j++) dv.setInt8(o + 2 + j, roundAway(f32(x[j] * id)));
      }
      break;
    case "q4_0":
    case "q5_0": {
      const five = dtype === "q5_0", size = five ? 22 : 18, levels = five ? 16 : 8;
      const top = 2 * levels - 1;
      for (let b = 0; b < nb; b++) {
        const x = values.subarray(b * 32, b * 32 + 32), o = b * size;
        let amax = 0, max = 0; // max: the signed value of largest magnitude (first one wins)
        for (let j = 0; j < 32; j++) {
          if (amax < Math.abs(x[j])) {
            amax = Math.abs(x[j]);
            max = x[j];
          }
        }
        const d = f32(max / -levels), id = d ? f32(1 / d) : 0;
        setHalf(o, d);
        const qs = o + (five ? 6 : 2);
        let qh = 0;
        for (let j = 0; j < 16; j++) {
          const q0 = Math.min(top, truncInt(f32(f32(x[j] * id) + levels + 0.5)));
          const q1 = Math.min(top, truncInt(f32(f32(x[j + 16] * id) + levels + 0.5)));
          out[qs + j] = (q0 & 0xf) | ((q1 & 0xf) << 4);
          qh |= ((q0 >> 4) << j) | ((q1 >> 4) << (j + 16));
        }
        if (five) dv.setUint32(o + 2, qh >>> 0, true);
      }
      break;
    }
    case "q4_1":
    case "q5_1": {
      const five = dtype === "q5_1", size = five ? 24 : 20, top = five ? 31 : 15;
      for (let b = 0; b < nb; b++) {
        const x = values.subarray(b * 32, b * 32 + 32), o = b * size;
        let min = Infinity, max = -Infinity;
        for (let j = 0; j < 32; j++) {
          if (x[j] < min) min = x[j];
          if (x[j] > max) max = x[j];
        }
        const d = f32(f32(max - min) / top), id = d ? f32(1 / d) : 0;
        setHalf(o, d);
        setHalf(o + 2, min);
        const qs = o + (five ? 8 : 4);
        let qh = 0;
        for (let j = 0; j < 16; j++) {
          const q0 = Math.min(top, truncInt(f32(f32(f32(x[j] - min) * id) + 0.5)));
          const q1 = Math.min(top, truncInt(f32(f32(f32(x[j + 16] - min) * id) + 0.5)));
          out[qs + j] = (q0 & 0xf) | ((q1 & 0xf) << 4);
          qh |= ((q0 >> 4) << j) | ((q1 >> 4) << (j + 16));
        }
        if (five) dv.setUint32(o + 4, qh >>> 0, true);
      }
      break;
    }
    case "q4_k":
    case "q5_k":
      for (let b = 0; b < nb; b++) {
        quantizeBlockQ45K(values.subarray(b * 256, b * 256 + 256), out, b, dtype === "q5_k");
      }
      break;
    case "q2_k":
      for (let b = 0; b < nb; b++) {
        quantizeBlockQ2K(values.subarray(b * 256, b * 256 + 256), out, b);
      }
      break;
    case "q3_k":
      for (let b = 0; b < nb; b++) {
        quantizeBlockQ3K(values.subarray(b * 256, b * 256 + 256), out, b);
      }
      break;
    case "q6_k":
      for (let b = 0; b < nb; b++) {
        quantizeBlockQ6K(values.subarray(b * 256, b * 256 + 256), out, b);
      }
      break;
    default:
      throw new RangeError(`quantize: unknown dtype "${dtype}"`);
  }
  return out;
}

/** The f32 value of the f16 nearest to `x`. */
function toHalf(x: number): number {
  return halfToFloatTable()[floatToHalfBits(x)];
}

/**
 * One q4_K / q5_K super-block by plain rounding: each 32-value sub-block gets scale
 * (max - min) / top and min -min(0, min); both are quantized to 6 bits against the super-block
 * scales d = max(scale) / 63 and dmin = max(min) / 63, then values are rounded with the
 * quantized scales so that the stored bytes and the dequantized values agree.
 */
function quantizeBlockQ45K(x: Float32Array, out: Uint8Array, b: number, five: boolean): void {
  const top = five ? 31 : 15, size = five ? 176 : 144, o = b * size;
  const scale = new Float64Array(8), mins = new Float64Array(8);
  for (let s = 0; s < 8; s++) {
    let lo = 0, hi = -Infinity;
    for (let l = 0; l < 32; l++) {
      lo = Math.min(lo, x[s * 32 + l]);
      hi = Math.max(hi, x[s * 32 + l]);
    }
    scale[s] = Math.max(0, hi - lo) / top;
    mins[s] = -lo;
  }
  const d = toHalf(Math.max(...scale) / 63), dmin = toHalf(Math.max(...mins) / 63);
  const dv = new DataView(out.buffer, out.byteOffset);
  dv.setUint16(o, floatToHalfBits(d), true);
  dv.setUint16(o + 2, floatToHalfBits(dmin), true);
  const ls = new Uint8Array(8), lm = new Uint8Array(8);
  for (let s = 0; s < 8; s++) {
    ls[s] = d > 0 ? Math.min(63, Math.round(scale[s] / d)) : 0;
    lm[s] = dmin > 0 ? Math.min(63, Math.round(mins[s] / dmin)) : 0;
    // A sub-block that needs a positive scale must not round to 0 (its values would vanish).
    if (ls[s] === 0 && scale[s] > 0 && d > 0) ls[s] = 1;
  }
  const sc = o + 4;
  for (let s = 0; s < 8; s++) { // inverse of scaleMinK4
    if (s < 4) {
      out[sc + s] = ls[s];
      out[sc + s + 4] = lm[s];
    } else {
      out[sc + s + 4] = (ls[s] & 0xf) | ((lm[s] & 0xf) << 4);
      out[sc + s - 4] |= (ls[s] >> 4) << 6;
      out[sc + s] |= (lm[s] >> 4) << 6;
    }
  }
  const qh = o + 16, qs = five ? o + 48 : o + 16;
  for (let s = 0; s < 8; s++) {
    const dl = f32(d * ls[s]), ml = f32(dmin * lm[s]);
    const g = s >> 1, upper = s & 1;
    for (let l = 0; l < 32; l++) {
      const q = dl > 0 ? Math.max(0, Math.min(top, Math.round((x[s * 32 + l] + ml) / dl))) : 0;
      out[qs + g * 32 + l] |= (q & 0xf) << (4 * upper);
      if (five) out[qh + l] |= (q >> 4) << (2 * g + upper);
    }
  }
}

/**
 * One q6_K super-block by plain rounding: each 16-value sub-block gets scale v / -32 for its
 * largest-magnitude value v; the 16 scales are quantized to int8 against d = max|scale| / 128,
 * then values are rounded to -32..31 with the quantized scales.
 */
function quantizeBlockQ6K(x: Float32Array, out: Uint8Array, b: number): void {
  const o = b * 210;
  const scale = new Float64Array(16);
  let maxScale = 0;
  for (let s = 0; s < 16; s++) {
    let amax = 0, vmax = 0;
    for (let l = 0; l < 16; l++) {
      const v = x[s * 16 + l];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        vmax = v;
      }
    }
    scale[s] = vmax / -32;
    if (Math.abs(scale[s]) > Math.abs(maxScale)) maxScale = scale[s];
  }
  const iscale = maxScale !== 0 ? -128 / maxScale : 0;
  const d = toHalf(iscale ? 1 / iscale : 0);
  const dv = new DataView(out.buffer, out.byteOffset);
  dv.setUint16(o + 208, floatToHalfBits(d), true);
  const L = new Uint8Array(256);
  for (let s = 0; s < 16; s++) {
    const q = Math.max(-128, Math.min(127, Math.round(iscale * scale[s])));
    dv.setInt8(o + 192 + s, q);
    const dq = f32(d * q);
    for (let l = 0; l < 16; l++) {
      const v = dq !== 0 ? Math.max(-32, Math.min(31, Math.round(x[s * 16 + l] / dq))) : 0;
      L[s * 16 + l] = v + 32;
    }
  }
  for (let c = 0; c < 2; c++) { // inverse of the dequantization's 128-value chunks
    const ql = o + 64 * c, qh = o + 128 + 32 * c, e = 128 * c;
    for (let l = 0; l < 32; l++) {
      out[ql + l] = (L[e + l] & 0xf) | ((L[e + l + 64] & 0xf) << 4);
      out[ql + l + 32] = (L[e + l + 32] & 0xf) | ((L[e + l + 96] & 0xf) << 4);
      out[qh + l] = (L[e + l] >> 4) | ((L[e + l + 32] >> 4) << 2) |
        ((L[e + l + 64] >> 4) << 4) | ((L[e + l + 96] >> 4) << 6);
    }
  }
}

/**
 * One q2_K super-block by plain rounding: each 16-value sub-block gets min m = min(0, min x) and
 * scale (max - m) / 3; both are quantized to 4 bits against d = max(scale) / 15 and
 * dmin = max(-m) / 15, then values are rounded to 0..3 with the quantized scale and min.
 */
function quantizeBlockQ2K(x: Float32Array, out: Uint8Array, b: number): void {
  const o = b * 84;
  const scale = new Float64Array(16), mins = new Float64Array(16);
  for (let s = 0; s < 16; s++) {
    let lo = 0, hi = -Infinity;
    for (let l = 0; l < 16; l++) {
      lo = Math.min(lo, x[16 * s + l]);
      hi = Math.max(hi, x[16 * s + l]);
    }
    scale[s] = Math.max(0, hi - lo) / 3;
    mins[s] = -lo;
  }
  const d = toHalf(Math.max(...scale) / 15), dmin = toHalf(Math.max(...mins) / 15);
  const dv = new DataView(out.buffer, out.byteOffset);
  dv.setUint16(o + 80, floatToHalfBits(d), true);
  dv.setUint16(o + 82, floatToHalfBits(dmin), true);
  for (let s = 0; s < 16; s++) {
    let ls = d > 0 ? Math.min(15, Math.round(scale[s] / d)) : 0;
    if (ls === 0 && scale[s] > 0 && d > 0) ls = 1; // keep a non-zero sub-block non-zero
    const lm = dmin > 0 ? Math.min(15, Math.round(mins[s] / dmin)) : 0;
    out[o + s] = ls | (lm << 4);
    const dl = f32(d * ls), ml = f32(dmin * lm);
    for (let l = 0; l < 16; l++) {
      const e = 16 * s + l, n = e >> 7, j = (e >> 5) & 3;
      const q = dl > 0 ? Math.max(0, Math.min(3, Math.round((x[e] + ml) / dl))) : 0;
      out[o + 16 + 32 * n + (e & 31)] |= q << (2 * j);
    }
  }
}

/**
 * One q3_K super-block by plain rounding: each 16-value sub-block gets scale v / -4 for its
 * largest-magnitude value v; the 16 scales are quantized to -32..31 against
 * d = max|scale| / 32, then values are rounded to -4..3 with the quantized scales.
 */
function quantizeBlockQ3K(x: Float32Array, out: Uint8Array, b: number): void {
  const o = b * 110;
  const scale = new Float64Array(16);
  let maxScale = 0;
  for (let s = 0; s < 16; s++) {
    let amax = 0, vmax = 0;
    for (let l = 0; l < 16; l++) {
      const v = x[16 * s + l];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        vmax = v;
      }
    }
    scale[s] = vmax / -4;
    if (Math.abs(scale[s]) > Math.abs(maxScale)) maxScale = scale[s];
  }
  const iscale = maxScale !== 0 ? -32 / maxScale : 0;
  const d = toHalf(iscale ? 1 / iscale : 0);
  new DataView(out.buffer, out.byteOffset).setUint16(o + 108, floatToHalfBits(d), true);
  for (let s = 0; s < 16; s++) {
    const q6 = Math.max(-32, Math.min(31, Math.round(iscale * scale[s]))) + 32; // inverse of scaleQ3K
    if (s < 8) out[o + 96 + s] |= q6 & 0xf;
    else out[o + 96 + s - 8] |= (q6 & 0xf) << 4;
    out[o + 104 + (s % 4)] |= (q6 >> 4) << (2 * (s >> 2));
    const dq = f32(d * (q6 - 32));
    for (let l = 0; l < 16; l++) {
      const e = 16 * s + l, n = e >> 7, j = (e >> 5) & 3;
      const u = (dq !== 0 ? Math.max(-4, Math.min(3, Math.round(x[e] / dq))) : 0) + 4;
      out[o + 32 + 32 * n + (e & 31)] |= (u & 3) << (2 * j);
      out[o + (e & 31)] |= (u >> 2) << (4 * n + j);
    }
  }
}
