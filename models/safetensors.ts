/**
 * A validating reader for the safetensors format: an 8-byte little-endian header length `n`, `n`
 * bytes of JSON (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`),
 * then the data section; offsets are relative to the data section. Every size and offset is
 * checked against the file before anything is used; tensor data are views into `bytes`.
 *
 * @module
 */
import { FormatError } from "./types.ts";

/** The floating-point dtypes this project loads from safetensors. */
export type SafetensorsDType = "f32" | "f16" | "bf16";

/** One tensor of a safetensors file: `data` is a view into the file's bytes (no copy). */
export interface SafetensorsTensor {
  /** Element type. */
  readonly dtype: SafetensorsDType;
  /** Outermost-first, as stored (a linear weight is `[out, in]`). */
  readonly shape: number[];
  /** The raw little-endian bytes, a view into the file. */
  readonly data: Uint8Array;
}

/** A parsed safetensors file. */
export interface SafetensorsFile {
  /** Tensors with a supported dtype, by stored name. */
  readonly tensors: Map<string, SafetensorsTensor>;
  /** Tensors whose (valid) dtype this project does not load, e.g. I64 or F8_E4M3: name → dtype. */
  readonly unsupported: Map<string, string>;
  /** The `__metadata__` string map (empty when absent). */
  readonly metadata: Record<string, string>;
}

/** Largest JSON header accepted (the format's own readers use the same bound). */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const SUPPORTED: Record<string, SafetensorsDType> = { F32: "f32", F16: "f16", BF16: "bf16" };

/** Item sizes of every dtype the format defines, so unsupported tensors are size-checked too. */
const ITEM_SIZE: Record<string, number> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * Parses a safetensors file held in memory. Throws a {@linkcode FormatError} naming `fileName`
 * and the offending field for any truncation or inconsistency.
 *
 * @example
 * ```ts
 * import { readSafetensors } from "./safetensors.ts";
 * const header = new TextEncoder().encode('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}');
 * const bytes = new Uint8Array(8 + header.length + 4);
 * new DataView(bytes.buffer).setBigUint64(0, BigInt(header.length), true);
 * bytes.set(header, 8);
 * console.log(readSafetensors(bytes, "x.safetensors").tensors.get("x")?.shape); // [1]
 * ```
 */
