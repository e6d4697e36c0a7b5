/**
 * One entry point for every checkpoint format: `loadModel(path)` picks the reader from what the
 * path is (a Hugging Face folder, a `.gguf` file or a llama2.c `.bin` file) and attaches the
 * tokenizer found with the model.
 *
 * @module
 */
import { basename, dirname, extname, join } from "@specdec/path";
import { loadHfFolder } from "./hf.ts";
import { readLlama2c } from "./llama2c.ts";
import { ggufToModel, readGguf } from "./gguf.ts";
import { loadTokenizerFile, tokenizerFromGguf } from "./tokenizer.ts";
import {
  FormatError,
  type HostTensor,
  type LoadedModel,
  type ModelConfig,
  type Tokenizer,
} from "./types.ts";

/** Options of {@linkcode loadModel}. */
export interface LoadModelOptions {
  /** Called with a short human-readable line before each slow step. */
  onProgress?: (msg: string) => void;
  /**
   * Tokenizer file to use (tokenizer.json, tokenizer.model or a llama2.c tokenizer .bin). Without
   * it, a folder's tokenizer.json or tokenizer.model is used; a GGUF file's own vocabulary
   * (`tokenizer.ggml.*` metadata) when it has one; a llama2.c .bin gets none.
   */
  tokenizer?: string;
}

/** What `loadModel` accepts, for error messages. */
export const SUPPORTED_FORMATS =
  "a Hugging Face folder (config.json + model.safetensors or model.safetensors.index.json), " +
  "a .gguf file, or a llama2.c legacy .bin file";

/** Tokenizer files looked for in a model folder, in order of preference. */
export const FOLDER_TOKENIZERS = ["tokenizer.json", "tokenizer.model"] as const;

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

/** Reads a whole file, reporting its size first. */
async function readWithProgress(path: string, progress: (msg: string) => void) {
  const info = await Deno.stat(path);
  progress(`reading ${basename(path)} (${(info.size / 1e6).toFixed(1)} MB)`);
  return await Deno.readFile(path);
}

/** The tokenizer file of a model folder (`tokenizer.json`, else `tokenizer.model`), if any. */
export async function findFolderTokenizer(dir: string): Promise<string | undefined> {
  for (const name of FOLDER_TOKENIZERS) {
    const info = await statOrNull(join(dir, name));
    if (info?.isFile) return join(dir, name);
  }
  return undefined;
}

/**
 * Loads a checkpoint and its tokenizer into host memory. `path` is a Hugging Face folder, a
 * `.gguf` file or a llama2.c `.bin` file; anything else is a {@linkcode FormatError} listing the
 * supported formats. Tensors keep their stored dtype and carry canonical llama.cpp names.
 *
 * @example
 * ```ts ignore
 * import { loadModel } from "./load.ts";
 * const model = await loadModel("../shared/models/icppWorld-icpp_llm/stories260K.bin", {
 *   tokenizer: "../shared/models/icppWorld-icpp_llm/tok512.bin",
 * });
 * console.log(model.format, model.config.dim, model.tokenizer?.vocabSize); // llama2c 64 512
 * ```
 */
export async function loadModel(
  path: string,
  options: LoadModelOptions = {},
): Promise<LoadedModel> {
  const progress = options.onProgress ?? (() => {});
  const info = await statOrNull(path);
  if (info === null) {
    throw new FormatError(path, `no such file or folder (expected ${SUPPORTED_FORMATS})`);
  }
  const tokenizerAt = async (file: string | undefined): Promise<Tokenizer | undefined> => {
    if (file === undefined) return undefined;
    progress(`loading tokenizer ${basename(file)}`);
    return await loadTokenizerFile(file);
  };

  if (info.isDirectory) {
    progress(`reading Hugging Face folder ${path}`);
    const model = await loadHfFolder(path, { onProgress: progress });
    const tokenizer = await tokenizerAt(options.tokenizer ?? await findFolderTokenizer(path));
    return { ...model, ...(tokenizer ? { tokenizer } : {}) };
  }

  const ext = extname(path).toLowerCase();
  if (ext === ".gguf") {
    const bytes = await readWithProgress(path, progress);
    const gguf = readGguf(bytes, path);
    const { config, tensors } = ggufToModel(gguf, path);
    let tokenizer = await tokenizerAt(options.tokenizer);
    if (tokenizer === undefined && gguf.metadata.has("tokenizer.ggml.model")) {
      progress("building the tokenizer from the GGUF metadata");
      tokenizer = tokenizerFromGguf(gguf, path);
    }
    return { source: path, format: "gguf", config, tensors, ...(tokenizer ? { tokenizer } : {}) };
  }
  if (ext === ".bin") {
    const bytes = await readWithProgress(path, progress);
    const { config, tensors } = readLlama2c(bytes, path);
    const tokenizer = await tokenizerAt(options.tokenizer);
    return {
      source: path,
      format: "llama2c",
      config,
      tensors,
      ...(tokenizer ? { tokenizer } : {}),
    };
  }
  const hint = ext === ".safetensors"
    ? `; pass the folder ${dirname(path)} (it needs config.json beside the weights)`
    : "";
  throw new FormatError(
    path,
    `unsupported model file "${basename(path)}": expected ${SUPPORTED_FORMATS}${hint}`,
  );
}

/**
 * The number of parameters (elements) over all tensors. Tied embeddings count once, since a
 * tied model has no separate `output.weight`.
 *
 * @example
 * ```ts
 * import { countParams } from "./load.ts";
 * const t = { name: "x", dtype: "f32" as const, shape: [2, 3], data: new Uint8Array(24) };
 * console.log(countParams(new Map([["x", t]]))); // 6
 * ```
 */
export function countParams(tensors: ReadonlyMap<string, HostTensor>): number {
  let n = 0;
  for (const t of tensors.values()) n += t.shape.reduce((a, b) => a * b, 1);
  return n;
}

/**
 * What sets the longest context of the models in `configs` (the smallest `maxSeqLen`), for
 * error messages: the trained context, or a sliding window with the remedy.
 *
 * @example
 * ```ts
 * import { contextLimitReason } from "./load.ts";
 * import type { ModelConfig } from "./types.ts";
 * const mistral = { maxSeqLen: 4096, slidingWindow: 4096 } as ModelConfig;
 * console.log(contextLimitReason(mistral)); // "sliding_window 4096: attention past ..."
 * ```
 */
export function contextLimitReason(...configs: ModelConfig[]): string {
  const c = configs.reduce((a, b) => (b.maxSeqLen < a.maxSeqLen ? b : a));
  if (c.slidingWindow !== undefined && c.slidingWindow <= c.maxSeqLen) {
    return `sliding_window ${c.slidingWindow}: attention past the window is not implemented, ` +
      `so the context must fit in it (use --ctx ${c.slidingWindow} or less)`;
  }
  return "max_position_embeddings";
}
