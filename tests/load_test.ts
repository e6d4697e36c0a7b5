import assert from "@specdec/assert";
import { join } from "@specdec/path";
import { countParams, findFolderTokenizer, loadModel } from "../models/load.ts";
import { formatInspect, formatParams, inspectModel } from "../models/inspect.ts";
import { assertFormatErrorAsync } from "./fixtures.ts";

const MODELS = new URL("../../shared/models/", import.meta.url);

async function fixture(relative: string): Promise<string> {
  const path = new URL(relative, MODELS).pathname;
  try {
    await Deno.stat(path);
  } catch (e) {
    throw new Error(`fixture ${path} is missing (see shared/models/MANIFEST.md): ${e}`);
  }
  return path;
}

Deno.test("loadModel() loads the pycode pair with their SentencePiece tokenizers", async () => {
  for (const [name, params] of [["target", 60_913_728], ["draft", 10_602_240]] as const) {
    const dir = await fixture(`pycode-pair/${name}`);
    const progress: string[] = [];
    const model = await loadModel(dir, { onProgress: (m) => progress.push(m) });
    assert.equal(model.format, "safetensors");
    assert.equal(model.source, dir);
    assert.equal(countParams(model.tensors), params);
    assert.equal(model.tokenizer?.vocabSize, 32000);
    assert.equal(await findFolderTokenizer(dir), join(dir, "tokenizer.model"));
    assert.ok(progress.some((m) => /model\.safetensors \(\d+\.\d MB\)/.test(m)), `${progress}`);
    assert.ok(progress.some((m) => /tokenizer\.model/.test(m)), `${progress}`);
  }
});

Deno.test("loadModel() loads llama2.c files, with a tokenizer only when one is passed", async () => {
  const path = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const bare = await loadModel(path);
  assert.deepEqual([bare.format, bare.config.dim, bare.config.ffnDim], ["llama2c", 64, 172]);
  assert.equal(bare.tokenizer, undefined);
  assert.equal(countParams(bare.tensors), 260_032, "MANIFEST.md: 260,032 weights");
  const tokenizer = await fixture("icppWorld-icpp_llm/tok512.bin");
  const withTok = await loadModel(path, { tokenizer });
  assert.equal(withTok.tokenizer?.vocabSize, 512);
  const xs = await loadModel(await fixture("saltyduckegg-llama2xs.c/model.bin"));
  assert.equal(countParams(xs.tensors), 279_232, "MANIFEST.md: 279,232 weights");
});

Deno.test("loadModel() dispatches .gguf files to the GGUF reader and its vocabulary", async () => {
  const path = await fixture("ggerganov-llama.cpp/ggml-vocab-llama-spm.gguf");
  const model = await loadModel(path);
  assert.equal(model.format, "gguf");
  assert.deepEqual([model.config.dim, model.config.nLayers, model.tensors.size], [4096, 32, 0]);
  assert.equal(model.tokenizer?.vocabSize, 32000, "the vocabulary stored in the GGUF");
});

Deno.test("loadModel() names the path and the supported formats for anything else", async () => {
  const dir = await Deno.makeTempDir({ prefix: "specdec_load_" });
  try {
    const pt = join(dir, "model.pt");
    await Deno.writeTextFile(pt, "x");
    await assertFormatErrorAsync(
      () => loadModel(pt),
      pt,
      /unsupported model file "model.pt": expected a Hugging Face folder .*\.gguf.*llama2\.c/,
    );
    const st = join(dir, "model.safetensors");
    await Deno.writeTextFile(st, "x");
    await assertFormatErrorAsync(() => loadModel(st), st, /pass the folder .* config\.json/);
    const missing = join(dir, "nope.bin");
    await assertFormatErrorAsync(() => loadModel(missing), missing, /no such file or folder/);
    await assertFormatErrorAsync(() => loadModel(dir), dir, /no config\.json here/);
    const bin = join(dir, "bad.bin");
    await Deno.writeFile(bin, new Uint8Array(40));
    await assertFormatErrorAsync(() => loadModel(bin), bin, /header field dim = 0/);
    const gguf = join(dir, "bad.gguf");
    await Deno.writeFile(gguf, new Uint8Array(40));
    await assertFormatErrorAsync(() => loadModel(gguf), gguf, /./);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("inspectModel() totals params and bytes; formatInspect() aligns the tensor table", async () => {
  const model = await loadModel(await fixture("icppWorld-icpp_llm/stories260K.bin"));
  const result = inspectModel(model);
  assert.equal(result.totalParams, 260_032);
  assert.equal(result.totalBytes, 4 * 260_032);
  assert.equal(result.tensors.length, 47);
  assert.deepEqual(result.tensors[0], {
    name: "token_embd.weight",
    shape: [512, 64],
    dtype: "f32",
    bytes: 131_072,
  });
  const text = formatInspect(result);
  assert.match(text, /^architecture +"llama"$/m);
  assert.match(text, /^ropeLayout +"interleaved"$/m);
  assert.match(text, /47 tensors, 260,032 parameters \(260\.0K\), 1,040,128 bytes \(1\.0 MiB\)$/);
  const rows = text.split("\n").filter((l) => /^(tensor|token_embd|blk\.|output)/.test(l));
  assert.equal(rows.length, 48);
  // Every column starts at the same offset in every row.
  const shapeAt = rows[0].indexOf("shape");
  const dtypeAt = rows[0].indexOf("dtype");
  for (const r of rows.slice(1)) {
    assert.equal(r.indexOf("["), shapeAt, r);
    assert.equal(r.indexOf("f32"), dtypeAt, r);
    assert.equal(r.length, rows[0].length, r);
  }
  assert.equal(formatParams(60_913_728), "60.9M");
});
