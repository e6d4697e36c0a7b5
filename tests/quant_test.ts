import assert from "@specdec/assert";
import { BLOCK_INFO, dequantize, quantize, scaleMinK4, tensorBytes } from "../models/quant.ts";
import type { DType } from "../models/types.ts";

/** Deterministic uniform numbers in [0, 1) (mulberry32). */
function uniform(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Deterministic normal samples (Box-Muller). */
function normals(n: number, seed: number): Float32Array {
  const u = uniform(seed), out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = Math.sqrt(-2 * Math.log(1 - u())) * Math.cos(2 * Math.PI * u());
  }
  return out;
}

function randomBytes(n: number, seed: number): Uint8Array {
  const u = uniform(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(u() * 256));
}

/** f16 bits -> value, written from the IEEE 754 definition (independent of quant.ts). */
function halfValue(bits: number): number {
  const s = bits >> 15 ? -1 : 1, e = (bits >> 10) & 31, m = bits & 1023;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

function nmse(got: Float32Array, want: Float32Array): number {
  let se = 0, ref = 0;
  for (let i = 0; i < want.length; i++) {
    se += (got[i] - want[i]) ** 2;
    ref += want[i] ** 2;
  }
  return se / ref;
}

Deno.test("BLOCK_INFO and tensorBytes() match ggml's block sizes", () => {
  const want: Record<DType, [number, number]> = {
    f32: [1, 4],
    f16: [1, 2],
    bf16: [1, 2],
    q8_0: [32, 34],
    q4_0: [32, 18],
    q4_1: [32, 20],
    q5_0: [32, 22],
    q5_1: [32, 24],
    q2_k: [256, 84],
    q3_k: [256, 110],
    q4_k: [256, 144],
    q5_k: [256, 176],
    q6_k: [256, 210],
  };
  for (const [dt, [bs, bpb]] of Object.entries(want) as [DType, [number, number]][]) {
    assert.deepEqual(BLOCK_INFO[dt], { blockSize: bs, bytesPerBlock: bpb }, dt);
    assert.equal(tensorBytes(dt, 3 * bs), 3 * bpb, dt);
    assert.equal(tensorBytes(dt, 0), 0);
  }
  assert.throws(() => tensorBytes("q4_0", 33), /q4_0: 33 elements is not a multiple of .* 32/);
  assert.throws(() => tensorBytes("q6_k", 128), /multiple of the block size 256/);
  assert.throws(() => tensorBytes("f16", -2), /not a non-negative integer/);
});

Deno.test("dequantize() rejects data shorter than the element count needs", () => {
  assert.throws(() => dequantize("q8_0", new Uint8Array(33), 32), /need 34 bytes, got 33/);
  assert.throws(() => dequantize("q4_k", new Uint8Array(144), 32), /not a multiple/);
});

Deno.test("dequantize() reads f32, f16 and bf16 bit patterns exactly, from unaligned views", () => {
  const buf = new Uint8Array(1 + 8);
  new DataView(buf.buffer).setFloat32(1, 1.5, true);
  new DataView(buf.buffer).setFloat32(5, -0.1, true);
  assert.deepEqual([...dequantize("f32", buf.subarray(1), 2)], [1.5, Math.fround(-0.1)]);
  // f16: 0x3c00 = 1, 0xc000 = -2, 0x0001 = 2^-24 (subnormal), 0x7c00 = inf, 0x3555 ~ 1/3.
  const f16 = new Uint8Array([0, 0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00, 0x00, 0x7c, 0x55, 0x35]);
  const y = dequantize("f16", f16.subarray(1), 5);
  assert.deepEqual([...y], [1, -2, 2 ** -24, Infinity, halfValue(0x3555)]);
  // bf16 0x3fc0 = 1.5, 0xc120 = -10.
  assert.deepEqual([...dequantize("bf16", new Uint8Array([0xc0, 0x3f, 0x20, 0xc1]), 2)], [
    1.5,
    -10,
  ]);
});

Deno.test("quantize() rounds f16 and bf16 to nearest even and keeps f32 bits", () => {
  const x = new Float32Array([1 + 2 ** -11, 1 + 3 * 2 ** -11, -65504, 1e-8, 70000]);
  const h = new DataView(quantize("f16", x).buffer);
  assert.deepEqual([0, 1, 2, 3, 4].map((i) => h.getUint16(2 * i, true)), [
    0x3c00, // tie -> even mantissa 0
    0x3c02, // tie -> even mantissa 2
    0xfbff, // -65504 is the largest finite f16
    0x0000, // 1e-8 underflows below half of 2^-24
    0x7c00, // overflow -> inf
  ]);
  const b = new DataView(
    quantize("bf16", new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, NaN])).buffer,
  );
  assert.equal(b.getUint16(0, true), 0x3f80);
  assert.equal(b.getUint16(2, true), 0x3f82);
  assert.ok(Number.isNaN(dequantize("bf16", new Uint8Array(b.buffer.slice(4)), 1)[0]));
  const f = new Float32Array([Math.PI, -0, 1e-40]);
  assert.deepEqual(dequantize("f32", quantize("f32", f), 3), f);
});

