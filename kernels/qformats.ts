/**
 * Weight formats of stored matrices: sizes, host encoding to the GPU layout, the TS reference
 * decoder of that layout, and the WGSL that kernels (matmul, embedding) include to decode weights
 * in-kernel. The single source of truth for the weight store and the VRAM planner.
 *
 * A matrix is `[rows, cols]` (weights are `[out, in]`), row-major, quantized in blocks of
 * {@linkcode formatBlock} consecutive values of a row (`cols` must be a multiple of the block).
 * With `nb = rows * cols / block` blocks numbered row-major (block `b` holds values
 * `b * block .. b * block + block - 1` of the flattened matrix), the GPU layouts are:
 *
 * - `f32` / `f16`: the values, 4 / 2 bytes each.
 * - `q8_0` (blocks of 32): quants region `i8[nb * 32]` (block b's 32 bytes at `32b`, so value e
 *   is byte e), then scales region `half[nb]` (block b's `d` at byte `32 nb + 2b`).
 *   `y = d * q`.
 * - `q4_0` (32): quants `u8[nb * 16]` (block b at `16b`, GGUF's nibble order: low nibble of byte
 *   j = value j, high nibble = value j + 16), then scales `half[nb]` at `16 nb`.
 *   `y = d * (nibble - 8)`.
 * - `q4_k` (256): GGUF's 144-byte blocks unchanged (`d, dmin: half, scales: u8[12],
 *   qs: u8[128]`; 9 vec4s each: the header, then 8 of qs).
 * - `q6_k` (256): the first 208 bytes of each GGUF block (`ql: u8[128], qh: u8[64],
 *   scales: i8[16]`) at `208b`, then the blocks' `d: half[nb]` at `208 nb`.
 * - `nf4` (64, see `models/nf4.ts`): quants `u8[nb * 32]` (low nibble of byte j = value j, high
 *   = value j + 32) at `32b`, then absmax scales `half[nb]` at `32 nb`. `y = d * NF4[index]`.
 * - `q4_1` (32): quants `u8[nb * 16]` as q4_0, then `(d, m): half[2]` per block at `16 nb + 4b`.
 *   `y = d * nibble + m`.
 * - `q5_0` (32): GGUF's block without `d` (`qh: u32, qs: u8[16]`, 20 bytes) at `20b`, then
 *   `d: half[nb]` at `20 nb`. `y = d * (q5 - 16)`, bit 4 of value j = bit j of `qh`.
 * - `q5_1` (32): as q5_0, then `(d, m): half[2]` per block at `20 nb + 4b`. `y = d * q5 + m`.
 * - `q2_k` (256): GGUF's 84-byte blocks unchanged (`scales: u8[16], qs: u8[64], d, dmin`).
 * - `q3_k` (256): the first 108 bytes of each GGUF block (`hmask: u8[32], qs: u8[64],
 *   scales: u8[12]`) at `108b`, then the blocks' `d: half[nb]` at `108 nb`.
 * - `q5_k` (256): GGUF's 176-byte blocks unchanged (`d, dmin, scales: u8[12], qh: u8[32],
 *   qs: u8[128]`).
 *
 * So every word the kernels load is 4-byte aligned, quants of one row are contiguous (coalesced
 * loads), and the byte count equals GGUF's (`nb * blockBytes`) plus padding to a multiple of
 * {@linkcode weightAlign} (4, or 16 for the formats the kernels read as `vec4<u32>`: q8_0, q4_0
 * and q4_k, whose quant regions are whole vec4s: 2 per q8_0 block, 1 per q4_0 block, 9 per
 * 144-byte q4_k block). Because the scales trail the whole matrix, a row range of a
 * block-format matrix is not a byte range: to split a large matrix (e.g. an embedding larger than
 * one storage binding), encode each row range as its own matrix.
 *
 * @module
 */
import { dequantize, quantize, tensorBytes } from "../models/quant.ts";
import { dequantizeNf4, NF4_BLOCK_BYTES, NF4_CODEBOOK, quantizeNf4 } from "../models/nf4.ts";

/** Storage format of a weight matrix. */
export type WeightFormat =
  | "f32"
  | "f16"
  | "q8_0"
  | "q4_0"
  | "q4_k"
  | "q6_k"
  | "nf4"
  | "q4_1"
  | "q5_0"
  | "q5_1"
  | "q2_k"
  | "q3_k"
  | "q5_k";

/** The weight formats that exist as GGUF tensor types (every format but nf4). */
export type GgufWeightFormat = Exclude<WeightFormat, "nf4">;

/** Every {@linkcode WeightFormat}. */
export const WEIGHT_FORMATS: readonly WeightFormat[] = Object.freeze(
  [
    "f32",
    "f16",
    "q8_0",
    "q4_0",
    "q4_k",
    "q6_k",
    "nf4",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k",
    "q5_k",
  ] as const,
);

/** The WGSL binding (group 0) at which {@linkcode weightWgsl} declares the weights `w`. */
export const WEIGHT_BINDING = 1;

/** Block geometry: values per block, host/GGUF bytes per block, and how the GPU layout splits it. */
interface Layout {
  /** Values per block. */
  readonly block: number;
  /** Bytes per block in GGUF (or the nf4 host layout). */
  readonly blockBytes: number;
  /**
   * Byte offset in a block of the scale bytes moved to the trailing region (0: they open the
   * block; blockBytes - headBytes: they close it), or -1 (blocks copied as they are).
   */
  readonly headAt: number;
  /** Bytes moved per block (2: one f16 scale; 4: f16 scale and min). */
  readonly headBytes: number;
}

