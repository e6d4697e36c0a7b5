import assert from "@specdec/assert";
import {
  defaultKeepFormat,
  parseKeep,
  planQuant,
  type QuantPlanOptions,
  summarizePlan,
  type TensorChoice,
} from "../engine/quant_plan.ts";
import { hfTensorPlan, readHfConfig } from "../models/hf.ts";
import type { DType, HostTensor, ModelConfig } from "../models/types.ts";
import { fixtureText } from "./fixtures.ts";

/** Tensors with `config`'s shapes (no data: the plan reads names, shapes and dtypes only). */
function shapesOf(config: ModelConfig, dtype: DType): Map<string, HostTensor> {
  return new Map(
    hfTensorPlan(config).map(({ name, shape }) => [
      name,
      { name, dtype, shape, data: new Uint8Array(0) },
    ]),
  );
}

async function pycodeConfig(which: "draft" | "target"): Promise<ModelConfig> {
  const rel = `pycode-pair/${which}/config.json`;
  return readHfConfig(JSON.parse(await fixtureText(rel)), rel);
}

const SYNTH: ModelConfig = {
  architecture: "llama",
  dim: 512,
  nLayers: 4,
  nHeads: 8,
  nKvHeads: 2,
  headDim: 64,
  ffnDim: 1024,
  vocabSize: 1000,
  maxSeqLen: 256,
  normEps: 1e-5,
  ropeTheta: 10000,
  ropeLayout: "interleaved",
  tiedEmbeddings: false,
  qkvBias: true,
  eosIds: [2],
};

function plan(
  config: ModelConfig,
  tensors: Map<string, HostTensor>,
  opts: QuantPlanOptions,
): Map<string, TensorChoice> {
  const p = planQuant(config, tensors, opts);
  assert.deepEqual([...p.keys()], [...tensors.keys()], "one choice per tensor, in map order");
  return p;
}

const fmt = (p: Map<string, TensorChoice>, name: string) => p.get(name)!.format;
const why = (p: Map<string, TensorChoice>, name: string) => p.get(name)!.why;

Deno.test("planQuant() keeps embed/output/first/last at q8_0 for q4_0, norms and biases f32", () => {
  const p = plan(SYNTH, shapesOf(SYNTH, "f16"), { quant: "q4_0" });
  for (const [name, c] of p) {
    const layer = /^blk\.(\d+)\./.exec(name)?.[1];
    if (c.shape.length === 1) {
      assert.equal(c.format, "f32", name);
      assert.match(c.why, name.endsWith(".bias") ? /^bias$/ : /^norm$/, name);
    } else if (layer === undefined || layer === "0" || layer === "3") {
      assert.equal(c.format, "q8_0", name);
      assert.match(c.why, /^kept: /, name);
    } else {
      assert.equal(c.format, "q4_0", name);
      assert.equal(c.why, "quant", name);
    }
    assert.equal(c.source, "f16");
  }
  assert.match(why(p, "token_embd.weight"), /kept: embeddings/);
  assert.match(why(p, "output.weight"), /kept: output/);
  assert.match(why(p, "blk.0.ffn_up.weight"), /kept: first layer/);
  assert.match(why(p, "blk.3.attn_q.weight"), /kept: last layer/);
});

Deno.test("planQuant() default keepFormat follows quant; an explicit keepFormat overrides it", () => {
  assert.deepEqual(
    (["q4_0", "q4_k", "nf4", "q8_0", "q6_k", "f16", "f32"] as const).map(defaultKeepFormat),
    ["q8_0", "q8_0", "q8_0", "f16", "f16", "f16", "f32"],
  );
  const t = shapesOf(SYNTH, "f32");
  for (const quant of ["q8_0", "q6_k", "f16", "f32", "q4_k", "nf4"] as const) {
    const p = plan(SYNTH, t, { quant });
    assert.equal(fmt(p, "blk.0.attn_v.weight"), defaultKeepFormat(quant), quant);
    assert.equal(fmt(p, "blk.1.attn_v.weight"), quant, quant);
  }
  const p = plan(SYNTH, t, { quant: "q4_0", keepFormat: "q6_k" });
  assert.equal(fmt(p, "output.weight"), "q6_k");
  assert.equal(fmt(p, "blk.2.ffn_down.weight"), "q4_0");
});

