/**
 * A small reader for the protobuf wire format (enough for SentencePiece's `ModelProto`): tags,
 * varints, 64-bit, length-delimited and 32-bit fields. Every read is bounds-checked against the
 * enclosing message; a malformed input gives a {@linkcode FormatError} naming the file and the
 * field being read, never an out-of-range read or a large allocation (values are views).
 *
 * @module
 */
import { FormatError } from "./types.ts";

/** Wire type of a field: varint. */
export const WIRE_VARINT = 0;
/** Wire type of a field: 8 fixed bytes (fixed64, sfixed64, double). */
export const WIRE_I64 = 1;
/** Wire type of a field: a varint length, then that many bytes (string, bytes, message). */
export const WIRE_LEN = 2;
/** Wire type of a field: 4 fixed bytes (fixed32, sfixed32, float). */
export const WIRE_I32 = 5;

/** One field tag: its number and wire type. */
export interface ProtoTag {
  /** Field number. */
  readonly field: number;
  /** Wire type (`WIRE_*`). */
  readonly wire: number;
}

/** A varint split into its low and high 32 bits (both unsigned). */
export interface Varint64 {
  /** Bits 0..31. */
  readonly lo: number;
  /** Bits 32..63. */
  readonly hi: number;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Reads the fields of one message in `bytes[start, end)`. `path` names the message in errors
 * (e.g. `"ModelProto.pieces[12]"`).
 *
 * @example
 * ```ts
 * import { ProtoReader, WIRE_VARINT } from "./protobuf.ts";
 * const r = new ProtoReader(new Uint8Array([0x08, 0x96, 0x01]), "x.bin");
 * const tag = r.tag();
 * if (tag?.field === 1 && tag.wire === WIRE_VARINT) console.log(r.uint("id")); // 150
 * ```
 */
export class ProtoReader {
  /** Next byte to read. */
  pos: number;

  /** A reader over `bytes[start, end)` of file `fileName`; `path` prefixes field names in errors. */
  constructor(
    readonly bytes: Uint8Array,
    readonly fileName: string,
    start = 0,
    readonly end: number = bytes.length,
    readonly path = "message",
  ) {
    if (start < 0 || end > bytes.length || start > end) {
      throw new FormatError(fileName, `${path}: range [${start}, ${end}) is outside the data`);
    }
    this.pos = start;
  }

  /** Whether every byte of the message has been read. */
  get done(): boolean {
    return this.pos >= this.end;
  }

  /** Throws a FormatError naming the file, message path and field. */
  private fail(field: string, message: string): never {
    throw new FormatError(this.fileName, `${this.path}.${field}: ${message}`);
  }

  /** Reads a raw varint (at most 10 bytes) as two 32-bit halves. */
  varint64(field: string): Varint64 {
    let lo = 0, hi = 0;
    const start = this.pos;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) {
        this.fail(field, `varint at byte ${start} runs past the end of the message (${this.end})`);
      }
      const b = this.bytes[this.pos++];
      const v = b & 0x7f;
      if (i < 4) lo |= v << (7 * i);
      else if (i === 4) {
        lo |= (v & 0x0f) << 28;
        hi |= v >>> 4;
      } else hi |= v << (7 * i - 32);
      if ((b & 0x80) === 0) return { lo: lo >>> 0, hi: hi >>> 0 };
    }
    this.fail(field, `varint at byte ${start} is longer than 10 bytes`);
  }

  /** Reads the next tag, or returns null at the end of the message. */
  tag(): ProtoTag | null {
    if (this.done) return null;
    const at = this.pos;
    const { lo, hi } = this.varint64("tag");
    if (hi !== 0 || lo >>> 3 === 0) this.fail("tag", `invalid field number at byte ${at}`);
    return { field: lo >>> 3, wire: lo & 7 };
  }

  /** Reads a varint as an unsigned number (exact up to 2^53). */
  uint(field: string): number {
    const { lo, hi } = this.varint64(field);
    return hi * 0x1_0000_0000 + lo;
  }

  /** Reads an `int32`/`enum` varint (negative values are sign-extended 10-byte varints). */
  int32(field: string): number {
    return this.varint64(field).lo | 0;
  }

  /** Reads a `bool` varint. */
  bool(field: string): boolean {
    const { lo, hi } = this.varint64(field);
    return lo !== 0 || hi !== 0;
  }

  /** Advances past `n` bytes, checked; returns where they start. */
  private take(field: string, n: number): number {
    const at = this.pos;
    if (n > this.end - at) {
      this.fail(field, `${n} bytes at byte ${at} run past the end of the message (${this.end})`);
    }
    this.pos += n;
    return at;
  }

  /** Reads a 32-bit little-endian float (`float` fields). */
  float(field: string): number {
    const at = this.take(field, 4);
    return new DataView(this.bytes.buffer, this.bytes.byteOffset + at, 4).getFloat32(0, true);
  }

  /** Reads a length-delimited field as a view into the input (no copy). */
  lengthDelimited(field: string): Uint8Array {
    const at = this.pos;
    const { lo, hi } = this.varint64(field);
    if (hi !== 0 || lo > this.end - this.pos) {
      this.fail(
        field,
        `length ${
          hi * 0x1_0000_0000 + lo
        } at byte ${at} runs past the end of the message (${this.end})`,
      );
    }
    const start = this.pos;
    this.pos += lo;
    return this.bytes.subarray(start, start + lo);
  }

  /** Reads a length-delimited UTF-8 string; invalid UTF-8 is a format error. */
  string(field: string): string {
    const b = this.lengthDelimited(field);
    try {
      return utf8.decode(b);
    } catch {
      this.fail(field, "string is not valid UTF-8");
    }
  }

  /** Reads a length-delimited sub-message; `path` names it in the sub-reader's errors. */
  message(field: string, path = `${this.path}.${field}`): ProtoReader {
    const b = this.lengthDelimited(field);
    const start = b.byteOffset - this.bytes.byteOffset;
    return new ProtoReader(this.bytes, this.fileName, start, start + b.length, path);
  }

  /** Skips a field of wire type `wire` that the caller does not use. */
  skip(wire: number, field: string): void {
    switch (wire) {
      case WIRE_VARINT:
        this.varint64(field);
        return;
      case WIRE_I64:
        this.take(field, 8);
        return;
      case WIRE_LEN:
        this.lengthDelimited(field);
        return;
      case WIRE_I32:
        this.take(field, 4);
        return;
      default:
        this.fail(field, `unsupported wire type ${wire} at byte ${this.pos}`);
    }
  }

  /** Throws unless field `field` has wire type `want` (a schema mismatch or corruption). */
  expect(tag: ProtoTag, want: number, field: string): void {
    if (tag.wire !== want) {
      this.fail(field, `wire type ${tag.wire}, expected ${want} (field ${tag.field})`);
    }
  }
}