Deno.test("dequantize() decodes hand-built q8_0, q4_0 and q4_1 blocks", () => {
  // q8_0: d = 0.5 (f16 0x3800), qs = -128, -1, 0, 1, 127, then j - 16.
  const q8 = new Uint8Array(34);
  q8.set([0x00, 0x38]);
  const qs = [-128, -1, 0, 1, 127];
  for (let j = 0; j < 32; j++) q8[2 + j] = (j < 5 ? qs[j] : j - 16) & 0xff;
  const y8 = dequantize("q8_0", q8, 32);
  assert.deepEqual([...y8.subarray(0, 5)], [-64, -0.5, 0, 0.5, 63.5]);
  assert.equal(y8[31], 7.5);
  // q4_0: d = 0.5; byte j = low nibble j % 16 (value j), high nibble 15 - j (value j + 16).
  const q4 = new Uint8Array(18);
  q4.set([0x00, 0x38]);
  for (let j = 0; j < 16; j++) q4[2 + j] = j | ((15 - j) << 4);
  const y4 = dequantize("q4_0", q4, 32);
  for (let j = 0; j < 16; j++) {
    assert.equal(y4[j], (j - 8) * 0.5);
    assert.equal(y4[j + 16], (15 - j - 8) * 0.5);
  }
  // q4_1: d = 0.25 (0x3400), m = -1 (0xbc00): y = nibble / 4 - 1.
  const q41 = new Uint8Array(20);
  q41.set([0x00, 0x34, 0x00, 0xbc]);
  for (let j = 0; j < 16; j++) q41[4 + j] = j | ((15 - j) << 4);
  const y41 = dequantize("q4_1", q41, 32);
  for (let j = 0; j < 16; j++) {
    assert.equal(y41[j], j / 4 - 1);
    assert.equal(y41[j + 16], (15 - j) / 4 - 1);
  }
});

Deno.test("dequantize() takes q5_0/q5_1 fifth bits from qh bit j (values j and j + 16)", () => {
  // q5_0: d = 2 (0x4000); qh = 0x80000001: bit 0 -> value 0, bit 31 -> value 31.
  const q5 = new Uint8Array(22);
  q5.set([0x00, 0x40, 0x01, 0x00, 0x00, 0x80]);
  q5.fill(0x33, 6); // nibbles 3 everywhere
  const y5 = dequantize("q5_0", q5, 32);
  assert.equal(y5[0], (16 + 3 - 16) * 2);
  assert.equal(y5[31], (16 + 3 - 16) * 2);
  for (let j = 1; j < 31; j++) assert.equal(y5[j], (3 - 16) * 2, `value ${j}`);
  // q5_1: d = 0.5, m = 10 (0x4900); qh = 0x00010000 -> value 16 only.
  const q51 = new Uint8Array(24);
  q51.set([0x00, 0x38, 0x00, 0x49, 0x00, 0x00, 0x01, 0x00]);
  q51.fill(0xf1, 8); // low nibble 1 (values 0..15), high nibble 15 (values 16..31)
  const y51 = dequantize("q5_1", q51, 32);
  assert.equal(y51[0], 0.5 + 10);
  assert.equal(y51[16], (16 + 15) * 0.5 + 10);
  assert.equal(y51[17], 15 * 0.5 + 10);
});

