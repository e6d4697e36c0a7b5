/**
 * The core of the `quantize` command: load a checkpoint, choose every tensor's format with
 * {@linkcode planQuant}, re-encode the tensors with the `models/quant.ts` references and write a
 * standard GGUF (llama.cpp tensor names, ggml type ids, `tokenizer.ggml.*` vocabulary) that
 * `loadModel` reads back to identical tensors.
 *
 * - Re-encoding: a tensor whose chosen format equals its source dtype is copied byte for byte;
 *   any other is dequantized (or converted) to f32 first, then quantized. Q/K rows of a
 *   rotate-half checkpoint are permuted to GGUF's interleaved layout by `modelToGguf`, after
 *   quantization (rows move whole, so this equals quantizing the permuted rows).
 * - `nf4` has no GGUF type: asking for it (as `quant` or `keepFormat`) is refused.
 * - Tokenizer: SentencePiece tokenizers (`tokenizer.model`, llama2.c `tokenizer.bin`, GGUF
 *   "llama") are written as `tokenizer.ggml.model = "llama"` with their pieces, scores, types,
 *   unknown id and whitespace flags. Byte-level BPE tokenizers (tokenizer.json, GGUF "gpt2") are
 *   written as `tokenizer.ggml.model = "gpt2"` with their tokens, types, merges and
 *   pre-tokenizer name (Llama 3's as llama.cpp's "llama-bpe"); a tiktoken rank file, which has
 *   no merge list, is refused. A vocabulary shorter than the model's embedding (Qwen2 pads its
 *   embedding) is padded with unused `[PAD<id>]` tokens, as llama.cpp's converter does, so the
 *   token count equals the embedding rows. A model without a tokenizer is refused too (pass
 *   `tokenizer`).
 * - The file is written atomically: to a temporary file beside `out`, then renamed; on any
 *   failure the temporary file is removed and `out` is untouched.
 *
 * @module
 */
import { basename, dirname, join } from "@specdec/path";
import { type GgufTokenizerData, modelToGguf } from "../models/gguf.ts";
import { loadModel } from "../models/load.ts";
import { dequantize, quantize } from "../models/quant.ts";
import { PieceType, SentencePieceTokenizer, SPACE_SYMBOL } from "../models/sentencepiece.ts";
import { BpeTokenizer, defaultIgnoreMerges } from "../models/bpe.ts";
import type { DType, HostTensor, Tokenizer } from "../models/types.ts";
import {
  type KeepGroup,
  planQuant,
  QUANT_REQUESTS,
  type QuantRequest,
  summarizePlan,
  type TensorChoice,
  type WeightFormat,
} from "./quant_plan.ts";

/** Options of {@linkcode quantizeToGguf}. */
export interface QuantizeOptions {
  /** Model path: a Hugging Face folder, a .gguf or a llama2.c .bin file. */
  model: string;
  /** Tokenizer file (required for a llama2.c .bin, which carries none). */
  tokenizer?: string;
  /** Format of every 2-D weight outside the kept groups. */
  quant: QuantRequest;
  /** Groups kept at `keepFormat` (default: embed, output, first, last). */
  keep?: KeepGroup[];
  /** Format of the kept groups (default from `quant`, see engine/quant_plan.ts). */
  keepFormat?: WeightFormat;
  /** Output GGUF path; its folder must exist. */
  out: string;
  /** Called with a short line per step and per tensor group. */
  onProgress?: (msg: string) => void;
}

/** What {@linkcode quantizeToGguf} did. */
export interface QuantizeResult {
  /** The format chosen for every tensor, and why. */
  plan: Map<string, TensorChoice>;
  /** Bytes of the loaded tensors. */
  bytesIn: number;
  /** Bytes of the written GGUF file. */
  bytesOut: number;
  /** Number of tensors written. */
  tensors: number;
}

const NF4_REFUSED = "nf4 has no GGUF type; use it at load time with --quant nf4";

/** The GGUF dtype of a chosen format (every format but nf4). */
function ggufDtype(format: WeightFormat): DType {
  if (format === "nf4") throw new RangeError(NF4_REFUSED);
  return format;
}

/**
 * `t` stored as `dtype`: the same bytes when `dtype` is its own, else its values dequantized to
 * f32 and quantized with the `models/quant.ts` reference.
 *
 * @example
 * ```ts
 * import { convertTensor } from "./quantize.ts";
 * const t = { name: "w", dtype: "f32" as const, shape: [1, 32], data: new Uint8Array(128) };
 * console.log(convertTensor(t, "q8_0").data.byteLength); // 34
 * ```
 */
