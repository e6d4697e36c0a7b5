import {
  bitsPerWeight,
  decodeWeights,
  encodeWeights,
  formatBlock,
  formatGroups,
  formatUnitValues,
  type GgufWeightFormat,
  isBlockFormat,
  isGgufFormat,
  packGguf,
  unpackGpu,
  WEIGHT_BINDING,
  WEIGHT_FORMATS,
  weightAlign,
  weightBytes,
  type WeightFormat,
  weightWgsl,
} from "../kernels/qformats.ts";
import { dequantizeNf4, NF4_BLOCK, NF4_CODEBOOK, quantizeNf4 } from "../models/nf4.ts";
import { dequantize, quantize, tensorBytes } from "../models/quant.ts";
import { rng } from "./harness.ts";
import assert from "@specdec/assert";

const GGUF_FORMATS: GgufWeightFormat[] = [
  "f32",
  "f16",
  "q8_0",
  "q4_0",
  "q4_k",
  "q6_k",
  "q4_1",
  "q5_0",
  "q5_1",
  "q2_k",
  "q3_k",
  "q5_k",
];

/** `n` seeded standard-normal values (Box-Muller). */
function normal(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => {
    const u = 1 - r(), v = r();
    return scale * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  });
}

/** Ragged shapes for `f`: rows 1, 3, 7; cols 1, 3 and 5 blocks (K = 32*3, 64*5, 256, 512 ...). */
function shapes(f: WeightFormat): [number, number][] {
  const b = formatBlock(f);
  const cols = b === 1 ? [1, 3, 67] : [b, 3 * b, 5 * b];
  return [1, 3, 7].flatMap((rows) => cols.map((c) => [rows, c] as [number, number]));
}

