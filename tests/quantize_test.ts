import assert from "@specdec/assert";
import { join } from "@specdec/path";
import { convertTensor, quantizeToGguf, tokenizerToGguf } from "../engine/quantize.ts";
import type { KeepGroup, QuantRequest } from "../engine/quant_plan.ts";
import { GGML_TYPE_IDS, permuteRopeRows, readGguf } from "../models/gguf.ts";
import { loadModel } from "../models/load.ts";
import { dequantize, quantize } from "../models/quant.ts";
import type { HostTensor, LoadedModel } from "../models/types.ts";
import { fixture } from "./fixtures.ts";

const SAMPLES = [
  "Once upon a time, there was a little girl named Lily.",
  "def main(argv):\n    return  sorted(x   for x in argv)  # two  spaces\n",
  "  leading and trailing  ",
  "Unicode: héllo wörld — 日本 🙂",
];

/** The tensor a correct quantizer writes: the source's f32 values quantized, Q/K rows permuted. */
function expected(src: LoadedModel, t: HostTensor, dtype: HostTensor["dtype"]): HostTensor {
  const n = t.shape.reduce((a, b) => a * b, 1);
  let want: HostTensor = t.dtype === dtype // same format: copied as it is
    ? t
    : { ...t, dtype, data: quantize(dtype, dequantize(t.dtype, t.data, n)) };
  const m = /^blk\.\d+\.attn_([qk])\./.exec(t.name);
  if (m && src.config.ropeLayout === "rotate-half") {
    want = permuteRopeRows(want, m[1] === "q" ? src.config.nHeads : src.config.nKvHeads);
  }
  return want;
}

