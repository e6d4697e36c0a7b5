/**
 * Byte-level BPE (GPT-2 style), built from a Hugging Face `tokenizer.json`, from GGUF vocabulary
 * arrays (`tokenizer.ggml.model == "gpt2"`), or from a tiktoken rank file (Llama 3).
 *
 * Encoding, as llama.cpp does it: (1) user-defined (non-control) added tokens are cut out of the
 * text first, longest first; (2) each remaining fragment is split into words by the model's
 * pre-tokenizer, a list of regexes applied in turn (the text between matches stays a word too);
 * (3) each word's UTF-8 bytes are merged pairwise by rank (lowest first, ties leftmost) with a
 * priority queue; (4) each final symbol becomes its token, or one token per byte. Control tokens
 * are never produced from text. Internally every token is a "byte string" (one char per byte,
 * U+0000..U+00FF), so GPT-2's byte↔unicode table only matters at load and in {@linkcode
 * BpeTokenizer.piece}.
 *
 * @module
 */
import {
  ByteStreamDecoder,
  checkTokenId,
  concatBytes,
  PairQueue,
  PieceType,
} from "./sentencepiece.ts";
import { FormatError, type StreamDecoder, type Tokenizer } from "./types.ts";

// ---------------------------------------------------------------------------------------------
// GPT-2 byte ↔ unicode table: printable bytes map to themselves, the others to U+0100.. in order.

/** `BYTE_TO_UNICODE[b]`: the character GPT-2 writes for byte `b`. */
export const BYTE_TO_UNICODE: readonly string[] = (() => {
  const out: string[] = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    out[b] = String.fromCharCode(printable ? b : 256 + n++);
  }
  return out;
})();

const UNICODE_TO_BYTE = new Map<string, number>(BYTE_TO_UNICODE.map((c, b) => [c, b]));

/** The byte string of a GPT-2 byte-level token, or null if a character is outside the table. */
export function byteLevelToBytes(token: string): string | null {
  let out = "";
  for (const ch of token) {
    const b = UNICODE_TO_BYTE.get(ch);
    if (b === undefined) return null;
    out += String.fromCharCode(b);
  }
  return out;
}

const utf8Encoder = new TextEncoder();

/** The byte string (one char per byte) of the UTF-8 encoding of `text`. */
export function utf8ByteString(text: string): string {
  const b = utf8Encoder.encode(text);
  let out = "";
  for (let i = 0; i < b.length; i += 4096) {
    out += String.fromCharCode(...b.subarray(i, Math.min(i + 4096, b.length)));
  }
  return out;
}