const LAYOUT: Readonly<Record<WeightFormat, Layout>> = {
  f32: { block: 1, blockBytes: 4, headAt: -1, headBytes: 0 },
  f16: { block: 1, blockBytes: 2, headAt: -1, headBytes: 0 },
  q8_0: { block: 32, blockBytes: 34, headAt: 0, headBytes: 2 },
  q4_0: { block: 32, blockBytes: 18, headAt: 0, headBytes: 2 },
  q4_k: { block: 256, blockBytes: 144, headAt: -1, headBytes: 0 },
  q6_k: { block: 256, blockBytes: 210, headAt: 208, headBytes: 2 },
  nf4: { block: 64, blockBytes: NF4_BLOCK_BYTES, headAt: 0, headBytes: 2 },
  q4_1: { block: 32, blockBytes: 20, headAt: 0, headBytes: 4 },
  q5_0: { block: 32, blockBytes: 22, headAt: 0, headBytes: 2 },
  q5_1: { block: 32, blockBytes: 24, headAt: 0, headBytes: 4 },
  q2_k: { block: 256, blockBytes: 84, headAt: -1, headBytes: 0 },
  q3_k: { block: 256, blockBytes: 110, headAt: 108, headBytes: 2 },
  q5_k: { block: 256, blockBytes: 176, headAt: -1, headBytes: 0 },
};

function layout(f: WeightFormat): Layout {
  const l = LAYOUT[f];
  if (!l) throw new RangeError(`unknown weight format "${f}" (known: ${WEIGHT_FORMATS})`);
  return l;
}

/**
 * Values per block: 1 for f32/f16, 32 for q8_0/q4_0/q4_1/q5_0/q5_1, 256 for the K formats
 * (q2_k .. q6_k), 64 for nf4.
 *
 * @example
 * ```ts
 * import { formatBlock } from "./qformats.ts";
 * console.log(formatBlock("q4_k")); // 256
 * ```
 */
export function formatBlock(f: WeightFormat): number {
  return layout(f).block;
}

/**
 * Whether `f` is block-quantized (every format but f32 and f16).
 *
 * @example
 * ```ts
 * import { isBlockFormat } from "./qformats.ts";
 * console.log(isBlockFormat("f16"), isBlockFormat("nf4")); // false true
 * ```
 */
export function isBlockFormat(f: WeightFormat): boolean {
  return layout(f).block > 1;
}

/**
 * vec4 groups per decode unit of a block format (`W_GROUPS` of its WGSL, see
 * {@linkcode weightWgsl}): how many vec4s of values one `wUnit` load decodes to; 0 for f32 and
 * f16.
 *
 * @example
 * ```ts
 * import { formatGroups } from "./qformats.ts";
 * console.log(formatGroups("q8_0"), formatGroups("q6_k"), formatGroups("f16")); // 4 4 0
 * ```
 */
export function formatGroups(f: WeightFormat): number {
  return GROUPS[f];
}

/**
 * Whether `f` is also a GGUF tensor type, so GGUF bytes of that type convert to the GPU layout
 * with {@linkcode packGguf} (every format but nf4).
 *
 * @example
 * ```ts
 * import { isGgufFormat } from "./qformats.ts";
 * console.log(isGgufFormat("q3_k"), isGgufFormat("nf4")); // true false
 * ```
 */
export function isGgufFormat(f: WeightFormat): f is GgufWeightFormat {
  layout(f);
  return f !== "nf4";
}

/**
 * Storage bits per weight, scales included: 32, 16, 8.5 (q8_0), 4.5 (q4_0, q4_k),
 * 6.5625 (q6_k), 4.25 (nf4), 5 (q4_1), 5.5 (q5_0, q5_k), 6 (q5_1), 2.625 (q2_k),
 * 3.4375 (q3_k).
 *
 * @example
 * ```ts
 * import { bitsPerWeight } from "./qformats.ts";
 * console.log(bitsPerWeight("q8_0")); // 8.5
 * ```
 */
export function bitsPerWeight(f: WeightFormat): number {
  const l = layout(f);
  return (l.blockBytes * 8) / l.block;
}

/** Validates a matrix shape for `f` and returns its block count. */
function blocks(f: WeightFormat, rows: number, cols: number): number {
  const l = layout(f);
  for (const [name, v] of [["rows", rows], ["cols", cols]] as const) {
    if (!Number.isSafeInteger(v) || v < 1) {
      throw new RangeError(`${f}: ${name}=${v} is not a positive integer`);
    }
  }
  if (cols % l.block !== 0) {
    throw new RangeError(`${f}: cols=${cols} is not a multiple of the block size ${l.block}`);
  }
  const nb = (rows * cols) / l.block;
  if (!Number.isSafeInteger(nb * l.blockBytes)) {
    throw new RangeError(`${f}: a ${rows}x${cols} matrix is too large`);
  }
  return nb;
}

/** The formats whose WGSL declares the weights as `array<vec4<u32>>` (16-byte loads). */
const VEC4_FORMATS: ReadonlySet<WeightFormat> = new Set(["q8_0", "q4_0", "q4_k"]);

/**
 * Byte multiple the GPU buffer of a matrix in `f` is padded to: 16 for the formats whose kernels
 * read the weights as `array<vec4<u32>>` (q8_0, q4_0, q4_k), so the last vec4 is whole and the
 * binding's size is a multiple of the array stride; 4 (one u32, or the f32/f16 scalars) for the
 * others.
 *
 * @example
 * ```ts
 * import { weightAlign } from "./qformats.ts";
 * console.log(weightAlign("q4_0"), weightAlign("q6_k"), weightAlign("f16")); // 16 4 4
 * ```
 */
export function weightAlign(f: WeightFormat): 4 | 16 {
  layout(f);
  return VEC4_FORMATS.has(f) ? 16 : 4;
}

/**
 * Values of K that one matrix-vector decode unit of `f` covers (`W_BLOCK / W_UNITS` of its WGSL,
 * see {@linkcode weightWgsl}): 16 for q8_0 (one vec4 of quants), 32 for q4_0 and q4_k (one vec4 of
 * nibbles), 8 or 16 for the formats loading one u32 per unit; 4 for f32 and f16 (one vec4).
 *
 * @example
 * ```ts
 * import { formatUnitValues } from "./qformats.ts";
 * console.log(formatUnitValues("q4_0"), formatUnitValues("q6_k"), formatUnitValues("f16"));
 * // 32 16 4
 * ```
 */
export function formatUnitValues(f: WeightFormat): number {
  const units = UNITS[f];
  return units ? layout(f).block / units : 4;
}

