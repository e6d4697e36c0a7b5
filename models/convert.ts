/**
 * Host-side conversions of stored floating-point tensors to f32 (for references, tests and
 * uploads that want f32). Little-endian byte order, as in every format we read.
 *
 * @module
 */
import type { DType, HostTensor } from "./types.ts";

/** Bytes per element of the plain floating-point dtypes (block formats are not listed). */
export const FLOAT_ITEM_SIZE: Readonly<Partial<Record<DType, number>>> = {
  f32: 4,
  f16: 2,
  bf16: 2,
};

/** A copy of `data` that starts at a fresh buffer (offset 0), for aligned typed-array views. */
function aligned(data: Uint8Array, align: number): Uint8Array {
  return data.byteOffset % align === 0 ? data : data.slice();
}

/**
 * Converts IEEE half-precision values (2 bytes each, little-endian) to f32.
 *
 * @example
 * ```ts
 * import { f16ToF32 } from "./convert.ts";
 * const one = new Uint8Array([0x00, 0x3c]); // 1.0 in f16
 * console.log(f16ToF32(one)[0]); // 1
 * ```
 */
export function f16ToF32(data: Uint8Array): Float32Array {
  if (data.byteLength % 2 !== 0) {
    throw new RangeError(`f16ToF32: ${data.byteLength} bytes is not a whole number of f16 values`);
  }
  const src = aligned(data, 2);
  return Float32Array.from(new Float16Array(src.buffer, src.byteOffset, src.byteLength / 2));
}

/**
 * Converts bfloat16 values (2 bytes each, little-endian: the top half of an f32) to f32.
 *
 * @example
 * ```ts
 * import { bf16ToF32 } from "./convert.ts";
 * const one = new Uint8Array([0x80, 0x3f]); // 1.0 in bf16
 * console.log(bf16ToF32(one)[0]); // 1
 * ```
 */
export function bf16ToF32(data: Uint8Array): Float32Array {
  if (data.byteLength % 2 !== 0) {
    throw new RangeError(
      `bf16ToF32: ${data.byteLength} bytes is not a whole number of bf16 values`,
    );
  }
  const n = data.byteLength / 2;
  const bits = new Uint32Array(n);
  for (let i = 0; i < n; i++) bits[i] = (data[2 * i] | (data[2 * i + 1] << 8)) << 16;
  return new Float32Array(bits.buffer);
}

/**
 * A fresh f32 copy of an f32, f16 or bf16 tensor's values (row-major, `shape` outermost-first).
 * Throws for block-quantized dtypes and when the byte length does not match the shape.
 *
 * @example
 * ```ts
 * import { tensorToF32 } from "./convert.ts";
 * const t = { name: "x", dtype: "bf16" as const, shape: [1], data: new Uint8Array([0x80, 0x3f]) };
 * console.log(tensorToF32(t)); // Float32Array [ 1 ]
 * ```
 */
export function tensorToF32(t: HostTensor): Float32Array {
  const itemSize = FLOAT_ITEM_SIZE[t.dtype];
  if (itemSize === undefined) {
    throw new Error(`tensor "${t.name}": tensorToF32 does not convert ${t.dtype} (quantized)`);
  }
  const count = t.shape.reduce((a, b) => a * b, 1);
  if (t.data.byteLength !== count * itemSize) {
    throw new Error(
      `tensor "${t.name}": ${t.data.byteLength} bytes, but shape [${t.shape}] of ${t.dtype} ` +
        `needs ${count * itemSize}`,
    );
  }
  if (t.dtype === "f16") return f16ToF32(t.data);
  if (t.dtype === "bf16") return bf16ToF32(t.data);
  const src = t.data.slice();
  return new Float32Array(src.buffer, 0, count);
}