export function convertTensor(t: HostTensor, dtype: DType): HostTensor {
  if (t.dtype === dtype) return t;
  const n = t.shape.reduce((a, b) => a * b, 1);
  return { ...t, dtype, data: quantize(dtype, dequantize(t.dtype, t.data, n)) };
}

/**
 * The `tokenizer.ggml.*` data of a loaded tokenizer, for {@linkcode modelToGguf}: SentencePiece
 * or byte-level BPE (see the module comment), padded with unused `[PAD<id>]` tokens up to
 * `vocabSize` when that is larger. A tokenizer GGUF cannot express (a tiktoken file, spaces not
 * escaped to "▁", an `ignore_merges` other than the pre-tokenizer's default) or one longer than
 * `vocabSize` throws an `Error` naming `source`.
 *
 * @example
 * ```ts
 * import { tokenizerToGguf } from "./quantize.ts";
 * import { loadTokenizerFile } from "../models/tokenizer.ts";
 * const tok = await loadTokenizerFile("../shared/models/icppWorld-icpp_llm/tok512.bin");
 * console.log(tokenizerToGguf(tok, "tok512.bin").tokens.length); // 512
 * ```
 */
export function tokenizerToGguf(
  tok: Tokenizer,
  source: string,
  vocabSize = tok.vocabSize,
): GgufTokenizerData {
  const n = tok.vocabSize;
  if (n > vocabSize) {
    throw new Error(
      `${source}: the tokenizer has ${n} tokens but the model's embedding only ${vocabSize} rows`,
    );
  }
  const pad = Array.from({ length: vocabSize - n }, (_, i) => `[PAD${n + i}]`);
  const padTypes = pad.map(() => PieceType.UNUSED);
  const tokens = [...Array.from({ length: n }, (_, i) => tok.piece(i)), ...pad];
  if (tok instanceof BpeTokenizer) {
    const merges = tok.merges();
    if (merges === undefined) {
      throw new Error(
        `${source}: a tiktoken rank file holds no merge list for a GGUF; use the model's ` +
          `tokenizer.json`,
      );
    }
    const pre = tok.pre === "llama3" ? "llama-bpe" : tok.pre;
    if (tok.ignoreMerges !== defaultIgnoreMerges(pre)) {
      throw new Error(
        `${source}: ignore_merges ${tok.ignoreMerges} differs from what GGUF readers assume ` +
          `for pre-tokenizer "${pre}" (${defaultIgnoreMerges(pre)}), which GGUF cannot express`,
      );
    }
    return {
      model: "gpt2",
      pre,
      tokens,
      tokenTypes: [...Array.from({ length: n }, (_, i) => tok.type(i)), ...padTypes],
      merges,
    };
  }
  if (!(tok instanceof SentencePieceTokenizer)) {
    throw new Error(`${source}: this kind of tokenizer cannot be written to a GGUF`);
  }
  // The whitespace flags are read back through normalize(): "a  b" shows all three.
  const norm = tok.normalize("a  b");
  if (norm.includes(" ")) {
    throw new Error(
      `${source}: the tokenizer does not escape spaces to "${SPACE_SYMBOL}" ` +
        `(escape_whitespaces = false), which GGUF cannot express`,
    );
  }
  return {
    model: "llama",
    tokens,
    scores: [...Array.from({ length: n }, (_, i) => tok.score(i)), ...pad.map(() => 0)],
    tokenTypes: [...Array.from({ length: n }, (_, i) => tok.type(i)), ...padTypes],
    ...(tok.unkId !== undefined ? { unknownId: tok.unkId } : {}),
    addSpacePrefix: norm.startsWith(SPACE_SYMBOL),
    removeExtraWhitespaces: !norm.includes(SPACE_SYMBOL + SPACE_SYMBOL),
  };
}

