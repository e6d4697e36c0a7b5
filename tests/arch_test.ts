/**
 * Every architecture the README names, against Hugging Face transformers. The tiny random
 * checkpoints in tests/data/arch/<family>/ keep each family's features (Llama 3 rope scaling,
 * Mistral's sliding window and explicit head_dim, Qwen2's q/k/v biases, tied embeddings, GQA
 * ratios 3 and 4, head sizes 32, 64 and 128); tests/data/arch/make_arch.py wrote them with
 * transformers 5.17 together with its logits (float64, for prompt + 32 greedy tokens) and its
 * 32 greedy tokens. specdec must reproduce both: the CPU reference forward, the GPU forward with
 * f16 and with f32 weights (prefill, and decode through the KV cache), and the GPU forward of the
 * GGUF that `quantize --quant f16` writes.
 *
 * Tolerances (max |logit error|; the references' logits have std 2-3, their smallest greedy
 * top-1/top-2 margin is 0.065), with what lavapipe measured:
 * - CPU reference (f32): 1e-4 (measured ≤ 3.1e-6).
 * - GPU, f32 weights and f32 KV cache: 1e-4 (measured ≤ 6.5e-6).
 * - GPU, f16 weights (exactly the checkpoint's values) and f16 KV cache, from the folder or the
 *   GGUF: 2e-2 (measured ≤ 3.9e-3). The error is the f16 KV cache's rounding of K and V: the
 *   same f16 weights with an f32 cache measure ≤ 6.5e-6.
 * Each GPU test prints the errors it measured.
 */
import assert from "@specdec/assert";
import { join } from "@specdec/path";
import { errorStats, gpuTest } from "./harness.ts";
import { fixture, GREEDY, QUIET, readLogits, refWeights } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { Session } from "../engine/session.ts";
import { quantizeToGguf } from "../engine/quantize.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaRef } from "../models/llama_ref.ts";
import { loadModel } from "../models/load.ts";
import { readHfConfig } from "../models/hf.ts";
import { llama3FromRopeFreqs, llama3RopeFreqs, modelToGguf, readGguf } from "../models/gguf.ts";
import { FormatError, type LoadedModel, type ModelConfig } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";

const FAMILIES = ["llama3", "smollm2", "mistral", "qwen2"] as const;
type Family = typeof FAMILIES[number];

/** Max |logit error| allowed, by path (see the module comment). */
const TOL = { cpu: 1e-4, f32: 1e-4, f16: 2e-2 } as const;

/** What make_arch.py wrote in reference.json. */
interface ArchReference {
  family: Family;
  transformers: string;
  prompt: number[];
  prompt_text?: string;
  prompt_bos?: boolean;
  greedy: number[];
  greedy_text?: string;
  logits_rows: number;
  vocab_size: number;
  greedy_min_margin: number;
}

/** A family's checkpoint folder, its reference and its logits `[prompt + greedy, vocab]`. */
interface ArchCase {
  family: Family;
  dir: string;
  ref: ArchReference;
  logits: Float32Array;
}

const DATA = new URL("./data/arch/", import.meta.url).pathname;

/** Reads tests/data/arch/<family>; a missing or short file fails with what to do. */
async function archCase(family: Family): Promise<ArchCase> {
  const dir = join(DATA, family);
  const read = async (name: string) => {
    try {
      return await Deno.readFile(join(dir, name));
    } catch (e) {
      throw new Error(
        `fixture missing: ${join(dir, name)} (${(e as Error).message}); re-make it with ` +
          `tests/data/arch/make_arch.py (needs torch and transformers)`,
      );
    }
  };
  const ref = JSON.parse(new TextDecoder().decode(await read("reference.json"))) as ArchReference;
  const bytes = await read("logits.f32");
  const rows = ref.prompt.length + ref.greedy.length;
  if (ref.logits_rows !== rows || bytes.byteLength !== rows * ref.vocab_size * 4) {
    throw new Error(`${dir}/logits.f32: ${bytes.byteLength} bytes, expected ${rows} rows`);
  }
  return { family, dir, ref, logits: new Float32Array(bytes.buffer) };
}

/** Row `t` of the reference logits (row prompt.length - 1 + i is decode step i). */
function refRow(c: ArchCase, t: number): Float32Array {
  return c.logits.subarray(t * c.ref.vocab_size, (t + 1) * c.ref.vocab_size);
}

/** The tokenizer the GGUF of a family carries: its own tokenizer.json, else tok512. */
async function ggufTokenizer(c: ArchCase): Promise<string | undefined> {
  return c.ref.prompt_text === undefined
    ? await fixture("icppWorld-icpp_llm/tok512.bin")
    : undefined;
}

