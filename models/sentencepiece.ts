/**
 * SentencePiece BPE (`model_type: BPE`, as Llama 2, TinyLlama, Mistral v0.1 and Phi-3 use), built
 * from a `tokenizer.model` (protobuf `ModelProto`), a llama2.c `tokenizer.bin`, or plain vocabulary
 * arrays (GGUF `tokenizer.ggml.model == "llama"`).
 *
 * Encoding follows sentencepiece: normalize (optionally collapse extra spaces, add the dummy-prefix
 * space, spaces → "▁"), split into characters (user-defined pieces matched greedily first), then
 * repeatedly merge the adjacent pair whose concatenation is a piece with the HIGHEST score (ties:
 * leftmost), with a priority queue over a linked list: O(n log n). Characters left without a piece
 * become byte tokens `<0xXX>` (one per UTF-8 byte) or `<unk>` without byte fallback. Control pieces
 * are never produced from text.
 *
 * @module
 */
import { ProtoReader, WIRE_I32, WIRE_LEN, WIRE_VARINT } from "./protobuf.ts";
import { FormatError, type StreamDecoder, type Tokenizer } from "./types.ts";

/** SentencePiece piece types (`ModelProto.SentencePiece.Type`; GGUF `token_type` uses the same). */
export const PieceType = {
  NORMAL: 1,
  UNKNOWN: 2,
  CONTROL: 3,
  USER_DEFINED: 4,
  UNUSED: 5,
  BYTE: 6,
} as const;

/** The whitespace symbol sentencepiece writes for " " (U+2581). */
export const SPACE_SYMBOL = "\u2581";

/** Plain vocabulary arrays of a SentencePiece BPE model (e.g. from GGUF metadata). */
export interface SentencePieceVocab {
  /** Piece strings by id ("▁" for spaces, "<0x0A>" for byte pieces). */
  readonly pieces: readonly string[];
  /** Piece scores by id (merge priority: higher merges first). */
  readonly scores: ArrayLike<number>;
  /** {@linkcode PieceType} by id; when absent every piece is NORMAL except `<unk>`/`<s>`/`</s>`
   * (by id) and `<0xXX>` byte pieces. */
  readonly types?: ArrayLike<number>;
  /** Beginning-of-sequence id (default 1 when that piece exists). */
  readonly bosId?: number;
  /** End-of-sequence id (default 2 when that piece exists). */
  readonly eosId?: number;
  /** Unknown-piece id (default 0). */
  readonly unkId?: number;
  /** Prepend "▁" to non-empty text (sentencepiece's `add_dummy_prefix`, default true). */
  readonly addDummyPrefix?: boolean;
  /** Strip leading/trailing spaces and collapse runs (`remove_extra_whitespaces`, default false). */
  readonly removeExtraWhitespaces?: boolean;
  /** Replace " " by "▁" (`escape_whitespaces`, default true). */
  readonly escapeWhitespaces?: boolean;
}

/**
 * A min-priority queue of adjacent symbol pairs, ordered by `prio` then by `left` (the leftmost
 * pair wins ties). Stale entries are left in place and skipped by the caller when popped.
 */
export class PairQueue {
  private prio: number[] = [];
  private left: number[] = [];
  private right: number[] = [];
  private len: number[] = [];

  /** Number of queued entries. */
  get size(): number {
    return this.prio.length;
  }

  /** Whether entry `i` pops before entry `j`. */
  private less(i: number, j: number): boolean {
    return this.prio[i] < this.prio[j] ||
      (this.prio[i] === this.prio[j] && this.left[i] < this.left[j]);
  }

  /** Swaps entries `i` and `j`. */
  private swap(i: number, j: number): void {
    const { prio, left, right, len } = this;
    let t = prio[i];
    prio[i] = prio[j];
    prio[j] = t;
    t = left[i];
    left[i] = left[j];
    left[j] = t;
    t = right[i];
    right[i] = right[j];
    right[j] = t;
    t = len[i];
    len[i] = len[j];
    len[j] = t;
  }