Deno.test("planQuant() keep selects the groups; tied embeddings are kept for 'output' too", () => {
  const t = shapesOf(SYNTH, "f16");
  const none = plan(SYNTH, t, { quant: "q4_0", keep: [] });
  for (const c of none.values()) assert.equal(c.format, c.shape.length === 1 ? "f32" : "q4_0");
  const last = plan(SYNTH, t, { quant: "q4_0", keep: ["last"] });
  assert.equal(fmt(last, "token_embd.weight"), "q4_0");
  assert.equal(fmt(last, "output.weight"), "q4_0");
  assert.equal(fmt(last, "blk.0.attn_q.weight"), "q4_0");
  assert.equal(fmt(last, "blk.3.attn_q.weight"), "q8_0");

  const tied = { ...SYNTH, tiedEmbeddings: true };
  const tt = shapesOf(tied, "f16");
  assert.ok(!tt.has("output.weight"));
  const out = plan(tied, tt, { quant: "q4_0", keep: ["output"] });
  assert.equal(fmt(out, "token_embd.weight"), "q8_0");
  assert.match(why(out, "token_embd.weight"), /kept: output \(tied to token_embd\)/);
  const embOnly = plan(SYNTH, t, { quant: "q4_0", keep: ["embed"] });
  assert.equal(fmt(embOnly, "token_embd.weight"), "q8_0");
  assert.equal(fmt(embOnly, "output.weight"), "q4_0");

  const one = { ...SYNTH, nLayers: 1 };
  const p1 = plan(one, shapesOf(one, "f16"), { quant: "q4_k" });
  assert.match(why(p1, "blk.0.ffn_gate.weight"), /kept: first layer, last layer/);
});

Deno.test("planQuant() falls back when the row length is not a multiple of the block", () => {
  const w = (name: string, cols: number): [string, HostTensor] => [
    name,
    { name, dtype: "f32", shape: [8, cols], data: new Uint8Array(0) },
  ];
  const t = new Map([w("blk.1.a", 96), w("blk.1.b", 48), w("blk.1.c", 288), w("blk.1.d", 20)]);
  const cfg = { ...SYNTH, nLayers: 3 };
  const cases: [string, string[]][] = [
    ["q4_k", ["q4_0", "f16", "q4_0", "f16"]],
    ["nf4", ["q4_0", "f16", "q4_0", "f16"]],
    ["q6_k", ["q8_0", "f16", "q8_0", "f16"]],
    ["q8_0", ["q8_0", "f16", "q8_0", "f16"]],
    ["q4_0", ["q4_0", "f16", "q4_0", "f16"]],
    ["f16", ["f16", "f16", "f16", "f16"]],
  ];
  for (const [quant, want] of cases) {
    const p = plan(cfg, t, { quant: quant as QuantPlanOptions["quant"] });
    assert.deepEqual([...p.values()].map((c) => c.format), want, quant);
  }
  const p = plan(cfg, t, { quant: "q4_k" });
  assert.equal(why(p, "blk.1.a"), "quant; fallback: 96 cols not a multiple of 256 -> q4_0");
  assert.equal(
    why(p, "blk.1.b"),
    "quant; fallback: 48 cols not a multiple of 256, 48 cols not a multiple of 32 -> f16",
  );
  const noF16 = plan(cfg, t, { quant: "q4_0", f16: false });
  assert.deepEqual([...noF16.values()].map((c) => c.format), ["q4_0", "f32", "q4_0", "f32"]);
  assert.match(why(noF16, "blk.1.b"), /no shader-f16 -> f32$/);
});