/** Quantizes `model` to a temp GGUF and checks tensors, config, tokenizer and file against it. */
async function roundTrip(
  modelPath: string,
  tokenizer: string | undefined,
  quant: QuantRequest,
  keep?: KeepGroup[],
): Promise<{ formats: Map<string, string>; messages: string[] }> {
  const dir = await Deno.makeTempDir({ prefix: "specdec-quantize-" });
  try {
    const out = join(dir, `m-${quant}.gguf`);
    const messages: string[] = [];
    const opts = {
      model: modelPath,
      quant,
      out,
      onProgress: (m: string) => messages.push(m),
      ...(tokenizer ? { tokenizer } : {}),
      ...(keep ? { keep } : {}),
    };
    const r = await quantizeToGguf(opts);
    const src = await loadModel(modelPath, tokenizer ? { tokenizer } : {});
    const back = await loadModel(out); // tokenizer from the GGUF's own metadata
    assert.equal(back.format, "gguf");
    assert.equal(r.bytesOut, (await Deno.stat(out)).size);
    assert.equal(r.tensors, src.tensors.size);
    assert.equal(r.bytesIn, [...src.tensors.values()].reduce((a, t) => a + t.data.byteLength, 0));
    const names = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name);
    assert.deepEqual(names, [`m-${quant}.gguf`], "only the output file, no temp file");

    // Config: identical, except that a rotate-half checkpoint is stored interleaved.
    assert.deepEqual(back.config, { ...src.config, ropeLayout: "interleaved" });

    // Tensors: same names and order, each byte-equal to quantize(format, source f32 values).
    assert.deepEqual([...back.tensors.keys()], [...src.tensors.keys()]);
    const formats = new Map<string, string>();
    for (const [name, t] of src.tensors) {
      const choice = r.plan.get(name)!;
      const got = back.tensors.get(name)!;
      const dtype = choice.format as HostTensor["dtype"];
      assert.equal(got.dtype, dtype, name);
      assert.deepEqual(got.shape, t.shape, name);
      const want = expected(src, t, dtype);
      assert.ok(
        got.data.byteLength === want.data.byteLength &&
          got.data.every((b, i) => b === want.data[i]),
        `${name} (${dtype}): bytes differ from quantize(${dtype}, source values)`,
      );
      formats.set(name, dtype);
    }

    // A valid GGUF whose tensor types are llama.cpp's ggml type ids.
    const g = readGguf(await Deno.readFile(out), out);
    assert.equal(g.version, 3);
    assert.equal(g.metadata.get("general.architecture")?.value, "llama");
    assert.equal(g.metadata.get("tokenizer.ggml.model")?.value, "llama");
    for (const t of g.tensors) assert.equal(t.dtype, formats.get(t.name), t.name);

    // Tokenizer: the GGUF's vocabulary encodes and decodes like the source tokenizer.
    const a = src.tokenizer!, b = back.tokenizer!;
    assert.equal(b.vocabSize, a.vocabSize);
    assert.equal(b.bosId, a.bosId);
    assert.equal(b.eosId, a.eosId);
    for (const s of SAMPLES) {
      const ids = a.encode(s, { bos: true });
      assert.deepEqual(b.encode(s, { bos: true }), ids, JSON.stringify(s));
      assert.equal(b.decode(ids), a.decode(ids));
    }
    for (let i = 0; i < a.vocabSize; i += 97) assert.equal(b.piece(i), a.piece(i));
    return { formats, messages };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("ggml type ids are llama.cpp's (f32 0, f16 1, q4_0 2, q8_0 8, q4_K 12, q6_K 14)", () => {
  assert.deepEqual(
    [GGML_TYPE_IDS.f32, GGML_TYPE_IDS.f16, GGML_TYPE_IDS.q4_0, GGML_TYPE_IDS.q8_0],
    [0, 1, 2, 8],
  );
  assert.deepEqual([GGML_TYPE_IDS.q4_k, GGML_TYPE_IDS.q6_k], [12, 14]);
});

for (const quant of ["q8_0", "q4_0", "q4_k"] as const) {
  Deno.test(`quantizeToGguf(${quant}) of stories260K loads back to the quantized tensors`, async () => {
    const model = await fixture("icppWorld-icpp_llm/stories260K.bin");
    const tok = await fixture("icppWorld-icpp_llm/tok512.bin");
    const { formats, messages } = await roundTrip(model, tok, quant);
    // dim 64 holds whole 32-blocks; ffn_down's 172 columns do not -> f16.
    const mid = quant === "q4_k" ? "q4_0" : quant;
    assert.equal(formats.get("blk.2.attn_q.weight"), mid);
    assert.equal(formats.get("blk.2.ffn_down.weight"), "f16");
    assert.equal(formats.get("blk.0.attn_q.weight"), "q8_0" === quant ? "f16" : "q8_0");
    assert.equal(formats.get("token_embd.weight"), "q8_0" === quant ? "f16" : "q8_0");
    assert.equal(formats.get("output_norm.weight"), "f32");
    assert.ok(messages.includes(`blk.2: f32 x2, ${mid} x6, f16 x1`), messages.join("\n"));
    assert.ok(messages.some((m) => m.startsWith("writing ")));
  });
}

Deno.test("quantizeToGguf(q4_0, keep none) of stories260K quantizes every matrix", async () => {
  const model = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok = await fixture("icppWorld-icpp_llm/tok512.bin");
  const { formats } = await roundTrip(model, tok, "q4_0", []);
  assert.equal(formats.get("token_embd.weight"), "q4_0");
  assert.equal(formats.get("blk.0.attn_q.weight"), "q4_0");
});

Deno.test("quantizeToGguf() of a quantized GGUF re-encodes down and never up", async () => {
  const model = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok = await fixture("icppWorld-icpp_llm/tok512.bin");
  const dir = await Deno.makeTempDir({ prefix: "specdec-quantize-" });
  try {
    const q8 = join(dir, "q8.gguf");
    await quantizeToGguf({ model, tokenizer: tok, quant: "q8_0", keep: [], out: q8 });
    const down = await roundTrip(q8, undefined, "q4_0", []); // q8_0 -> q4_0, tokenizer from GGUF
    assert.equal(down.formats.get("blk.1.attn_q.weight"), "q4_0");
    assert.equal(down.formats.get("blk.1.ffn_down.weight"), "f16"); // 172 cols
    const up = await roundTrip(q8, undefined, "f16", []); // q8_0 is not re-encoded upward
    assert.equal(up.formats.get("blk.1.attn_q.weight"), "q8_0");
    assert.equal(up.formats.get("token_embd.weight"), "q8_0");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

for (const quant of ["q8_0", "q4_0", "q4_k"] as const) {
  Deno.test(`quantizeToGguf(${quant}) of the pycode draft (rotate-half, f16) round-trips`, async () => {
    const model = await fixture("pycode-pair/draft");
    const { formats } = await roundTrip(model, undefined, quant);
    assert.equal(formats.get("blk.1.attn_q.weight"), quant);
    assert.equal(formats.get("blk.1.ffn_down.weight"), quant === "q4_k" ? "q4_0" : quant);
    assert.equal(formats.get("blk.2.attn_k.weight"), quant === "q8_0" ? "f16" : "q8_0");
  });
}

Deno.test("quantizeToGguf() refuses nf4 and an unknown format before reading the model", async () => {
  for (
    const o of [{ quant: "nf4" as const }, { quant: "q4_0" as const, keepFormat: "nf4" as const }]
  ) {
    await assert.rejects(
      () => quantizeToGguf({ model: "/nonexistent", out: "/tmp/x.gguf", ...o }),
      /nf4 has no GGUF type; use it at load time with --quant nf4/,
    );
  }
  await assert.rejects(
    () => quantizeToGguf({ model: "/nonexistent", out: "/tmp/x.gguf", quant: "q2_k" as never }),
    /quant "q2_k" is not one of/,
  );
});

Deno.test("quantizeToGguf() into a missing folder fails clearly and writes nothing", async () => {
  const dir = await Deno.makeTempDir({ prefix: "specdec-quantize-" });
  try {
    const out = join(dir, "missing", "m.gguf");
    await assert.rejects(
      () =>
        quantizeToGguf({
          model: join(dir, "whatever.bin"),
          quant: "q8_0",
          out,
        }),
      /cannot write .*missing\/m\.gguf: the folder .*missing does not exist/,
    );
    assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("quantizeToGguf() that fails while writing leaves neither out nor a temp file", async () => {
  const model = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok = await fixture("icppWorld-icpp_llm/tok512.bin");
  const dir = await Deno.makeTempDir({ prefix: "specdec-quantize-" });
  try {
    // Once the checks passed, a non-empty folder appears at `out`: the final rename must fail.
    const out = join(dir, "m.gguf");
    const onProgress = (m: string) => {
      if (m.startsWith("writing ")) {
        Deno.mkdirSync(out);
        Deno.writeTextFileSync(join(out, "keep"), "x");
      }
    };
    await assert.rejects(
      () => quantizeToGguf({ model, tokenizer: tok, quant: "q8_0", out, onProgress }),
      /cannot write .*m\.gguf: /,
    );
    const names = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name);
    assert.deepEqual(names, ["m.gguf"], "no temp file left behind");
    assert.ok((await Deno.stat(out)).isDirectory, "out untouched");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("quantizeToGguf() of a llama2.c model without a tokenizer says to pass one", async () => {
  const model = await fixture("icppWorld-icpp_llm/stories260K.bin");
  await assert.rejects(
    () => quantizeToGguf({ model, quant: "q8_0", out: "/tmp/never-written.gguf" }),
    /stories260K\.bin has no tokenizer; pass one/,
  );
});

Deno.test("convertTensor() copies same-dtype tensors and re-encodes others via f32", () => {
  const values = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * 3);
  const q8: HostTensor = {
    name: "w",
    dtype: "q8_0",
    shape: [2, 32],
    data: quantize("q8_0", values),
  };
  assert.equal(convertTensor(q8, "q8_0"), q8);
  const q4 = convertTensor(q8, "q4_0");
  assert.equal(q4.dtype, "q4_0");
  assert.deepEqual(q4.data, quantize("q4_0", dequantize("q8_0", q8.data, 64)));
  const f = convertTensor(q8, "f32");
  assert.deepEqual(new Float32Array(f.data.buffer), dequantize("q8_0", q8.data, 64));
});

Deno.test("tokenizerToGguf() writes a SentencePiece vocabulary with its whitespace flags", async () => {
  const { loadTokenizerFile } = await import("../models/tokenizer.ts");
  const { sentencePieceFromVocab } = await import("../models/sentencepiece.ts");
  const tok = await loadTokenizerFile(await fixture("pycode-pair/draft/tokenizer.model"));
  const d = tokenizerToGguf(tok, "tokenizer.model");
  assert.equal(d.model, "llama");
  assert.equal(d.tokens.length, 32000);
  assert.equal(d.tokens[13], "<0x0A>");
  assert.equal(d.tokenTypes![13], 6);
  assert.equal(d.tokenTypes![1], 3);
  assert.equal(d.unknownId, 0);
  assert.equal(d.addSpacePrefix, true);
  assert.equal(d.removeExtraWhitespaces, false);
  const odd = sentencePieceFromVocab({
    pieces: ["<unk>", "<s>", "</s>", "a"],
    scores: [0, 0, 0, -1],
    addDummyPrefix: false,
    removeExtraWhitespaces: true,
  }, "inline");
  const o = tokenizerToGguf(odd, "inline");
  assert.equal(o.addSpacePrefix, false);
  assert.equal(o.removeExtraWhitespaces, true);
  const raw = sentencePieceFromVocab({
    pieces: ["<unk>", "<s>", "</s>"],
    scores: [0, 0, 0],
    escapeWhitespaces: false,
  }, "raw");
  assert.throws(() => tokenizerToGguf(raw, "raw"), /raw: .*escape_whitespaces = false/);
  assert.throws(() => tokenizerToGguf(tok, "tokenizer.model", 31999), /32000 tokens but .* 31999/);
  const padded = tokenizerToGguf(odd, "inline", 6);
  assert.deepEqual(padded.tokens.slice(3), ["a", "[PAD4]", "[PAD5]"]);
  assert.deepEqual([padded.tokenTypes!.slice(4), padded.scores!.slice(4)], [[5, 5], [0, 0]]);
});

Deno.test("tokenizerToGguf() writes a byte-level BPE vocabulary that encodes as the source", async () => {
  const { loadTokenizerFile } = await import("../models/tokenizer.ts");
  const { bpeFromVocab } = await import("../models/bpe.ts");
  const src = await loadTokenizerFile(await fixture("ggerganov-llama.cpp/ggml-vocab-gpt-2.gguf"));
  const d = tokenizerToGguf(src, "gpt-2.gguf");
  assert.deepEqual([d.model, d.pre, d.tokens.length, d.merges!.length], [
    "gpt2",
    "gpt-2",
    50257,
    50000,
  ]);
  assert.equal(d.merges![0], "Ġ t");
  const back = bpeFromVocab({
    tokens: d.tokens,
    merges: d.merges!,
    types: d.tokenTypes,
    pre: d.pre!,
  }, "back");
  for (const s of SAMPLES) assert.deepEqual(back.encode(s), src.encode(s), JSON.stringify(s));
  const tiktoken = await loadTokenizerFile(await fixture("meta-llama-llama3/tokenizer.model"));
  assert.throws(
    () => tokenizerToGguf(tiktoken, "tokenizer.model"),
    /tiktoken rank file holds no merge list/,
  );
});