  /** Queues the pair (`left`, `right`) whose merged length is `len`, with priority `prio`. */
  push(prio: number, left: number, right: number, len: number): void {
    let i = this.prio.length;
    this.prio.push(prio);
    this.left.push(left);
    this.right.push(right);
    this.len.push(len);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  /** Removes the best entry and returns `[left, right, len]`, or null when empty. */
  pop(): [number, number, number] | null {
    const n = this.prio.length;
    if (n === 0) return null;
    const top: [number, number, number] = [this.left[0], this.right[0], this.len[0]];
    this.swap(0, n - 1);
    this.prio.pop();
    this.left.pop();
    this.right.pop();
    this.len.pop();
    const m = n - 1;
    let i = 0;
    for (;;) {
      const a = 2 * i + 1, b = a + 1;
      let best = i;
      if (a < m && this.less(a, best)) best = a;
      if (b < m && this.less(b, best)) best = b;
      if (best === i) break;
      this.swap(i, best);
      i = best;
    }
    return top;
  }
}

/**
 * A streaming decoder over per-token byte strings: a token ending mid UTF-8 sequence emits nothing
 * until the sequence completes; in total it emits exactly what one-shot decoding of the same bytes
 * gives (invalid bytes become U+FFFD).
 */
export class ByteStreamDecoder implements StreamDecoder {
  private readonly text = new TextDecoder("utf-8", { ignoreBOM: true });

  /** `bytesOf(id)` gives the bytes a token contributes at this point of the stream. */
  constructor(private readonly bytesOf: (id: number) => Uint8Array) {}

  /** Text completed by token `id`. */
  push(id: number): string {
    return this.text.decode(this.bytesOf(id), { stream: true });
  }

  /** Whatever remains buffered (an incomplete sequence becomes U+FFFD). */
  flush(): string {
    return this.text.decode();
  }
}

const utf8Encoder = new TextEncoder();
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;

/** Concatenates byte arrays. */
export function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** A SentencePiece BPE tokenizer (see the module comment for the exact algorithm). */
export class SentencePieceTokenizer implements Tokenizer {
  /** Number of token ids. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, if any. */
  readonly bosId?: number;
  /** End-of-sequence id, if any. */
  readonly eosId?: number;
  /** Unknown-piece id, if any. */
  readonly unkId?: number;
  /** Whether characters without a piece become `<0xXX>` byte tokens. */
  readonly byteFallback: boolean;

  private readonly pieces: readonly string[];
  private readonly scores: Float32Array;
  private readonly types: Uint8Array;
  /** Pieces that text can produce (NORMAL and USER_DEFINED) → id. */
  private readonly mergeable = new Map<string, number>();
  /** USER_DEFINED pieces (matched whole before merging) → id, and their first characters. */
  private readonly userDefined = new Map<string, number>();
  private readonly userFirst = new Set<string>();
  private maxUserLen = 0;
  private readonly byteIds = new Int32Array(256).fill(-1);
  private readonly pieceBytes: Uint8Array[] = [];
  private readonly addDummyPrefix: boolean;
  private readonly removeExtraWhitespaces: boolean;
  private readonly escapeWhitespaces: boolean;

