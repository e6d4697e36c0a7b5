/**
 * llama2.c legacy (version 0) checkpoints: a 7×int32 header
 * `{dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}` followed by f32 weights
 * in run.c's order. A negative `vocab_size` means an unshared classifier follows the weights.
 * The file size implied by the header is checked before any tensor is made; tensors are f32
 * views into the given bytes, renamed to canonical llama.cpp names.
 *
 * @module
 */
import { FormatError, type HostTensor, type ModelConfig } from "./types.ts";

/** Header bytes: seven little-endian int32 values. */
export const LLAMA2C_HEADER_BYTES = 28;

/** Magic of the newer llama2.c export versions ("ak42"), which this reader does not load. */
const VERSIONED_MAGIC = 0x616b3432;

/** Upper bounds on header fields: generous for real models, small enough to reject garbage. */
const LIMITS = {
  dim: 1 << 16,
  hidden_dim: 1 << 18,
  n_layers: 1 << 10,
  n_heads: 1 << 10,
  vocab_size: 1 << 22,
  seq_len: 1 << 22,
} as const;

/** A llama2.c checkpoint read into a config and canonical f32 host tensors. */
export interface Llama2cModel {
  /** The resolved hyperparameters (interleaved RoPE, eps 1e-5, BOS 1, EOS 2). */
  readonly config: ModelConfig;
  /** f32 views into the file by canonical name; no `output.weight` when the classifier is shared. */
  readonly tensors: Map<string, HostTensor>;
}

/**
 * Parses a llama2.c legacy `.bin` checkpoint held in memory. Throws a {@linkcode FormatError}
 * naming `fileName` and the field when the header is implausible or the size does not match.
 *
 * @example
 * ```ts ignore
 * import { readLlama2c } from "./llama2c.ts";
 * const path = "../shared/models/icppWorld-icpp_llm/stories260K.bin";
 * const { config } = readLlama2c(await Deno.readFile(path), path);
 * console.log(config.dim, config.nLayers); // 64 5
 * ```
 */
