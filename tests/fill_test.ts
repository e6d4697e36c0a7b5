import { createFill, fillRef } from "../kernels/fill.ts";
import {
  decodeWeights,
  halfWords,
  isBlockFormat,
  WEIGHT_FORMATS,
  weightBytes,
  type WeightFormat,
} from "../kernels/qformats.ts";
import { gpuTest, RAGGED } from "./harness.ts";
import assert from "@specdec/assert";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("halfWords() marks each format's scale words", () => {
  assert.deepEqual(halfWords("f16", 3, 8), { halfFrom: 0, halfStride: 0, halfPhase: 0 });
  assert.deepEqual(halfWords("q4_0", 2, 64), { halfFrom: 4 * 4, halfStride: 0, halfPhase: 0 });
  assert.deepEqual(halfWords("q6_k", 1, 256), { halfFrom: 52, halfStride: 0, halfPhase: 0 });
  assert.deepEqual(halfWords("q4_k", 2, 256), { halfFrom: 72, halfStride: 36, halfPhase: 0 });
  assert.deepEqual(halfWords("q2_k", 2, 256), { halfFrom: 42, halfStride: 21, halfPhase: 20 });
  assert.throws(() => halfWords("f32", 1, 4), /no f16 words/);
});

gpuTest("fill writes exactly fillRef()'s words on ragged sizes", async (gpu) => {
  for (const words of [...RAGGED, 256 * 3 + 5]) {
    for (
      const half of [{ halfFrom: words, halfStride: 0, halfPhase: 0 }, {
        halfFrom: 5,
        halfStride: 3,
        halfPhase: 2,
      }]
    ) {
      const buf = gpu.buffer("fill", words * 4, RW);
      await gpu.run("fill", [
        await createFill(gpu, { label: "t", buffer: buf, words, seed: 7, ...half }),
      ]);
      const got = new Uint32Array(await gpu.read(buf));
      assert.deepEqual(
        [...got],
        [...fillRef(words, 7, half)],
        `words=${words} ${JSON.stringify(half)}`,
      );
      buf.destroy();
    }
  }
});

gpuTest("a random fill decodes to finite, small weights in every format", async (gpu) => {
  const formats: WeightFormat[] = WEIGHT_FORMATS.filter(isBlockFormat);
  if (gpu.features.f16) formats.push("f16");
  for (const f of formats) {
    const rows = 3, cols = 512, bytes = weightBytes(f, rows, cols);
    const buf = gpu.buffer(f, bytes, RW);
    const fill = await createFill(gpu, {
      label: f,
      buffer: buf,
      words: bytes / 4,
      seed: 3,
      ...halfWords(f, rows, cols),
    });
    await gpu.run("fill", [fill]);
    const w = decodeWeights(f, new Uint8Array(await gpu.read(buf)), rows, cols);
    const max = w.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
    assert.ok(w.every(Number.isFinite) && max > 0 && max < 64, `${f}: max |w| = ${max}`);
  }
});