/**
 * Exact bytes of the GPU buffer that `gpu.upload()` creates for a `[rows, cols]` matrix in `f`
 * (GGUF's byte count, padded to a multiple of {@linkcode weightAlign}). Throws a `RangeError` if
 * `cols` is not a multiple of the block or a dimension is not a positive integer.
 *
 * @example
 * ```ts
 * import { weightBytes } from "./qformats.ts";
 * console.log(weightBytes("q8_0", 3, 32)); // 112 (3 blocks * 34 = 102, padded to 16)
 * console.log(weightBytes("q6_k", 1, 256)); // 212 (210, padded to 4)
 * ```
 */
export function weightBytes(f: WeightFormat, rows: number, cols: number): number {
  const raw = blocks(f, rows, cols) * layout(f).blockBytes, a = weightAlign(f);
  return Math.max(a, Math.ceil(raw / a) * a);
}

/** Which u32 words of a GPU-layout buffer hold f16 values (scales, or the weights themselves). */
export interface HalfWords {
  /** First word of the trailing f16 region (the word count when there is none). */
  readonly halfFrom: number;
  /** Words i with i % halfStride == halfPhase hold f16 pairs too (block headers); 0 for none. */
  readonly halfStride: number;
  /** Word of each block, counted from its start, that holds the block's f16 pair. */
  readonly halfPhase: number;
}

/**
 * The words of the GPU layout of a `[rows, cols]` matrix in `f` that hold f16 values: all of
 * them for f16; the trailing scale region for formats whose scales moved there (q8_0, q4_0,
 * q4_1, q5_0, q5_1, q3_k, q6_k, nf4); the word of every block holding its `d, dmin` pair for
 * the blocks copied whole (q4_k and q5_k open with it, q2_k closes with it). A random fill must
 * put finite f16 in exactly these words (`kernels/fill.ts`). f32 has none (it is refused).
 *
 * @example
 * ```ts
 * import { halfWords } from "./qformats.ts";
 * console.log(halfWords("q8_0", 2, 64)); // { halfFrom: 16, halfStride: 0, halfPhase: 0 }
 * ```
 */
export function halfWords(f: WeightFormat, rows: number, cols: number): HalfWords {
  const nb = blocks(f, rows, cols), l = layout(f);
  const words = weightBytes(f, rows, cols) / 4;
  if (f === "f32") throw new RangeError("halfWords: f32 matrices hold no f16 words");
  if (f === "f16") return { halfFrom: 0, halfStride: 0, halfPhase: 0 };
  if (l.headAt >= 0) {
    return { halfFrom: (nb * (l.blockBytes - l.headBytes)) / 4, halfStride: 0, halfPhase: 0 };
  }
  if (l.blockBytes % 4) throw new RangeError(`halfWords: ${f} blocks are not whole words`);
  // d and dmin (two f16) open q4_k/q5_k blocks and close q2_k's.
  const phase = f === "q2_k" ? l.blockBytes / 4 - 1 : 0;
  return { halfFrom: words, halfStride: l.blockBytes / 4, halfPhase: phase };
}

/** GGUF / host block bytes -> GPU layout (scales moved to a trailing region) in `out`. */
function pack(f: WeightFormat, src: Uint8Array, nb: number, out: Uint8Array): Uint8Array {
  const { blockBytes: S, headAt, headBytes: H } = layout(f);
  if (headAt < 0) {
    out.set(src.subarray(0, nb * S));
    return out;
  }
  const Q = S - H, qFrom = headAt === 0 ? H : 0;
  for (let b = 0; b < nb; b++) {
    const o = b * S;
    out.set(src.subarray(o + qFrom, o + qFrom + Q), b * Q);
    out.set(src.subarray(o + headAt, o + headAt + H), nb * Q + H * b);
  }
  return out;
}

/** GPU layout -> GGUF / host block bytes (the inverse of `pack`). */
function unpack(f: WeightFormat, gpu: Uint8Array, nb: number): Uint8Array {
  const { blockBytes: S, headAt, headBytes: H } = layout(f);
  if (headAt < 0) return gpu.slice(0, nb * S);
  const out = new Uint8Array(nb * S);
  const Q = S - H, qTo = headAt === 0 ? H : 0;
  for (let b = 0; b < nb; b++) {
    const o = b * S;
    out.set(gpu.subarray(b * Q, b * Q + Q), o + qTo);
    out.set(gpu.subarray(nb * Q + H * b, nb * Q + H * b + H), o + headAt);
  }
  return out;
}

/**
 * Quantizes `values` (`[rows, cols]`, row-major) straight to the GPU layout of `f`; the result
 * has {@linkcode weightBytes} bytes. For the GGUF formats it equals
 * `packGguf(f, quantize(f, values), rows, cols)`, so a GGUF written by specdec loads back to
 * identical GPU bytes.
 *
 * @example
 * ```ts
 * import { decodeWeights, encodeWeights } from "./qformats.ts";
 * const w = Float32Array.from({ length: 64 }, (_, i) => i / 8 - 4);
 * const gpuBytes = encodeWeights("q8_0", w, 2, 32);
 * console.log(gpuBytes.length, Math.abs(decodeWeights("q8_0", gpuBytes, 2, 32)[9] - w[9]) < 0.02);
 * // 80 true (68 bytes, padded to 16)
 * ```
 */
export function encodeWeights(
  f: WeightFormat,
  values: Float32Array,
  rows: number,
  cols: number,
): Uint8Array {
  const nb = blocks(f, rows, cols);
  if (values.length !== rows * cols) {
    throw new RangeError(`${f}: ${values.length} values given for a ${rows}x${cols} matrix`);
  }
  const out = new Uint8Array(weightBytes(f, rows, cols));
  const host = f === "nf4" ? quantizeNf4(values) : quantize(f, values);
  return pack(f, host, nb, out);
}

/**
 * Converts GGUF tensor bytes of a `[rows, cols]` matrix (ggml's block layout) to the GPU layout
 * (length {@linkcode weightBytes}). Throws a `RangeError` naming the expected size if `gguf` is
 * not exactly the tensor's byte count.
 *
 * @example
 * ```ts
 * import { quantize } from "../models/quant.ts";
 * import { packGguf } from "./qformats.ts";
 * const gguf = quantize("q4_0", new Float32Array(64).fill(1));
 * console.log(gguf.length, packGguf("q4_0", gguf, 1, 64).length); // 36 48
 * ```
 */