Deno.test("planQuant() on the pycode target: q4_k falls back to q4_0 on its 576 columns", async () => {
  const config = await pycodeConfig("target");
  assert.equal(config.dim, 576);
  const p = plan(config, shapesOf(config, "f16"), { quant: "q4_k" });
  assert.equal(fmt(p, "blk.5.attn_q.weight"), "q4_0");
  assert.equal(
    why(p, "blk.5.attn_q.weight"),
    "quant; fallback: 576 cols not a multiple of 256 -> q4_0",
  );
  assert.equal(fmt(p, "blk.5.ffn_down.weight"), "q4_k"); // [576, 1536]: 1536 = 6 * 256
  assert.equal(fmt(p, "blk.11.ffn_down.weight"), "q8_0"); // last layer kept
  assert.equal(fmt(p, "token_embd.weight"), "q8_0"); // embed (and tied output)
  assert.ok(!p.has("output.weight"));
  const s = summarizePlan(p).byFormat;
  assert.deepEqual(Object.keys(s).sort(), ["f32", "q4_0", "q4_k", "q8_0"]);
  assert.equal(s.q4_k.tensors, 10); // ffn_down of layers 1..10
  assert.equal(s.q8_0.tensors, 1 + 2 * 7);
  assert.equal(s.f32.tensors, 12 * 2 + 1);
  const total = Object.values(s).reduce((a, b) => a + b.params, 0);
  assert.equal(total, [...p.values()].reduce((a, c) => a + c.shape.reduce((x, y) => x * y), 0));
  assert.ok(Math.abs(total - 61.0e6) < 0.1e6, `params ${total}`);
});

Deno.test("planQuant() on the pycode draft: q4_k holds on 256 cols, ffn_down (704) falls back", async () => {
  const config = await pycodeConfig("draft");
  const p = plan(config, shapesOf(config, "f16"), { quant: "q4_k" });
  assert.equal(fmt(p, "blk.1.attn_q.weight"), "q4_k");
  assert.equal(fmt(p, "blk.1.ffn_gate.weight"), "q4_k");
  assert.equal(fmt(p, "blk.1.ffn_down.weight"), "q4_0");
  assert.match(why(p, "blk.1.ffn_down.weight"), /704 cols not a multiple of 256/);
  assert.equal(fmt(p, "blk.2.ffn_down.weight"), "q8_0");
});

Deno.test("planQuant() without quant keeps what was loaded (bf16 -> f32, every block type)", () => {
  const names: [DType, string][] = [
    ["f32", "f32"],
    ["f16", "f16"],
    ["bf16", "f32"],
    ["q8_0", "q8_0"],
    ["q4_0", "q4_0"],
    ["q4_k", "q4_k"],
    ["q6_k", "q6_k"],
    ["q4_1", "q4_1"],
    ["q5_0", "q5_0"],
    ["q5_1", "q5_1"],
    ["q2_k", "q2_k"],
    ["q3_k", "q3_k"],
    ["q5_k", "q5_k"],
  ];
  const t = new Map(names.map(([d]): [string, HostTensor] => [
    `blk.1.${d}`,
    { name: `blk.1.${d}`, dtype: d, shape: [4, 256], data: new Uint8Array(0) },
  ]));
  t.set("blk.1.attn_norm.weight", {
    name: "blk.1.attn_norm.weight",
    dtype: "f16",
    shape: [256],
    data: new Uint8Array(0),
  });
  const p = plan(SYNTH, t, {});
  assert.deepEqual([...p.values()].map((c) => c.format), [...names.map(([, f]) => f), "f32"]);
  assert.equal(why(p, "blk.1.q5_k"), "as loaded");
  assert.equal(why(p, "blk.1.bf16"), "bf16 -> f32");
  assert.equal(why(p, "blk.1.q8_0"), "as loaded");
  const noF16 = plan(SYNTH, t, { f16: false });
  assert.deepEqual(
    [...noF16.values()].map((c) => c.format),
    [...names.map(([, f]) => (f === "f16" ? "f32" : f)), "f32"],
  );
});