/** Throws unless the folder of `out` exists and `out` is not a folder. */
async function checkOutPath(out: string): Promise<void> {
  const dir = dirname(out);
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(dir);
  } catch {
    throw new Error(`cannot write ${out}: the folder ${dir} does not exist (create it first)`);
  }
  if (!info.isDirectory) throw new Error(`cannot write ${out}: ${dir} is not a folder`);
  try {
    if ((await Deno.stat(out)).isDirectory) {
      throw new Error(`cannot write ${out}: it is a folder; give a file name ending in .gguf`);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

/** Writes `bytes` to `path` through a temporary file in the same folder and a rename. */
async function writeAtomic(path: string, bytes: Uint8Array): Promise<void> {
  const tmp = join(
    dirname(path),
    `.${basename(path)}.${Deno.pid}.${crypto.randomUUID().slice(0, 8)}.tmp`,
  );
  try {
    await Deno.writeFile(tmp, bytes);
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`cannot write ${path}: ${(e as Error).message}`);
  }
}

/** A short "q4_0 x7, f32 x2" description of some choices. */
function describe(choices: readonly TensorChoice[]): string {
  const count = new Map<string, number>();
  for (const c of choices) count.set(c.format, (count.get(c.format) ?? 0) + 1);
  return [...count].map(([f, k]) => `${f} x${k}`).join(", ");
}

/**
 * Loads `opts.model`, plans every tensor's format (see engine/quant_plan.ts), re-encodes the
 * tensors and writes a llama.cpp-compatible GGUF with the tokenizer to `opts.out`, atomically.
 * Throws before any slow work for nf4, an unknown format, or an `out` whose folder is missing;
 * throws a clear error for a model without a (writable) tokenizer.
 *
 * @example
 * ```ts ignore
 * import { quantizeToGguf } from "./quantize.ts";
 * const r = await quantizeToGguf({
 *   model: "../shared/models/pycode-pair/draft", quant: "q4_0", out: "/tmp/draft-q4_0.gguf",
 * });
 * console.log(r.bytesIn, r.bytesOut);
 * ```
 */
export async function quantizeToGguf(opts: QuantizeOptions): Promise<QuantizeResult> {
  const progress = opts.onProgress ?? (() => {});
  if (opts.quant === "nf4" || opts.keepFormat === "nf4") throw new RangeError(NF4_REFUSED);
  if (!QUANT_REQUESTS.includes(opts.quant)) {
    throw new RangeError(
      `quant ${JSON.stringify(opts.quant)} is not one of ${QUANT_REQUESTS.join(", ")}`,
    );
  }
  await checkOutPath(opts.out);

  const model = await loadModel(opts.model, {
    onProgress: progress,
    ...(opts.tokenizer !== undefined ? { tokenizer: opts.tokenizer } : {}),
  });
  if (model.tokenizer === undefined) {
    throw new Error(
      `${opts.model} has no tokenizer; pass one (tokenizer.json, tokenizer.model, tokenizer.bin) so the GGUF ` +
        `carries its vocabulary`,
    );
  }
  const tokenizer = tokenizerToGguf(
    model.tokenizer,
    opts.tokenizer ?? opts.model,
    model.config.vocabSize,
  );

  const plan = planQuant(model.config, model.tensors, {
    quant: opts.quant,
    ...(opts.keep !== undefined ? { keep: opts.keep } : {}),
    ...(opts.keepFormat !== undefined ? { keepFormat: opts.keepFormat } : {}),
    f16: true, // a file, not a device: f16 is always storable
  });

  // Re-encode, reporting one line per group: each layer, then the tensors outside layers.
  const out = new Map<string, HostTensor>();
  let bytesIn = 0;
  let group: string | undefined, groupChoices: TensorChoice[] = [];
  const flush = () => {
    if (group !== undefined) progress(`${group}: ${describe(groupChoices)}`);
    groupChoices = [];
  };
  for (const [name, t] of model.tensors) {
    const choice = plan.get(name)!;
    const g = /^blk\.\d+/.exec(name)?.[0] ?? name;
    if (g !== group) {
      flush();
      group = g;
    }
    groupChoices.push(choice);
    bytesIn += t.data.byteLength;
    out.set(name, convertTensor(t, ggufDtype(choice.format)));
  }
  flush();

  const summary = Object.entries(summarizePlan(plan).byFormat)
    .map(([f, s]) => `${f}: ${s.tensors} tensors, ${(s.params / 1e6).toFixed(2)}M params`)
    .join("; ");
  progress(`writing ${opts.out} (${summary})`);
  const bytes = modelToGguf(model.config, out, { name: basename(opts.model), tokenizer });
  await writeAtomic(opts.out, bytes);
  return { plan, bytesIn, bytesOut: bytes.byteLength, tensors: out.size };
}
