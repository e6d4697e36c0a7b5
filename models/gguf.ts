/**
 * GGUF (llama.cpp's model container, versions 2 and 3, little-endian): a reader that validates
 * every count, length, dimension and offset against the file before allocating, a writer (v3),
 * and the mapping between GGUF metadata and {@linkcode ModelConfig}.
 *
 * File layout: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count metadata
 * entries (string key, u32 value type, value); tensor_count tensor infos (string name,
 * u32 n_dims, u64 ne[n_dims] innermost-first, u32 ggml type, u64 offset); padding to
 * `general.alignment` (default 32); then the data section, where each tensor's offset (relative
 * to the section) is a multiple of the alignment. Strings are a u64 byte length plus UTF-8 bytes.
 *
 * Metadata values are a tagged union ({@linkcode GgufValue}) so the writer knows each type:
 * `{ type: "u32", value: 5 }`, `{ type: "u64", value: 5n }` (64-bit integers are bigints),
 * `{ type: "string", value: "llama" }`,
 * `{ type: "array", itemType: "string", value: ["a", "b"] }` (arrays hold plain values; nested
 * arrays hold {@linkcode GgufArray} items).
 *
 * RoPE layout: llama.cpp's "llama" architecture uses interleaved pairs (its converter permutes
 * Hugging Face Q/K rows), while "qwen2" keeps Hugging Face's rotate-half pairs (llama.cpp's
 * LLAMA_ROPE_TYPE_NEOX). {@linkcode ggufToModel} reports the layout of the stored weights;
 * {@linkcode modelToGguf} permutes Q/K rows so a written file follows its architecture's layout.
 *
 * @module
 */
import { BLOCK_INFO, tensorBytes } from "./quant.ts";
import {
  type DType,
  FormatError,
  type HostTensor,
  type ModelConfig,
  type RopeScaling,
} from "./types.ts";
import { ropeInvFreq } from "../kernels/rope.ts";

/** A GGUF numeric metadata type held as a JS number. */
export type GgufNumberType = "u8" | "i8" | "u16" | "i16" | "u32" | "i32" | "f32" | "f64";

/** A GGUF 64-bit integer metadata type, held as a bigint. */
export type GgufBigType = "u64" | "i64";

/** Every GGUF metadata value type (ids 0..12 in the file). */
export type GgufValueType = GgufNumberType | GgufBigType | "bool" | "string" | "array";

/** A GGUF array: items of one type, held as plain JS values (nested arrays as GgufArray). */
export type GgufArray =
  | { readonly type: "array"; readonly itemType: GgufNumberType; readonly value: number[] }
  | { readonly type: "array"; readonly itemType: GgufBigType; readonly value: bigint[] }
  | { readonly type: "array"; readonly itemType: "bool"; readonly value: boolean[] }
  | { readonly type: "array"; readonly itemType: "string"; readonly value: string[] }
  | { readonly type: "array"; readonly itemType: "array"; readonly value: GgufArray[] };

/** A typed GGUF metadata value. */
export type GgufValue =
  | { readonly type: GgufNumberType; readonly value: number }
  | { readonly type: GgufBigType; readonly value: bigint }
  | { readonly type: "bool"; readonly value: boolean }
  | { readonly type: "string"; readonly value: string }
  | GgufArray;

/** One tensor described by a GGUF file. */
export interface GgufTensorInfo {
  /** Tensor name (llama.cpp canonical names, e.g. `blk.0.attn_q.weight`). */
  readonly name: string;
  /** Shape outermost-first (the reverse of `ne`): a weight is `[out, in]`. */
  readonly shape: readonly number[];
  /** GGUF/ggml dimensions as stored, innermost-first. */
  readonly ne: readonly number[];
  /** Storage type. */
  readonly dtype: DType;
  /** Byte offset of the data, relative to the data section. */
  readonly offset: number;
  /** Bytes of data. */
  readonly size: number;
  /** The data: a view into the file's bytes (no copy). */
  readonly data: Uint8Array;
}

/** A parsed GGUF file. */
export interface GgufFile {
  /** Format version (2 or 3). */
  readonly version: number;
  /** Metadata in file order. */
  readonly metadata: Map<string, GgufValue>;
  /** Tensors in file order. */
  readonly tensors: GgufTensorInfo[];
  /** Data alignment in bytes (`general.alignment`, default 32). */
  readonly alignment: number;
  /** Absolute byte offset of the data section. */
  readonly dataOffset: number;
}

/** ggml type ids of the storage types this project reads and writes. */
export const GGML_TYPE_IDS: Readonly<Record<DType, number>> = {
  f32: 0,
  f16: 1,
  q4_0: 2,
  q4_1: 3,
  q5_0: 6,
  q5_1: 7,
  q8_0: 8,
  q2_k: 10,
  q3_k: 11,
  q4_k: 12,
  q5_k: 13,
  q6_k: 14,
  bf16: 30,
};

const DTYPE_BY_ID = new Map<number, DType>(
  Object.entries(GGML_TYPE_IDS).map(([k, v]) => [v, k as DType]),
);

/** Value type ids, in file order 0..12. */
const VALUE_TYPES: readonly GgufValueType[] = [
  "u8",
  "i8",
  "u16",
  "i16",
  "u32",
  "i32",
  "f32",
  "bool",
  "string",
  "array",
  "u64",
  "i64",
  "f64",
];

/** Smallest encoding of one value of each type (strings: the u64 length; arrays: type + count). */
const MIN_BYTES: Readonly<Record<GgufValueType, number>> = {
  u8: 1,
  i8: 1,
  bool: 1,
  u16: 2,
  i16: 2,
  u32: 4,
  i32: 4,
  f32: 4,
  u64: 8,
  i64: 8,
  f64: 8,
  string: 8,
  array: 12,
};

const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
const DEFAULT_ALIGNMENT = 32;
const MAX_DIMS = 4;
const MAX_ARRAY_DEPTH = 8;
/** Smallest metadata entry: empty key (8) + type (4) + one-byte value. */
const MIN_KV_BYTES = 13;
/** Smallest tensor info: empty name (8) + n_dims (4) + one ne (8) + type (4) + offset (8). */
const MIN_TENSOR_INFO_BYTES = 32;

// ---- reading -----------------------------------------------------------------------------------

/** A bounds-checked little-endian cursor whose errors name the file, field and byte offset. */
class Cursor {
  pos = 0;
  readonly view: DataView;
  /** Keeps a leading U+FEFF: it is part of some vocabulary pieces, not a byte-order mark. */
  readonly decoder = new TextDecoder("utf-8", { ignoreBOM: true });