export function packGguf(
  f: GgufWeightFormat,
  gguf: Uint8Array,
  rows: number,
  cols: number,
): Uint8Array {
  const nb = blocks(f, rows, cols);
  const want = tensorBytes(f, rows * cols);
  if (gguf.byteLength !== want) {
    throw new RangeError(
      `${f}: a ${rows}x${cols} tensor has ${want} bytes in GGUF, got ${gguf.byteLength}`,
    );
  }
  return pack(f, gguf, nb, new Uint8Array(weightBytes(f, rows, cols)));
}

/**
 * Converts GPU-layout bytes back to GGUF tensor bytes (for nf4: the host layout of
 * `models/nf4.ts`); the inverse of {@linkcode packGguf}. Accepts the exact or the padded length.
 *
 * @example
 * ```ts
 * import { encodeWeights, unpackGpu } from "./qformats.ts";
 * const g = encodeWeights("q6_k", new Float32Array(256).fill(0.5), 1, 256);
 * console.log(g.length, unpackGpu("q6_k", g, 1, 256).length); // 212 210
 * ```
 */
export function unpackGpu(
  f: WeightFormat,
  gpuBytes: Uint8Array,
  rows: number,
  cols: number,
): Uint8Array {
  const nb = blocks(f, rows, cols);
  const raw = nb * layout(f).blockBytes, padded = weightBytes(f, rows, cols);
  if (gpuBytes.byteLength < raw || gpuBytes.byteLength > padded) {
    throw new RangeError(
      `${f}: a ${rows}x${cols} matrix has ${raw} bytes (${padded} padded) in the GPU layout, ` +
        `got ${gpuBytes.byteLength}`,
    );
  }
  return unpack(f, gpuBytes, nb);
}

/**
 * The TS reference dequantizer of the GPU layout: equals `dequantize(f, ggufBytes)` of
 * `models/quant.ts` (or `dequantizeNf4`) bit for bit. Accepts the exact or the padded length.
 *
 * @example
 * ```ts
 * import { decodeWeights, encodeWeights } from "./qformats.ts";
 * const w = new Float32Array([1, 2, 3, 4]);
 * console.log([...decodeWeights("f16", encodeWeights("f16", w, 2, 2), 2, 2)]); // [1, 2, 3, 4]
 * ```
 */
export function decodeWeights(
  f: WeightFormat,
  gpuBytes: Uint8Array,
  rows: number,
  cols: number,
): Float32Array {
  const host = unpackGpu(f, gpuBytes, rows, cols);
  return f === "nf4" ? dequantizeNf4(host, rows * cols) : dequantize(f, host, rows * cols);
}

// ---- WGSL --------------------------------------------------------------------------------------

/** WGSL helpers shared by the block formats. */
const BLOCK_COMMON = /* wgsl */ `
// f16 number i of the weight buffer (byte offset 2i), as f32.
fn wHalf(i: u32) -> f32 { return unpack2x16float(wWord(i >> 1u))[i & 1u]; }
// Small integers n < 2^23 to f32 without a conversion instruction (quarter rate on NVIDIA GPUs):
// the bits of 2^23 with n in the mantissa are the float 2^23 + n, so subtracting 2^23 + o gives
// n - o exactly.
const MAGIC = 0x4B000000u;
fn asF32(n: vec4<u32>, o: f32) -> vec4<f32> {
  return bitcast<vec4<f32>>(n | vec4<u32>(MAGIC)) - vec4<f32>(8388608.0 + o);
}
// The four low / high nibbles of the bytes of q (byte 0 first), as f32, minus o.
fn lo4o(q: u32, o: f32) -> vec4<f32> {
  return asF32((vec4<u32>(q) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u), o);
}
fn hi4o(q: u32, o: f32) -> vec4<f32> {
  return asF32((vec4<u32>(q) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u), o);
}
fn lo4(q: u32) -> vec4<f32> { return lo4o(q, 0.0); }
fn hi4(q: u32) -> vec4<f32> { return hi4o(q, 0.0); }
fn w1(e: u32, nb: u32) -> f32 { return w4(e & ~3u, nb)[e & 3u]; }
// Bit k of each byte of v (byte 0 first), as u32s.
fn bit4(v: u32, k: u32) -> vec4<u32> {
  return (vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) >> vec4<u32>(k)) & vec4<u32>(1u);
}
`;

/** q4_K / q5_K: the 6-bit scale and min of a sub-block from the 16-byte block header. */
const K_SCALE_MIN = /* wgsl */ `
// (d * scale, dmin * min) of sub-block s (0..7), h = the header words (d and dmin as f16, then
// the 12 scale bytes): ggml's get_scale_min_k4.
fn kScaleMin(h: vec4<u32>, s: u32) -> vec2<f32> {
  let sh = 8u * (s & 3u);
  let a = (h.y >> sh) & 255u; // scales[s % 4]
  let c = (h.z >> sh) & 255u; // scales[s % 4 + 4]
  let e = (h.w >> sh) & 255u; // scales[s % 4 + 8]
  let sm = select(vec2<u32>(a & 63u, c & 63u),
                  vec2<u32>((e & 15u) | ((a >> 6u) << 4u), (e >> 4u) | ((c >> 6u) << 4u)),
                  s >= 4u);
  return unpack2x16float(h.x) * vec2<f32>(sm);
}
`;

