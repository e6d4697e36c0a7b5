import assert from "@specdec/assert";
import { readLlama2c } from "../models/llama2c.ts";
import { tensorToF32 } from "../models/convert.ts";
import { assertFormatError } from "./fixtures.ts";

const STORIES = new URL("../../shared/models/icppWorld-icpp_llm/stories260K.bin", import.meta.url);
const XS = new URL("../../shared/models/saltyduckegg-llama2xs.c/model.bin", import.meta.url);

async function readFixture(url: URL): Promise<Uint8Array> {
  try {
    return await Deno.readFile(url);
  } catch (e) {
    throw new Error(`fixture ${url.pathname} is missing (see shared/models/MANIFEST.md): ${e}`);
  }
}

/** The header of a llama2.c file as seven int32 values. */
function header(bytes: Uint8Array): number[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  return Array.from({ length: 7 }, (_, i) => view.getInt32(4 * i, true));
}

const common = {
  architecture: "llama",
  dim: 64,
  nLayers: 5,
  nHeads: 8,
  nKvHeads: 4,
  headDim: 8,
  vocabSize: 512,
  normEps: 1e-5,
  ropeTheta: 10000,
  ropeLayout: "interleaved",
  tiedEmbeddings: true,
  qkvBias: false,
  bosId: 1,
  eosIds: [2],
};

Deno.test("readLlama2c() resolves stories260K's and llama2xs's configs (MANIFEST.md)", async () => {
  const stories = readLlama2c(await readFixture(STORIES), "stories260K.bin");
  assert.deepEqual(stories.config, { ...common, ffnDim: 172, maxSeqLen: 512 });
  const xs = readLlama2c(await readFixture(XS), "model.bin");
  assert.deepEqual(xs.config, { ...common, ffnDim: 192, maxSeqLen: 256 });
  // Tied classifier: embedding + output norm + 9 tensors per layer, no output.weight.
  assert.equal(stories.tensors.size, 2 + 9 * 5);
  assert.ok(!stories.tensors.has("output.weight"));
});

Deno.test("readLlama2c() places tensors so the stored RoPE table lands on cos(p * theta_i)", async () => {
  // The legacy freq_cis_real table follows every weight; if all regions before it are sized
  // right, the floats right after output_norm.weight are cos(p * 10000^(-2i/headDim)).
  const bytes = await readFixture(STORIES);
  const { config, tensors } = readLlama2c(bytes, "stories260K.bin");
  const norm = tensors.get("output_norm.weight")!;
  const after = norm.data.byteOffset + norm.data.byteLength;
  const half = config.headDim / 2;
  const table = new Float32Array(bytes.buffer.slice(after, after + 4 * config.maxSeqLen * half));
  for (const p of [0, 1, 7, 300, 511]) {
    for (let i = 0; i < half; i++) {
      const want = Math.cos(p * 10000 ** (-(2 * i) / config.headDim));
      assert.ok(Math.abs(table[p * half + i] - want) < 1e-5, `p=${p} i=${i}`);
    }
  }
  // And the tensors are views into the file, with trained-looking contents.
  const emb = tensors.get("token_embd.weight")!;
  assert.equal(emb.data.buffer, bytes.buffer);
  assert.equal(emb.data.byteOffset, 28);
  const gains = tensorToF32(tensors.get("blk.4.ffn_norm.weight")!);
  assert.ok(gains.every((g) => Number.isFinite(g)) && gains.some((g) => g !== 0));
});

