/**
 * The host-side model description every reader produces: a resolved, readonly `ModelConfig`, named
 * tensors with canonical (llama.cpp GGUF) names, and a tokenizer. Nothing GPU here.
 *
 * @module
 */

/**
 * How RoPE pairs dimensions. "interleaved": pairs (2i, 2i+1) (llama2.c, GGUF, Meta's original).
 * "rotate-half": pairs (i, i + headDim/2) (Hugging Face transformers' Llama).
 */
export type RopeLayout = "interleaved" | "rotate-half";

/** Llama 3.1-style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`). */
export interface RopeScaling {
  /** The scaling rule (only Llama 3's). */
  readonly type: "llama3";
  /** Divisor of low frequencies. */
  readonly factor: number;
  /** Wavelengths above originalMaxPositionEmbeddings / lowFreqFactor are fully scaled. */
  readonly lowFreqFactor: number;
  /** Wavelengths below originalMaxPositionEmbeddings / highFreqFactor are kept. */
  readonly highFreqFactor: number;
  /** Context length the model was pretrained with. */
  readonly originalMaxPositionEmbeddings: number;
}

/** The resolved hyperparameters of a Llama-family decoder. */
export interface ModelConfig {
  /** Architecture family: "llama" (also Llama 2/3, TinyLlama), "mistral", "qwen2". */
  readonly architecture: "llama" | "mistral" | "qwen2";
  /** Model width (embedding size). */
  readonly dim: number;
  /** Number of transformer blocks. */
  readonly nLayers: number;
  /** Query heads. */
  readonly nHeads: number;
  /** Key/value heads (GQA when fewer than nHeads). */
  readonly nKvHeads: number;
  /** Per-head size (usually dim / nHeads). */
  readonly headDim: number;
  /** SwiGLU hidden size. */
  readonly ffnDim: number;
  /** Vocabulary size (rows of the embedding). */
  readonly vocabSize: number;
  /**
   * Longest context this engine runs the model at: the trained context
   * (`max_position_embeddings`), capped at {@linkcode ModelConfig.slidingWindow} when that is
   * smaller (attention past a sliding window is not implemented; inside it, full causal
   * attention is exact).
   */
  readonly maxSeqLen: number;
  /**
   * Mistral-style sliding-window attention span (`sliding_window`), when the model uses one:
   * each query attends to at most this many positions, itself included. Absent for full
   * attention.
   */
  readonly slidingWindow?: number;
  /** RMSNorm epsilon. */
  readonly normEps: number;
  /** RoPE base frequency. */
  readonly ropeTheta: number;
  /** RoPE pairing layout of the stored Q/K weights. */
  readonly ropeLayout: RopeLayout;
  /** Optional Llama 3 frequency scaling. */
  readonly ropeScaling?: RopeScaling;
  /** Whether the classifier reuses the token embedding. */
  readonly tiedEmbeddings: boolean;
  /** Whether Q/K/V projections carry biases (Qwen2). */
  readonly qkvBias: boolean;
  /** Beginning-of-sequence token id, if the model uses one. */
  readonly bosId?: number;
  /** End-of-sequence token ids (generation stops at any of them). */
  readonly eosIds: readonly number[];
}

/** Storage type of a host tensor (GGUF-compatible block formats included). */
export type DType =
  | "f32"
  | "f16"
  | "bf16"
  | "q8_0"
  | "q4_0"
  | "q4_1"
  | "q5_0"
  | "q5_1"
  | "q2_k"
  | "q3_k"
  | "q4_k"
  | "q5_k"
  | "q6_k";

/**
 * A tensor on the host. `shape` is outermost-first (row-major): a linear layer's weight is
 * `[out, in]`, as in PyTorch; GGUF's `ne` is the reverse. `data` holds the raw bytes in `dtype`.
 *
 * Canonical names follow llama.cpp: `token_embd.weight`, `output_norm.weight`, `output.weight`,
 * `blk.N.attn_norm.weight`, `blk.N.attn_q.weight` (and `.bias`), `blk.N.attn_k.weight`,
 * `blk.N.attn_v.weight`, `blk.N.attn_output.weight`, `blk.N.ffn_norm.weight`,
 * `blk.N.ffn_gate.weight`, `blk.N.ffn_up.weight`, `blk.N.ffn_down.weight`.
 */
export interface HostTensor {
  /** Canonical name. */
  readonly name: string;
  /** Storage type of `data`. */
  readonly dtype: DType;
  /** Shape, outermost first. */
  readonly shape: readonly number[];
  /** Raw little-endian bytes. */
  readonly data: Uint8Array;
}

/** A streaming detokenizer: feed ids, get text that is safe to print (complete UTF-8 only). */
export interface StreamDecoder {
  /** Text completed by this token (may be "" while a UTF-8 sequence is incomplete). */
  push(id: number): string;
  /** Whatever remains buffered (invalid trailing bytes become U+FFFD). */
  flush(): string;
}

/** A tokenizer: text to ids and back. */
export interface Tokenizer {
  /** Number of token ids. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, if any. */
  readonly bosId?: number;
  /** End-of-sequence id, if any. */
  readonly eosId?: number;
  /** Encodes `text`; adds BOS first only when `options.bos` is true. */
  encode(text: string, options?: { bos?: boolean }): number[];
  /** Decodes ids to text (BOS/EOS and other control tokens produce no text). */
  decode(ids: readonly number[]): string;
  /** A fresh streaming decoder. */
  decoder(): StreamDecoder;
  /** The stored piece of token `id` (for vocabulary comparisons and debugging). */
  piece(id: number): string;
}

/** A checkpoint read into host memory. */
export interface LoadedModel {
  /** Where it came from (file or folder path). */
  readonly source: string;
  /** Container format. */
  readonly format: "safetensors" | "gguf" | "llama2c";
  /** Resolved hyperparameters. */
  readonly config: ModelConfig;
  /** Tensors by canonical name. */
  readonly tensors: ReadonlyMap<string, HostTensor>;
  /** The tokenizer found with the model, if any. */
  readonly tokenizer?: Tokenizer;
}

/** An error in an input file: names the file and what is wrong with it. */
export class FormatError extends Error {
  /** `file`: the offending file's path or name; `message`: what is wrong and, if known, why. */
  constructor(file: string, message: string) {
    super(`${file}: ${message}`);
    this.name = "FormatError";
  }
}