/** Decoders of each block format (see the module doc for the layouts). */
const BLOCK_WGSL: Record<Exclude<WeightFormat, "f32" | "f16">, string> = {
  q8_0: /* wgsl */ `
const W_BLOCK = 32u;
const W_UNITS = 2u;  // a unit is one vec4<u32> of quants: values 16j .. 16j + 15 of the block
const W_GROUPS = 4u;
fn wInit(lid: u32) {}
// The four signed bytes of q (byte 0 first), as f32: byte ^ 0x80 is the byte + 128 unsigned.
fn i8x4(q: u32) -> vec4<f32> {
  return asF32((vec4<u32>(q ^ 0x80808080u) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u), 128.0);
}
// Unit j of block b: its 16 quant bytes (one 16-byte load) and the block's scale d.
struct WUnit { q: vec4<u32>, d: f32 }
fn wUnit(b: u32, j: u32, nb: u32) -> WUnit { return WUnit(w[b * 2u + j], wHalf(nb * 16u + b)); }
// Group g: values 16j + 4g .. + 3 (word g of the unit).
fn wGroup(u: WUnit, g: u32) -> vec4<f32> { return u.d * i8x4(u.q[g]); }
// Factored form (see wScale): the quants of group g, and the unit's (scale, offset) of part 0.
fn wGroupQ(u: WUnit, g: u32) -> vec4<f32> { return i8x4(u.q[g]); }
fn wScale(u: WUnit, part: u32) -> vec2<f32> { return vec2<f32>(u.d, 0.0); }
fn wUnitK4(j: u32, g: u32) -> u32 { return 4u * j + g; }
fn w4(e: u32, nb: u32) -> vec4<f32> { return wHalf(nb * 16u + e / 32u) * i8x4(wWord(e / 4u)); }
`,
  q4_0: /* wgsl */ `
const W_BLOCK = 32u;
const W_UNITS = 1u;  // a unit is a whole block: its 16 quant bytes are one vec4<u32>
const W_GROUPS = 8u;
fn wInit(lid: u32) {}
// Block b (unit j = 0): its quants (one 16-byte load) and its scale d.
struct WUnit { q: vec4<u32>, d: f32 }
fn wUnit(b: u32, j: u32, nb: u32) -> WUnit { return WUnit(w[b + j], wHalf(nb * 8u + b)); }
// Group g: values 4g .. 4g + 3, the low nibbles of word g (g < 4) or the high ones of word g - 4.
fn wGroup(u: WUnit, g: u32) -> vec4<f32> { return u.d * wGroupQ(u, g); }
fn wGroupQ(u: WUnit, g: u32) -> vec4<f32> {
  let q = u.q[g % 4u];
  return select(lo4o(q, 8.0), hi4o(q, 8.0), g >= 4u);
}
fn wScale(u: WUnit, part: u32) -> vec2<f32> { return vec2<f32>(u.d, 0.0); }
fn wUnitK4(j: u32, g: u32) -> u32 { return g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 32u;
  let r = e % 32u;
  let q = w[b][(r % 16u) / 4u];
  return wHalf(nb * 8u + b) * (select(lo4(q), hi4(q), r >= 16u) - 8.0);
}
`,
  nf4: /* wgsl */ `
const W_BLOCK = 64u;
const W_UNITS = 8u;  // a unit is one u32 of quants: values 4j.. (low nibbles), 32+4j.. (high)
const W_GROUPS = 2u;
var<workgroup> nf4Lut: array<f32, 16>; // the NF4 codebook, filled by wInit
fn wInit(lid: u32) {
  if (lid == 0u) {
${NF4_CODEBOOK.map((c, i) => `    nf4Lut[${i}] = ${c.toPrecision(17)};`).join("\n")}
  }
}
fn nf4x4(i: vec4<u32>) -> vec4<f32> {
  return vec4<f32>(nf4Lut[i.x], nf4Lut[i.y], nf4Lut[i.z], nf4Lut[i.w]);
}
fn nf4Lo(q: u32) -> vec4<f32> {
  return nf4x4(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
}
fn nf4Hi(q: u32) -> vec4<f32> {
  return nf4x4(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 2> {
  let d = wHalf(nb * 16u + b);
  let q = w[b * 8u + j];
  return array<vec4<f32>, 2>(d * nf4Lo(q), d * nf4Hi(q));
}
fn wUnitK4(j: u32, g: u32) -> u32 { return j + 8u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 64u;
  let r = e % 64u;
  let q = w[b * 8u + (r % 32u) / 4u];
  return wHalf(nb * 16u + b) * select(nf4Lo(q), nf4Hi(q), r >= 32u);
}
`,
  q4_k: /* wgsl */ `
const W_BLOCK = 256u;
const W_UNITS = 8u;  // a unit is one vec4<u32> of qs: p = j/2, values 64p + 16(j%2) .. + 15 and +32
const W_GROUPS = 8u;
fn wInit(lid: u32) {}
// A block is 9 vec4s: the header (d and dmin as f16, then the 12 scale bytes), then qs.
${K_SCALE_MIN}
// Unit j of block b: its 32 quant nibbles (one 16-byte load) and the (scale, min) of the two
// sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles) they belong to, from one header load.
struct WUnit { q: vec4<u32>, s0: vec2<f32>, s1: vec2<f32> }
fn wUnit(b: u32, j: u32, nb: u32) -> WUnit {
  let h = w[b * 9u];
  let p = j / 2u;
  return WUnit(w[b * 9u + 1u + j], kScaleMin(h, 2u * p), kScaleMin(h, 2u * p + 1u));
}
// Group g: the low nibbles of word g (g < 4) or the high ones of word g - 4.
fn wGroup(u: WUnit, g: u32) -> vec4<f32> {
  let s = wScale(u, g / 4u);
  return s.x * wGroupQ(u, g) - s.y;
}
fn wGroupQ(u: WUnit, g: u32) -> vec4<f32> {
  let q = u.q[g % 4u];
  return select(lo4(q), hi4(q), g >= 4u);
}
// Part 0: groups 0..3 (sub-block 2p), part 1: groups 4..7 (sub-block 2p + 1).
fn wScale(u: WUnit, part: u32) -> vec2<f32> { return select(u.s0, u.s1, part == 1u); }
fn wUnitK4(j: u32, g: u32) -> u32 { return (j / 2u) * 16u + (j % 2u) * 4u + g % 4u + 8u * (g / 4u); }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 256u;
  let r = e % 256u;
  let g = r / 64u;
  let hi = (r % 64u) >= 32u;
  let q = w[b * 9u + 1u + 2u * g + (r % 32u) / 16u][(r % 16u) / 4u];
  let s = kScaleMin(w[b * 9u], 2u * g + u32(hi));
  return s.x * select(lo4(q), hi4(q), hi) - s.y;
}
`,
  q6_k: /* wgsl */ `
const W_BLOCK = 256u;
const W_UNITS = 16u; // a unit: chunk c = j/8, l = 4(j%8): values c*128 + l.. + {0, 32, 64, 96}
const W_GROUPS = 4u;
fn wInit(lid: u32) {}
// Signed scale s (0..15) of block b (the i8 scales at bytes 192..207 of its 208 bytes).
fn q6Scale(b: u32, s: u32) -> f32 { return i8At(w[b * 52u + 48u + s / 4u], s % 4u); }
// Signed byte i (0..3) of word v.
fn i8At(v: u32, i: u32) -> f32 { return f32(bitcast<i32>(v << (24u - 8u * i)) >> 24u); }
// The 4 six-bit values (minus 32) from nibbles of ql (low or high) and 2-bit fields of qh.
fn q6x4(ql: u32, nibble: u32, qh: u32, shift: u32) -> vec4<f32> {
  let l = (vec4<u32>(ql, ql >> 8u, ql >> 16u, ql >> 24u) >> vec4<u32>(nibble)) & vec4<u32>(15u);
  let h = (vec4<u32>(qh, qh >> 8u, qh >> 16u, qh >> 24u) >> vec4<u32>(shift)) & vec4<u32>(3u);
  return vec4<f32>(vec4<i32>(l | (h << vec4<u32>(4u))) - vec4<i32>(32));
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 4> {
  let d = wHalf(nb * 104u + b);
  let c = j / 8u;
  let i = j % 8u;
  let qa = w[b * 52u + c * 16u + i];       // ql[l .. l+3]
  let qb = w[b * 52u + c * 16u + 8u + i];  // ql[l+32 .. l+35]
  let qh = w[b * 52u + 32u + c * 8u + i];  // qh[l .. l+3]
  // Scales c*8 + i/4 + {0, 2, 4, 6}: bytes i/4 and i/4 + 2 of the chunk's two scale words.
  let s0 = w[b * 52u + 48u + 2u * c];
  let s1 = w[b * 52u + 49u + 2u * c];
  let is = i / 4u;
  return array<vec4<f32>, 4>(
    (d * i8At(s0, is)) * q6x4(qa, 0u, qh, 0u),
    (d * i8At(s0, is + 2u)) * q6x4(qb, 0u, qh, 2u),
    (d * i8At(s1, is)) * q6x4(qa, 4u, qh, 4u),
    (d * i8At(s1, is + 2u)) * q6x4(qb, 4u, qh, 6u));
}
fn wUnitK4(j: u32, g: u32) -> u32 { return (j / 8u) * 32u + j % 8u + 8u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 256u;
  let r = e % 256u;
  let c = r / 128u;
  let quarter = (r % 128u) / 32u;
  let i = (r % 32u) / 4u;
  let ql = w[b * 52u + c * 16u + (quarter & 1u) * 8u + i];
  let qh = w[b * 52u + 32u + c * 8u + i];
  let s = c * 8u + i / 4u + 2u * quarter;
  return (wHalf(nb * 104u + b) * q6Scale(b, s)) * q6x4(ql, 4u * (quarter >> 1u), qh, 2u * quarter);
}
`,
  q4_1: /* wgsl */ `
const W_BLOCK = 32u;
const W_UNITS = 4u;  // a unit is one u32 of quants: values 4j.. (low nibbles), 16+4j.. (high)
const W_GROUPS = 2u;
fn wInit(lid: u32) {}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 2> {
  let dm = unpack2x16float(w[nb * 4u + b]); // (d, m)
  let q = w[b * 4u + j];
  return array<vec4<f32>, 2>(dm.x * lo4(q) + dm.y, dm.x * hi4(q) + dm.y);
}
fn wUnitK4(j: u32, g: u32) -> u32 { return j + 4u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 32u;
  let r = e % 32u;
  let q = w[b * 4u + (r % 16u) / 4u];
  let dm = unpack2x16float(w[nb * 4u + b]);
  return dm.x * select(lo4(q), hi4(q), r >= 16u) + dm.y;
}
`,
  q5_0: /* wgsl */ `
const W_BLOCK = 32u;
const W_UNITS = 4u;  // a unit is one u32 of qs: values 4j.. (low nibbles), 16+4j.. (high)
const W_GROUPS = 2u;
fn wInit(lid: u32) {}
// Values r .. r+3 of a block (r % 4 == 0): nibbles of q plus 16 * bits r.. of qh.
fn q5x4(q: u32, qh: u32, r: u32) -> vec4<f32> {
  let n = select(lo4(q), hi4(q), r >= 16u);
  return n + 16.0 * vec4<f32>((vec4<u32>(qh) >> (vec4<u32>(r) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u));
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 2> {
  let d = wHalf(nb * 10u + b);
  let qh = w[b * 5u];
  let q = w[b * 5u + 1u + j];
  return array<vec4<f32>, 2>(d * (q5x4(q, qh, 4u * j) - 16.0), d * (q5x4(q, qh, 16u + 4u * j) - 16.0));
}
fn wUnitK4(j: u32, g: u32) -> u32 { return j + 4u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 32u;
  let r = e % 32u;
  let q = w[b * 5u + 1u + (r % 16u) / 4u];
  return wHalf(nb * 10u + b) * (q5x4(q, w[b * 5u], r) - 16.0);
}
`,
  q5_1: /* wgsl */ `
const W_BLOCK = 32u;
const W_UNITS = 4u;  // a unit is one u32 of qs: values 4j.. (low nibbles), 16+4j.. (high)
const W_GROUPS = 2u;
fn wInit(lid: u32) {}
// Values r .. r+3 of a block (r % 4 == 0): nibbles of q plus 16 * bits r.. of qh.
fn q5x4(q: u32, qh: u32, r: u32) -> vec4<f32> {
  let n = select(lo4(q), hi4(q), r >= 16u);
  return n + 16.0 * vec4<f32>((vec4<u32>(qh) >> (vec4<u32>(r) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u));
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 2> {
  let dm = unpack2x16float(w[nb * 5u + b]); // (d, m)
  let qh = w[b * 5u];
  let q = w[b * 5u + 1u + j];
  return array<vec4<f32>, 2>(dm.x * q5x4(q, qh, 4u * j) + dm.y, dm.x * q5x4(q, qh, 16u + 4u * j) + dm.y);
}
fn wUnitK4(j: u32, g: u32) -> u32 { return j + 4u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 32u;
  let r = e % 32u;
  let q = w[b * 5u + 1u + (r % 16u) / 4u];
  let dm = unpack2x16float(w[nb * 5u + b]);
  return dm.x * q5x4(q, w[b * 5u], r) + dm.y;
}
`,
  q2_k: /* wgsl */ `
const W_BLOCK = 256u;
const W_UNITS = 16u; // a unit: qs word j, n = j/8, l = 4(j%8): values 128n + 32g + l.. for g 0..3
const W_GROUPS = 4u;
fn wInit(lid: u32) {}
// Group g of unit q: values 128n + 32g + l .. + 3 of block word offset o; s = their sub-block.
fn q2Group(o: u32, q: u32, g: u32, s: u32) -> vec4<f32> {
  let dm = unpack2x16float(w[o + 20u]); // (d, dmin)
  let sc = (w[o + s / 4u] >> (8u * (s % 4u))) & 255u;
  let v = (vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) >> vec4<u32>(2u * g)) & vec4<u32>(3u);
  return (dm.x * f32(sc & 15u)) * vec4<f32>(v) - dm.y * f32(sc >> 4u);
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 4> {
  let o = b * 21u;
  let q = w[o + 4u + j];
  let s = 8u * (j / 8u) + (j % 8u) / 4u; // sub-block of group 0; group g: s + 2g
  return array<vec4<f32>, 4>(q2Group(o, q, 0u, s), q2Group(o, q, 1u, s + 2u),
                             q2Group(o, q, 2u, s + 4u), q2Group(o, q, 3u, s + 6u));
}
fn wUnitK4(j: u32, g: u32) -> u32 { return (j / 8u) * 32u + j % 8u + 8u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let o = (e / 256u) * 21u;
  let r = e % 256u; // 128n + 32g + l
  let q = w[o + 4u + 8u * (r / 128u) + (r % 32u) / 4u];
  return q2Group(o, q, (r % 128u) / 32u, r / 16u);
}
`,
  q3_k: /* wgsl */ `
const W_BLOCK = 256u;
const W_UNITS = 16u; // a unit: qs word j, n = j/8, l = 4(j%8): values 128n + 32g + l.. for g 0..3
const W_GROUPS = 4u;
fn wInit(lid: u32) {}
// Signed scale of sub-block s (0..15) of the block at word o: ggml's 6-bit q3_K scale - 32.
fn q3Scale(o: u32, s: u32) -> f32 {
  let lo = (w[o + 24u + (s % 8u) / 4u] >> (8u * (s % 4u) + 4u * (s / 8u))) & 15u;
  let hi = (w[o + 26u] >> (8u * (s % 4u) + 2u * (s / 4u))) & 3u;
  return f32(i32(lo | (hi << 4u)) - 32);
}
// Group g of the values in qs word q and hmask word hm (n = the 128-value half), times d * scale.
fn q3Group(o: u32, d: f32, q: u32, hm: u32, n: u32, g: u32, s: u32) -> vec4<f32> {
  let v = (vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) >> vec4<u32>(2u * g)) & vec4<u32>(3u);
  let h = bit4(hm, 4u * n + g);
  return (d * q3Scale(o, s)) * (vec4<f32>(v) - 4.0 + 4.0 * vec4<f32>(h));
}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 4> {
  let o = b * 27u;
  let d = wHalf(nb * 54u + b);
  let n = j / 8u;
  let q = w[o + 8u + j];
  let hm = w[o + j % 8u];
  let s = 8u * n + (j % 8u) / 4u;
  return array<vec4<f32>, 4>(q3Group(o, d, q, hm, n, 0u, s), q3Group(o, d, q, hm, n, 1u, s + 2u),
                             q3Group(o, d, q, hm, n, 2u, s + 4u), q3Group(o, d, q, hm, n, 3u, s + 6u));
}
fn wUnitK4(j: u32, g: u32) -> u32 { return (j / 8u) * 32u + j % 8u + 8u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let b = e / 256u;
  let o = b * 27u;
  let r = e % 256u; // 128n + 32g + l
  let n = r / 128u;
  let l4 = (r % 32u) / 4u;
  return q3Group(o, wHalf(nb * 54u + b), w[o + 8u + 8u * n + l4], w[o + l4], n, (r % 128u) / 32u, r / 16u);
}
`,
  q5_k: /* wgsl */ `
const W_BLOCK = 256u;
const W_UNITS = 32u; // a unit is one u32 of qs: group g = j/8, values g*64+4(j%8).. and +32
const W_GROUPS = 2u;
fn wInit(lid: u32) {}
${K_SCALE_MIN}
fn wUnit(b: u32, j: u32, nb: u32) -> array<vec4<f32>, 2> {
  let o = b * 44u;
  let g = j / 8u;
  let q = w[o + 12u + j];
  let qh = w[o + 4u + j % 8u];
  let h = vec4<u32>(w[o], w[o + 1u], w[o + 2u], w[o + 3u]);
  let s0 = kScaleMin(h, 2u * g);
  let s1 = kScaleMin(h, 2u * g + 1u);
  return array<vec4<f32>, 2>(s0.x * (lo4(q) + 16.0 * vec4<f32>(bit4(qh, 2u * g))) - s0.y,
                             s1.x * (hi4(q) + 16.0 * vec4<f32>(bit4(qh, 2u * g + 1u))) - s1.y);
}
fn wUnitK4(j: u32, g: u32) -> u32 { return (j / 8u) * 16u + j % 8u + 8u * g; }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  let o = (e / 256u) * 44u;
  let r = e % 256u;
  let g = r / 64u;
  let hi = (r % 64u) >= 32u;
  let q = w[o + 12u + g * 8u + (r % 32u) / 4u];
  let qh = w[o + 4u + (r % 32u) / 4u];
  let s = kScaleMin(vec4<u32>(w[o], w[o + 1u], w[o + 2u], w[o + 3u]), 2u * g + u32(hi));
  return s.x * (select(lo4(q), hi4(q), hi) + 16.0 * vec4<f32>(bit4(qh, 2u * g + u32(hi)))) - s.y;
}
`,
};