  constructor(readonly bytes: Uint8Array, readonly file: string) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get remaining(): number {
    return this.bytes.byteLength - this.pos;
  }

  fail(message: string): never {
    throw new FormatError(this.file, message);
  }

  need(n: number, field: string): void {
    if (n > this.remaining) {
      this.fail(
        `${field} at byte ${this.pos} needs ${n} bytes but the file ends at byte ` +
          `${this.bytes.byteLength} (truncated?)`,
      );
    }
  }

  u32(field: string): number {
    this.need(4, field);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }

  /** A u64 that must fit a safe integer. */
  u64(field: string): number {
    this.need(8, field);
    const v = this.view.getBigUint64(this.pos, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      this.fail(`${field} at byte ${this.pos} is ${v}, larger than any valid value`);
    }
    this.pos += 8;
    return Number(v);
  }

  /** A count of items that take at least `minBytes` each, checked against the rest of the file. */
  count(field: string, minBytes: number): number {
    const at = this.pos, n = this.u64(field);
    if (n > this.remaining / minBytes) {
      this.fail(
        `${field} at byte ${at} is ${n}, but ${n} items of at least ${minBytes} bytes ` +
          `cannot fit in the ${this.remaining} bytes left`,
      );
    }
    return n;
  }

  string(field: string): string {
    const at = this.pos, n = this.u64(`${field} length`);
    if (n > this.remaining) {
      this.fail(`${field} length at byte ${at} is ${n}, but only ${this.remaining} bytes remain`);
    }
    const start = this.pos;
    this.pos += n;
    // Short ASCII strings (most vocabulary pieces) skip the decoder.
    if (n <= 64) {
      let ascii = true;
      for (let i = start; i < start + n; i++) {
        if (this.bytes[i] >= 0x80) {
          ascii = false;
          break;
        }
      }
      if (ascii) return String.fromCharCode(...this.bytes.subarray(start, start + n));
    }
    return this.decoder.decode(this.bytes.subarray(start, start + n));
  }

  valueType(field: string): GgufValueType {
    const at = this.pos, id = this.u32(field);
    const t = VALUE_TYPES[id];
    if (t === undefined) {
      this.fail(`${field} at byte ${at} is ${id}, not a GGUF value type (0..12)`);
    }
    return t;
  }

  scalar(t: Exclude<GgufValueType, "array">, field: string): number | bigint | boolean | string {
    if (t === "string") return this.string(field);
    this.need(MIN_BYTES[t], field);
    const p = this.pos, v = this.view;
    this.pos += MIN_BYTES[t];
    switch (t) {
      case "u8":
        return v.getUint8(p);
      case "i8":
        return v.getInt8(p);
      case "u16":
        return v.getUint16(p, true);
      case "i16":
        return v.getInt16(p, true);
      case "u32":
        return v.getUint32(p, true);
      case "i32":
        return v.getInt32(p, true);
      case "f32":
        return v.getFloat32(p, true);
      case "f64":
        return v.getFloat64(p, true);
      case "u64":
        return v.getBigUint64(p, true);
      case "i64":
        return v.getBigInt64(p, true);
      case "bool":
        return v.getUint8(p) !== 0;
    }
  }

  value(t: GgufValueType, field: string, depth = 0): GgufValue {
    if (t !== "array") return { type: t, value: this.scalar(t, field) } as GgufValue;
    return this.array(field, depth);
  }

  array(field: string, depth: number): GgufArray {
    if (depth >= MAX_ARRAY_DEPTH) this.fail(`${field} nests arrays deeper than ${MAX_ARRAY_DEPTH}`);
    const itemType = this.valueType(`${field} item type`);
    const n = this.count(`${field} item count`, MIN_BYTES[itemType]);
    const value: unknown[] = new Array(n);
    const item = `${field} item`; // built once: per-item names would dominate big vocabularies
    if (itemType === "array") {
      for (let i = 0; i < n; i++) value[i] = this.array(item, depth + 1);
    } else {
      for (let i = 0; i < n; i++) value[i] = this.scalar(itemType, item);
    }
    return { type: "array", itemType, value } as GgufArray;
  }
}

/**
 * Parses a GGUF v2/v3 file held in memory. Tensor data are views into `bytes`. Throws a
 * {@linkcode FormatError} naming `fileName` and the offending field for anything malformed:
 * bad magic or version, counts or lengths that cannot fit in the file, unknown value or tensor
 * types, more than 4 dimensions, zero or overflowing dimensions, misaligned offsets, or data
 * past the end of the file.
 *
 * @example
 * ```ts
 * import { readGguf, writeGguf } from "./gguf.ts";
 * const bytes = writeGguf({ metadata: [["general.name", { type: "string", value: "x" }]], tensors: [] });
 * console.log(readGguf(bytes, "x.gguf").metadata.get("general.name")?.value); // "x"
 * ```
 */