export function readSafetensors(bytes: Uint8Array, fileName: string): SafetensorsFile {
  function fail(msg: string): never {
    throw new FormatError(fileName, msg);
  }
  if (bytes.byteLength < 8) {
    fail(`${bytes.byteLength} bytes is too short for the 8-byte header length (truncated file?)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = view.getBigUint64(0, true);
  if (headerLen > BigInt(bytes.byteLength - 8)) {
    fail(
      `header length ${headerLen} exceeds the ${bytes.byteLength - 8} bytes after it ` +
        `(truncated download, or not a safetensors file?)`,
    );
  }
  if (headerLen > BigInt(MAX_HEADER_BYTES)) {
    fail(`header length ${headerLen} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  }
  const n = Number(headerLen);
  let header: unknown;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + n));
    header = JSON.parse(text);
  } catch (e) {
    fail(`header (bytes 8..${8 + n}) is not valid UTF-8 JSON: ${(e as Error).message}`);
  }
  if (!isRecord(header)) fail("header JSON is not an object");
  const entries = header as Record<string, unknown>;
  const data = bytes.subarray(8 + n);
  const tensors = new Map<string, SafetensorsTensor>();
  const unsupported = new Map<string, string>();
  const metadata: Record<string, string> = {};

  for (const [name, info] of Object.entries(entries)) {
    if (name === "__metadata__") {
      if (!isRecord(info)) fail(`"__metadata__" is not an object`);
      for (const [k, v] of Object.entries(info as Record<string, unknown>)) {
        if (typeof v !== "string") fail(`"__metadata__"."${k}" is not a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    const where = `tensor "${name}"`;
    if (!isRecord(info)) fail(`${where}: entry is not an object`);
    const { dtype, shape, data_offsets: offsets } = info as Record<string, unknown>;
    if (typeof dtype !== "string") fail(`${where}: "dtype" is missing or not a string`);
    const itemSize = ITEM_SIZE[dtype as string];
    if (itemSize === undefined) fail(`${where}: unknown dtype ${JSON.stringify(dtype)}`);
    if (!Array.isArray(shape)) fail(`${where}: "shape" is missing or not an array`);
    const dims = shape as unknown[];
    let count = 1;
    for (const d of dims) {
      if (typeof d !== "number" || !Number.isSafeInteger(d) || d < 0) {
        fail(`${where}: shape [${dims}] has an invalid dimension ${JSON.stringify(d)}`);
      }
      count *= d as number;
      // Larger than the data section already: stop before the product leaves the safe range.
      if (count * itemSize > data.byteLength) {
        fail(
          `${where}: shape [${dims}] needs more than the ${data.byteLength}-byte data section ` +
            `(truncated download?)`,
        );
      }
    }
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => typeof o === "number" && Number.isSafeInteger(o) && o >= 0)
    ) {
      fail(
        `${where}: "data_offsets" must be two non-negative integers, got ${
          JSON.stringify(offsets)
        }`,
      );
    }
    const [begin, end] = offsets as number[];
    if (begin > end) fail(`${where}: data_offsets [${begin}, ${end}] end before they begin`);
    if (end > data.byteLength) {
      fail(
        `${where}: ends at data byte ${end} but the data section has ${data.byteLength} ` +
          `(truncated download?)`,
      );
    }
    if (end - begin !== count * itemSize) {
      fail(
        `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes, but shape ` +
          `[${dims}] of ${dtype} needs ${count * itemSize}`,
      );
    }
    const ours = SUPPORTED[dtype as string];
    if (ours === undefined) {
      unsupported.set(name, dtype as string);
    } else {
      tensors.set(name, { dtype: ours, shape: dims as number[], data: data.subarray(begin, end) });
    }
  }
  return { tensors, unsupported, metadata };
}

/** One tensor to write with {@linkcode encodeSafetensors}: `dtype` uses the format's names. */
export interface SafetensorsEntry {
  /** Tensor name, e.g. "model.norm.weight". */
  readonly name: string;
  /** The format's dtype name: "F32", "F16", "BF16", "I64", ... */
  readonly dtype: string;
  /** Outermost-first shape. */
  readonly shape: readonly number[];
  /** Raw little-endian bytes: product(shape) × item size. */
  readonly data: Uint8Array;
}

/**
 * Serializes tensors (in the given order, packed back to back) and optional metadata into
 * safetensors bytes. Throws when a tensor's byte length does not match its shape and dtype.
 *
 * @example
 * ```ts
 * import { encodeSafetensors, readSafetensors } from "./safetensors.ts";
 * const bytes = encodeSafetensors([
 *   { name: "w", dtype: "F32", shape: [2], data: new Uint8Array(new Float32Array([1, 2]).buffer) },
 * ]);
 * console.log(readSafetensors(bytes, "w.safetensors").tensors.get("w")?.shape); // [2]
 * ```
 */
export function encodeSafetensors(
  entries: readonly SafetensorsEntry[],
  metadata?: Record<string, string>,
): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const e of entries) {
    const itemSize = ITEM_SIZE[e.dtype];
    if (itemSize === undefined) throw new Error(`encodeSafetensors: unknown dtype ${e.dtype}`);
    const size = e.shape.reduce((a, b) => a * b, 1) * itemSize;
    if (size !== e.data.byteLength) {
      throw new Error(
        `encodeSafetensors: tensor "${e.name}" has ${e.data.byteLength} bytes; ` +
          `shape [${e.shape}] of ${e.dtype} needs ${size}`,
      );
    }
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  // Pad the header with spaces so the data section starts 8-byte aligned, as writers do.
  const padded = Math.ceil((8 + json.length) / 8) * 8 - 8;
  if (padded !== json.length) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const e of entries) {
    out.set(e.data, at);
    at += e.data.byteLength;
  }
  return out;
}