/** `W_UNITS` of each format's decoder (0: no decode units). */
const UNITS: Readonly<Record<WeightFormat, number>> = {
  f32: 0,
  f16: 0,
  q8_0: 2,
  q4_0: 1,
  q4_k: 8,
  q6_k: 16,
  nf4: 8,
  q4_1: 4,
  q5_0: 4,
  q5_1: 4,
  q2_k: 16,
  q3_k: 16,
  q5_k: 32,
};

/**
 * How a vec4 format's unit factors for {@linkcode formatFactoring}: its groups split into
 * `parts` runs of equal length, each with one (scale, offset) pair; `offset` says whether any
 * offset is non-zero.
 */
export interface UnitFactoring {
  /** Scale parts per unit: group g is in part `floor(g * parts / W_GROUPS)`. */
  readonly parts: number;
  /** Whether the decoded values carry an offset (`y = scale * q - offset`). */
  readonly offset: boolean;
}

const FACTORING: Partial<Record<WeightFormat, UnitFactoring>> = {
  q8_0: { parts: 1, offset: false },
  q4_0: { parts: 1, offset: false },
  q4_k: { parts: 2, offset: true },
};

/**
 * The formats whose units decode in factored form, `y = s.x * q - s.y` with one (s.x, s.y) =
 * `wScale(u, part)` per part of the unit and `q = wGroupQ(u, g)` small integers, so a dot
 * product over a part is `s.x * Σ q x - s.y * Σ x`: one multiply per part instead of one per
 * value (q8_0, q4_0, q4_k); `undefined` for the others.
 *
 * @example
 * ```ts
 * import { formatFactoring } from "./qformats.ts";
 * console.log(formatFactoring("q4_k"), formatFactoring("q6_k")); // { parts: 2, offset: true } undefined
 * ```
 */