export function readGguf(bytes: Uint8Array, fileName: string): GgufFile {
  const c: Cursor = new Cursor(bytes, fileName);
  const magic = c.u32("magic");
  if (magic !== GGUF_MAGIC) {
    const text = [...bytes.subarray(0, 4)].map((b) => String.fromCharCode(b)).join("");
    c.fail(`not a GGUF file: magic is ${JSON.stringify(text)}, expected "GGUF"`);
  }
  const version = c.u32("version");
  if (version !== 2 && version !== 3) {
    const hint = version === 1
      ? "GGUF v1 (32-bit counts) is not supported; re-convert with a current llama.cpp"
      : (version & 0xffff) === 0
      ? "this looks like a big-endian GGUF, which is not supported"
      : "only versions 2 and 3 are supported";
    c.fail(`GGUF version ${version}: ${hint}`);
  }
  const tensorCount = c.count("tensor_count", MIN_TENSOR_INFO_BYTES);
  const kvCount = c.count("metadata_kv_count", MIN_KV_BYTES);

  const metadata = new Map<string, GgufValue>();
  for (let i = 0; i < kvCount; i++) {
    const key = c.string(`metadata key #${i}`);
    if (metadata.has(key)) c.fail(`metadata key "${key}" appears twice`);
    const t = c.valueType(`metadata "${key}" value type`);
    metadata.set(key, c.value(t, `metadata "${key}"`));
  }

  let alignment = DEFAULT_ALIGNMENT;
  const al = metadata.get("general.alignment");
  if (al !== undefined) {
    const v = typeof al.value === "bigint" ? Number(al.value) : al.value;
    if (
      typeof v !== "number" || !Number.isInteger(v) || v <= 0 || (v & (v - 1)) !== 0 ||
      v > 1 << 30
    ) {
      c.fail(`metadata "general.alignment" must be a power-of-two integer, got ${String(v)}`);
    }
    alignment = v;
  }

  interface RawInfo {
    name: string;
    ne: number[];
    dtype: DType;
    offset: number;
  }
  const infos: RawInfo[] = [];
  const names = new Set<string>();
  for (let i = 0; i < tensorCount; i++) {
    const name = c.string(`tensor #${i} name`);
    const what = `tensor "${name}"`;
    if (names.has(name)) c.fail(`${what} appears twice`);
    names.add(name);
    const nDims = c.u32(`${what} n_dims`);
    if (nDims < 1 || nDims > MAX_DIMS) c.fail(`${what} has ${nDims} dimensions (1..4 allowed)`);
    const ne: number[] = [];
    let elements = 1;
    for (let d = 0; d < nDims; d++) {
      const n = c.u64(`${what} ne[${d}]`);
      if (n === 0) c.fail(`${what} has ne[${d}] = 0`);
      elements *= n;
      if (elements > Number.MAX_SAFE_INTEGER) {
        c.fail(`${what} has more than 2^53 elements (ne = [${[...ne, n].join(", ")}, ...])`);
      }
      ne.push(n);
    }
    const typeId = c.u32(`${what} type`);
    const dtype = DTYPE_BY_ID.get(typeId);
    if (dtype === undefined) {
      c.fail(
        `${what} has ggml type id ${typeId}, which is not supported ` +
          `(supported: ${[...DTYPE_BY_ID.entries()].map(([k, v]) => `${v}=${k}`).join(", ")})`,
      );
    }
    const block = BLOCK_INFO[dtype].blockSize;
    if (ne[0] % block !== 0) {
      c.fail(
        `${what}: row length ne[0] = ${ne[0]} is not a multiple of the ${dtype} block ${block}`,
      );
    }
    const offset = c.u64(`${what} offset`);
    if (offset % alignment !== 0) {
      c.fail(`${what}: data offset ${offset} is not a multiple of the alignment ${alignment}`);
    }
    infos.push({ name, ne, dtype, offset });
  }

  const dataOffset = Math.ceil(c.pos / alignment) * alignment;
  const tensors: GgufTensorInfo[] = infos.map(({ name, ne, dtype, offset }) => {
    const size = tensorBytes(dtype, ne.reduce((a, b) => a * b, 1));
    const start = dataOffset + offset, end = start + size;
    if (end > bytes.byteLength) {
      c.fail(
        `tensor "${name}": data ends at byte ${end} but the file has ${bytes.byteLength} ` +
          `(truncated download?)`,
      );
    }
    return {
      name,
      shape: [...ne].reverse(),
      ne,
      dtype,
      offset,
      size,
      data: bytes.subarray(start, end),
    };
  });
  return { version, metadata, tensors, alignment, dataOffset };
}

// ---- writing -----------------------------------------------------------------------------------

/** A tensor to write: shape outermost-first, raw bytes in `dtype`. */
export interface GgufWriteTensor {
  /** Tensor name. */
  readonly name: string;
  /** Storage type of `data`. */
  readonly dtype: DType;
  /** Shape outermost-first (written reversed, as GGUF's `ne`). */
  readonly shape: readonly number[];
  /** Raw bytes: exactly {@linkcode tensorBytes}(dtype, elements). */
  readonly data: Uint8Array;
}

/** What {@linkcode writeGguf} writes: ordered metadata and tensors. */
export interface GgufWriteInput {
  /** Metadata entries, written in this order. */
  readonly metadata: readonly (readonly [string, GgufValue])[];
  /** Tensors, written (infos and data) in this order. */
  readonly tensors: readonly GgufWriteTensor[];
}

/** A growable little-endian byte buffer. */
class ByteWriter {
  buf = new Uint8Array(1 << 16);
  view = new DataView(this.buf.buffer);
  pos = 0;
  readonly encoder = new TextEncoder();

  ensure(n: number): void {
    if (this.pos + n <= this.buf.byteLength) return;
    let size = this.buf.byteLength * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u32(v: number): void {
    this.ensure(4);
    this.view.setUint32(this.pos, v, true);
    this.pos += 4;
  }

  u64(v: number | bigint): void {
    this.ensure(8);
    this.view.setBigUint64(this.pos, BigInt(v), true);
    this.pos += 8;
  }

  string(s: string): void {
    const b = this.encoder.encode(s);
    this.u64(b.byteLength);
    this.ensure(b.byteLength);
    this.buf.set(b, this.pos);
    this.pos += b.byteLength;
  }

  scalar(t: Exclude<GgufValueType, "array">, v: unknown, key: string): void {
    const bad = (): never => {
      throw new RangeError(`GGUF metadata "${key}": ${String(v)} is not a valid ${t} value`);
    };
    if (t === "string") return typeof v === "string" ? this.string(v) : bad();
    if (t === "bool") {
      if (typeof v !== "boolean") bad();
      this.ensure(1);
      this.buf[this.pos++] = v ? 1 : 0;
      return;
    }
    const n = MIN_BYTES[t];
    this.ensure(n);
    const p = this.pos, w = this.view;
    if (t === "u64" || t === "i64") {
      if (typeof v !== "bigint") return bad();
      if (t === "u64" ? v < 0n || v >= 1n << 64n : v < -(1n << 63n) || v >= 1n << 63n) bad();
      if (t === "u64") w.setBigUint64(p, v, true);
      else w.setBigInt64(p, v, true);
    } else {
      if (typeof v !== "number") return bad();
      if (t === "f32") w.setFloat32(p, v, true);
      else if (t === "f64") w.setFloat64(p, v, true);
      else {
        const bits = t === "u8" || t === "i8" ? 8 : t === "u16" || t === "i16" ? 16 : 32;
        const signed = t[0] === "i";
        const lo = signed ? -(2 ** (bits - 1)) : 0, hi = signed ? 2 ** (bits - 1) : 2 ** bits;
        if (!Number.isInteger(v) || v < lo || v >= hi) bad();
        if (t === "u8") w.setUint8(p, v);
        else if (t === "i8") w.setInt8(p, v);
        else if (t === "u16") w.setUint16(p, v, true);
        else if (t === "i16") w.setInt16(p, v, true);
        else if (t === "u32") w.setUint32(p, v, true);
        else w.setInt32(p, v, true);
      }
    }
    this.pos += n;
  }

  value(v: GgufValue, key: string): void {
    if (v.type !== "array") return this.scalar(v.type, v.value, key);
    const typeId = VALUE_TYPES.indexOf(v.itemType);
    if (typeId < 0) throw new RangeError(`GGUF metadata "${key}": unknown item type ${v.itemType}`);
    this.u32(typeId);
    this.u64(v.value.length);
    for (const item of v.value) {
      if (v.itemType === "array") this.value(item as GgufArray, key);
      else this.scalar(v.itemType, item, key);
    }
  }

  pad(alignment: number): void {
    const n = (alignment - (this.pos % alignment)) % alignment;
    this.ensure(n);
    this.buf.fill(0, this.pos, this.pos + n);
    this.pos += n;
  }
}

/**
 * Serializes metadata and tensors as a GGUF v3 file. Each tensor's data starts at a multiple of
 * `alignment` and is zero-padded to one; if `alignment` is not 32 and the metadata has no
 * `general.alignment`, that key is added (u32). Throws a `RangeError` for a value outside its
 * type's range, a mismatched `general.alignment`, a duplicate name, a shape that is not 1 to 4
 * positive dimensions with a whole number of blocks per row, or data of the wrong length.
 *
 * @example
 * ```ts
 * import { writeGguf } from "./gguf.ts";
 * const bytes = writeGguf({
 *   metadata: [["general.architecture", { type: "string", value: "llama" }]],
 *   tensors: [{ name: "w", dtype: "f32", shape: [2, 2], data: new Uint8Array(16) }],
 * });
 * console.log(bytes.byteLength % 32); // 0
 * ```
 */
export function writeGguf(file: GgufWriteInput, alignment = DEFAULT_ALIGNMENT): Uint8Array {
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new RangeError(`writeGguf: alignment ${alignment} is not a power of two`);
  }
  const metadata = [...file.metadata];
  const keys = new Set<string>();
  for (const [key, v] of metadata) {
    if (keys.has(key)) throw new RangeError(`writeGguf: metadata key "${key}" appears twice`);
    keys.add(key);
    if (key === "general.alignment" && Number(v.value) !== alignment) {
      throw new RangeError(
        `writeGguf: metadata general.alignment = ${String(v.value)} but alignment is ${alignment}`,
      );
    }
  }
  if (!keys.has("general.alignment") && alignment !== DEFAULT_ALIGNMENT) {
    metadata.unshift(["general.alignment", { type: "u32", value: alignment }]);
  }

