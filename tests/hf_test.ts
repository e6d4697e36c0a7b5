import assert from "@specdec/assert";
import { join } from "@specdec/path";
import { hfTensorPlan, loadHfFolder, readHfConfig, readHfIndex } from "../models/hf.ts";
import {
  encodeSafetensors,
  readSafetensors,
  type SafetensorsEntry,
} from "../models/safetensors.ts";
import { f16ToF32, tensorToF32 } from "../models/convert.ts";
import { FormatError, type ModelConfig } from "../models/types.ts";
import { assertFormatErrorAsync } from "./fixtures.ts";

const PAIR = new URL("../../shared/models/pycode-pair/", import.meta.url);

async function fixtureDir(name: string): Promise<string> {
  const path = new URL(name, PAIR).pathname;
  try {
    await Deno.stat(join(path, "model.safetensors"));
  } catch (e) {
    throw new Error(`fixture ${path} is missing (see shared/models/MANIFEST.md): ${e}`);
  }
  return path;
}

// A tiny Llama-style config and matching f32 weights, written to temporary folders.
const TINY = {
  model_type: "llama",
  hidden_size: 8,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  intermediate_size: 12,
  vocab_size: 10,
  max_position_embeddings: 32,
  rms_norm_eps: 1e-6,
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
};

/** HF entries for `config` (f32; value k of tensor t is t + k/1000), plus `extra`. */
function tinyEntries(config: ModelConfig): SafetensorsEntry[] {
  const entries: SafetensorsEntry[] = [];
  const plan = hfTensorPlan(config);
  plan.forEach((t, i) => {
    const n = t.shape.reduce((a, b) => a * b, 1);
    const values = Float32Array.from({ length: n }, (_, k) => i + k / 1000);
    entries.push({
      name: t.hfName,
      dtype: "F32",
      shape: t.shape,
      data: new Uint8Array(values.buffer),
    });
  });
  return entries;
}

async function writeFolder(
  files: Record<string, Uint8Array | string | object>,
): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "specdec_hf_" });
  for (const [name, content] of Object.entries(files)) {
    const bytes = content instanceof Uint8Array
      ? content
      : new TextEncoder().encode(typeof content === "string" ? content : JSON.stringify(content));
    await Deno.writeFile(join(dir, name), bytes);
  }
  return dir;
}

Deno.test("readHfConfig() resolves the pycode pair's config.json files", async () => {
  for (
    const [name, dim, layers, heads, kv, ffn] of [
      ["target", 576, 12, 9, 3, 1536],
      ["draft", 256, 3, 4, 4, 704],
    ] as const
  ) {
    const dir = await fixtureDir(name);
    const json = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
    assert.deepEqual(readHfConfig(json, "config.json"), {
      architecture: "llama",
      dim,
      nLayers: layers,
      nHeads: heads,
      nKvHeads: kv,
      headDim: 64,
      ffnDim: ffn,
      vocabSize: 32000,
      maxSeqLen: 1024,
      normEps: 1e-5,
      ropeTheta: 10000,
      ropeLayout: "rotate-half",
      tiedEmbeddings: true,
      qkvBias: false,
      bosId: 1,
      eosIds: [2],
    });
  }
});