export function formatFactoring(f: WeightFormat): UnitFactoring | undefined {
  return FACTORING[f];
}

/** `W_GROUPS` of each format's decoder (0: no decode units). */
const GROUPS: Readonly<Record<WeightFormat, number>> = {
  f32: 0,
  f16: 0,
  q8_0: 4,
  q4_0: 8,
  q4_k: 8,
  q6_k: 4,
  nf4: 2,
  q4_1: 2,
  q5_0: 2,
  q5_1: 2,
  q2_k: 4,
  q3_k: 4,
  q5_k: 2,
};

/**
 * WGSL snippet declaring the weights and their decoders, for kernels that read a `[rows, cols]`
 * matrix in format `f`. Place it first in the module (for f16 it opens with `enable f16;`).
 *
 * It declares `w` at `@group(0) @binding(`{@linkcode WEIGHT_BINDING}`)` (read-only storage:
 * `array<f32>` / `array<f16>` for the float formats, `array<vec4<u32>>` for q8_0, q4_0 and q4_k
 * (16-byte loads; {@linkcode weightAlign} 16), `array<u32>` for the other block formats) and:
 * - `const W_BLOCK: u32`: values per block (1 for f32/f16).
 * - `fn wInit(lid: u32)`: call with `local_invocation_index` at the start of the entry point,
 *   then `workgroupBarrier()`, before decoding (nf4 fills a workgroup codebook; others no-op).
 * - `fn w4(e: u32, nb: u32) -> vec4<f32>`: flat elements e .. e+3 (`e = row * cols + k`,
 *   `e % 4 == 0`); `nb = rows * cols / W_BLOCK` (ignored by f32/f16).
 * - `fn w1(e: u32, nb: u32) -> f32`: flat element e.
 * - Block formats only: `fn wWord(i: u32) -> u32`, u32 word i of the layout (one lane of a vec4
 *   for the vec4 formats), for kernels that read single values.
 * - Block formats only, for streaming a row: a row of `cols / W_BLOCK` blocks is `W_UNITS`
 *   units per block (see {@linkcode formatUnitValues}); `fn wUnit(b: u32, j: u32, nb: u32)`
 *   loads unit j of (global) block b, one vec4 (vec4 formats) or one u32 of quants with the
 *   block's scales decoded once; group g (`0 .. W_GROUPS - 1`) of it holds the block's values
 *   `4 * wUnitK4(j, g) .. + 3`. The vec4 formats return a `WUnit` (the loaded quants and decoded
 *   scales) and decode group g with `fn wGroup(u: WUnit, g: u32) -> vec4<f32>`, so a kernel
 *   decodes each group just before using it; the others return the decoded groups as
 *   `array<vec4<f32>, W_GROUPS>`. Consecutive units read consecutive quant words.
 *
 * @example
 * ```ts
 * import { weightWgsl } from "./qformats.ts";
 * console.log(weightWgsl("q4_0").includes("fn w4(")); // true
 * console.log(weightWgsl("q4_0").includes("array<vec4<u32>>")); // true
 * ```
 */