  const names = new Set<string>();
  const sizes = file.tensors.map((t) => {
    const what = `writeGguf: tensor "${t.name}"`;
    if (names.has(t.name)) throw new RangeError(`${what} appears twice`);
    names.add(t.name);
    if (!(t.dtype in GGML_TYPE_IDS)) throw new RangeError(`${what}: unknown dtype ${t.dtype}`);
    if (
      t.shape.length < 1 || t.shape.length > MAX_DIMS ||
      t.shape.some((d) => !Number.isSafeInteger(d) || d <= 0)
    ) {
      throw new RangeError(`${what}: shape [${t.shape}] must be 1 to 4 positive integers`);
    }
    const inner = t.shape[t.shape.length - 1], block = BLOCK_INFO[t.dtype].blockSize;
    if (inner % block !== 0) {
      throw new RangeError(`${what}: row length ${inner} is not a multiple of the block ${block}`);
    }
    const size = tensorBytes(t.dtype, t.shape.reduce((a, b) => a * b, 1));
    if (t.data.byteLength !== size) {
      throw new RangeError(
        `${what}: ${t.dtype} [${t.shape}] needs ${size} bytes, got ${t.data.byteLength}`,
      );
    }
    return size;
  });

  const w = new ByteWriter();
  w.u32(GGUF_MAGIC);
  w.u32(3);
  w.u64(file.tensors.length);
  w.u64(metadata.length);
  for (const [key, v] of metadata) {
    w.string(key);
    w.u32(VALUE_TYPES.indexOf(v.type));
    w.value(v, key);
  }
  let offset = 0;
  file.tensors.forEach((t, i) => {
    w.string(t.name);
    w.u32(t.shape.length);
    for (let d = t.shape.length - 1; d >= 0; d--) w.u64(t.shape[d]);
    w.u32(GGML_TYPE_IDS[t.dtype]);
    w.u64(offset);
    offset += Math.ceil(sizes[i] / alignment) * alignment;
  });
  if (file.tensors.length > 0) w.pad(alignment);
  w.ensure(offset);
  file.tensors.forEach((t, i) => {
    w.buf.set(t.data, w.pos);
    w.pos += sizes[i];
    w.pad(alignment);
  });
  return w.buf.slice(0, w.pos);
}

// ---- RoPE row permutation ----------------------------------------------------------------------

/** Moves whole rows of `tensor`: output row r is input row `src(r)` within each head. */
function permuteRows(
  tensor: HostTensor,
  nHeads: number,
  src: (i: number, half: number) => number,
): HostTensor {
  const rows = tensor.shape[0];
  if (!Number.isInteger(nHeads) || nHeads <= 0 || rows % nHeads !== 0 || (rows / nHeads) % 2) {
    throw new RangeError(
      `permuteRopeRows: tensor "${tensor.name}" has ${rows} rows, not ${nHeads} heads of an ` +
        `even size`,
    );
  }
  const rowElems = tensor.shape.slice(1).reduce((a, b) => a * b, 1);
  const rowBytes = tensorBytes(tensor.dtype, rowElems);
  const headDim = rows / nHeads, half = headDim / 2;
  const out = new Uint8Array(rows * rowBytes);
  for (let h = 0; h < nHeads; h++) {
    for (let i = 0; i < headDim; i++) {
      const from = (h * headDim + src(i, half)) * rowBytes;
      out.set(tensor.data.subarray(from, from + rowBytes), (h * headDim + i) * rowBytes);
    }
  }
  return { ...tensor, data: out };
}

/**
 * Permutes the rows of a Q or K projection (weight `[nHeads * headDim, in]` or bias
 * `[nHeads * headDim]`) from the rotate-half RoPE layout (pairs i, i + headDim/2: Hugging Face)
 * to the interleaved layout (pairs 2i, 2i+1: GGUF "llama", llama2.c), as llama.cpp's converter
 * does. Within each head, output row 2i + t is input row t * headDim/2 + i. Rows move whole, so
 * any dtype works. For K, pass the number of KV heads.
 *
 * @example
 * ```ts
 * import { permuteRopeRows } from "./gguf.ts";
 * const t = { name: "q", dtype: "f32" as const, shape: [4], data: new Uint8Array(new Float32Array([0, 1, 2, 3]).buffer) };
 * console.log([...new Float32Array(permuteRopeRows(t, 1).data.buffer)]); // [0, 2, 1, 3]
 * ```
 */
export function permuteRopeRows(tensor: HostTensor, nHeads: number): HostTensor {
  return permuteRows(tensor, nHeads, (i, half) => (i % 2) * half + (i >> 1));
}