/** Writes the family's `quantize --quant f16` GGUF into a fresh temp folder. */
async function writeGguf(c: ArchCase): Promise<{ path: string; cleanup: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: `specdec-arch-${c.family}-` });
  const path = join(dir, `${c.family}-f16.gguf`);
  const tokenizer = await ggufTokenizer(c);
  await quantizeToGguf({
    model: c.dir,
    quant: "f16",
    out: path,
    ...(tokenizer ? { tokenizer } : {}),
  });
  return { path, cleanup: () => Deno.remove(dir, { recursive: true }) };
}

// ---- configs, CPU reference, tokenizers ------------------------------------------------------

Deno.test("readHfConfig() resolves each tiny checkpoint with its family's features", async () => {
  const configs = {} as Record<Family, ModelConfig>;
  for (const f of FAMILIES) {
    const path = join(DATA, f, "config.json");
    configs[f] = readHfConfig(JSON.parse(await Deno.readTextFile(path)), path);
  }
  const pick = (c: ModelConfig) => [
    c.architecture,
    c.dim,
    c.nHeads / c.nKvHeads,
    c.headDim,
    c.ropeTheta,
    c.tiedEmbeddings,
    c.qkvBias,
    c.maxSeqLen,
    c.slidingWindow,
  ];
  // family: [arch, dim, GQA ratio, head size, theta, tied, q/k/v bias, usable context, window]
  assert.deepEqual(pick(configs.llama3), ["llama", 64, 4, 64, 5e5, false, false, 512, undefined]);
  assert.deepEqual(pick(configs.smollm2), ["llama", 96, 3, 32, 1e5, true, false, 1024, undefined]);
  assert.deepEqual(pick(configs.mistral), ["mistral", 64, 4, 128, 1e4, false, false, 64, 64]);
  assert.deepEqual(pick(configs.qwen2), ["qwen2", 128, 2, 64, 1e6, true, true, 512, undefined]);
  assert.deepEqual(configs.llama3.ropeScaling, {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 64,
  });
  assert.deepEqual(configs.llama3.eosIds, [501, 509]);
});

/** max |logits - reference| of the CPU forward of `config` over prompt + greedy tokens. */
async function cpuError(c: ArchCase, patch: Partial<ModelConfig> = {}): Promise<number> {
  const model = await loadModel(c.dir);
  const config = { ...model.config, ...patch };
  const ref = new LlamaRef(config, refWeights(model), c.ref.logits_rows);
  const rows = ref.forward([...c.ref.prompt, ...c.ref.greedy]);
  return Math.max(...rows.map((row, t) => errorStats(row, refRow(c, t)).maxAbs));
}

Deno.test("the CPU reference forward gives transformers' logits for every family", async () => {
  for (const f of FAMILIES) {
    const err = await cpuError(await archCase(f));
    assert.ok(err <= TOL.cpu, `${f}: max |logit error| ${err} > ${TOL.cpu}`);
  }
});

Deno.test("the references depend on each family's feature (the comparisons can fail)", async () => {
  // Without Llama 3 scaling, without Qwen2's biases, or with the default theta, the same
  // weights give logits far outside every tolerance.
  const cases: [Family, Partial<ModelConfig>][] = [
    ["llama3", { ropeScaling: undefined }],
    ["qwen2", { qkvBias: false }],
    ["smollm2", { ropeTheta: 10000 }],
  ];
  for (const [f, patch] of cases) {
    const err = await cpuError(await archCase(f), patch);
    assert.ok(err > 10 * TOL.f16, `${f} ${JSON.stringify(patch)}: only ${err} off`);
  }
});

Deno.test("tokenizer.json (Llama 3 and Qwen2 byte-level BPE) encodes and decodes as transformers' tokenizers", async () => {
  for (const f of ["llama3", "qwen2"] as const) {
    const c = await archCase(f);
    const model = await loadModel(c.dir);
    const tok = model.tokenizer!;
    assert.ok(tok, `${f}: no tokenizer loaded from ${c.dir}`);
    const ids = tok.encode(c.ref.prompt_text!, { bos: c.ref.prompt_bos });
    assert.deepEqual(ids, c.ref.prompt, `${f}: prompt ids`);
    assert.equal(tok.decode(ids), c.ref.prompt_text);
    assert.equal(tok.decode(c.ref.greedy), c.ref.greedy_text, `${f}: greedy text`);
  }
});

// ---- sliding window and unsupported configs --------------------------------------------------

