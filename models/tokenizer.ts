/**
 * Tokenizer entry point: loads any supported tokenizer file and builds the tokenizer of a GGUF
 * file's vocabulary.
 *
 * - `tokenizer.model`: a SentencePiece `ModelProto` (BPE), or a tiktoken rank file (Llama 3) when
 *   it is base64 text lines;
 * - a llama2.c `tokenizer.bin` (any other `.bin`);
 * - a Hugging Face `tokenizer.json` (byte-level BPE);
 * - a `.gguf` file (its `tokenizer.ggml.*` metadata).
 *
 * @module
 */
import { bpeFromTiktoken, bpeFromTokenizerJson, bpeFromVocab } from "./bpe.ts";
import { type GgufFile, type GgufValue, readGguf } from "./gguf.ts";
import {
  sentencePieceFromLlama2c,
  sentencePieceFromModelProto,
  sentencePieceFromVocab,
} from "./sentencepiece.ts";
import { FormatError, type Tokenizer } from "./types.ts";

/** Whether `bytes` look like a tiktoken rank file (`base64 rank` text lines). */
export function isTiktoken(bytes: Uint8Array): boolean {
  const head = new TextDecoder("latin1").decode(bytes.subarray(0, 256));
  return /^[A-Za-z0-9+/]+={0,2} \d+\r?\n/.test(head);
}

/**
 * Parses tokenizer file bytes; `fileName` (its path or name) picks the format together with the
 * content (see the module comment) and names the file in errors.
 */
export function parseTokenizer(bytes: Uint8Array, fileName: string): Tokenizer {
  const name = fileName.split(/[\\/]/).pop()!.toLowerCase();
  if (name.endsWith(".gguf")) return tokenizerFromGguf(readGguf(bytes, fileName), fileName);
  if (name.endsWith(".json")) {
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw new FormatError(fileName, "not valid UTF-8 text");
    }
    return bpeFromTokenizerJson(text, fileName);
  }
  if (name.endsWith(".bin")) return sentencePieceFromLlama2c(bytes, fileName);
  if (isTiktoken(bytes)) {
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw new FormatError(fileName, "tiktoken file is not valid UTF-8 text");
    }
    return bpeFromTiktoken(text, fileName);
  }
  return sentencePieceFromModelProto(bytes, fileName);
}

/**
 * Loads a tokenizer file (`tokenizer.model`, `tokenizer.bin`, `tokenizer.json` or a `.gguf`).
 *
 * @example
 * ```ts
 * import { loadTokenizerFile } from "./tokenizer.ts";
 * const tok = await loadTokenizerFile("../shared/models/icppWorld-icpp_llm/tok512.bin");
 * console.log(tok.decode(tok.encode("Once upon a time"))); // "Once upon a time"
 * ```
 */
export async function loadTokenizerFile(path: string): Promise<Tokenizer> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new FormatError(path, `cannot read the tokenizer file (${(e as Error).message})`);
  }
  return parseTokenizer(bytes, path);
}

function get(gguf: GgufFile, key: string): GgufValue | undefined {
  return gguf.metadata.get(key);
}

function stringArray(gguf: GgufFile, key: string, fileName: string): string[] {
  const v = get(gguf, key);
  if (!v || v.type !== "array" || v.itemType !== "string") {
    throw new FormatError(fileName, `${key} is missing or not an array of strings`);
  }
  return v.value;
}

function numberArray(gguf: GgufFile, key: string, fileName: string): number[] | undefined {
  const v = get(gguf, key);
  if (v === undefined) return undefined;
  if (
    v.type !== "array" || v.itemType === "string" || v.itemType === "bool" || v.itemType === "array"
  ) {
    throw new FormatError(fileName, `${key} is not a numeric array`);
  }
  return (v.value as (number | bigint)[]).map(Number);
}

function optId(gguf: GgufFile, key: string, n: number): number | undefined {
  const v = get(gguf, key);
  if (v === undefined || (typeof v.value !== "number" && typeof v.value !== "bigint")) {
    return undefined;
  }
  const id = Number(v.value);
  return id >= 0 && id < n ? id : undefined; // llama.cpp ignores out-of-range ids too
}

/**
 * Builds the tokenizer described by a GGUF file's metadata: `tokenizer.ggml.model` "llama"
 * (SentencePiece: tokens, scores, token_type, bos/eos/unknown ids, add_space_prefix) or "gpt2"
 * (byte-level BPE: tokens, merges, token_type, pre). `fileName` names the file in errors.
 */
export function tokenizerFromGguf(gguf: GgufFile, fileName: string): Tokenizer {
  const model = get(gguf, "tokenizer.ggml.model");
  if (!model || model.type !== "string") {
    throw new FormatError(fileName, "tokenizer.ggml.model is missing (no vocabulary in this file)");
  }
  const tokens = stringArray(gguf, "tokenizer.ggml.tokens", fileName);
  const n = tokens.length;
  const types = numberArray(gguf, "tokenizer.ggml.token_type", fileName);
  if (types && types.length < n) {
    throw new FormatError(
      fileName,
      `tokenizer.ggml.token_type has ${types.length} entries for ${n} tokens`,
    );
  }
  const bosId = optId(gguf, "tokenizer.ggml.bos_token_id", n);
  const eosId = optId(gguf, "tokenizer.ggml.eos_token_id", n);
  if (model.value === "llama") {
    const scores = numberArray(gguf, "tokenizer.ggml.scores", fileName) ?? new Array(n).fill(0);
    if (scores.length < n) {
      throw new FormatError(
        fileName,
        `tokenizer.ggml.scores has ${scores.length} entries for ${n} tokens`,
      );
    }
    const prefix = get(gguf, "tokenizer.ggml.add_space_prefix");
    const extraWs = get(gguf, "tokenizer.ggml.remove_extra_whitespaces");
    return sentencePieceFromVocab({
      pieces: tokens,
      scores,
      ...(types ? { types } : {}),
      bosId: bosId ?? (n > 1 ? 1 : undefined),
      eosId: eosId ?? (n > 2 ? 2 : undefined),
      unkId: optId(gguf, "tokenizer.ggml.unknown_token_id", n) ?? 0,
      addDummyPrefix: prefix?.type === "bool" ? prefix.value : true,
      removeExtraWhitespaces: extraWs?.type === "bool" ? extraWs.value : false,
    }, fileName);
  }
  if (model.value === "gpt2") {
    const pre = get(gguf, "tokenizer.ggml.pre");
    return bpeFromVocab({
      tokens,
      merges: stringArray(gguf, "tokenizer.ggml.merges", fileName),
      ...(types ? { types } : {}),
      pre: pre?.type === "string" ? pre.value : "default",
      bosId,
      eosId,
    }, fileName);
  }
  throw new FormatError(
    fileName,
    `tokenizer.ggml.model "${model.value}" is not supported (supported: llama, gpt2)`,
  );
}