/**
 * The inverse of {@linkcode permuteRopeRows}: interleaved RoPE rows (GGUF "llama") back to the
 * rotate-half layout (Hugging Face). Within each head, output row t * headDim/2 + i is input
 * row 2i + t.
 *
 * @example
 * ```ts
 * import { permuteRopeRows, unpermuteRopeRows } from "./gguf.ts";
 * const t = { name: "k", dtype: "f32" as const, shape: [4], data: new Uint8Array(new Float32Array([0, 1, 2, 3]).buffer) };
 * console.log([...new Float32Array(unpermuteRopeRows(permuteRopeRows(t, 1), 1).data.buffer)]); // [0, 1, 2, 3]
 * ```
 */
export function unpermuteRopeRows(tensor: HostTensor, nHeads: number): HostTensor {
  return permuteRows(tensor, nHeads, (i, half) => 2 * (i % half) + Math.floor(i / half));
}

// ---- GGUF <-> ModelConfig ----------------------------------------------------------------------

/** The RoPE layout llama.cpp uses for each supported architecture. */
const ARCH_ROPE: Readonly<Record<"llama" | "qwen2", ModelConfig["ropeLayout"]>> = {
  llama: "interleaved",
  qwen2: "rotate-half",
};

/**
 * The shortest decimal that rounds to the same f32 as `x` (so an f32 1e-5 reads back as 1e-5,
 * not 9.99999974e-6).
 */
function f32Decimal(x: number): number {
  if (!Number.isFinite(x) || Math.fround(x) !== x) return x;
  for (let p = 1; p <= 9; p++) {
    const d = Number(x.toPrecision(p));
    if (Math.fround(d) === x) return d;
  }
  return x;
}

/** Reads metadata `key` as a number (any numeric type); undefined when absent. */
function metaNumber(gguf: GgufFile, key: string, file: string): number | undefined {
  const v = gguf.metadata.get(key);
  if (v === undefined) return undefined;
  if (v.type === "array" || v.type === "string" || v.type === "bool") {
    throw new FormatError(file, `metadata "${key}" is a ${v.type}, expected a number`);
  }
  if (typeof v.value === "bigint") {
    if (v.value > BigInt(Number.MAX_SAFE_INTEGER) || v.value < -BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new FormatError(file, `metadata "${key}" = ${v.value} is out of range`);
    }
    return Number(v.value);
  }
  return v.type === "f32" ? f32Decimal(v.value) : v.value;
}

/** Reads a required positive integer from the metadata. */
function metaCount(gguf: GgufFile, key: string, file: string, fallback?: number): number {
  const v = metaNumber(gguf, key, file) ?? fallback;
  if (v === undefined) throw new FormatError(file, `metadata key "${key}" is missing`);
  if (!Number.isSafeInteger(v) || v <= 0) {
    throw new FormatError(file, `metadata "${key}" = ${v} is not a positive integer`);
  }
  return v;
}

/** Reads a required positive number from the metadata. */
function metaPositive(gguf: GgufFile, key: string, file: string, fallback?: number): number {
  const v = metaNumber(gguf, key, file) ?? fallback;
  if (v === undefined) throw new FormatError(file, `metadata key "${key}" is missing`);
  if (!(v > 0) || !Number.isFinite(v)) {
    throw new FormatError(file, `metadata "${key}" = ${v} is not a positive number`);
  }
  return v;
}

/** Reads an optional token id (a non-negative integer). */
function metaTokenId(gguf: GgufFile, key: string, file: string): number | undefined {
  const v = metaNumber(gguf, key, file);
  if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) {
    throw new FormatError(file, `metadata "${key}" = ${v} is not a token id`);
  }
  return v;
}

/** The tensors a model with `config` must have, with their shapes (outermost-first). */
function expectedShapes(config: ModelConfig): Map<string, number[]> {
  const { dim, headDim, nHeads, nKvHeads, ffnDim, vocabSize } = config;
  const m = new Map<string, number[]>([
    ["token_embd.weight", [vocabSize, dim]],
    ["output_norm.weight", [dim]],
  ]);
  if (!config.tiedEmbeddings) m.set("output.weight", [vocabSize, dim]);
  for (let l = 0; l < config.nLayers; l++) {
    const p = `blk.${l}.`;
    m.set(p + "attn_norm.weight", [dim]);
    m.set(p + "attn_q.weight", [nHeads * headDim, dim]);
    m.set(p + "attn_k.weight", [nKvHeads * headDim, dim]);
    m.set(p + "attn_v.weight", [nKvHeads * headDim, dim]);
    m.set(p + "attn_output.weight", [dim, nHeads * headDim]);
    m.set(p + "ffn_norm.weight", [dim]);
    m.set(p + "ffn_gate.weight", [ffnDim, dim]);
    m.set(p + "ffn_up.weight", [ffnDim, dim]);
    m.set(p + "ffn_down.weight", [dim, ffnDim]);
    if (config.qkvBias) {
      m.set(p + "attn_q.bias", [nHeads * headDim]);
      m.set(p + "attn_k.bias", [nKvHeads * headDim]);
      m.set(p + "attn_v.bias", [nKvHeads * headDim]);
    }
  }
  return m;
}

/**
 * Resolves a parsed GGUF of architecture "llama" or "qwen2" into a {@linkcode ModelConfig} and
 * canonical host tensors (views into the file). Keys read, for `arch` = general.architecture:
 * `{arch}.embedding_length`, `.block_count`, `.attention.head_count`, `.feed_forward_length`,
 * `.context_length`, `.attention.layer_norm_rms_epsilon` (required);
 * `.attention.head_count_kv` (default head_count), `.attention.key_length` (default
 * dim / heads), `.rope.dimension_count` (must equal the head size), `.rope.freq_base` (default
 * 10000), `.vocab_size`, `.attention.sliding_window` (caps the context, as for Hugging Face
 * configs), `.rope.scaling.original_context_length`; `tokenizer.ggml.tokens` (vocabulary size
 * when there is no embedding), `tokenizer.ggml.bos_token_id`, `eos_token_id` and
 * `eot_token_id`. A `rope_freqs.weight` tensor (Llama 3 scaling as per-frequency divisors) becomes
 * the config's `ropeScaling` (see {@linkcode llama3FromRopeFreqs}) and is not returned as a
 * tensor; `.rope.scaling.type` other than "none" is refused. RoPE layout: "interleaved"
 * for llama, "rotate-half" for qwen2 (as llama.cpp runs them). When the file has tensors, every
 * tensor the config implies must exist with the implied shape. f32 values read back as the
 * shortest decimal with the same f32 (1e-5, not 9.99999974e-6). Throws a
 * {@linkcode FormatError} naming the file and the missing or bad key or tensor.
 *
 * @example
 * ```ts ignore
 * import { ggufToModel, readGguf } from "./gguf.ts";
 * const bytes = await Deno.readFile("model.gguf");
 * const { config, tensors } = ggufToModel(readGguf(bytes, "model.gguf"), "model.gguf");
 * ```
 */