/** Bit patterns, so that -0 and NaN compare exactly. */
function bits(a: Float32Array): number[] {
  return [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
}

Deno.test("WEIGHT_FORMATS lists every format with its block size and bits per weight", () => {
  const want: [WeightFormat, number, number][] = [
    ["f32", 1, 32],
    ["f16", 1, 16],
    ["q8_0", 32, 8.5],
    ["q4_0", 32, 4.5],
    ["q4_k", 256, 4.5],
    ["q6_k", 256, 6.5625],
    ["nf4", 64, 4.25],
    ["q4_1", 32, 5],
    ["q5_0", 32, 5.5],
    ["q5_1", 32, 6],
    ["q2_k", 256, 2.625],
    ["q3_k", 256, 3.4375],
    ["q5_k", 256, 5.5],
  ];
  assert.deepEqual([...WEIGHT_FORMATS], want.map((w) => w[0]));
  for (const [f, block, bpw] of want) {
    assert.equal(formatBlock(f), block, f);
    assert.equal(bitsPerWeight(f), bpw, f);
    assert.equal(isBlockFormat(f), block > 1, f);
  }
  assert.throws(() => formatBlock("q7_k" as WeightFormat), /unknown weight format "q7_k"/);
});

Deno.test("weightBytes() is GGUF's byte count padded to weightAlign(), the length encodeWeights() returns", () => {
  assert.equal(weightBytes("q8_0", 3, 32), 112); // 3 * 34 = 102 -> 112 (vec4 loads)
  assert.equal(weightBytes("q4_0", 1, 32), 32); // 18 -> 32
  assert.equal(weightBytes("q4_0", 7, 96), 384); // 21 * 18 = 378 -> 384
  assert.equal(weightBytes("q6_k", 1, 256), 212); // 210 -> 212
  assert.equal(weightBytes("q4_k", 2, 512), 4 * 144); // 9 vec4s per block already
  assert.equal(weightBytes("nf4", 1, 64), 36); // 34 -> 36
  assert.equal(weightBytes("f16", 1, 1), 4); // Gpu.buffer never makes fewer than 4 bytes
  assert.equal(weightBytes("f16", 3, 3), 20); // 18 -> 20
  for (const f of WEIGHT_FORMATS) {
    for (const [rows, cols] of shapes(f)) {
      const raw = f === "nf4" ? (rows * cols / NF4_BLOCK) * 34 : tensorBytes(f, rows * cols);
      const bytes = weightBytes(f, rows, cols);
      const a = weightAlign(f);
      assert.equal(a, ["q8_0", "q4_0", "q4_k"].includes(f) ? 16 : 4, f);
      assert.ok(bytes % a === 0 && bytes - raw >= 0 && bytes - raw < a, `${f} ${rows}x${cols}`);
      assert.equal(encodeWeights(f, normal(rows * cols, cols), rows, cols).length, bytes);
    }
  }
});

Deno.test("weightBytes() and encodeWeights() reject cols that are not a block multiple", () => {
  assert.throws(() => weightBytes("q4_k", 4, 576), /q4_k: cols=576 is not a multiple of .* 256/);
  assert.throws(() => weightBytes("q8_0", 1, 33), RangeError);
  assert.throws(() => weightBytes("nf4", 1, 32), /block size 64/);
  assert.throws(() => weightBytes("f32", 0, 4), /rows=0/);
  assert.throws(() => encodeWeights("q4_0", new Float32Array(40), 1, 40), RangeError);
  assert.throws(() => encodeWeights("q4_0", new Float32Array(31), 1, 32), /31 values/);
});

Deno.test("encodeWeights() equals packGguf(quantize()) for every GGUF format", () => {
  for (const f of GGUF_FORMATS) {
    for (const [rows, cols] of shapes(f)) {
      const v = normal(rows * cols, rows * 31 + cols, 0.05);
      assert.deepEqual(
        encodeWeights(f, v, rows, cols),
        packGguf(f, quantize(f, v), rows, cols),
        `${f} ${rows}x${cols}`,
      );
    }
  }
});

Deno.test("decodeWeights(packGguf(quantize())) equals quant.ts dequantize() bit for bit", () => {
  for (const f of GGUF_FORMATS) {
    for (const [rows, cols] of shapes(f)) {
      const gguf = quantize(f, normal(rows * cols, rows + cols * 7, 3));
      const gpu = packGguf(f, gguf, rows, cols);
      assert.deepEqual(
        bits(decodeWeights(f, gpu, rows, cols)),
        bits(dequantize(f, gguf, rows * cols)),
        `${f} ${rows}x${cols}`,
      );
      // The unpadded length is accepted too, and unpackGpu() inverts packGguf().
      const raw = gguf.length;
      assert.deepEqual(
        bits(decodeWeights(f, gpu.subarray(0, raw), rows, cols)),
        bits(dequantize(f, gguf, rows * cols)),
      );
      assert.deepEqual(unpackGpu(f, gpu, rows, cols), gguf);
    }
  }
});

Deno.test("decodeWeights() of nf4 equals dequantizeNf4() of the host bytes bit for bit", () => {
  for (const [rows, cols] of shapes("nf4")) {
    const v = normal(rows * cols, cols - rows, 0.02);
    const host = quantizeNf4(v);
    const gpu = encodeWeights("nf4", v, rows, cols);
    assert.deepEqual(
      bits(decodeWeights("nf4", gpu, rows, cols)),
      bits(dequantizeNf4(host, rows * cols)),
    );
    assert.deepEqual(unpackGpu("nf4", gpu, rows, cols), host);
  }
});

Deno.test("packGguf() and decodeWeights() reject a byte count that does not fit the shape", () => {
  const gguf = quantize("q8_0", new Float32Array(64));
  assert.throws(
    () => packGguf("q8_0", gguf.subarray(0, 67), 2, 32),
    /q8_0: a 2x32 tensor has 68 bytes in GGUF, got 67/,
  );
  assert.throws(() => packGguf("q8_0", gguf, 1, 32), /has 34 bytes in GGUF, got 68/);
  assert.throws(() => decodeWeights("q6_k", new Uint8Array(209), 1, 256), /210 bytes \(212/);
  assert.throws(() => decodeWeights("q6_k", new Uint8Array(216), 1, 256), /got 216/);
});

Deno.test("GPU layout: quants of all blocks first, then the f16 scales (q8_0, q4_0, q6_k, nf4)", () => {
  // Two q8_0 blocks: block b holds value b+1 at position 0 (quant 127, d = (b+1)/127).
  const v = new Float32Array(64);
  v[0] = 1;
  v[32] = 2;
  const g = encodeWeights("q8_0", v, 2, 32);
  assert.equal(g[0], 127);
  assert.equal(g[32], 127);
  const dv = new DataView(g.buffer);
  assert.equal(dv.getFloat16(64, true), Math.f16round(1 / 127));
  assert.equal(dv.getFloat16(66, true), Math.f16round(2 / 127));
  // q6_k: d of the single block right after its 208 bytes; q4_k: the GGUF block unchanged.
  const k = normal(256, 9);
  const q6 = quantize("q6_k", k);
  assert.deepEqual(encodeWeights("q6_k", k, 1, 256).subarray(0, 210), q6);
  const q4k = quantize("q4_k", k);
  assert.deepEqual(encodeWeights("q4_k", k, 1, 256), q4k);
  // q4_0 with 3 blocks: scales at 48, 50, 52.
  const q40 = quantize("q4_0", normal(96, 4));
  const p40 = packGguf("q4_0", q40, 1, 96);
  for (let b = 0; b < 3; b++) {
    assert.deepEqual(p40.subarray(16 * b, 16 * b + 16), q40.subarray(18 * b + 2, 18 * b + 18));
    assert.deepEqual(p40.subarray(48 + 2 * b, 50 + 2 * b), q40.subarray(18 * b, 18 * b + 2));
  }
});

// Relative RMS error ||dequant(quant(x)) - x|| / ||x|| on N(0, 1) data, 64 rows of 512.
// Measured with specdec's quantizers (seeds 2024, 1, 2): f16 0.021%, q8_0 0.53%, q6_k 1.88%,
// q4_k 7.8%, q4_0 8.6%, nf4 9.2% (4.25 bits, blocks of 64), q4_1 7.8%, q5_0 4.3%, q5_1 3.8%,
// q5_k 3.8%, q3_k 15.5%, q2_k 32.9% (plain rounding, see models/quant.ts). Bounds: ~20% headroom.
const RMS_BOUND: Record<WeightFormat, number> = {
  f32: 0,
  f16: 0.00026,
  q8_0: 0.0065,
  q6_k: 0.023,
  q4_k: 0.094,
  q4_0: 0.104,
  nf4: 0.11,
  q4_1: 0.094,
  q5_0: 0.052,
  q5_1: 0.046,
  q2_k: 0.4,
  q3_k: 0.19,
  q5_k: 0.046,
};

Deno.test("quantization error on normal data is within each format's stated bound", () => {
  const rows = 64, cols = 512;
  const x = normal(rows * cols, 2024);
  const measured: string[] = [];
  for (const f of WEIGHT_FORMATS) {
    const y = decodeWeights(f, encodeWeights(f, x, rows, cols), rows, cols);
    let se = 0, ref = 0;
    for (let i = 0; i < x.length; i++) {
      se += (y[i] - x[i]) ** 2;
      ref += x[i] ** 2;
    }
    const rel = Math.sqrt(se / ref);
    measured.push(`${f} ${(100 * rel).toFixed(2)}%`);
    assert.ok(rel <= RMS_BOUND[f], `${f}: relative RMS error ${rel} > ${RMS_BOUND[f]}`);
  }
  console.log(`relative RMS quantization error: ${measured.join(", ")}`);
});

Deno.test("nf4 round-trips codebook values times an f16 scale exactly", () => {
  for (const s of [1, 0.5, 2 ** -10, 0.75, 3.25, 1000]) {
    const x = Float32Array.from({ length: 4 * NF4_BLOCK }, (_, i) => {
      const idx = i % 16 === 0 ? 15 : (i * 7 + (i >> 4)) % 16; // every block holds +1
      return Math.fround(NF4_CODEBOOK[idx] * s);
    });
    const q = quantizeNf4(x);
    assert.equal(q.length, 4 * 34);
    assert.deepEqual(bits(dequantizeNf4(q, x.length)), bits(x), `scale ${s}`);
  }
});

Deno.test("nf4 host layout: f16 absmax, low nibbles = values 0..31, high = 32..63", () => {
  const x = new Float32Array(64);
  x[0] = -2; // absmax 2, index 0 (-1)
  x[1] = 2; // index 15
  x[32] = 1.1; // 0.55 -> nearest 0.5626 (index 13)
  x[33] = -0.2; // -0.1 -> nearest -0.0911 (index 6)
  const q = quantizeNf4(x);
  assert.equal(new DataView(q.buffer).getFloat16(0, true), 2);
  assert.equal(q[2], 0 | (13 << 4));
  assert.equal(q[3], 15 | (6 << 4));
  assert.equal(q[4], 7 | (7 << 4)); // zeros -> index 7
  assert.equal(dequantizeNf4(q, 64)[32], Math.fround(2 * NF4_CODEBOOK[13]));
  // An all-zero block has scale 0 and decodes to zeros.
  assert.deepEqual([...dequantizeNf4(quantizeNf4(new Float32Array(64)), 64)], Array(64).fill(0));
  // Values past the f16 range clip to 65504 instead of producing an infinite scale.
  const big = new Float32Array(64).fill(1e6);
  assert.ok(dequantizeNf4(quantizeNf4(big), 64).every((y) => y === 65504));
});

Deno.test("nf4 rejects lengths that are not whole blocks", () => {
  assert.throws(() => quantizeNf4(new Float32Array(65)), /nf4: value count 65 .* 64/);
  assert.throws(() => dequantizeNf4(new Uint8Array(34), 32), RangeError);
  assert.throws(() => dequantizeNf4(new Uint8Array(33), 64), /64 values need 34 bytes, got 33/);
});

Deno.test("weightWgsl() declares the weights at WEIGHT_BINDING and the decoders of each format", () => {
  for (const f of WEIGHT_FORMATS) {
    const src = weightWgsl(f);
    assert.match(src, new RegExp(`@binding\\(${WEIGHT_BINDING}\\) var<storage, read> w`), f);
    for (const fn of ["fn wInit(", "fn w4(", "fn w1(", "const W_BLOCK"]) {
      assert.ok(src.includes(fn), `${f} lacks ${fn}`);
    }
    assert.equal(src.includes("fn wUnit("), isBlockFormat(f), f);
    assert.equal(src.trimStart().startsWith("enable f16;"), f === "f16", f);
    // formatGroups() is the W_GROUPS the decoder declares (matmul unrolls that many vec4s).
    const groups = /const W_GROUPS = (\d+)u;/.exec(src);
    assert.equal(groups ? Number(groups[1]) : 0, formatGroups(f), f);
    // formatUnitValues() is W_BLOCK / W_UNITS (4 for the float formats' vec4s).
    const units = /const W_UNITS = (\d+)u;/.exec(src);
    assert.equal(units ? formatBlock(f) / Number(units[1]) : 4, formatUnitValues(f), f);
    // The vec4 formats declare vec4 weights, wWord() for single values and wGroup() for units.
    const vec4 = weightAlign(f) === 16;
    assert.equal(src.includes("var<storage, read> w: array<vec4<u32>>"), vec4, f);
    assert.equal(src.includes("fn wGroup("), vec4, f);
    assert.equal(src.includes("fn wWord("), isBlockFormat(f), f);
    assert.equal(isGgufFormat(f), f !== "nf4", f);
  }
});

Deno.test("GPU layout of the 5- and 2/3-bit formats: scale (and min) bytes trail the quants", () => {
  // q4_1 / q5_1: (d, m) move as 4 bytes per block; q5_0: d moves, qh + qs stay (20 bytes);
  // q3_k: the trailing d of each 110-byte block moves; q2_k, q5_k: blocks unchanged.
  for (
    const [f, S, headAt, H] of [
      ["q4_1", 20, 0, 4],
      ["q5_0", 22, 0, 2],
      ["q5_1", 24, 0, 4],
      ["q3_k", 110, 108, 2],
      ["q2_k", 84, -1, 0],
      ["q5_k", 176, -1, 0],
    ] as [GgufWeightFormat, number, number, number][]
  ) {
    const block = formatBlock(f), nb = 3;
    const host = quantize(f, normal(nb * block, S));
    const g = packGguf(f, host, 1, nb * block);
    if (headAt < 0) {
      assert.deepEqual(g.subarray(0, host.length), host, f);
      continue;
    }
    const Q = S - H, from = headAt === 0 ? H : 0;
    for (let b = 0; b < nb; b++) {
      assert.deepEqual(
        g.subarray(Q * b, Q * b + Q),
        host.subarray(S * b + from, S * b + from + Q),
        f,
      );
      assert.deepEqual(
        g.subarray(Q * nb + H * b, Q * nb + H * b + H),
        host.subarray(S * b + headAt, S * b + headAt + H),
        f,
      );
    }
    assert.deepEqual(unpackGpu(f, g, 1, nb * block), host, f);
  }
});