Deno.test("readHfConfig() resolves Llama 3.1 rope scaling, Mistral and Qwen2 configs", () => {
  const llama3 = readHfConfig({
    ...TINY,
    vocab_size: 128256,
    rope_theta: 500000,
    eos_token_id: [128001, 128008, 128009],
    rope_scaling: {
      rope_type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  }, "c.json");
  assert.equal(llama3.ropeTheta, 500000);
  assert.deepEqual(llama3.eosIds, [128001, 128008, 128009]);
  assert.deepEqual(llama3.ropeScaling, {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  // transformers 5 keeps theta and scaling together in rope_parameters.
  const v5 = readHfConfig({
    ...TINY,
    rope_parameters: { rope_type: "default", rope_theta: 1e6 },
  }, "c.json");
  assert.equal(v5.ropeTheta, 1e6);
  assert.equal(v5.ropeScaling, undefined);
  const mistral = readHfConfig({ ...TINY, model_type: "mistral", sliding_window: null }, "c.json");
  assert.equal(mistral.architecture, "mistral");
  assert.equal(mistral.qkvBias, false);
  const qwen = readHfConfig({ ...TINY, model_type: "qwen2", tie_word_embeddings: true }, "c.json");
  assert.deepEqual([qwen.architecture, qwen.qkvBias, qwen.tiedEmbeddings], ["qwen2", true, true]);
  const defaults = readHfConfig(
    { ...TINY, num_key_value_heads: undefined, tie_word_embeddings: undefined, eos_token_id: null },
    "c.json",
  );
  assert.deepEqual(
    [
      defaults.nKvHeads,
      defaults.headDim,
      defaults.tiedEmbeddings,
      defaults.eosIds,
      defaults.ropeTheta,
    ],
    [2, 4, false, [], 10000],
  );
});

Deno.test("readHfConfig() names the file and field of every bad value", async () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ model_type: "gpt2" }, /"model_type" "gpt2" is not supported \(supported: llama, mistral/],
    [{ hidden_size: undefined }, /"hidden_size" is missing/],
    [{ hidden_size: -8 }, /"hidden_size" must be an integer/],
    [{ hidden_size: "8" }, /"hidden_size" must be an integer/],
    [{ hidden_size: 2 ** 40 }, /"hidden_size" must be an integer/],
    [{ hidden_size: 1 << 25 }, /"hidden_size" 33554432 exceeds/],
    [{ num_hidden_layers: 0 }, /"num_hidden_layers" must be an integer/],
    [
      { num_attention_heads: 3 },
      /not a multiple of "num_key_value_heads"|"hidden_size" 8 is not a multiple/,
    ],
    [
      { num_key_value_heads: 3 },
      /"num_attention_heads" 2 is not a multiple of "num_key_value_heads" 3/,
    ],
    [{ intermediate_size: 1.5 }, /"intermediate_size" must be an integer/],
    [{ vocab_size: null }, /"vocab_size" is missing/],
    [{ head_dim: 3 }, /"head_dim" 3 must be even/],
    [{ rms_norm_eps: 0 }, /"rms_norm_eps" must be a positive number/],
    [{ rope_theta: "big" }, /"rope_theta" must be a positive number/],
    [
      { rope_scaling: { type: "linear", factor: 2 } },
      /"rope_scaling" type "linear" is not supported/,
    ],
    [
      { rope_scaling: { rope_type: "llama3", factor: 8 } },
      /"rope_scaling.low_freq_factor" is missing/,
    ],
    [{ rope_scaling: 5 }, /"rope_scaling" is not an object/],
    [{ tie_word_embeddings: "yes" }, /"tie_word_embeddings" must be true or false/],
    [{ attention_bias: true }, /"attention_bias": true is not supported/],
    [{ hidden_act: "gelu" }, /"hidden_act" "gelu" is not supported/],
    [{ eos_token_id: 10 }, /"eos_token_id" must be a token id in \[0, 10\)/],
    [{ bos_token_id: -1 }, /"bos_token_id" must be a token id/],
  ];
  for (const [patch, what] of cases) {
    await assertFormatErrorAsync(
      () => readHfConfig({ ...TINY, ...patch }, "dir/config.json"),
      "dir/config.json",
      what,
      JSON.stringify(patch),
    );
  }
  await assertFormatErrorAsync(
    () => readHfConfig([1], "c.json"),
    "c.json",
    /not a JSON object/,
    "[1]",
  );
});

