/**
 * The weight store: every model tensor on the GPU as a typed record (format, shape, buffer, bytes).
 * Draft and target share one store. A tensor's format (f32, f16, q8_0, q4_0, q4_k, q6_k, nf4) is
 * a property of the stored record, chosen per tensor by the quantization plan
 * (`engine/quant_plan.ts`); the model code never forks on it, the kernels decode it.
 *
 * Identical tensors are stored once: the key is the source tensor's bytes (SHA-256), dtype and
 * shape plus the stored format, so the same source asked for in the same format (a self-draft's
 * kept embedding, norms shared by two checkpoints) costs memory once, and the bytes a later owner
 * adds are only what it does not share.
 *
 * @module
 */
import type { Gpu } from "./gpu.ts";
import type { HostTensor } from "../models/types.ts";
import { tensorToF32 } from "../models/convert.ts";
import { dequantize } from "../models/quant.ts";
import {
  encodeWeights,
  halfWords,
  isGgufFormat,
  packGguf,
  weightBytes,
  type WeightFormat,
} from "../kernels/qformats.ts";
import { createFill } from "../kernels/fill.ts";

/** Formats a stored tensor can have on the GPU. */
export type StoredFormat = WeightFormat;

/** One tensor in GPU memory. */
export interface StoredTensor {
  /** Canonical name. */
  readonly name: string;
  /** Element format of the buffer (its layout is defined in `kernels/qformats.ts`). */
  readonly format: StoredFormat;
  /** Shape, outermost first (`[out, in]` for matrices). */
  readonly shape: readonly number[];
  /** The buffer holding exactly this tensor. */
  readonly buffer: GPUBuffer;
  /** Bytes of the buffer. */
  readonly bytes: number;
}

/** `[rows, cols]` of a tensor as the formats see it (a vector is one row). */
export function matrixShape(shape: readonly number[]): [number, number] {
  if (shape.length === 1) return [1, shape[0]];
  if (shape.length === 2) return [shape[0], shape[1]];
  throw new RangeError(`tensors of rank ${shape.length} are not supported (shape [${shape}])`);
}

/** Exact GPU bytes of a tensor of `shape` stored as `format` (what the store allocates). */
export function storedBytes(shape: readonly number[], format: StoredFormat): number {
  const [rows, cols] = matrixShape(shape);
  return weightBytes(format, rows, cols);
}

const digests = new WeakMap<Uint8Array, string>();

/**
 * The store's dedup key of `t` stored as `format`: format, shape, source dtype and the SHA-256 of
 * the source bytes (memoized per data array, so planning and uploading hash once).
 */
export async function tensorKey(t: HostTensor, format: StoredFormat): Promise<string> {
  let d = digests.get(t.data);
  if (d === undefined) {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", t.data.slice()));
    d = Array.from(digest, hex).join("");
    digests.set(t.data, d);
  }
  return `${format}:${t.shape.join("x")}:${t.dtype}:${d}`;
}

/** GPU-resident tensors of one or more models, deduplicated by content. */
export class WeightStore {
  readonly #gpu: Gpu;
  readonly #byKey = new Map<string, StoredTensor>();
  readonly #added = new Map<string, number>();
  readonly #used = new Map<string, number>();
  #uniqueBytes = 0;

  /** An empty store on `gpu`. */
  constructor(gpu: Gpu) {
    this.#gpu = gpu;
  }

  /** Bytes of GPU memory the store holds (each shared tensor counted once). */
  get bytes(): number {
    return this.#uniqueBytes;
  }

  /**
   * Bytes `owner` added to the store: the tensors it uploaded first. A tensor it shares with an
   * owner that came before is not counted again, so the owners' figures sum to {@linkcode bytes}.
   */
  bytesOf(owner: string): number {
    return this.#added.get(owner) ?? 0;
  }

  /** Bytes of every tensor `owner` uses, shared ones included. */
  usedBy(owner: string): number {
    return this.#used.get(owner) ?? 0;
  }