  /** Builds the tokenizer from vocabulary arrays; `source` names the file in errors. */
  constructor(vocab: SentencePieceVocab, source: string) {
    const n = vocab.pieces.length;
    if (n === 0) throw new FormatError(source, "the vocabulary is empty");
    if (vocab.scores.length < n) {
      throw new FormatError(source, `${vocab.scores.length} scores for ${n} pieces`);
    }
    if (vocab.types && vocab.types.length < n) {
      throw new FormatError(source, `${vocab.types.length} token types for ${n} pieces`);
    }
    this.vocabSize = n;
    this.pieces = vocab.pieces;
    this.scores = Float32Array.from({ length: n }, (_, i) => vocab.scores[i]);
    const unk = vocab.unkId ?? 0;
    const bos = vocab.bosId ?? (n > 1 ? 1 : undefined);
    const eos = vocab.eosId ?? (n > 2 ? 2 : undefined);
    for (const [name, id] of [["unk", unk], ["bos", bos], ["eos", eos]] as const) {
      if (id !== undefined && (!Number.isInteger(id) || id < 0 || id >= n)) {
        throw new FormatError(source, `${name} id ${id} is outside the vocabulary (0..${n - 1})`);
      }
    }
    this.unkId = unk;
    this.bosId = bos;
    this.eosId = eos;
    this.addDummyPrefix = vocab.addDummyPrefix ?? true;
    this.removeExtraWhitespaces = vocab.removeExtraWhitespaces ?? false;
    this.escapeWhitespaces = vocab.escapeWhitespaces ?? true;

    this.types = new Uint8Array(n);
    for (let id = 0; id < n; id++) {
      const piece = vocab.pieces[id];
      if (typeof piece !== "string") throw new FormatError(source, `piece ${id} is not a string`);
      let type: number;
      if (vocab.types) {
        type = vocab.types[id];
        if (!(type >= 1 && type <= 6)) {
          throw new FormatError(source, `piece ${id} (${JSON.stringify(piece)}) has type ${type}`);
        }
      } else if (id === unk) type = PieceType.UNKNOWN;
      else if (id === bos || id === eos) type = PieceType.CONTROL;
      else if (BYTE_PIECE.test(piece)) type = PieceType.BYTE;
      else type = PieceType.NORMAL;
      this.types[id] = type;

      let bytes: Uint8Array;
      if (type === PieceType.BYTE) {
        const m = BYTE_PIECE.exec(piece);
        if (!m) throw new FormatError(source, `byte piece ${id} is ${JSON.stringify(piece)}`);
        const b = parseInt(m[1], 16);
        if (this.byteIds[b] < 0) this.byteIds[b] = id;
        bytes = new Uint8Array([b]);
      } else if (type === PieceType.CONTROL) {
        bytes = new Uint8Array(0);
      } else if (type === PieceType.UNKNOWN) {
        // sentencepiece's unk surface; other UNKNOWN-typed pieces (padding) produce no text.
        bytes = id === unk ? utf8Encoder.encode(" \u2047 ") : new Uint8Array(0);
      } else {
        bytes = utf8Encoder.encode(piece.replaceAll(SPACE_SYMBOL, " "));
        if (type !== PieceType.UNUSED && piece.length > 0 && !this.mergeable.has(piece)) {
          this.mergeable.set(piece, id);
        }
        if (type === PieceType.USER_DEFINED && piece.length > 0) {
          this.userDefined.set(piece, id);
          this.userFirst.add(piece[0]);
          this.maxUserLen = Math.max(this.maxUserLen, piece.length);
        }
      }
      this.pieceBytes.push(bytes);
    }
    this.byteFallback = this.byteIds.every((id) => id >= 0);
  }

  /** The stored piece of token `id`. */
  piece(id: number): string {
    checkTokenId(id, this.vocabSize);
    return this.pieces[id];
  }

  /** The {@linkcode PieceType} of token `id`. */
  type(id: number): number {
    checkTokenId(id, this.vocabSize);
    return this.types[id];
  }

  /** The score of token `id`. */
  score(id: number): number {
    checkTokenId(id, this.vocabSize);
    return this.scores[id];
  }

  /** Applies sentencepiece's normalization (whitespace handling only; identity rule). */
  normalize(text: string): string {
    let t = text;
    if (this.removeExtraWhitespaces) t = t.replace(/ +/g, " ").replace(/^ | $/g, "");
    if (t.length === 0) return "";
    if (this.addDummyPrefix) t = " " + t;
    return this.escapeWhitespaces ? t.replaceAll(" ", SPACE_SYMBOL) : t;
  }