Deno.test("a context longer than Mistral's sliding_window is refused at load, naming the field and the remedy", async () => {
  const c = await archCase("mistral");
  await assert.rejects(
    () => Session.load({ model: c.dir, maxSeq: 65 }, () => {}),
    /context 65 is longer than the model's 64 \(sliding_window 64: attention past the window is not implemented, so the context must fit in it \(use --ctx 64 or less\)\)/,
  );
  const base = JSON.parse(await Deno.readTextFile(join(c.dir, "config.json")));
  // Qwen2 applies its window only with use_sliding_window, from layer max_window_layers on.
  const qwen = { ...base, model_type: "qwen2", sliding_window: 32 };
  assert.equal(readHfConfig(qwen, "c.json").maxSeqLen, 256);
  assert.equal(readHfConfig({ ...qwen, use_sliding_window: true }, "c.json").maxSeqLen, 256);
  const on = readHfConfig({ ...qwen, use_sliding_window: true, max_window_layers: 1 }, "c.json");
  assert.deepEqual([on.maxSeqLen, on.slidingWindow], [32, 32]);
  const types = { ...base, layer_types: ["full_attention", "sliding_attention"] };
  assert.equal(readHfConfig(types, "c.json").maxSeqLen, 64);
  const full = { ...base, layer_types: ["full_attention", "full_attention"] };
  assert.equal(readHfConfig(full, "c.json").slidingWindow, undefined);
  // A window at least as long as the trained context changes nothing (Mistral v0.2 style).
  assert.equal(readHfConfig({ ...base, sliding_window: null }, "c.json").maxSeqLen, 256);
  assert.equal(readHfConfig({ ...base, sliding_window: 4096 }, "c.json").maxSeqLen, 256);
});

Deno.test("unsupported families and fields are refused at load, naming the field", async () => {
  const base = JSON.parse(await Deno.readTextFile(join(DATA, "llama3", "config.json")));
  const cases: [Record<string, unknown>, RegExp][] = [
    [
      { model_type: "gemma2" },
      /"model_type" "gemma2" is not supported \(supported: llama, mistral, qwen2\)/,
    ],
    [{ model_type: "qwen3" }, /"model_type" "qwen3" is not supported/],
    [
      { rope_parameters: { rope_type: "yarn", rope_theta: 1e6, factor: 4 } },
      /"rope_parameters" type "yarn" is not supported/,
    ],
    [
      { rope_scaling: { type: "dynamic", factor: 2 } },
      /"rope_scaling" type "dynamic" is not supported/,
    ],
    [
      { rope_scaling: { rope_type: "longrope" } },
      /"rope_scaling" type "longrope" is not supported/,
    ],
    [{ attention_bias: true }, /"attention_bias": true is not supported/],
    [{ mlp_bias: true }, /"mlp_bias": true is not supported/],
    [{ partial_rotary_factor: 0.5 }, /"partial_rotary_factor" 0.5 is not supported/],
    [
      { quantization_config: { quant_method: "awq", bits: 4 } },
      /"quantization_config" \("awq"\) is not supported: use the unquantized/,
    ],
    [{ layer_types: ["full_attention", "chunked_attention"] }, /"layer_types" must list/],
    [{ layer_types: ["sliding_attention", "full_attention"] }, /"sliding_window" is missing/],
    [{ model_type: "mistral", sliding_window: 0 }, /"sliding_window" must be an integer/],
    [
      { model_type: "qwen2", use_sliding_window: "yes" },
      /"use_sliding_window" must be true or false/,
    ],
  ];
  for (const [patch, what] of cases) {
    assert.throws(
      () => readHfConfig({ ...base, ...patch }, "x/config.json"),
      (e: unknown) =>
        e instanceof FormatError && /^x\/config\.json: /.test(e.message) && what.test(e.message),
      JSON.stringify(patch),
    );
  }
});

// ---- GGUF ------------------------------------------------------------------------------------