export function weightWgsl(f: WeightFormat): string {
  layout(f);
  const decl = (t: string, shape: string) =>
    `@group(0) @binding(${WEIGHT_BINDING}) var<storage, read> w: array<${t}>; // w: ${shape}`;
  if (f === "f32" || f === "f16") {
    return /* wgsl */ `${f === "f16" ? "enable f16;\n" : ""}
${decl(f, `[rows, cols] ${f}`)}
const W_BLOCK = 1u;
fn wInit(lid: u32) {}
fn w1(e: u32, nb: u32) -> f32 { return f32(w[e]); }
fn w4(e: u32, nb: u32) -> vec4<f32> {
  return vec4<f32>(f32(w[e]), f32(w[e + 1u]), f32(w[e + 2u]), f32(w[e + 3u]));
}
`;
  }
  const vec4 = weightAlign(f) === 16;
  const shape = `${f} GPU layout of [rows, cols] (kernels/qformats.ts): quants, then scales${
    vec4 ? ", as 16-byte words" : ""
  }`;
  const word = vec4
    ? "fn wWord(i: u32) -> u32 { return w[i >> 2u][i & 3u]; }"
    : "fn wWord(i: u32) -> u32 { return w[i]; }";
  return `
${decl(vec4 ? "vec4<u32>" : "u32", shape)}
// u32 word i of the layout (byte offset 4i).
${word}${BLOCK_COMMON}${BLOCK_WGSL[f]}`;
}