export function ggufToModel(
  gguf: GgufFile,
  fileName: string,
): { config: ModelConfig; tensors: Map<string, HostTensor> } {
  const archValue = gguf.metadata.get("general.architecture");
  if (archValue === undefined) {
    throw new FormatError(fileName, `metadata key "general.architecture" is missing`);
  }
  if (archValue.type !== "string" || (archValue.value !== "llama" && archValue.value !== "qwen2")) {
    throw new FormatError(
      fileName,
      `general.architecture is ${JSON.stringify(archValue.value)}; supported: "llama", "qwen2"`,
    );
  }
  const arch = archValue.value;
  const tensors = new Map<string, HostTensor>();
  for (const t of gguf.tensors) {
    tensors.set(t.name, { name: t.name, dtype: t.dtype, shape: t.shape, data: t.data });
  }
  const k = (s: string) => `${arch}.${s}`;
  const scalingType = gguf.metadata.get(k("rope.scaling.type"));
  if (scalingType !== undefined && scalingType.value !== "none") {
    throw new FormatError(
      fileName,
      `${k("rope.scaling.type")} = ${JSON.stringify(scalingType.value)} is not supported ` +
        `(only Llama 3's scaling, stored as the rope_freqs.weight tensor)`,
    );
  }
  // Llama 3 scaling travels as per-frequency divisors (the tensor rope_freqs.weight); it is a
  // property of the config, not a weight.
  const ropeFreqs = tensors.get("rope_freqs.weight");
  tensors.delete("rope_freqs.weight");
  const dim = metaCount(gguf, k("embedding_length"), fileName);
  const nHeads = metaCount(gguf, k("attention.head_count"), fileName);
  const nKvHeads = metaCount(gguf, k("attention.head_count_kv"), fileName, nHeads);
  if (nHeads % nKvHeads !== 0) {
    throw new FormatError(
      fileName,
      `${k("attention.head_count")} = ${nHeads} is not a multiple of head_count_kv = ${nKvHeads}`,
    );
  }
  const defaultHead = dim % nHeads === 0 ? dim / nHeads : undefined;
  const headDim = metaCount(gguf, k("attention.key_length"), fileName, defaultHead);
  const valueLength = metaNumber(gguf, k("attention.value_length"), fileName);
  if (valueLength !== undefined && valueLength !== headDim) {
    throw new FormatError(
      fileName,
      `${k("attention.value_length")} = ${valueLength} differs from key_length ${headDim}`,
    );
  }
  const ropeDims = metaNumber(gguf, k("rope.dimension_count"), fileName);
  if (ropeDims !== undefined && ropeDims !== headDim) {
    throw new FormatError(
      fileName,
      `${k("rope.dimension_count")} = ${ropeDims} but the head size is ${headDim} ` +
        `(partial rotary embeddings are not supported)`,
    );
  }
  const embd = tensors.get("token_embd.weight");
  const tokens = gguf.metadata.get("tokenizer.ggml.tokens");
  const vocabSize = embd?.shape[0] ??
    (tokens?.type === "array" ? tokens.value.length : undefined) ??
    metaNumber(gguf, k("vocab_size"), fileName);
  if (vocabSize === undefined || vocabSize <= 0) {
    throw new FormatError(
      fileName,
      `cannot tell the vocabulary size: no token_embd.weight tensor, no tokenizer.ggml.tokens ` +
        `and no ${k("vocab_size")}`,
    );
  }
  const eosIds: number[] = [];
  for (const key of ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]) {
    const id = metaTokenId(gguf, key, fileName);
    if (id !== undefined && !eosIds.includes(id)) eosIds.push(id);
  }
  const bosId = metaTokenId(gguf, "tokenizer.ggml.bos_token_id", fileName);
  const ropeTheta = metaPositive(gguf, k("rope.freq_base"), fileName, 10000);
  const ropeScaling = ropeFreqs === undefined ? undefined : llama3FromRopeFreqs(
    ropeFreqs,
    headDim,
    ropeTheta,
    metaNumber(gguf, k("rope.scaling.original_context_length"), fileName),
    fileName,
  );
  const window = metaNumber(gguf, k("attention.sliding_window"), fileName);
  const slidingWindow = window === undefined
    ? undefined
    : metaCount(gguf, k("attention.sliding_window"), fileName);
  const config: ModelConfig = {
    architecture: arch,
    dim,
    nLayers: metaCount(gguf, k("block_count"), fileName),
    nHeads,
    nKvHeads,
    headDim,
    ffnDim: metaCount(gguf, k("feed_forward_length"), fileName),
    vocabSize,
    maxSeqLen: Math.min(metaCount(gguf, k("context_length"), fileName), slidingWindow ?? Infinity),
    ...(slidingWindow !== undefined ? { slidingWindow } : {}),
    normEps: metaPositive(gguf, k("attention.layer_norm_rms_epsilon"), fileName),
    ropeTheta,
    ropeLayout: ARCH_ROPE[arch],
    ...(ropeScaling ? { ropeScaling } : {}),
    tiedEmbeddings: gguf.tensors.length > 0 ? !tensors.has("output.weight") : true,
    qkvBias: arch === "qwen2" || tensors.has("blk.0.attn_q.bias"),
    ...(bosId !== undefined ? { bosId } : {}),
    eosIds,
  };
  if (gguf.tensors.length > 0) {
    for (const [name, shape] of expectedShapes(config)) {
      const t = tensors.get(name);
      if (t === undefined) throw new FormatError(fileName, `tensor "${name}" is missing`);
      if (t.shape.join() !== shape.join()) {
        throw new FormatError(
          fileName,
          `tensor "${name}" has shape [${t.shape}], expected [${shape}] from the metadata`,
        );
      }
    }
  }
  return { config, tensors };
}

/**
 * Llama 3 RoPE scaling as llama.cpp stores it: one divisor per frequency pair (the
 * `rope_freqs.weight` tensor), computed as llama.cpp's converter does: 1 for wavelengths below
 * `orig / highFreqFactor`, `factor` above `orig / lowFreqFactor`, and
 * `1 / ((1 - smooth) / factor + smooth)` in between (see `ropeInvFreq` in kernels/rope.ts).
 *
 * @example
 * ```ts
 * import { llama3RopeFreqs } from "./gguf.ts";
 * const s = { type: "llama3" as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 };
 * console.log(llama3RopeFreqs(128, 500000, s).length); // 64
 * ```
 */