export function readLlama2c(bytes: Uint8Array, fileName: string): Llama2cModel {
  function fail(msg: string): never {
    throw new FormatError(fileName, msg);
  }
  if (bytes.byteLength < LLAMA2C_HEADER_BYTES) {
    fail(`${bytes.byteLength} bytes is too short for the 28-byte llama2.c header (truncated?)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const field = (i: number) => view.getInt32(4 * i, true);
  if (view.getUint32(0, true) === VERSIONED_MAGIC) {
    fail(
      `this is a versioned llama2.c export (magic "ak42", version ${field(1)}); ` +
        `only the legacy version 0 format loads (export with --version 0)`,
    );
  }
  const [dim, ffnDim, nLayers, nHeads, nKvHeads, rawVocab, seqLen] = [0, 1, 2, 3, 4, 5, 6].map(
    field,
  );
  const check = (name: string, v: number, max: number) => {
    if (v < 1 || v > max) fail(`header field ${name} = ${v} is outside [1, ${max}]`);
  };
  check("dim", dim, LIMITS.dim);
  check("hidden_dim", ffnDim, LIMITS.hidden_dim);
  check("n_layers", nLayers, LIMITS.n_layers);
  check("n_heads", nHeads, LIMITS.n_heads);
  check("n_kv_heads", nKvHeads, nHeads);
  check("|vocab_size|", Math.abs(rawVocab), LIMITS.vocab_size);
  check("seq_len", seqLen, LIMITS.seq_len);
  if (dim % nHeads !== 0) {
    fail(`header field dim = ${dim} is not a multiple of n_heads = ${nHeads}`);
  }
  if (nHeads % nKvHeads !== 0) {
    fail(`header field n_heads = ${nHeads} is not a multiple of n_kv_heads = ${nKvHeads}`);
  }
  const headDim = dim / nHeads;
  if (headDim % 2 !== 0) fail(`head size dim / n_heads = ${headDim} must be even for RoPE`);
  const vocabSize = Math.abs(rawVocab);
  const shared = rawVocab > 0;
  const kvDim = nKvHeads * headDim;

  // Layout in floats, in file order; all counts are < 2^50 given the limits above.
  const L = nLayers;
  const layout: [string, number][] = [
    ["token_embedding", vocabSize * dim],
    ["rms_att", L * dim],
    ["wq", L * dim * dim],
    ["wk", L * kvDim * dim],
    ["wv", L * kvDim * dim],
    ["wo", L * dim * dim],
    ["rms_ffn", L * dim],
    ["w1", L * ffnDim * dim],
    ["w2", L * dim * ffnDim],
    ["w3", L * ffnDim * dim],
    ["rms_final", dim],
    ["freq_cis_real", seqLen * headDim / 2],
    ["freq_cis_imag", seqLen * headDim / 2],
    ["wcls", shared ? 0 : vocabSize * dim],
  ];
  const totalFloats = layout.reduce((a, [, n]) => a + n, 0);
  const expected = LLAMA2C_HEADER_BYTES + 4 * totalFloats;
  if (bytes.byteLength !== expected) {
    fail(
      `the header (dim ${dim}, hidden_dim ${ffnDim}, n_layers ${nLayers}, n_heads ${nHeads}, ` +
        `n_kv_heads ${nKvHeads}, vocab_size ${rawVocab}, seq_len ${seqLen}) implies ` +
        `${expected} bytes, but the file has ${bytes.byteLength}` +
        (bytes.byteLength < expected ? " (truncated?)" : ""),
    );
  }

  // Byte offset of each region.
  const start = new Map<string, number>();
  let offset = LLAMA2C_HEADER_BYTES;
  for (const [name, n] of layout) {
    start.set(name, offset);
    offset += 4 * n;
  }
  const tensors = new Map<string, HostTensor>();
  /** Adds `name` with `shape`, taken as the `index`-th slice of that shape in region `region`. */
  const add = (name: string, region: string, shape: number[], index = 0) => {
    const size = 4 * shape.reduce((a, b) => a * b, 1);
    const begin = start.get(region)! + index * size;
    tensors.set(name, { name, dtype: "f32", shape, data: bytes.subarray(begin, begin + size) });
  };
  add("token_embd.weight", "token_embedding", [vocabSize, dim]);
  for (let l = 0; l < L; l++) {
    const b = `blk.${l}.`;
    add(b + "attn_norm.weight", "rms_att", [dim], l);
    add(b + "attn_q.weight", "wq", [dim, dim], l); // wq: [L, n_heads*head, dim]
    add(b + "attn_k.weight", "wk", [kvDim, dim], l); // wk: [L, n_kv_heads*head, dim]
    add(b + "attn_v.weight", "wv", [kvDim, dim], l); // wv: [L, n_kv_heads*head, dim]
    add(b + "attn_output.weight", "wo", [dim, dim], l); // wo: [L, dim, n_heads*head]
    add(b + "ffn_norm.weight", "rms_ffn", [dim], l);
    add(b + "ffn_gate.weight", "w1", [ffnDim, dim], l); // w1: [L, hidden, dim]
    add(b + "ffn_down.weight", "w2", [dim, ffnDim], l); // w2: [L, dim, hidden]
    add(b + "ffn_up.weight", "w3", [ffnDim, dim], l); // w3: [L, hidden, dim]
  }
  add("output_norm.weight", "rms_final", [dim]);
  if (!shared) add("output.weight", "wcls", [vocabSize, dim]);

  const config: ModelConfig = {
    architecture: "llama",
    dim,
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    ffnDim,
    vocabSize,
    maxSeqLen: seqLen,
    normEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: "interleaved",
    tiedEmbeddings: shared,
    qkvBias: false,
    bosId: 1,
    eosIds: [2],
  };
  return { config, tensors };
}