Deno.test("quantize --quant f16 writes each family's features into the GGUF and reads them back", async () => {
  for (const f of FAMILIES) {
    const c = await archCase(f);
    const { path, cleanup } = await writeGguf(c);
    try {
      const src = await loadModel(c.dir, { tokenizer: await ggufTokenizer(c) });
      const back = await loadModel(path);
      // The same config, except: llama.cpp's "llama" architecture holds Mistral too and
      // stores Q/K rows interleaved; Qwen2 keeps rotate-half.
      assert.deepEqual(back.config, {
        ...src.config,
        architecture: src.config.architecture === "qwen2" ? "qwen2" : "llama",
        ropeLayout: src.config.architecture === "qwen2" ? "rotate-half" : "interleaved",
      }, f);
      assert.ok(!back.tensors.has("rope_freqs.weight"), `${f}: rope_freqs is config, not a weight`);
      const g = readGguf(await Deno.readFile(path), path);
      assert.equal(g.tensors.some((t) => t.name === "rope_freqs.weight"), f === "llama3", f);
      // Its vocabulary: as many tokens as embedding rows (Qwen2's padded), encoding the same.
      assert.equal(back.tokenizer!.vocabSize, back.config.vocabSize, f);
      if (c.ref.prompt_text !== undefined) {
        assert.equal(g.metadata.get("tokenizer.ggml.model")?.value, "gpt2");
        assert.equal(
          g.metadata.get("tokenizer.ggml.pre")?.value,
          f === "llama3" ? "llama-bpe" : "qwen2",
        );
        assert.deepEqual(
          back.tokenizer!.encode(c.ref.prompt_text, { bos: c.ref.prompt_bos }),
          c.ref.prompt,
          f,
        );
      }
    } finally {
      await cleanup();
    }
  }
});

Deno.test("llama3FromRopeFreqs() recovers Llama 3.1's scaling from llama.cpp's rope_freqs and refuses others", () => {
  const s31 = {
    type: "llama3" as const,
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  };
  const t = (f: Float32Array, n = f.length) => ({
    name: "rope_freqs.weight",
    dtype: "f32" as const,
    shape: [n],
    data: new Uint8Array(f.buffer),
  });
  for (const [hd, theta] of [[128, 5e5], [64, 5e5], [32, 1e4]]) {
    const f = llama3RopeFreqs(hd, theta, s31);
    // Without original_context_length llama.cpp files imply 8192 (Llama 3.1's).
    assert.deepEqual(llama3FromRopeFreqs(t(f), hd, theta, undefined, "m.gguf"), s31, `${hd}`);
    const other = {
      ...s31,
      lowFreqFactor: 2,
      highFreqFactor: 16,
      originalMaxPositionEmbeddings: 1024,
    };
    const g = llama3RopeFreqs(hd, theta, other);
    assert.deepEqual(llama3FromRopeFreqs(t(g), hd, theta, 1024, "m.gguf"), other, `${hd} other`);
  }
  assert.equal(
    llama3FromRopeFreqs(t(new Float32Array(64).fill(1)), 128, 5e5, undefined, "m"),
    undefined,
  );
  // Divisors that fall and rise again follow no Llama 3 rule; a wrong length is named.
  const bumpy = llama3RopeFreqs(128, 5e5, s31);
  bumpy[10] = 3;
  assert.throws(
    () => llama3FromRopeFreqs(t(bumpy), 128, 5e5, undefined, "m.gguf"),
    /m\.gguf: tensor "rope_freqs.weight" does not follow Llama 3's/,
  );
  assert.throws(
    () => llama3FromRopeFreqs(t(new Float32Array(8).fill(2)), 128, 5e5, undefined, "m.gguf"),
    /is f32\[8\], expected f32\[64\]/,
  );
});

Deno.test("a GGUF with rope.scaling.type linear or yarn is refused, naming the key", async () => {
  const c = await archCase("smollm2");
  const src = await loadModel(c.dir);
  const bytes = modelToGguf(src.config, src.tensors);
  const g = readGguf(bytes, "m.gguf");
  for (const type of ["linear", "yarn"]) {
    const meta = new Map(g.metadata);
    meta.set("llama.rope.scaling.type", { type: "string", value: type });
    const { ggufToModel } = await import("../models/gguf.ts");
    assert.throws(
      () => ggufToModel({ ...g, metadata: meta }, "m.gguf"),
      new RegExp(`m\\.gguf: llama\\.rope\\.scaling\\.type = "${type}" is not supported`),
    );
  }
});

// ---- the GPU forward -------------------------------------------------------------------------

/**
 * Runs `model` on the GPU against the family's reference: prefill logits of every prompt row;
 * decode through the KV cache (the prompt but its last token, then one token per step over the
 * last prompt token and the greedy tokens, each step's logits against the reference row); and
 * the 32 greedy tokens through the decoder. Returns the max |logit error| of prefill and decode.
 */