export function llama3RopeFreqs(headDim: number, theta: number, s: RopeScaling): Float32Array {
  const base = ropeInvFreq(headDim, theta);
  const orig = s.originalMaxPositionEmbeddings;
  return base.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < orig / s.highFreqFactor) return 1;
    if (wavelen > orig / s.lowFreqFactor) return s.factor;
    const smooth = (orig / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return 1 / ((1 - smooth) / s.factor + smooth);
  });
}

/**
 * The Llama 3 RoPE scaling whose divisors are `tensor` (`rope_freqs.weight`, f32
 * `[headDim / 2]`), or undefined when every divisor is 1. The rule depends on `orig` only through
 * `lowFreqFactor / orig` and `highFreqFactor / orig`, so `orig` (the file's
 * `rope.scaling.original_context_length`, else Llama 3.1's 8192) fixes one of the equivalent
 * parameter sets; the simplest decimals that reproduce every divisor to f32 precision are
 * returned. Divisors that follow no such rule (other per-frequency schemes) throw a
 * {@linkcode FormatError} naming `fileName`.
 *
 * @example
 * ```ts
 * import { llama3FromRopeFreqs, llama3RopeFreqs } from "./gguf.ts";
 * const s = { type: "llama3" as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 };
 * const f = llama3RopeFreqs(128, 500000, s);
 * const t = { name: "rope_freqs.weight", dtype: "f32" as const, shape: [64], data: new Uint8Array(f.buffer) };
 * console.log(llama3FromRopeFreqs(t, 128, 500000, 8192, "m.gguf")); // the same parameters
 * ```
 */
export function llama3FromRopeFreqs(
  tensor: HostTensor,
  headDim: number,
  theta: number,
  orig: number | undefined,
  fileName: string,
): RopeScaling | undefined {
  const half = headDim / 2;
  const what = `tensor "rope_freqs.weight"`;
  if (tensor.dtype !== "f32" || tensor.shape.length !== 1 || tensor.shape[0] !== half) {
    throw new FormatError(
      fileName,
      `${what} is ${tensor.dtype}[${tensor.shape}], expected f32[${half}] (head size ${headDim})`,
    );
  }
  const f = new Float32Array(tensor.data.slice().buffer);
  if (f.every((x) => x === 1)) return undefined;
  const unsupported = () =>
    new FormatError(
      fileName,
      `${what} does not follow Llama 3's RoPE frequency scaling (the only per-frequency ` +
        `factors supported)`,
    );
  const F = Math.max(...f);
  if (!(F > 1) || f.some((x) => !Number.isFinite(x) || x < 1 - 1e-6)) throw unsupported();
  // With u = 1 / wavelength, the rule is s(u) = clamp((u - u0) / (u1 - u0), 0, 1) and
  // 1 / divisor = (1 - s) / F + s, where u0 = lowFreqFactor / orig, u1 = highFreqFactor / orig.
  const base = ropeInvFreq(headDim, theta);
  const u = Array.from(base, (b) => b / (2 * Math.PI));
  const s = Array.from(f, (x) => (1 / x - 1 / F) / (1 - 1 / F));
  const eps = 1e-6;
  const scaled = u.filter((_, i) => s[i] <= eps);
  const kept = u.filter((_, i) => s[i] >= 1 - eps);
  const mid = u.flatMap((ui, i) => (s[i] > eps && s[i] < 1 - eps ? [[ui, s[i]]] : []));
  const a = Math.max(...scaled); // below u0
  const b = kept.length > 0 ? Math.min(...kept) : Infinity; // above u1
  let u0: number, u1: number;
  if (mid.length >= 2) {
    const [[up, sp], [uq, sq]] = [mid[0], mid[mid.length - 1]];
    const slope = (sp - sq) / (up - uq);
    u0 = up - sp / slope;
    u1 = u0 + 1 / slope;
  } else if (mid.length === 1) {
    const [[um, sm]] = mid;
    const width = 0.5 * Math.min((um - a) / sm, (b - um) / (1 - sm));
    u0 = um - sm * width;
    u1 = u0 + width;
  } else {
    u0 = b === Infinity ? 1.5 * a : a + (b - a) / 3;
    u1 = b === Infinity ? 3 * a : a + (2 * (b - a)) / 3;
  }
  const L = orig ?? 8192;
  const fits = (c: RopeScaling) => {
    if (!(c.highFreqFactor > c.lowFreqFactor && c.lowFreqFactor > 0)) return false;
    const g = llama3RopeFreqs(headDim, theta, c);
    return g.every((x, i) => Math.abs(x - f[i]) <= 2e-6 * f[i]);
  };
  const round = (x: number, p: number) => (p === 0 ? x : Number(x.toPrecision(p)));
  for (const p of [1, 2, 3, 4, 5, 6, 7, 8, 0]) {
    const c: RopeScaling = {
      type: "llama3",
      factor: f32Decimal(F),
      lowFreqFactor: round(u0 * L, p),
      highFreqFactor: round(u1 * L, p),
      originalMaxPositionEmbeddings: L,
    };
    if (fits(c)) return c;
  }
  throw unsupported();
}

/** Tokenizer data written as llama.cpp's `tokenizer.ggml.*` keys. */
export interface GgufTokenizerData {
  /** `tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (byte-level BPE), ... */
  readonly model: string;
  /** `tokenizer.ggml.pre`: the pre-tokenizer name (BPE), e.g. "llama-bpe". */
  readonly pre?: string;
  /** `tokenizer.ggml.tokens`: the piece of every id. */
  readonly tokens: readonly string[];
  /** `tokenizer.ggml.scores` (SentencePiece). */
  readonly scores?: readonly number[];
  /** `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte). */
  readonly tokenTypes?: readonly number[];
  /** `tokenizer.ggml.merges` (BPE), "a b" per merge. */
  readonly merges?: readonly string[];
  /** `tokenizer.ggml.unknown_token_id`. */
  readonly unknownId?: number;
  /** `tokenizer.ggml.add_space_prefix` (SentencePiece's add_dummy_prefix; readers default true). */
  readonly addSpacePrefix?: boolean;
  /** `tokenizer.ggml.remove_extra_whitespaces` (SentencePiece; readers default false). */
  readonly removeExtraWhitespaces?: boolean;
}

/** Options for {@linkcode modelToGguf}. */
export interface ModelToGgufOptions {
  /** `general.name`; default "specdec". */
  readonly name?: string;
  /** Tokenizer data to embed. */
  readonly tokenizer?: GgufTokenizerData;
  /** Data alignment; default 32. */
  readonly alignment?: number;
}

