/**
 * Token embedding lookup: `x[t, :] = table[tokens[tokensOffset + t] - firstRow, :]` as f32.
 *
 * A table larger than one storage binding can be split into row ranges: bind each range with its
 * `firstRow` and encode one dispatch per range; each writes only the rows whose token falls in
 * its range.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import { formatBlock, isBlockFormat, type WeightFormat, weightWgsl } from "./qformats.ts";

/** Invocations per workgroup (along D). */
export const EMBEDDING_WG = 256;

/**
 * WGSL of the embedding gather for a table in format `dtype`: f32/f16 tables copy one element per
 * invocation; block formats dequantize 4 consecutive elements per invocation (`w4`).
 */
export function embeddingWgsl(dtype: WeightFormat): string {
  const V = isBlockFormat(dtype) ? 4 : 1;
  const gather = V === 1
    ? "  x[p.xOffset + t * p.D + i] = w1((id - p.firstRow) * p.D + i, p.nb);"
    : `  let v = w4((id - p.firstRow) * p.D + i, p.nb);
${[0, 1, 2, 3].map((c) => `  x[p.xOffset + t * p.D + i + ${c}u] = v[${c}];`).join("\n")}`;
  return /* wgsl */ `${weightWgsl(dtype)}
// Embedding gather: workgroup (bx, t) copies elements bx*${EMBEDDING_WG * V} .. +${
    EMBEDDING_WG * V
  } of
// the table row of token t into row t of x, ${V} consecutive element(s) per invocation (dequantized
// to f32; D is a multiple of the block for block formats). Invocations past D return; a token
// outside [firstRow, firstRow + V) writes nothing.
struct Params {
  T: u32,            // tokens (rows of x)
  D: u32,            // embedding width
  V: u32,            // rows held by this table binding
  firstRow: u32,     // vocabulary id of table row 0
  tokensOffset: u32, // element offset of the first token id in tokens
  xOffset: u32,      // element offset of x[0, 0] in x
  nb: u32,           // blocks of the table: V * D / block (block formats)
}
// w (binding 1, declared above): the table [V, D] in ${dtype}
@group(0) @binding(0) var<storage, read> tokens: array<u32>;   // tokens: [T] u32 at tokensOffset
@group(0) @binding(2) var<storage, read_write> x: array<f32>;  // x: [T, D] f32 at xOffset
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(${EMBEDDING_WG})
fn main(@builtin(global_invocation_id) g: vec3u, @builtin(local_invocation_index) lid: u32) {
${V === 1 ? "" : "  wInit(lid);\n  workgroupBarrier();\n"}  let i = g.x * ${V}u;
  let t = g.y;
  if (i >= p.D || t >= p.T) { return; }
  let id = tokens[p.tokensOffset + t];
  if (id < p.firstRow || id - p.firstRow >= p.V) { return; }
${gather}
}
`;
}

/** Buffers and sizes for {@linkcode createEmbedding}. */
export interface EmbeddingArgs {
  /** Label of the dispatch. */
  label: string;
  /**
   * table: [V, D] rows `firstRow .. firstRow + V` of the embedding, in `dtype`'s GPU layout
   * (`encodeWeights`; a row range of a block-format table is encoded as its own matrix).
   */
  table: GPUBuffer;
  /** Format of the table; "f16" needs `shader-f16`; block formats need D % block == 0. */
  dtype: WeightFormat;
  /** Rows in this table binding. */
  V: number;
  /** Embedding width. */
  D: number;
  /** Vocabulary id of the table's row 0 (for split tables); default 0. */
  firstRow?: number;
  /** tokens: u32 ids, T of them starting at element `tokensOffset`. */
  tokens: GPUBuffer;
  /** Element offset of the first id in `tokens`; default 0. */
  tokensOffset?: number;
  /** x: [T, D] f32 output at element `xOffset`. */
  x: GPUBuffer;
  /** Element offset of x[0, 0]; default 0. */
  xOffset?: number;
  /** Number of tokens (rows of x). */
  T: number;
}

/**
 * Builds the embedding-gather dispatch.
 *
 * @example
 * ```ts ignore
 * const d = await createEmbedding(gpu, {
 *   label: "embed", table, dtype: "f16", V: 32000, D: 576, tokens, x, T: 1,
 * });
 * ```
 */
export async function createEmbedding(gpu: Gpu, args: EmbeddingArgs): Promise<Dispatch> {
  if (args.dtype === "f16" && !gpu.features.f16) {
    throw new RangeError(`${args.label}: an f16 table needs the shader-f16 feature`);
  }
  const block = formatBlock(args.dtype);
  if (args.D % block !== 0) {
    throw new RangeError(
      `${args.label}: D=${args.D} is not a multiple of the ${args.dtype} block size ${block}`,
    );
  }
  if (block > 1 && args.V * args.D > 0xffffffff) {
    throw new RangeError(`${args.label}: a ${args.V}x${args.D} table exceeds 2^32 values`);
  }
  if (args.T > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new RangeError(`${args.label}: T=${args.T} exceeds the workgroups per dimension`);
  }
  const pipeline = await gpu.pipeline(
    `embedding.${args.dtype}.wg${EMBEDDING_WG}`,
    () => embeddingWgsl(args.dtype),
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      args.T,
      args.D,
      args.V,
      args.firstRow ?? 0,
      args.tokensOffset ?? 0,
      args.xOffset ?? 0,
      block > 1 ? (args.V * args.D) / block : 0,
      0,
    ]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.tokens, args.table, args.x, params]),
    workgroups: [Math.ceil(args.D / (block > 1 ? 4 : 1) / EMBEDDING_WG), args.T, 1],
  };
}

/**
 * CPU reference: gathers rows of `table[V, D]` for `tokens`; ids outside the table give zeros.
 *
 * @example
 * ```ts
 * import { embeddingRef } from "./embedding.ts";
 * const x = embeddingRef(new Float32Array([1, 2, 3, 4]), 2, new Uint32Array([1, 0]));
 * console.log([...x]); // [3, 4, 1, 2]
 * ```
 */
export function embeddingRef(table: Float32Array, D: number, tokens: Uint32Array): Float32Array {
  const V = table.length / D;
  const x = new Float32Array(tokens.length * D);
  tokens.forEach((id, t) => {
    if (id < V) x.set(table.subarray(id * D, (id + 1) * D), t * D);
  });
  return x;
}