Deno.test("loadHfFolder() loads the pycode pair: 60.9M and 10.6M params, tied, f16", async () => {
  for (
    const [name, params, norm] of [
      ["target", 60_913_728, [1.95703125, 1.919921875, 1.64453125]],
      ["draft", 10_602_240, [1.9541015625, 1.9072265625, 2.001953125]],
    ] as const
  ) {
    const model = await loadHfFolder(await fixtureDir(name));
    const { config, tensors } = model;
    assert.equal(model.format, "safetensors");
    assert.equal(tensors.size, 2 + 9 * config.nLayers, "no output.weight: embeddings are tied");
    let count = 0;
    for (const t of tensors.values()) {
      assert.equal(t.dtype, "f16", t.name);
      count += t.shape.reduce((a, b) => a * b, 1);
    }
    assert.equal(count, params);
    // Parameters implied by the architecture: embedding + per-layer blocks + final norm.
    const { dim, nLayers, nHeads, nKvHeads, headDim, ffnDim, vocabSize } = config;
    const perLayer = 2 * dim + 2 * dim * nHeads * headDim + 2 * dim * nKvHeads * headDim +
      3 * dim * ffnDim;
    assert.equal(count, vocabSize * dim + nLayers * perLayer + dim);
    assert.equal((count / 1e6).toFixed(1), name === "target" ? "60.9" : "10.6");
    // First values of model.norm.weight, read independently with Python's struct module.
    assert.deepEqual([...f16ToF32(tensors.get("output_norm.weight")!.data).subarray(0, 3)], norm);
    assert.deepEqual(tensors.get("blk.1.attn_k.weight")!.shape, [nKvHeads * headDim, dim]);
  }
  const draft = await loadHfFolder(await fixtureDir("draft"));
  const sum = tensorToF32(draft.tensors.get("blk.1.attn_k.weight")!).reduce((a, b) => a + b, 0);
  assert.equal(sum, 2.8735563158988953, "sum of model.layers.1.self_attn.k_proj.weight (Python)");
});

Deno.test("loadHfFolder() reads single-file and sharded folders to the same tensors", async () => {
  const config = readHfConfig(TINY, "config.json");
  const entries = tinyEntries(config);
  const single = await writeFolder({
    "config.json": TINY,
    "model.safetensors": encodeSafetensors(entries),
  });
  // Two shards, plus a shard that holds nothing we need (it must not be required to parse).
  const half = Math.floor(entries.length / 2);
  const weightMap: Record<string, string> = {};
  entries.forEach((e, i) => weightMap[e.name] = i < half ? "a.safetensors" : "b.safetensors");
  weightMap["model.rotary_emb.inv_freq"] = "unused.safetensors";
  const sharded = await writeFolder({
    "config.json": TINY,
    "model.safetensors.index.json": { metadata: { total_size: 0 }, weight_map: weightMap },
    "a.safetensors": encodeSafetensors(entries.slice(0, half)),
    "b.safetensors": encodeSafetensors(entries.slice(half)),
    "unused.safetensors": "garbage",
  });
  try {
    const a = await loadHfFolder(single);
    const b = await loadHfFolder(sharded);
    assert.equal(a.tensors.size, entries.length);
    assert.ok(a.tensors.has("output.weight"), "untied: lm_head.weight kept as output.weight");
    for (const [name, t] of a.tensors) {
      const u = b.tensors.get(name)!;
      assert.deepEqual([u.dtype, u.shape, u.data], [t.dtype, t.shape, t.data], name);
    }
    const plan = hfTensorPlan(config);
    plan.forEach((p, i) =>
      assert.equal(tensorToF32(a.tensors.get(p.name)!)[1], Math.fround(i + 0.001), p.name)
    );
  } finally {
    await Deno.remove(single, { recursive: true });
    await Deno.remove(sharded, { recursive: true });
  }
});