/** Per-element q4_K / q5_K value from the ggml spec, element by element. */
function kValueRef(block: Uint8Array, e: number, five: boolean): number {
  const d = halfValue(block[0] | (block[1] << 8)), dmin = halfValue(block[2] | (block[3] << 8));
  const scales = block.subarray(4, 16), s = e >> 5, within = e & 31;
  // 6-bit fields: sub-blocks 0..3 in the low 6 bits of bytes s (scale) and s+4 (min); 4..7 split
  // between the nibbles of byte s+4 and the top two bits of bytes s-4 (scale) and s (min).
  const sc = s < 4 ? scales[s] % 64 : (scales[s + 4] % 16) + 16 * Math.floor(scales[s - 4] / 64);
  const mn = s < 4
    ? scales[s + 4] % 64
    : Math.floor(scales[s + 4] / 16) + 16 * Math.floor(scales[s] / 64);
  const qs = block.subarray(five ? 48 : 16), byte = qs[32 * Math.floor(s / 2) + within];
  let q = s % 2 === 0 ? byte % 16 : Math.floor(byte / 16);
  if (five) q += 16 * (Math.floor(block[16 + within] / 2 ** s) % 2);
  return Math.fround(Math.fround(d * sc) * q - Math.fround(dmin * mn));
}

/** Per-element q6_K value from the ggml spec. */
function q6ValueRef(block: Uint8Array, e: number): number {
  const d = halfValue(block[208] | (block[209] << 8));
  const half = e >> 7, r = e & 127, quarter = r >> 5, l = r & 31;
  const qlByte = block[64 * half + l + (quarter % 2) * 32];
  const lo = quarter < 2 ? qlByte % 16 : Math.floor(qlByte / 16);
  const hi = Math.floor(block[128 + 32 * half + l] / 4 ** quarter) % 4;
  const scale = (block[192 + Math.floor(e / 16)] << 24) >> 24;
  return Math.fround(d * scale * (lo + 16 * hi - 32));
}

Deno.test("dequantize() q4_k/q5_k/q6_k match a per-element reference on random blocks", () => {
  for (const [dt, size] of [["q4_k", 144], ["q5_k", 176], ["q6_k", 210]] as const) {
    const nb = 3, data = randomBytes(nb * size, size);
    for (let b = 0; b < nb; b++) { // sane scales: d = 0.25 / 2^b, dmin = 0.125 (f16)
      const o = b * size, dOff = dt === "q6_k" ? o + 208 : o;
      new DataView(data.buffer).setUint16(dOff, 0x3400 - 0x400 * b, true);
      if (dt !== "q6_k") new DataView(data.buffer).setUint16(o + 2, 0x3000, true);
    }
    const got = dequantize(dt, data, nb * 256);
    for (let i = 0; i < nb * 256; i++) {
      const block = data.subarray(Math.floor(i / 256) * size, (Math.floor(i / 256) + 1) * size);
      const want = dt === "q6_k"
        ? q6ValueRef(block, i % 256)
        : kValueRef(block, i % 256, dt === "q5_k");
      assert.equal(got[i], want, `${dt} element ${i}`);
    }
  }
});

Deno.test("dequantize() q4_k unpacks a sub-block scale/min that needs the 6-bit high parts", () => {
  // d = 1, dmin = 0.5; sub-block 5 gets scale 37 (0b100101) and min 42 (0b101010).
  const block = new Uint8Array(144);
  block.set([0x00, 0x3c, 0x00, 0x38]);
  const sc = block.subarray(4, 16);
  sc[9] = (37 & 15) | ((42 & 15) << 4); // low nibbles of scale and min
  sc[1] = (37 >> 4) << 6; // top bits of the scale ride on byte 5 - 4
  sc[5] = (42 >> 4) << 6; // top bits of the min ride on byte 5
  assert.deepEqual(scaleMinK4(block, 4, 5), [37, 42]);
  // Sub-block 5 = high nibbles of qs[64..95]; put 7 in element 5*32 + 3.
  block[16 + 64 + 3] = 7 << 4;
  const y = dequantize("q4_k", block, 256);
  assert.equal(y[5 * 32 + 3], 37 * 7 - 0.5 * 42);
  assert.equal(y[5 * 32 + 4], -0.5 * 42);
  // Sub-block 1 reads byte 1's low 6 bits as its scale (here 0) and byte 5's as its min (0).
  assert.equal(y[32], 0);
});

Deno.test("quantize() q8_0 follows ggml: d = amax/127, round half away from zero", () => {
  const x = new Float32Array(32);
  x.set([127, -63.5, 0.5, -0.5, 2.5, -2.5, 1.49]);
  const q = quantize("q8_0", x);
  const dv = new DataView(q.buffer);
  assert.equal(dv.getUint16(0, true), 0x3c00); // d = 1
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((j) => dv.getInt8(2 + j)), [
    127,
    -64,
    1,
    -1,
    3,
    -3,
    1,
  ]);
  assert.deepEqual([...quantize("q8_0", new Float32Array(32))], new Array(34).fill(0));
});