/**
 * Writes a model as a llama.cpp-compatible GGUF v3: `general.architecture` ("llama" for llama
 * and mistral, "qwen2"), `general.name`, `general.alignment`, the `{arch}.*` hyperparameters
 * read by {@linkcode ggufToModel}, bos/eos ids (`eosIds[0]` as eos, `eosIds[1]` as eot; more are
 * not representable), optional tokenizer keys, and every tensor in map order in its own dtype.
 * Q/K rows (and biases) are permuted to the architecture's RoPE layout (interleaved for llama,
 * rotate-half for qwen2), so the written file's layout is always the one llama.cpp expects.
 * Whole rows move, so block-quantized Q/K weights (any dtype whose rows hold whole blocks) are
 * permuted without being dequantized. Llama 3 RoPE scaling is written as llama.cpp's converter
 * writes it, a `rope_freqs.weight` f32 tensor of per-frequency divisors (see
 * {@linkcode llama3RopeFreqs}), plus `.rope.scaling.original_context_length`; a sliding window as
 * `.attention.sliding_window` (and the capped context as `.context_length`). Throws a
 * `RangeError` for what GGUF metadata cannot express (more than two EOS ids).
 *
 * @example
 * ```ts ignore
 * import { modelToGguf } from "./gguf.ts";
 * await Deno.writeFile("model.gguf", modelToGguf(config, tensors, { name: "stories260K" }));
 * ```
 */
export function modelToGguf(
  config: ModelConfig,
  tensors: ReadonlyMap<string, HostTensor>,
  options: ModelToGgufOptions = {},
): Uint8Array {
  if (config.eosIds.length > 2) {
    throw new RangeError(`modelToGguf: ${config.eosIds.length} EOS ids; GGUF holds eos and eot`);
  }
  const arch = config.architecture === "qwen2" ? "qwen2" : "llama";
  const alignment = options.alignment ?? DEFAULT_ALIGNMENT;
  const u32 = (value: number): GgufValue => ({ type: "u32", value });
  const f32v = (value: number): GgufValue => ({ type: "f32", value });
  const meta: [string, GgufValue][] = [
    ["general.architecture", { type: "string", value: arch }],
    ["general.name", { type: "string", value: options.name ?? "specdec" }],
    ["general.alignment", u32(alignment)],
    [`${arch}.vocab_size`, u32(config.vocabSize)],
    [`${arch}.context_length`, u32(config.maxSeqLen)],
    [`${arch}.embedding_length`, u32(config.dim)],
    [`${arch}.block_count`, u32(config.nLayers)],
    [`${arch}.feed_forward_length`, u32(config.ffnDim)],
    [`${arch}.attention.head_count`, u32(config.nHeads)],
    [`${arch}.attention.head_count_kv`, u32(config.nKvHeads)],
    [`${arch}.attention.layer_norm_rms_epsilon`, f32v(config.normEps)],
    [`${arch}.rope.freq_base`, f32v(config.ropeTheta)],
    [`${arch}.rope.dimension_count`, u32(config.headDim)],
  ];
  if (config.headDim * config.nHeads !== config.dim) {
    meta.push([`${arch}.attention.key_length`, u32(config.headDim)]);
    meta.push([`${arch}.attention.value_length`, u32(config.headDim)]);
  }
  if (config.slidingWindow !== undefined) {
    meta.push([`${arch}.attention.sliding_window`, u32(config.slidingWindow)]);
  }
  if (config.ropeScaling) {
    meta.push([
      `${arch}.rope.scaling.original_context_length`,
      u32(config.ropeScaling.originalMaxPositionEmbeddings),
    ]);
  }
  const tok = options.tokenizer;
  if (tok) {
    meta.push(["tokenizer.ggml.model", { type: "string", value: tok.model }]);
    if (tok.pre !== undefined) {
      meta.push(["tokenizer.ggml.pre", { type: "string", value: tok.pre }]);
    }
    meta.push([
      "tokenizer.ggml.tokens",
      { type: "array", itemType: "string", value: [...tok.tokens] },
    ]);
    if (tok.scores) {
      meta.push([
        "tokenizer.ggml.scores",
        { type: "array", itemType: "f32", value: [...tok.scores] },
      ]);
    }
    if (tok.tokenTypes) {
      meta.push([
        "tokenizer.ggml.token_type",
        { type: "array", itemType: "i32", value: [...tok.tokenTypes] },
      ]);
    }
    if (tok.merges) {
      meta.push([
        "tokenizer.ggml.merges",
        { type: "array", itemType: "string", value: [...tok.merges] },
      ]);
    }
    if (tok.unknownId !== undefined) {
      meta.push(["tokenizer.ggml.unknown_token_id", u32(tok.unknownId)]);
    }
    if (tok.addSpacePrefix !== undefined) {
      meta.push(["tokenizer.ggml.add_space_prefix", { type: "bool", value: tok.addSpacePrefix }]);
    }
    if (tok.removeExtraWhitespaces !== undefined) {
      meta.push([
        "tokenizer.ggml.remove_extra_whitespaces",
        { type: "bool", value: tok.removeExtraWhitespaces },
      ]);
    }
  }
  if (config.bosId !== undefined) meta.push(["tokenizer.ggml.bos_token_id", u32(config.bosId)]);
  if (config.eosIds.length > 0) meta.push(["tokenizer.ggml.eos_token_id", u32(config.eosIds[0])]);
  if (config.eosIds.length > 1) meta.push(["tokenizer.ggml.eot_token_id", u32(config.eosIds[1])]);

  const target = ARCH_ROPE[arch];
  const out: GgufWriteTensor[] = [];
  if (config.ropeScaling) {
    const factors = llama3RopeFreqs(config.headDim, config.ropeTheta, config.ropeScaling);
    out.push({
      name: "rope_freqs.weight",
      dtype: "f32",
      shape: [factors.length],
      data: new Uint8Array(factors.buffer),
    });
  }
  for (const t of tensors.values()) {
    let w = t;
    const m = /^blk\.\d+\.attn_([qk])\.(weight|bias)$/.exec(t.name);
    if (m && config.ropeLayout !== target) {
      const heads = m[1] === "q" ? config.nHeads : config.nKvHeads;
      w = target === "interleaved" ? permuteRopeRows(t, heads) : unpermuteRopeRows(t, heads);
    }
    out.push({ name: w.name, dtype: w.dtype, shape: w.shape, data: w.data });
  }
  return writeGguf({ metadata: meta, tensors: out }, alignment);
}