Deno.test("readLlama2c() maps every region of an unshared-classifier file to its canonical name", () => {
  // A synthetic file whose float k holds k, so each tensor's first value is its file offset.
  const [dim, hidden, L, heads, kvHeads, vocab, seq] = [8, 12, 2, 4, 2, 10, 6];
  const head = dim / heads;
  const kv = kvHeads * head;
  const sizes = [
    vocab * dim, // token_embedding
    L * dim, // rms_att
    L * dim * dim, // wq
    L * kv * dim, // wk
    L * kv * dim, // wv
    L * dim * dim, // wo
    L * dim, // rms_ffn
    L * hidden * dim, // w1
    L * dim * hidden, // w2
    L * hidden * dim, // w3
    dim, // rms_final
    seq * head, // freq_cis_real + freq_cis_imag
    vocab * dim, // wcls
  ];
  const n = sizes.reduce((a, b) => a + b);
  const bytes = new Uint8Array(28 + 4 * n);
  new Int32Array(bytes.buffer, 0, 7).set([dim, hidden, L, heads, kvHeads, -vocab, seq]);
  new Float32Array(bytes.buffer, 28).set(Float32Array.from({ length: n }, (_, k) => k));
  const { config, tensors } = readLlama2c(bytes, "synthetic.bin");
  assert.equal(config.tiedEmbeddings, false);
  const starts = sizes.map((_, i) => sizes.slice(0, i).reduce((a, b) => a + b, 0));
  const first = (name: string) => tensorToF32(tensors.get(name)!)[0];
  const [, rmsAtt, wq, wk, wv, wo, rmsFfn, w1, w2, w3, rmsFinal, , wcls] = starts;
  assert.equal(first("token_embd.weight"), 0);
  assert.equal(first("blk.1.attn_norm.weight"), rmsAtt + dim);
  assert.equal(first("blk.1.attn_q.weight"), wq + dim * dim);
  assert.equal(first("blk.1.attn_k.weight"), wk + kv * dim);
  assert.equal(first("blk.1.attn_v.weight"), wv + kv * dim);
  assert.equal(first("blk.1.attn_output.weight"), wo + dim * dim);
  assert.equal(first("blk.1.ffn_norm.weight"), rmsFfn + dim);
  assert.equal(first("blk.1.ffn_gate.weight"), w1 + hidden * dim);
  assert.equal(first("blk.1.ffn_down.weight"), w2 + dim * hidden);
  assert.equal(first("blk.1.ffn_up.weight"), w3 + hidden * dim);
  assert.equal(first("output_norm.weight"), rmsFinal);
  assert.equal(first("output.weight"), wcls);
  assert.deepEqual(tensors.get("output.weight")!.shape, [vocab, dim]);
  assert.deepEqual(tensors.get("blk.0.attn_k.weight")!.shape, [kv, dim]);
  assert.deepEqual(tensors.get("blk.0.ffn_down.weight")!.shape, [dim, hidden]);
  assert.equal(tensors.size, 2 + 9 * L + 1);
});

Deno.test("readLlama2c() rejects every truncation and extension of a real file", async () => {
  const bytes = await readFixture(STORIES);
  const points = new Set([0, 1, 7, 8, 27, 28, 29, bytes.length - 1, bytes.length - 4]);
  for (let i = 0; points.size < 40; i++) points.add(Math.floor((bytes.length * i) / 33) + 5);
  for (const n of points) {
    if (n >= bytes.length) continue;
    assertFormatError(
      () => readLlama2c(bytes.subarray(0, n), "stories260K.bin"),
      "stories260K.bin",
      n < 28
        ? /too short for the 28-byte/
        : /implies 1056540 bytes, but the file has \d+ \(truncated\?\)/,
      `truncated to ${n} bytes`,
    );
  }
  const longer = new Uint8Array(bytes.length + 4);
  longer.set(bytes);
  assertFormatError(() => readLlama2c(longer, "x.bin"), "x.bin", /implies 1056540 bytes/, "+4");
});

Deno.test("readLlama2c() rejects flipped header bytes and absurd header values", async () => {
  const bytes = await readFixture(STORIES);
  const what = /header field|implies \d+ bytes|versioned llama2.c export|must be even/;
  for (let byte = 0; byte < 28; byte++) {
    for (const mask of [0x01, 0x02, 0x40, 0x80, 0xff]) {
      bytes[byte] ^= mask; // flipped in place, restored below
      assertFormatError(
        () => readLlama2c(bytes, "flip.bin"),
        "flip.bin",
        what,
        `byte ${byte} ^ ${mask} (header ${header(bytes)})`,
      );
      bytes[byte] ^= mask;
    }
  }
  const view = new DataView(bytes.buffer);
  for (let field = 0; field < 7; field++) {
    const saved = view.getInt32(4 * field, true);
    for (const v of [0, -1, 2 ** 31 - 1, -(2 ** 31), 1 << 20, saved + 1, saved * 2]) {
      if (v === saved) continue;
      view.setInt32(4 * field, v, true);
      assertFormatError(() => readLlama2c(bytes, "v.bin"), "v.bin", what, `field ${field} = ${v}`);
    }
    view.setInt32(4 * field, saved, true);
  }
  assert.equal(readLlama2c(bytes, "restored.bin").config.dim, 64);
  // Newer exports start with the "ak42" magic: a clear error, not a size mismatch.
  const v1 = bytes.slice(0, 256);
  new DataView(v1.buffer).setUint32(0, 0x616b3432, true);
  assertFormatError(() => readLlama2c(v1, "v1.bin"), "v1.bin", /versioned .*version 0/, "v1");
});