Deno.test("loadHfFolder() keeps Qwen2 biases and bf16, and drops lm_head when tied", async () => {
  const qwenJson = { ...TINY, model_type: "qwen2", tie_word_embeddings: true };
  const config = readHfConfig(qwenJson, "config.json");
  const entries = tinyEntries(config).map((e) =>
    e.name.endsWith("input_layernorm.weight")
      ? { ...e, dtype: "BF16", data: e.data.slice(0, e.data.byteLength / 2) }
      : e
  );
  const lmHead = {
    name: "lm_head.weight",
    dtype: "F32",
    shape: [10, 8],
    data: new Uint8Array(320),
  };
  const dir = await writeFolder({
    "config.json": qwenJson,
    "model.safetensors": encodeSafetensors([...entries, lmHead]),
  });
  try {
    const { tensors } = await loadHfFolder(dir);
    assert.deepEqual(tensors.get("blk.0.attn_k.bias")!.shape, [4]);
    assert.equal(tensors.get("blk.1.attn_norm.weight")!.dtype, "bf16");
    assert.ok(!tensors.has("output.weight"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadHfFolder() names the file and tensor when weights disagree with config.json", async () => {
  const config = readHfConfig(TINY, "config.json");
  const entries = tinyEntries(config);
  const without = (name: string) => entries.filter((e) => e.name !== name);
  const replace = (name: string, e: Partial<SafetensorsEntry>) =>
    entries.map((x) => x.name === name ? { ...x, ...e } : x);
  const cases: [Record<string, unknown>, RegExp][] = [
    [
      { "model.safetensors": encodeSafetensors(without("lm_head.weight")) },
      /"lm_head.weight" is missing \(config.json says tie_word_embeddings is false\)/,
    ],
    [
      { "model.safetensors": encodeSafetensors(without("model.layers.1.mlp.up_proj.weight")) },
      /"model.layers.1.mlp.up_proj.weight" is missing/,
    ],
    [
      { "model.safetensors": encodeSafetensors(replace("model.norm.weight", { shape: [2, 4] })) },
      /"model.norm.weight" has shape \[2,4\], but config.json implies \[8\]/,
    ],
    [
      {
        "model.safetensors": encodeSafetensors(
          replace("model.norm.weight", { dtype: "I16", data: new Uint8Array(16) }),
        ),
      },
      /"model.norm.weight" has dtype I16; only F32, F16, BF16 load/,
    ],
  ];
  for (const [files, what] of cases) {
    const dir = await writeFolder({ "config.json": TINY, ...files });
    try {
      await assertFormatErrorAsync(
        () => loadHfFolder(dir),
        join(dir, "model.safetensors"),
        what,
        `${what}`,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
  const empty = await writeFolder({ "config.json": TINY });
  try {
    await assertFormatErrorAsync(
      () => loadHfFolder(empty),
      empty,
      /neither model.safetensors nor/,
      "no weights",
    );
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});

Deno.test("loadHfFolder() rejects truncated and invalid config.json and index files", async () => {
  const config = readHfConfig(TINY, "config.json");
  const weights = encodeSafetensors(tinyEntries(config));
  const configBytes = new TextEncoder().encode(JSON.stringify(TINY, null, 2));
  const weightMap = Object.fromEntries(
    hfTensorPlan(config).map((t) => [t.hfName, "w.safetensors"]),
  );
  const indexBytes = new TextEncoder().encode(JSON.stringify({ weight_map: weightMap }, null, 1));
  const dir = await writeFolder({ "w.safetensors": weights });
  const configPath = join(dir, "config.json");
  const indexPath = join(dir, "model.safetensors.index.json");
  try {
    await Deno.writeFile(indexPath, indexBytes);
    await Deno.writeFile(configPath, configBytes);
    assert.equal((await loadHfFolder(dir)).tensors.size, hfTensorPlan(config).length);
    // Every truncation of config.json is invalid JSON: 40 points including 0, 1 and size - 1.
    const cuts = (
      n: number,
    ) => [...new Set(Array.from({ length: 40 }, (_, i) => Math.floor((n - 1) * i / 39)))];
    for (const n of cuts(configBytes.length)) {
      await Deno.writeFile(configPath, configBytes.subarray(0, n));
      await assertFormatErrorAsync(
        () => loadHfFolder(dir),
        configPath,
        /not valid UTF-8 JSON/,
        `config cut ${n}`,
      );
    }
    await Deno.writeFile(configPath, new Uint8Array([0x7b, 0xff, 0x7d]));
    await assertFormatErrorAsync(
      () => loadHfFolder(dir),
      configPath,
      /not valid UTF-8/,
      "config bytes",
    );
    await Deno.writeFile(configPath, configBytes);
    for (const n of cuts(indexBytes.length)) {
      await Deno.writeFile(indexPath, indexBytes.subarray(0, n));
      await assertFormatErrorAsync(
        () => loadHfFolder(dir),
        indexPath,
        /not valid UTF-8 JSON/,
        `index cut ${n}`,
      );
    }
    const indexCases: [unknown, RegExp, string][] = [
      [{}, /"weight_map" is missing or not an object/, indexPath],
      [{ weight_map: [] }, /"weight_map" is missing or not an object/, indexPath],
      [
        { weight_map: { ...weightMap, "model.norm.weight": "../w.safetensors" } },
        /"weight_map"."model.norm.weight" must be a shard file name/,
        indexPath,
      ],
      [
        { weight_map: { ...weightMap, "model.norm.weight": 3 } },
        /must be a shard file name/,
        indexPath,
      ],
      [
        { weight_map: { ...weightMap, "model.norm.weight": undefined } },
        /does not list tensor "model.norm.weight"/,
        indexPath,
      ],
      [
        { weight_map: { ...weightMap, "model.norm.weight": "gone.safetensors" } },
        /shard listed in the index not found/,
        join(dir, "gone.safetensors"),
      ],
    ];
    for (const [index, what, file] of indexCases) {
      await Deno.writeTextFile(indexPath, JSON.stringify(index));
      await assertFormatErrorAsync(() => loadHfFolder(dir), file, what, JSON.stringify(index));
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadHfFolder() rejects real weights whose safetensors header has a flipped byte", async () => {
  // Only a flip inside "__metadata__" may go unnoticed; any other must fail, either in the
  // safetensors reader (JSON, dtype, sizes) or in the mapping (renamed tensor, changed dtype).
  const dir = await fixtureDir("draft");
  const bytes = await Deno.readFile(join(dir, "model.safetensors"));
  const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = new TextDecoder().decode(bytes.subarray(8, 8 + headerLen));
  const meta = header.indexOf('"__metadata__"');
  const metaEnd = header.indexOf("}", meta);
  const tmp = await writeFolder({ "config.json": await Deno.readFile(join(dir, "config.json")) });
  const file = join(tmp, "model.safetensors");
  const chars = '0123456789abcdefxyzAFIQ_.,:[]{}"';
  let seed = 12345;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  const counts = { total: 0, reader: 0, loader: 0 };
  try {
    for (let i = 0; i < 40; i++) {
      const at = 8 + next() % headerLen;
      const saved = bytes[at];
      let c = chars.charCodeAt(next() % chars.length);
      if (c === saved) c = c === 0x30 ? 0x31 : 0x30;
      bytes[at] = c;
      const inMeta = at - 8 > meta && at - 8 < metaEnd;
      let readerAccepted = true;
      counts.total++;
      try {
        readSafetensors(bytes, "draft.safetensors");
      } catch (e) {
        readerAccepted = false;
        counts.reader++;
        assert.ok(e instanceof FormatError, `flip at ${at}: ${e}`);
        assert.match((e as Error).message, /^draft\.safetensors: /);
      }
      if (readerAccepted) {
        // The reader accepted it: the folder loader must notice, unless only metadata changed.
        await Deno.writeFile(file, bytes);
        if (inMeta) {
          assert.equal((await loadHfFolder(tmp)).tensors.size, 29);
        } else {
          await assertFormatErrorAsync(() => loadHfFolder(tmp), file, /tensor "/, `flip at ${at}`);
          counts.loader++;
        }
      }
      bytes[at] = saved;
    }
    // Both layers of defence were exercised by these 40 flips.
    assert.ok(counts.reader > 0 && counts.loader > 0, JSON.stringify(counts));
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("readHfIndex() returns the weight map", () => {
  const map = readHfIndex({ weight_map: { a: "x.safetensors" } }, "i.json");
  assert.deepEqual([...map], [["a", "x.safetensors"]]);
});