Deno.test("quantize() q4_0 follows ggml: d = signed max / -8, q = min(15, trunc(x/d + 8.5))", () => {
  const neg = new Float32Array(32);
  neg.set([-8, 4, -3.3, 7, 7.9, -0.5, 8]);
  const qn = quantize("q4_0", neg);
  assert.equal(new DataView(qn.buffer).getUint16(0, true), 0x3c00); // d = -8 / -8 = 1
  const nib = (b: Uint8Array, j: number) => j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4;
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map((j) => nib(qn, j)), [0, 12, 5, 15, 15, 8, 15, 8]);
  const pos = new Float32Array(32);
  pos[20] = 8;
  pos[21] = -8;
  const qp = quantize("q4_0", pos);
  assert.equal(new DataView(qp.buffer).getUint16(0, true), 0xbc00); // d = -1
  assert.deepEqual([nib(qp, 20), nib(qp, 21), nib(qp, 0)], [0, 15, 8]);
  assert.deepEqual([...dequantize("q4_0", qp, 32).subarray(20, 22)], [8, -7]);
});

Deno.test("quantize() q4_1 follows ggml: d = (max - min)/15, m = min, q = trunc((x-m)/d + 0.5)", () => {
  const x = new Float32Array(32).fill(0);
  x.set([-1, 14, 0.4, 0.6, 3.5]);
  const q = quantize("q4_1", x);
  const dv = new DataView(q.buffer);
  assert.equal(dv.getUint16(0, true), 0x3c00); // d = 1
  assert.equal(dv.getUint16(2, true), 0xbc00); // m = -1
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((j) => q[4 + j] & 15), [0, 15, 1, 2, 5, 1]);
});

Deno.test("quantize() then dequantize() stays within each legacy format's rounding bound", () => {
  const x = normals(32 * 40, 7);
  for (let i = 0; i < 32; i++) x[32 * 39 + i] = 1 + i / 100; // an all-positive block
  for (const dt of ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] as const) {
    const y = dequantize(dt, quantize(dt, x), x.length);
    for (let b = 0; b < 40; b++) {
      const blk = x.subarray(32 * b, 32 * b + 32);
      const amax = Math.max(...blk.map(Math.abs)), range = Math.max(...blk) - Math.min(...blk);
      // Step sizes; symmetric formats can clamp the largest opposite-sign value by one step.
      const bound = {
        q8_0: (amax / 127) * 0.57,
        q4_0: (amax / 8) * 1.01,
        q5_0: (amax / 16) * 1.02,
        q4_1: (range / 15) * 0.51 + amax * 2 ** -10,
        q5_1: (range / 31) * 0.51 + amax * 2 ** -10,
      }[dt];
      for (let j = 0; j < 32; j++) {
        const err = Math.abs(y[32 * b + j] - blk[j]);
        assert.ok(err <= bound, `${dt} block ${b} value ${j}: error ${err} > ${bound}`);
      }
    }
  }
});

Deno.test("quantize() K formats round-trip with bounded error and decode with ggml's layout", () => {
  const x = normals(256 * 6, 11);
  for (let i = 0; i < 256; i++) x[256 * 5 + i] = 0.5 + (i % 37) / 10; // all-positive super-block
  const limits = { q4_k: 0.012, q5_k: 0.003, q6_k: 0.0008 } as const;
  for (const dt of ["q4_k", "q5_k", "q6_k"] as const) {
    const bytes = quantize(dt, x);
    assert.equal(bytes.byteLength, tensorBytes(dt, x.length));
    const y = dequantize(dt, bytes, x.length);
    const e = nmse(y, x);
    assert.ok(e < limits[dt], `${dt}: nmse ${e} >= ${limits[dt]}`);
    // The independent per-element decoders agree with the stored bytes.
    const size = BLOCK_INFO[dt].bytesPerBlock;
    for (let i = 0; i < x.length; i += 7) {
      const block = bytes.subarray(Math.floor(i / 256) * size, (Math.floor(i / 256) + 1) * size);
      const want = dt === "q6_k"
        ? q6ValueRef(block, i % 256)
        : kValueRef(block, i % 256, dt === "q5_k");
      assert.equal(y[i], want, `${dt} element ${i}`);
    }
  }
  // All zeros stay zeros.
  for (const dt of ["q4_k", "q5_k", "q6_k"] as const) {
    assert.ok(dequantize(dt, quantize(dt, new Float32Array(256)), 256).every((v) => v === 0), dt);
  }
});