  /**
   * Uploads `t` for `owner` (e.g. "target") as `format`, labelled `owner.name`. GGUF tensors
   * already in `format` are repacked for the GPU as they are; anything else is converted to f32
   * values and encoded (quantized) into `format` on the host.
   */
  async add(owner: string, t: HostTensor, format: StoredFormat): Promise<StoredTensor> {
    const bytes = storedBytes(t.shape, format);
    const limit = this.#gpu.limits.maxStorageBufferBindingSize;
    if (bytes > limit) {
      throw new Error(
        `tensor "${t.name}" needs ${bytes} bytes as ${format}, more than this device can ` +
          `bind at once (maxStorageBufferBindingSize ${limit})`,
      );
    }
    const key = await tensorKey(t, format);
    let stored = this.#byKey.get(key);
    if (!stored) {
      const data = encodeTensor(t, format);
      const label = `${owner}.${t.name}`;
      const buffer = await this.#gpu.scoped(label, () => this.#gpu.upload(label, data));
      stored = { name: t.name, format, shape: t.shape, buffer, bytes: buffer.size };
      this.#byKey.set(key, stored);
      this.#uniqueBytes += buffer.size;
      this.#added.set(owner, (this.#added.get(owner) ?? 0) + buffer.size);
    }
    this.#used.set(owner, (this.#used.get(owner) ?? 0) + stored.bytes);
    return stored;
  }

  /**
   * Allocates `name` of `shape` in `format` (not f32) for `owner` and fills it with random values
   * on the GPU (`kernels/fill.ts`: finite f16 scales, random quants): a dummy-weights tensor for
   * benchmarks at real shapes. Never shared with another tensor.
   */
  async addRandom(
    owner: string,
    name: string,
    shape: readonly number[],
    format: Exclude<StoredFormat, "f32">,
    seed: number,
  ): Promise<StoredTensor> {
    const bytes = storedBytes(shape, format);
    const limit = this.#gpu.limits.maxStorageBufferBindingSize;
    if (bytes > limit) {
      throw new Error(
        `tensor "${name}" needs ${bytes} bytes as ${format}, more than this device can ` +
          `bind at once (maxStorageBufferBindingSize ${limit})`,
      );
    }
    const label = `${owner}.${name}`;
    const buffer = await this.#gpu.scoped(
      label,
      () => this.#gpu.buffer(label, bytes, GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC),
    );
    const [rows, cols] = matrixShape(shape);
    const fill = await createFill(this.#gpu, {
      label: `${label}.fill`,
      buffer,
      words: bytes / 4,
      seed,
      ...halfWords(format, rows, cols),
    });
    await this.#gpu.run(`${label}.fill`, [fill]);
    const stored = { name, format, shape, buffer, bytes };
    this.#byKey.set(`random:${label}`, stored);
    this.#uniqueBytes += bytes;
    this.#added.set(owner, (this.#added.get(owner) ?? 0) + bytes);
    this.#used.set(owner, (this.#used.get(owner) ?? 0) + bytes);
    return stored;
  }

  /** Frees every buffer. */
  destroy(): void {
    for (const t of this.#byKey.values()) t.buffer.destroy();
    this.#byKey.clear();
  }
}

function hex(b: number): string {
  return b.toString(16).padStart(2, "0");
}

/** The GPU bytes of `t` in `format` (see `kernels/qformats.ts` for the layouts). */
export function encodeTensor(t: HostTensor, format: StoredFormat): Uint8Array {
  const [rows, cols] = matrixShape(t.shape);
  if (t.dtype === format && isGgufFormat(format)) return packGguf(format, t.data, rows, cols);
  return encodeWeights(format, toF32(t), rows, cols);
}

/** The tensor's values as f32 (block formats dequantized on the host). */
function toF32(t: HostTensor): Float32Array {
  if (t.dtype === "f32" || t.dtype === "f16" || t.dtype === "bf16") return tensorToF32(t);
  return dequantize(t.dtype, t.data, t.shape.reduce((a, b) => a * b, 1));
}
