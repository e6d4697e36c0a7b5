/**
 * The weight store: every model tensor on the GPU as a typed record (format, shape, buffer, bytes).
 * Draft and target share one store; tensors with identical bytes and format are stored once.
 *
 * @module
 */
import type { Gpu } from "./gpu.ts";
import type { HostTensor } from "../models/types.ts";
import { tensorToF32 } from "../models/convert.ts";
import { dequantize } from "../models/quant.ts";

/** Formats a stored tensor can have on the GPU (quantized formats arrive with the store issue). */
export type StoredFormat = "f32" | "f16";

/** One tensor in GPU memory. */
export interface StoredTensor {
  /** Canonical name. */
  readonly name: string;
  /** Element format of the buffer. */
  readonly format: StoredFormat;
  /** Shape, outermost first (`[out, in]` for matrices). */
  readonly shape: readonly number[];
  /** The buffer holding exactly this tensor. */
  readonly buffer: GPUBuffer;
  /** Bytes of the buffer. */
  readonly bytes: number;
}

/** Which format to store a tensor in: as close to the source as the device allows. */
export type FormatRequest = "f32" | "auto";

/** GPU-resident tensors of one or more models, deduplicated by content. */
export class WeightStore {
  readonly #gpu: Gpu;
  readonly #byKey = new Map<string, StoredTensor>();
  readonly #owners = new Map<string, number>();
  #uniqueBytes = 0;

  /** An empty store on `gpu`. */
  constructor(gpu: Gpu) {
    this.#gpu = gpu;
  }

  /** Bytes of GPU memory the store holds (each shared tensor counted once). */
  get bytes(): number {
    return this.#uniqueBytes;
  }

  /** Bytes referenced by `owner` (a shared tensor counts for every owner that uses it). */
  bytesOf(owner: string): number {
    return this.#owners.get(owner) ?? 0;
  }

  /**
   * Uploads `t` for `owner` (e.g. "target"), labelled `owner.name`. "auto" keeps f16 as f16 when
   * the device has `shader-f16` and stores everything else (f32, bf16, block formats) as f32.
   */
  async add(owner: string, t: HostTensor, request: FormatRequest = "auto"): Promise<StoredTensor> {
    const keepF16 = request === "auto" && t.dtype === "f16" && this.#gpu.features.f16;
    const format: StoredFormat = keepF16 ? "f16" : "f32";
    const data: Uint8Array = keepF16 ? t.data : toF32Bytes(t);
    const limit = this.#gpu.limits.maxStorageBufferBindingSize;
    if (data.byteLength > limit) {
      throw new Error(
        `tensor "${t.name}" needs ${data.byteLength} bytes as ${format}, more than this device can ` +
          `bind at once (maxStorageBufferBindingSize ${limit})`,
      );
    }
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data.slice()));
    const key = `${format}:${t.shape.join("x")}:${Array.from(digest, hex).join("")}`;
    let stored = this.#byKey.get(key);
    if (!stored) {
      const buffer = await this.#gpu.scoped(
        `${owner}.${t.name}`,
        () => this.#gpu.upload(`${owner}.${t.name}`, data),
      );
      stored = { name: t.name, format, shape: t.shape, buffer, bytes: buffer.size };
      this.#byKey.set(key, stored);
      this.#uniqueBytes += buffer.size;
    }
    this.#owners.set(owner, (this.#owners.get(owner) ?? 0) + stored.bytes);
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

/** The tensor's values as f32 bytes (block formats dequantized on the host). */
function toF32Bytes(t: HostTensor): Uint8Array {
  let f32: Float32Array;
  if (t.dtype === "f32" || t.dtype === "f16" || t.dtype === "bf16") f32 = tensorToF32(t);
  else f32 = dequantize(t.dtype, t.data, t.shape.reduce((a, b) => a * b, 1));
  return new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
}