Deno.test("planQuant() never re-encodes a runnable GGUF block tensor at equal or more bits", () => {
  const t = new Map((["q8_0", "q4_0", "q4_k", "q6_k", "q5_k"] as DType[]).map((
    d,
  ): [string, HostTensor] => [
    `blk.1.${d}`,
    { name: `blk.1.${d}`, dtype: d, shape: [4, 256], data: new Uint8Array(0) },
  ]));
  const formats = (opts: QuantPlanOptions) =>
    [...plan(SYNTH, t, opts).values()].map((c) => c.format);
  assert.deepEqual(formats({ quant: "q8_0" }), ["q8_0", "q4_0", "q4_k", "q6_k", "q5_k"]);
  assert.deepEqual(formats({ quant: "q4_0" }), ["q4_0", "q4_0", "q4_k", "q4_0", "q4_0"]);
  assert.deepEqual(formats({ quant: "f16" }), ["q8_0", "q4_0", "q4_k", "q6_k", "q5_k"]);
  assert.deepEqual(formats({ quant: "q6_k" }), ["q6_k", "q4_0", "q4_k", "q6_k", "q5_k"]);
  const p = plan(SYNTH, t, { quant: "f16" });
  assert.match(why(p, "blk.1.q4_0"), /^source q4_0 kept: quant asks f16, not lower$/);
  // A kept tensor of a q4_0 GGUF asked for q8_0 stays q4_0.
  const e = new Map([["token_embd.weight", {
    name: "token_embd.weight",
    dtype: "q4_0" as DType,
    shape: [10, 64],
    data: new Uint8Array(0),
  }]]);
  assert.equal(fmt(plan(SYNTH, e, { quant: "q4_0" }), "token_embd.weight"), "q4_0");
});

Deno.test("planQuant() rejects an unknown quant, keepFormat or keep group", () => {
  const t = shapesOf(SYNTH, "f16");
  assert.throws(
    () => planQuant(SYNTH, t, { quant: "q3_k" as never }),
    /quant "q3_k" is not one of f32, f16, q8_0/,
  );
  assert.throws(() => planQuant(SYNTH, t, { quant: "q4_0", keepFormat: "int8" as never }), /int8/);
  assert.throws(() => planQuant(SYNTH, t, { quant: "q4_0", keep: ["head" as never] }), /"head"/);
});

Deno.test("parseKeep() reads lists, 'none' and '' and names unknown groups", () => {
  assert.deepEqual(parseKeep("embed,output,first,last"), ["embed", "output", "first", "last"]);
  assert.deepEqual(parseKeep(" last , embed,last"), ["last", "embed"]);
  assert.deepEqual(parseKeep("none"), []);
  assert.deepEqual(parseKeep(""), []);
  assert.throws(
    () => parseKeep("embed,lm_head"),
    /--keep: unknown group "lm_head"; use a comma-separated list of embed, output, first, last/,
  );
  assert.throws(() => parseKeep("none,embed"), /"none" cannot be combined/);
  assert.throws(() => parseKeep("Embed"), /unknown group "Embed"/);
});

Deno.test("summarizePlan() counts tensors and params per format", () => {
  const p = plan(SYNTH, shapesOf(SYNTH, "f16"), { quant: "q4_0" });
  const s = summarizePlan(p).byFormat;
  const q = SYNTH.nHeads * SYNTH.headDim, kv = SYNTH.nKvHeads * SYNTH.headDim;
  const layer = SYNTH.dim * (q + 2 * kv) + q * SYNTH.dim + 3 * SYNTH.dim * SYNTH.ffnDim;
  assert.deepEqual(s.q4_0, { tensors: 14, params: 2 * layer });
  assert.deepEqual(s.q8_0, {
    tensors: 16,
    params: 2 * layer + 2 * SYNTH.vocabSize * SYNTH.dim,
  });
  assert.deepEqual(s.f32, { tensors: 4 * 5 + 1, params: 4 * (2 * SYNTH.dim + q + 2 * kv) + 512 });
});