function byteStringToBytes(s: string): Uint8Array {
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (llama.cpp's llm_tokenizer_bpe regex lists, in JS syntax).

/** Whitespace as llama.cpp's unicode tables define it (a character-class body). */
const WS = "\\t-\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const S_ = `[${WS}]`;
const NS = `[^${WS}]`;
/** GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`. */
const GPT2 =
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|${S_}+(?!${NS})|${S_}+`;
const CONTRACTIONS_CI = "'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]";
/** Llama 3 (tiktoken cl100k-like); `digits` is `{1,3}` for Llama 3, empty for Qwen2. */
const llama3Like = (digits: string) =>
  `${CONTRACTIONS_CI}|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}${digits}| ?[^${WS}\\p{L}\\p{N}]+[\\r\\n]*|` +
  `${S_}*[\\r\\n]+|${S_}+(?!${NS})|${S_}+`;
const CJK = "[\\u4e00-\\u9fa5\\u0800-\\u4e00\\uac00-\\ud7ff]+";

/** Pre-tokenizer regex lists by canonical name. */
const PRE_TOKENIZERS: Record<string, readonly string[]> = {
  gpt2: [GPT2],
  llama3: [llama3Like("{1,3}")],
  qwen2: [llama3Like("")],
  "deepseek-llm": [
    "[\\r\\n]",
    // Upstream spells out the cased letters (Lu, Ll, Lt) as ranges; \p{LC} is that class.
    `${S_}?\\p{LC}+`,
    `${S_}?[!-/:-~\\uff01-\\uff0f\\uff1a-\\uff5e\\u2018-\\u201f\\u3000-\\u3002]+`,
    `${S_}+$`,
    CJK,
    "\\p{N}+",
  ],
  "deepseek-coder": ["[\\r\\n]", `${S_}?\\p{L}+`, `${S_}?\\p{P}+`, CJK, "\\p{N}"],
  falcon: ["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2, "[0-9][0-9][0-9]"],
  starcoder: ["\\p{N}", GPT2],
  default: ["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2, "\\p{N}+", "[0-9][0-9][0-9]"],
};

/** GGUF `tokenizer.ggml.pre` / llama.cpp names → the pre-tokenizer they use. */
const PRE_ALIASES: Record<string, string> = {
  "gpt-2": "gpt2",
  gpt2: "gpt2",
  mpt: "gpt2",
  olmo: "gpt2",
  "phi-2": "gpt2",
  jais: "gpt2",
  llama3: "llama3",
  "llama-bpe": "llama3",
  "llama-v3": "llama3",
  dbrx: "llama3",
  "smaug-bpe": "llama3",
  qwen2: "qwen2",
  "deepseek-r1-qwen": "qwen2",
  stablelm2: "qwen2",
  "deepseek-llm": "deepseek-llm",
  "deepseek-coder": "deepseek-coder",
  falcon: "falcon",
  starcoder: "starcoder",
  refact: "starcoder",
  "command-r": "starcoder",
  smollm: "starcoder",
  codeshell: "starcoder",
  default: "default",
};

/** Pre-tokenizer names llama.cpp uses that this module supports. */
export const SUPPORTED_PRE_TOKENIZERS: readonly string[] = Object.keys(PRE_ALIASES);

/**
 * Whether llama.cpp lets a whole-word vocabulary hit skip merging (`ignore_merges`) for
 * pre-tokenizer `pre`: what a GGUF file, which has no key for it, implies.
 *
 * @example
 * ```ts
 * import { defaultIgnoreMerges } from "./bpe.ts";
 * console.log(defaultIgnoreMerges("llama-bpe"), defaultIgnoreMerges("qwen2")); // true false
 * ```
 */
export function defaultIgnoreMerges(pre: string): boolean {
  return PRE_ALIASES[pre] === "llama3" && pre !== "dbrx" && pre !== "smaug-bpe";
}

const compiled = new Map<string, RegExp[]>();
function regexesFor(pre: string): RegExp[] {
  const name = PRE_ALIASES[pre];
  if (name === undefined) throw new RangeError(`unsupported pre-tokenizer "${pre}"`);
  let res = compiled.get(name);
  if (!res) {
    res = PRE_TOKENIZERS[name].map((r) => new RegExp(r, "gu"));
    compiled.set(name, res);
  }
  return res;
}

/**
 * Splits `text` into words with pre-tokenizer `pre` (a llama.cpp name such as "gpt-2", "llama3",
 * "qwen2", "deepseek-coder"): each regex splits every current word at its matches, keeping the
 * text between matches as words too.
 *
 * @example
 * ```ts
 * import { preTokenize } from "./bpe.ts";
 * console.log(preTokenize("Hello world!!", "gpt-2")); // ["Hello", " world", "!!"]
 * ```
 */
export function preTokenize(text: string, pre: string): string[] {
  let words = text.length > 0 ? [text] : [];
  for (const re of regexesFor(pre)) {
    const next: string[] = [];
    for (const w of words) {
      let last = 0;
      re.lastIndex = 0;
      for (let m = re.exec(w); m; m = re.exec(w)) {
        if (m[0].length === 0) {
          re.lastIndex++;
          continue;
        }
        if (m.index > last) next.push(w.slice(last, m.index));
        next.push(m[0]);
        last = m.index + m[0].length;
      }
      if (last < w.length) next.push(w.slice(last));
    }
    words = next;
  }
  return words;
}

// ---------------------------------------------------------------------------------------------
// The tokenizer.

/** A resolved byte-level BPE model; see {@linkcode bpeFromVocab} for the usual way to build one. */
export interface BpeModel {
  /** Stored token strings by id (byte-level encoded for normal tokens; raw for added ones). */
  readonly pieces: readonly string[];
  /** Byte string per id (one char per byte) for tokens text can produce, else null. */
  readonly bytes: readonly (string | null)[];
  /** {@linkcode PieceType} per id (NORMAL, CONTROL, USER_DEFINED, ...). */
  readonly types: ArrayLike<number>;
  /** Rank of a merge, keyed `left + "\u0100" + right` (byte strings), or "tiktoken": a pair's
   * rank is the id of its concatenation. */
  readonly ranks: Map<string, number> | "tiktoken";
  /** Pre-tokenizer name (a llama.cpp `tokenizer.ggml.pre` value). */
  readonly pre: string;
  /** Whether a word that is itself a token skips merging (llama.cpp `ignore_merges`). */
  readonly ignoreMerges?: boolean;
  /** Beginning-of-sequence id. */
  readonly bosId?: number;
  /** End-of-sequence id. */
  readonly eosId?: number;
}

const PAIR_SEP = "\u0100";

/** A byte-level BPE tokenizer (see the module comment for the algorithm). */
export class BpeTokenizer implements Tokenizer {
  /** Number of token ids. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, if any. */
  readonly bosId?: number;
  /** End-of-sequence id, if any. */
  readonly eosId?: number;
  /** Pre-tokenizer name. */
  readonly pre: string;

  private readonly pieces: readonly string[];
  private readonly types: Uint8Array;
  private readonly tokenOf = new Map<string, number>();
  private readonly ranks: Map<string, number> | null;
  /** Whether a word that is itself a token skips merging (llama.cpp `ignore_merges`). */
  readonly ignoreMerges: boolean;
  /** USER_DEFINED tokens cut out of text before pre-tokenization, longest first. */
  private readonly userTokens: { text: string; id: number }[] = [];
  private readonly outBytes: Uint8Array[] = [];

  /** Builds the tokenizer; `source` names the file in errors. */
  constructor(model: BpeModel, source: string) {
    const n = model.pieces.length;
    if (n === 0) throw new FormatError(source, "the vocabulary is empty");
    if (model.bytes.length !== n || model.types.length < n) {
      throw new FormatError(source, "vocabulary arrays have different lengths");
    }
    if (!(model.pre in PRE_ALIASES)) {
      throw new FormatError(
        source,
        `pre-tokenizer "${model.pre}" is not supported (supported: ${
          SUPPORTED_PRE_TOKENIZERS.join(", ")
        })`,
      );
    }
    for (const [name, id] of [["bos", model.bosId], ["eos", model.eosId]] as const) {
      if (id !== undefined && (!Number.isInteger(id) || id < 0 || id >= n)) {
        throw new FormatError(source, `${name} id ${id} is outside the vocabulary (0..${n - 1})`);
      }
    }
    this.vocabSize = n;
    this.pieces = model.pieces;
    this.bosId = model.bosId;
    this.eosId = model.eosId;
    this.pre = model.pre;
    this.ranks = model.ranks === "tiktoken" ? null : model.ranks;
    this.ignoreMerges = model.ignoreMerges ?? defaultIgnoreMerges(model.pre);
    this.types = new Uint8Array(n);
    for (let id = 0; id < n; id++) {
      const type = model.types[id];
      if (!(type >= 1 && type <= 6)) throw new FormatError(source, `token ${id} has type ${type}`);
      this.types[id] = type;
      const b = model.bytes[id];
      if (type === PieceType.CONTROL || type === PieceType.UNKNOWN) {
        this.outBytes.push(new Uint8Array(0));
      } else if (type === PieceType.USER_DEFINED) {
        const text = model.pieces[id];
        if (text.length > 0) this.userTokens.push({ text, id });
        this.outBytes.push(utf8Encoder.encode(text));
      } else {
        if (b !== null && b.length > 0 && !this.tokenOf.has(b)) this.tokenOf.set(b, id);
        this.outBytes.push(
          b !== null ? byteStringToBytes(b) : utf8Encoder.encode(model.pieces[id]),
        );
      }
    }
    this.userTokens.sort((a, b) => b.text.length - a.text.length);
  }

  /** The stored piece of token `id`. */
  piece(id: number): string {
    checkTokenId(id, this.vocabSize);
    return this.pieces[id];
  }

  /**
   * The merges by rank as "a b" strings of byte-level token text (what GGUF's
   * `tokenizer.ggml.merges` and tokenizer.json hold), or undefined for a tiktoken rank file, whose
   * merges are implied by the ranks. Duplicates and merges text cannot reach are not kept, so
   * ranks may be renumbered; their order, hence every encoding, is the same.
   */
  merges(): string[] | undefined {
    if (this.ranks === null) return undefined;
    const text = (b: string) => [...b].map((c) => BYTE_TO_UNICODE[c.charCodeAt(0)]).join("");
    return [...this.ranks].sort((x, y) => x[1] - y[1]).map(([key]) => {
      const [a, b] = key.split(PAIR_SEP);
      return `${text(a)} ${text(b)}`;
    });
  }

  /** The {@linkcode PieceType} of token `id`. */
  type(id: number): number {
    checkTokenId(id, this.vocabSize);
    return this.types[id];
  }

  /** Encodes `text`; adds BOS first only when `options.bos` is true. */
  encode(text: string, options?: { bos?: boolean }): number[] {
    const out: number[] = [];
    if (options?.bos && this.bosId !== undefined) out.push(this.bosId);
    // Cut user-defined tokens out of the text, longest first (llama.cpp's partition order).
    let frags: (string | number)[] = text.length > 0 ? [text] : [];
    for (const { text: t, id } of this.userTokens) {
      const next: (string | number)[] = [];
      for (const f of frags) {
        if (typeof f === "number") {
          next.push(f);
          continue;
        }
        let from = 0;
        for (let at = f.indexOf(t); at >= 0; at = f.indexOf(t, from)) {
          if (at > from) next.push(f.slice(from, at));
          next.push(id);
          from = at + t.length;
        }
        if (from < f.length) next.push(f.slice(from));
      }
      frags = next;
    }
    for (const f of frags) {
      if (typeof f === "number") out.push(f);
      else for (const w of preTokenize(f, this.pre)) this.encodeWord(utf8ByteString(w), out);
    }
    return out;
  }

  /** Merge rank of the adjacent byte strings `left`, `right` (-1: no merge). */
  private pairRank(left: string, right: string): number {
    if (this.ranks === null) return this.tokenOf.get(left + right) ?? -1;
    return this.ranks.get(left + PAIR_SEP + right) ?? -1;
  }

  /** BPE-merges one word (a byte string) and appends its tokens. */
  private encodeWord(w: string, out: number[]): void {
    if (this.ignoreMerges || w.length === 1) {
      const id = this.tokenOf.get(w);
      if (id !== undefined) {
        out.push(id);
        return;
      }
    }
    const n = w.length;
    const start = Int32Array.from({ length: n }, (_, i) => i);
    const end = Int32Array.from({ length: n }, (_, i) => i + 1);
    const prev = Int32Array.from({ length: n }, (_, i) => i - 1);
    const next = Int32Array.from({ length: n }, (_, i) => (i + 1 < n ? i + 1 : -1));
    const alive = new Uint8Array(n).fill(1);
    const queue = new PairQueue();
    const tryPair = (l: number, r: number) => {
      if (l < 0 || r < 0) return;
      const rank = this.pairRank(w.slice(start[l], end[l]), w.slice(start[r], end[r]));
      if (rank >= 0) queue.push(rank, l, r, end[r] - start[l]);
    };
    for (let i = 0; i + 1 < n; i++) tryPair(i, i + 1);
    for (let top = queue.pop(); top; top = queue.pop()) {
      const [l, r, len] = top;
      if (!alive[l] || !alive[r] || next[l] !== r || end[r] - start[l] !== len) continue;
      end[l] = end[r];
      alive[r] = 0;
      next[l] = next[r];
      if (next[r] >= 0) prev[next[r]] = l;
      tryPair(prev[l], l);
      tryPair(l, next[l]);
    }
    for (let i = 0; i >= 0; i = next[i]) {
      const s = w.slice(start[i], end[i]);
      const id = this.tokenOf.get(s);
      if (id !== undefined) out.push(id);
      else {
        for (const ch of s) {
          const b = this.tokenOf.get(ch);
          if (b !== undefined) out.push(b);
        }
      }
    }
  }

  /** Decodes ids to text (control tokens produce no text). */
  decode(ids: readonly number[]): string {
    const parts: Uint8Array[] = [];
    for (const id of ids) {
      checkTokenId(id, this.vocabSize);
      parts.push(this.outBytes[id]);
    }
    return new TextDecoder("utf-8", { ignoreBOM: true }).decode(concatBytes(parts));
  }

  /** A fresh streaming decoder (emits exactly {@linkcode decode}'s text in total). */
  decoder(): StreamDecoder {
    return new ByteStreamDecoder((id) => {
      checkTokenId(id, this.vocabSize);
      return this.outBytes[id];
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Loaders.

/** Byte-level BPE vocabulary arrays, as GGUF and `tokenizer.json` hold them. */
export interface BpeVocab {
  /** Token strings by id (byte-level encoded, e.g. "Ġthe"; added tokens raw). */
  readonly tokens: readonly string[];
  /** Merges by rank: "a b" strings or [a, b] pairs of token strings. */
  readonly merges: readonly (string | readonly [string, string])[];
  /** {@linkcode PieceType} per id (default NORMAL). */
  readonly types?: ArrayLike<number>;
  /** Pre-tokenizer name (llama.cpp `tokenizer.ggml.pre`, e.g. "gpt-2", "llama-bpe"). */
  readonly pre: string;
  /** Beginning-of-sequence id. */
  readonly bosId?: number;
  /** End-of-sequence id. */
  readonly eosId?: number;
  /** Override llama.cpp's per-pre-tokenizer `ignore_merges` default. */
  readonly ignoreMerges?: boolean;
}

/**
 * Builds a byte-level BPE tokenizer from vocabulary arrays (GGUF `tokenizer.ggml.tokens`,
 * `.merges`, `.token_type`, `.pre`); `source` names the file in errors.
 *
 * @example
 * ```ts
 * import { bpeFromVocab } from "./bpe.ts";
 * const tok = bpeFromVocab({ tokens: ["a", "b", "ab"], merges: ["a b"], pre: "gpt-2" }, "inline");
 * console.log(tok.encode("ab")); // [2]
 * ```
 */
export function bpeFromVocab(vocab: BpeVocab, source: string): BpeTokenizer {
  const n = vocab.tokens.length;
  if (vocab.types && vocab.types.length < n) {
    throw new FormatError(source, `${vocab.types.length} token types for ${n} tokens`);
  }
  const types = vocab.types ?? new Uint8Array(n).fill(PieceType.NORMAL);
  const bytes = vocab.tokens.map((t, id) => {
    if (typeof t !== "string") throw new FormatError(source, `token ${id} is not a string`);
    const ty = types[id];
    return ty === PieceType.NORMAL || ty === PieceType.BYTE || ty === PieceType.UNUSED
      ? byteLevelToBytes(t)
      : null;
  });
  const ranks = new Map<string, number>();
  vocab.merges.forEach((m, rank) => {
    let a: string, b: string;
    if (typeof m === "string") {
      const sp = m.indexOf(" ", 1);
      if (sp < 0) {
        throw new FormatError(source, `merge ${rank} (${JSON.stringify(m)}) has no space`);
      }
      a = m.slice(0, sp);
      b = m.slice(sp + 1);
    } else if (
      Array.isArray(m) && m.length === 2 && typeof m[0] === "string" && typeof m[1] === "string"
    ) {
      [a, b] = m;
    } else throw new FormatError(source, `merge ${rank} is not "a b" or [a, b]`);
    const ab = byteLevelToBytes(a), bb = byteLevelToBytes(b);
    if (ab === null || bb === null) return; // cannot occur in byte-level text
    const key = ab + PAIR_SEP + bb;
    if (!ranks.has(key)) ranks.set(key, rank);
  });
  return new BpeTokenizer({
    pieces: vocab.tokens,
    bytes,
    types,
    ranks,
    pre: vocab.pre,
    ignoreMerges: vocab.ignoreMerges,
    bosId: vocab.bosId,
    eosId: vocab.eosId,
  }, source);
}

/** Llama 3's special tokens (ids 128000..128255), defined in Meta's code, not in the file. */
export function llama3SpecialTokens(): string[] {
  const named = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
  ];
  for (let i = 5; i < 251; i++) named.push(`<|reserved_special_token_${i}|>`);
  return named;
}

/** The most ranks a tiktoken file may hold (Llama 3 has 128000; o200k has 200k). */
const MAX_TIKTOKEN_RANKS = 1 << 21;

/**
 * Parses a tiktoken rank file (`base64(token) rank` per line) as Llama 3's tokenizer: ids are the
 * ranks (which must be 0..n-1), merges are implied by ranks, the 256 Llama 3 special tokens follow
 * at n.. (`<|begin_of_text|>` = BOS, `<|end_of_text|>` = EOS), pre-tokenizer "llama3".
 */
export function bpeFromTiktoken(text: string, fileName: string): BpeTokenizer {
  const lines = text.split("\n");
  if (lines.at(-1) === "") lines.pop();
  if (lines.length === 0) throw new FormatError(fileName, "no ranks");
  if (lines.length > MAX_TIKTOKEN_RANKS) {
    throw new FormatError(
      fileName,
      `${lines.length} lines is more than ${MAX_TIKTOKEN_RANKS} ranks`,
    );
  }
  const bytes: string[] = new Array(lines.length);
  const seen = new Set<string>();
  lines.forEach((line, i) => {
    const m = /^([A-Za-z0-9+/]*={0,2}) (\d+)\r?$/.exec(line);
    if (!m) throw new FormatError(fileName, `line ${i + 1} is not "base64 rank"`);
    const rank = Number(m[2]);
    if (rank !== i) throw new FormatError(fileName, `line ${i + 1}: rank ${rank}, expected ${i}`);
    let tok: string;
    try {
      tok = atob(m[1]);
    } catch {
      throw new FormatError(fileName, `line ${i + 1}: invalid base64`);
    }
    if (tok.length === 0 || seen.has(tok)) {
      throw new FormatError(fileName, `line ${i + 1}: empty or duplicate token`);
    }
    seen.add(tok);
    bytes[i] = tok;
  });
  const specials = llama3SpecialTokens();
  const n = bytes.length;
  const pieces = bytes.map((b) => [...b].map((c) => BYTE_TO_UNICODE[c.charCodeAt(0)]).join(""));
  const types = new Uint8Array(n + specials.length).fill(PieceType.NORMAL);
  types.fill(PieceType.CONTROL, n);
  return new BpeTokenizer({
    pieces: [...pieces, ...specials],
    bytes: [...bytes, ...specials.map(() => null)],
    types,
    ranks: "tiktoken",
    pre: "llama3",
    ignoreMerges: true,
    bosId: n,
    eosId: n + 1,
  }, fileName);
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** The Split regexes of known Hugging Face pre-tokenizers → llama.cpp pre-tokenizer names. */
const HF_SPLIT_PATTERNS: Record<string, string> = {
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+":
    "llama3",
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+":
    "qwen2",
};

/** Works out the llama.cpp pre-tokenizer name of a `tokenizer.json` `pre_tokenizer`. */
function hfPreTokenizer(pre: unknown, fileName: string): string {
  const unsupported = () =>
    new FormatError(
      fileName,
      `pre_tokenizer ${String(JSON.stringify(pre)).slice(0, 200)} is not supported`,
    );
  if (!isRecord(pre)) throw unsupported();
  if (pre.type === "ByteLevel") {
    if (pre.use_regex === false) throw unsupported();
    return "gpt2";
  }
  if (pre.type === "Sequence" && Array.isArray(pre.pretokenizers)) {
    const split = pre.pretokenizers.find((p) => isRecord(p) && p.type === "Split");
    const pattern = isRecord(split) && isRecord(split.pattern) ? split.pattern.Regex : undefined;
    if (typeof pattern === "string" && pattern in HF_SPLIT_PATTERNS) {
      return HF_SPLIT_PATTERNS[pattern];
    }
    if (pre.pretokenizers.length === 1) return hfPreTokenizer(pre.pretokenizers[0], fileName);
  }
  throw unsupported();
}

/**
 * Parses a Hugging Face `tokenizer.json` with a byte-level BPE model (`model.vocab`,
 * `model.merges` as "a b" strings or [a, b] pairs, `added_tokens`, `pre_tokenizer`). Added
 * tokens marked special become CONTROL (never produced from text); the others USER_DEFINED.
 * `options.pre` overrides the detected pre-tokenizer; `bosId`/`eosId` the defaults (the added
 * tokens named like BOS/EOS).
 */
export function bpeFromTokenizerJson(
  text: string,
  fileName: string,
  options: { pre?: string; bosId?: number; eosId?: number } = {},
): BpeTokenizer {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(fileName, `not valid JSON (${(e as Error).message})`);
  }
  if (!isRecord(json) || !isRecord(json.model)) throw new FormatError(fileName, "no model object");
  const model = json.model;
  if (model.type !== "BPE") {
    throw new FormatError(
      fileName,
      `model.type is ${JSON.stringify(model.type)}; only BPE is supported`,
    );
  }
  if (!isRecord(model.vocab)) throw new FormatError(fileName, "model.vocab is not an object");
  if (!Array.isArray(model.merges)) throw new FormatError(fileName, "model.merges is not an array");
  const entries: [string, number][] = [];
  for (const [tok, id] of Object.entries(model.vocab)) {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      throw new FormatError(fileName, `model.vocab[${JSON.stringify(tok)}] is not a valid id`);
    }
    entries.push([tok, id]);
  }
  const added = json.added_tokens ?? [];
  if (!Array.isArray(added)) throw new FormatError(fileName, "added_tokens is not an array");
  const addedTokens: { content: string; id: number; special: boolean }[] = [];
  added.forEach((t, i) => {
    if (
      !isRecord(t) || typeof t.content !== "string" || typeof t.id !== "number" ||
      !Number.isInteger(t.id) || t.id < 0
    ) {
      throw new FormatError(
        fileName,
        `added_tokens[${i}] needs a string content and an integer id`,
      );
    }
    addedTokens.push({ content: t.content, id: t.id, special: t.special === true });
  });
  // Ids must be dense: every id below the largest is defined, and that bounds the arrays.
  const count = entries.length + addedTokens.length;
  let n = 0;
  for (const [, id] of entries) n = Math.max(n, id + 1);
  for (const t of addedTokens) n = Math.max(n, t.id + 1);
  if (n > count) {
    throw new FormatError(
      fileName,
      `token ids reach ${n - 1} but only ${count} tokens are defined`,
    );
  }
  const tokens: (string | undefined)[] = new Array(n);
  const types = new Uint8Array(n).fill(PieceType.NORMAL);
  for (const [tok, id] of entries) tokens[id] = tok;
  for (const t of addedTokens) {
    tokens[t.id] = t.content;
    types[t.id] = t.special ? PieceType.CONTROL : PieceType.USER_DEFINED;
  }
  for (let id = 0; id < n; id++) {
    if (tokens[id] === undefined) throw new FormatError(fileName, `token id ${id} is not defined`);
  }
  const pre = options.pre ?? hfPreTokenizer(json.pre_tokenizer, fileName);
  const find = (names: string[]) => addedTokens.find((t) => names.includes(t.content))?.id;
  return bpeFromVocab({
    tokens: tokens as string[],
    merges: model.merges as (string | [string, string])[],
    types,
    pre,
    bosId: options.bosId ??
      find(["<|begin_of_text|>", "<s>", "<|endoftext|>", "<｜begin▁of▁sentence｜>"]),
    eosId: options.eosId ??
      find(["<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<｜end▁of▁sentence｜>"]),
    ...(typeof model.ignore_merges === "boolean" ? { ignoreMerges: model.ignore_merges } : {}),
  }, fileName);
}