  /** Encodes `text`; adds BOS first only when `options.bos` is true. */
  encode(text: string, options?: { bos?: boolean }): number[] {
    const out: number[] = [];
    if (options?.bos && this.bosId !== undefined) out.push(this.bosId);
    const t = this.normalize(text);
    if (t.length === 0) return out;

    // Split into symbols: user-defined pieces whole (longest match), else one code point each.
    const start: number[] = [], end: number[] = [];
    for (let i = 0; i < t.length;) {
      let len = 0;
      if (this.userFirst.has(t[i])) {
        for (let l = Math.min(this.maxUserLen, t.length - i); l > 0; l--) {
          if (this.userDefined.has(t.slice(i, i + l))) {
            len = l;
            break;
          }
        }
      }
      if (len === 0) {
        const c = t.charCodeAt(i);
        len = c >= 0xd800 && c < 0xdc00 && i + 1 < t.length ? 2 : 1;
      }
      start.push(i);
      end.push(i + len);
      i += len;
    }
    const n = start.length;
    const prev = Int32Array.from({ length: n }, (_, i) => i - 1);
    const next = Int32Array.from({ length: n }, (_, i) => (i + 1 < n ? i + 1 : -1));
    const alive = new Uint8Array(n).fill(1);

    // Merge the best-scoring adjacent pair until none is a piece.
    const queue = new PairQueue();
    const tryPair = (l: number, r: number) => {
      if (l < 0 || r < 0) return;
      const id = this.mergeable.get(t.slice(start[l], end[r]));
      if (id !== undefined) queue.push(-this.scores[id], l, r, end[r] - start[l]);
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

    // Emit pieces; symbols without one fall back to bytes (or <unk>).
    for (let i = 0; i >= 0; i = next[i]) {
      const s = t.slice(start[i], end[i]);
      const id = this.mergeable.get(s);
      if (id !== undefined) out.push(id);
      else if (this.byteFallback) {
        for (const b of utf8Encoder.encode(s)) out.push(this.byteIds[b]);
      } else if (this.unkId !== undefined) out.push(this.unkId);
    }
    return out;
  }

  /**
   * Bytes token `id` adds. `atStart`: no piece has produced text yet; then a leading "▁" (the
   * dummy prefix) is dropped, once, as sentencepiece does.
   */
  private tokenBytes(id: number, atStart: boolean): Uint8Array {
    checkTokenId(id, this.vocabSize);
    const b = this.pieceBytes[id];
    const t = this.types[id];
    if (
      atStart && (this.addDummyPrefix || this.removeExtraWhitespaces) &&
      (t === PieceType.NORMAL || t === PieceType.USER_DEFINED || t === PieceType.UNUSED) &&
      this.pieces[id].startsWith(SPACE_SYMBOL)
    ) return b.subarray(1);
    return b;
  }

  /** Decodes ids to text (control tokens produce no text; `<unk>` gives " ⁇ "). */
  decode(ids: readonly number[]): string {
    const parts: Uint8Array[] = [];
    let atStart = true;
    for (const id of ids) {
      parts.push(this.tokenBytes(id, atStart));
      if (this.pieceBytes[id].length > 0) atStart = false;
    }
    return new TextDecoder("utf-8", { ignoreBOM: true }).decode(concatBytes(parts));
  }

  /** A fresh streaming decoder (emits exactly {@linkcode decode}'s text in total). */
  decoder(): StreamDecoder {
    let atStart = true;
    return new ByteStreamDecoder((id) => {
      const b = this.tokenBytes(id, atStart);
      if (this.pieceBytes[id].length > 0) atStart = false;
      return b;
    });
  }
}

/**
 * Builds a SentencePiece BPE tokenizer from plain arrays (the GGUF `tokenizer.ggml.*` metadata);
 * `source` names the file in errors.
 *
 * @example
 * ```ts
 * import { sentencePieceFromVocab } from "./sentencepiece.ts";
 * const tok = sentencePieceFromVocab({
 *   pieces: ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"],
 *   scores: [0, 0, 0, -1, -2, -3],
 * }, "inline");
 * console.log(tok.encode("a")); // [5]
 * ```
 */
export function sentencePieceFromVocab(
  vocab: SentencePieceVocab,
  source: string,
): SentencePieceTokenizer {
  return new SentencePieceTokenizer(vocab, source);
}

/** `TrainerSpec.model_type` values. */
const MODEL_TYPES: Record<number, string> = { 1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR" };

/**
 * Parses a sentencepiece `tokenizer.model` (protobuf `ModelProto`) of model type BPE.
 * `fileName` names the file in errors.
 */
export function sentencePieceFromModelProto(
  bytes: Uint8Array,
  fileName: string,
): SentencePieceTokenizer {
  const pieces: string[] = [], scores: number[] = [], types: number[] = [];
  let modelType = 1; // proto default: UNIGRAM
  let unkId = 0, bosId = 1, eosId = 2;
  let addDummyPrefix = true, removeExtraWhitespaces = true, escapeWhitespaces = true;
  let normalizer = "";
  let sawTrainer = false;

  const top = new ProtoReader(bytes, fileName, 0, bytes.length, "ModelProto");
  for (let tag = top.tag(); tag; tag = top.tag()) {
    if (tag.field === 1) {
      top.expect(tag, WIRE_LEN, "pieces");
      const i = pieces.length;
      const m = top.message("pieces", `ModelProto.pieces[${i}]`);
      let piece = "", score = 0, type: number = PieceType.NORMAL;
      for (let t = m.tag(); t; t = m.tag()) {
        if (t.field === 1) {
          m.expect(t, WIRE_LEN, "piece");
          piece = m.string("piece");
        } else if (t.field === 2) {
          m.expect(t, WIRE_I32, "score");
          score = m.float("score");
        } else if (t.field === 3) {
          m.expect(t, WIRE_VARINT, "type");
          type = m.int32("type");
          if (type < 1 || type > 6) {
            throw new FormatError(fileName, `ModelProto.pieces[${i}].type: unknown type ${type}`);
          }
        } else m.skip(t.wire, `field${t.field}`);
      }
      pieces.push(piece);
      scores.push(score);
      types.push(type);
    } else if (tag.field === 2) {
      top.expect(tag, WIRE_LEN, "trainer_spec");
      sawTrainer = true;
      const m = top.message("trainer_spec", "ModelProto.trainer_spec");
      for (let t = m.tag(); t; t = m.tag()) {
        const ids: Record<number, string> = {
          3: "model_type",
          40: "unk_id",
          41: "bos_id",
          42: "eos_id",
        };
        const name = ids[t.field];
        if (name) {
          m.expect(t, WIRE_VARINT, name);
          const v = m.int32(name);
          if (t.field === 3) modelType = v;
          else if (t.field === 40) unkId = v;
          else if (t.field === 41) bosId = v;
          else eosId = v;
        } else m.skip(t.wire, `field${t.field}`);
      }
    } else if (tag.field === 3) {
      top.expect(tag, WIRE_LEN, "normalizer_spec");
      const m = top.message("normalizer_spec", "ModelProto.normalizer_spec");
      for (let t = m.tag(); t; t = m.tag()) {
        if (t.field === 1) {
          m.expect(t, WIRE_LEN, "name");
          normalizer = m.string("name");
        } else if (t.field === 3) {
          m.expect(t, WIRE_VARINT, "add_dummy_prefix");
          addDummyPrefix = m.bool("add_dummy_prefix");
        } else if (t.field === 4) {
          m.expect(t, WIRE_VARINT, "remove_extra_whitespaces");
          removeExtraWhitespaces = m.bool("remove_extra_whitespaces");
        } else if (t.field === 5) {
          m.expect(t, WIRE_VARINT, "escape_whitespaces");
          escapeWhitespaces = m.bool("escape_whitespaces");
        } else m.skip(t.wire, `field${t.field}`);
      }
    } else top.skip(tag.wire, `field${tag.field}`);
  }
  if (pieces.length === 0) throw new FormatError(fileName, "ModelProto has no pieces");
  if (!sawTrainer) throw new FormatError(fileName, "ModelProto has no trainer_spec");
  if (modelType !== 2) {
    throw new FormatError(
      fileName,
      `trainer_spec.model_type is ${MODEL_TYPES[modelType] ?? modelType}; only BPE is supported`,
    );
  }
  if (normalizer !== "" && normalizer !== "identity") {
    throw new FormatError(
      fileName,
      `normalizer_spec.name is "${normalizer}"; only the identity normalizer is supported`,
    );
  }
  const opt = (id: number) => (id >= 0 ? id : undefined);
  return new SentencePieceTokenizer({
    pieces,
    scores,
    types,
    unkId: opt(unkId),
    bosId: opt(bosId),
    eosId: opt(eosId),
    addDummyPrefix,
    removeExtraWhitespaces,
    escapeWhitespaces,
  }, fileName);
}

/**
 * Parses a llama2.c `tokenizer.bin`: int32 max_token_length, then per token f32 score, int32
 * byte length and the bytes (spaces stored as " ", BOS/EOS as "\n<s>\n" / "\n</s>\n"). Ids 0, 1, 2
 * are `<unk>`, `<s>`, `</s>`; `<0xXX>` pieces are byte tokens. `fileName` names the file in errors.
 */
export function sentencePieceFromLlama2c(
  bytes: Uint8Array,
  fileName: string,
): SentencePieceTokenizer {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 4) {
    throw new FormatError(fileName, `${bytes.length} bytes is too short for the header (4)`);
  }
  const maxLen = view.getInt32(0, true);
  if (maxLen <= 0 || maxLen > bytes.length) {
    throw new FormatError(fileName, `max_token_length ${maxLen} is not plausible`);
  }
  const utf8 = new TextDecoder("utf-8", { fatal: true });
  const pieces: string[] = [], scores: number[] = [];
  let o = 4;
  while (o < bytes.length) {
    const id = pieces.length;
    if (bytes.length - o < 8) {
      throw new FormatError(fileName, `token ${id}: header at byte ${o} is truncated`);
    }
    const score = view.getFloat32(o, true);
    const len = view.getInt32(o + 4, true);
    o += 8;
    if (len < 0 || len > maxLen || len > bytes.length - o) {
      throw new FormatError(
        fileName,
        `token ${id}: length ${len} at byte ${o - 4} is invalid (max_token_length ${maxLen}, ` +
          `${bytes.length - o} bytes left)`,
      );
    }
    if (!Number.isFinite(score)) throw new FormatError(fileName, `token ${id}: score is ${score}`);
    let text: string;
    try {
      text = utf8.decode(bytes.subarray(o, o + len));
    } catch {
      throw new FormatError(fileName, `token ${id}: piece at byte ${o} is not valid UTF-8`);
    }
    o += len;
    if (id === 1 && text === "\n<s>\n") text = "<s>";
    else if (id === 2 && text === "\n</s>\n") text = "</s>";
    else text = text.replaceAll(" ", SPACE_SYMBOL);
    pieces.push(text);
    scores.push(score);
  }
  if (pieces.length < 3) {
    throw new FormatError(fileName, `${pieces.length} tokens; <unk>, <s>, </s> are required`);
  }
  return new SentencePieceTokenizer({ pieces, scores, unkId: 0, bosId: 1, eosId: 2 }, fileName);
}

/** Throws a RangeError unless `id` is a token id of a `vocabSize`-token vocabulary. */
export function checkTokenId(id: number, vocabSize: number): void {
  if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
    throw new RangeError(`token id ${id} is outside the vocabulary (0..${vocabSize - 1})`);
  }
}