async function checkForward(
  gpu: Gpu,
  model: LoadedModel,
  c: ArchCase,
  opts: { noF16: boolean; tol: number; label: string },
): Promise<{ prefill: number; decode: number }> {
  const { prompt, greedy } = c.ref;
  const T = prompt.length, V = c.ref.vocab_size;
  assert.equal(model.config.vocabSize, V);
  const store = new WeightStore(gpu);
  const m = await LlamaGpu.create(gpu, store, model, {
    label: opts.label,
    maxSeq: T + greedy.length + 1,
    maxLogitRows: T,
    noF16: opts.noF16,
  });
  try {
    const promptBuf = gpu.upload(`${opts.label}.prompt`, new Uint32Array(prompt));
    m.setPosition(0);
    await gpu.run("prefill", await m.plan(T, { buffer: promptBuf, offset: 0 }, "all"));
    const got = await readLogits(gpu, m, T);
    let prefill = 0;
    for (let t = 0; t < T; t++) {
      prefill = Math.max(
        prefill,
        errorStats(got.subarray(t * V, (t + 1) * V), refRow(c, t)).maxAbs,
      );
    }
    m.setPosition(0);
    await gpu.run("prefill", await m.plan(T - 1, { buffer: promptBuf, offset: 0 }, "none"));
    const next = gpu.upload(`${opts.label}.next`, new Uint32Array(1), GPUBufferUsage.STORAGE);
    const step = await m.plan(1, { buffer: next, offset: 0 }, "last");
    let decode = 0;
    const inputs = [prompt[T - 1], ...greedy.slice(0, -1)];
    for (const [i, token] of inputs.entries()) {
      gpu.write(next, new Uint32Array([token]));
      await gpu.run("decode", step);
      decode = Math.max(
        decode,
        errorStats(await readLogits(gpu, m, 1), refRow(c, T - 1 + i)).maxAbs,
      );
    }
    console.log(
      `${opts.label}: max |logit error| prefill ${prefill.toExponential(2)}, decode ` +
        `${decode.toExponential(2)} (limit ${opts.tol})`,
    );
    assert.ok(
      prefill <= opts.tol,
      `${opts.label}: prefill max |logit error| ${prefill} > ${opts.tol}`,
    );
    assert.ok(
      decode <= opts.tol,
      `${opts.label}: decode max |logit error| ${decode} > ${opts.tol}`,
    );
    const dec = new Decoder(gpu, m);
    try {
      const r = await dec.generate(prompt, greedy.length, GREEDY, QUIET);
      assert.deepEqual(r.tokens, greedy, `${opts.label}: greedy tokens`);
    } finally {
      dec.destroy();
    }
    return { prefill, decode };
  } finally {
    m.destroy();
    store.destroy();
  }
}

for (const f of FAMILIES) {
  for (const weights of ["f16", "f32"] as const) {
    gpuTest(
      `${f}, ${weights} weights: GPU prefill and decode match transformers' logits and its 32 greedy tokens`,
      async (gpu) => {
        const c = await archCase(f);
        await checkForward(gpu, await loadModel(c.dir), c, {
          noF16: weights === "f32",
          tol: TOL[weights],
          label: `${f}.${weights}`,
        });
      },
      weights === "f16" ? { features: ["shader-f16"] } : {},
    );
  }
  gpuTest(
    `${f}, through quantize --quant f16: the GGUF's GPU forward matches transformers and its greedy tokens`,
    async (gpu) => {
      const c = await archCase(f);
      const { path, cleanup } = await writeGguf(c);
      try {
        await checkForward(gpu, await loadModel(path), c, {
          noF16: false,
          tol: TOL.f16,
          label: `${f}.gguf`,
        });
      } finally {
        await cleanup();
      }
    },
    { features: ["shader-f16"] },
  );
}

gpuTest(
  "llama3 end to end: prompt text through tokenizer.json, GPU decoding (plain, n-gram and draft-model speculation) and streamed text give transformers' greedy output",
  async () => {
    const c = await archCase("llama3");
    const session = await Session.load({ model: c.dir, draft: c.dir }, () => {});
    try {
      assert.deepEqual(session.tokenize(c.ref.prompt_text!, true), c.ref.prompt);
      for (const spec of ["none", "ngram", "model"] as const) {
        const chunks: { text: string; tokens: number[] }[] = [];
        const stats = await session.generate(
          {
            prompt: c.ref.prompt_text!,
            maxTokens: c.ref.greedy.length,
            ...GREEDY,
            spec,
            draftTokens: 3,
          },
          (chunk) => chunks.push(chunk),
          () => false,
        );
        assert.equal(stats.prompt_tokens, c.ref.prompt.length, spec);
        assert.deepEqual(chunks.flatMap((ch) => ch.tokens), c.ref.greedy, `${spec}: tokens`);
        assert.equal(chunks.map((ch) => ch.text).join(""), c.ref.greedy_text, `${spec}: text`);
      }
    } finally {
      await session.dispose();
    }
  },
);
