/**
 * The quantization benchmark: per weight format, in one process and side by side, the target's
 * weight bytes (and their share of f16), total VRAM at a 1024 context (planner figures, equal to
 * the allocated bytes), perplexity, KL divergence from f16 and same-top-token rate on a held-out
 * text, and greedy decode tok/s plain and speculative (the draft model at the same format), plus
 * self-draft rows (f16 target drafted by a quantized copy of itself).
 *
 *   deno run -A bench/quant.ts --target DIR --draft DIR [--text F] [--ctx 512] [--ppl-tokens N]
 *                              [--tokens 128] [--formats f16,q8_0,q4_k,q4_0,nf4] [--k 4]
 *                              [--self q4_0,nf4] [--int8x 0,1,auto] [--ppl-rows 8] [--ppl-only]
 *                              [--tokenizer F] [--json] [--out F]
 *
 * `--int8x 0,1,auto` runs each format whose plan holds q8_0 or q4_0 tensors once per value of
 * `matvecTuning.int8x` (int8 activations on the matrix-vector path, set before that row's models
 * build their plans: 0 none, 1 q8_0 and q4_0, auto, the default, q4_0 only as the engine runs;
 * other formats run once, int8x "-"). `--ppl-rows R` evaluates the perplexity
 * text in chunks of at most R rows, model and f16 reference alike, so the products run as in
 * decode and verify (8: the matrix-vector path of block formats, where int8x applies); the
 * default chunk of min(ctx, 128) rows takes the tiled path, which int8x leaves alone.
 * `--ppl-only` skips the decode measurements and the self-draft rows.
 */
import { parseArgs } from "@specdec/cli";
import { requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder, type Speculation } from "../engine/decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import { planFormats, type QuantRequest } from "../engine/quant_plan.ts";
import { selfDraftFormats } from "../engine/planner.ts";
import { adapterFacts, estimateVram, formatBytes, vramTotal } from "../engine/vram.ts";
import { perplexity } from "../engine/perplexity.ts";
import type { LoadedModel } from "../models/types.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { PROMPTS } from "./gpu.ts";
import { int8xAvailable, type Int8xSetting, matvecTuning } from "../kernels/matmul.ts";
import { int8xName, parseInt8x } from "./matmul_cases.ts";

/** One format's figures. */
export interface QuantRow {
  format: string;
  /** Which products ran on int8 x (`matvecTuning.int8x`); null: no q8_0 / q4_0 tensors. */
  int8x: Int8xSetting | null;
  weight_bytes: number;
  draft_bytes: number;
  share_of_f16: number;
  vram_1024: number;
  ppl: number;
  kl: number;
  top1: number;
  plain_tok_s: number;
  spec_tok_s: number;
  speedup: number;
  acceptance: number;
}

function formatsOf(m: LoadedModel, quant: QuantRequest | undefined, keep: "default" | "none") {
  return planFormats(m.config, m.tensors, {
    quant,
    keep: keep === "none" ? [] : undefined,
    f16: true,
  });
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      target: { type: "string" },
      draft: { type: "string" },
      tokenizer: { type: "string" },
      text: { type: "string", default: "tests/data/heldout_code.py" },
      ctx: { type: "string", default: "512" },
      "ppl-tokens": { type: "string", default: "0" },
      tokens: { type: "string", default: "128" },
      formats: { type: "string", default: "f16,q8_0,q4_k,q4_0,nf4,q4_0/all" },
      self: { type: "string", default: "q8_0,q4_0,nf4" },
      k: { type: "string", default: "4" },
      int8x: { type: "string", default: "auto" },
      "ppl-rows": { type: "string", default: "0" },
      "ppl-only": { type: "boolean" },
      json: { type: "boolean" },
      out: { type: "string" },
    },
  });
  if (!values.target || !values.draft) {
    console.error("usage: bench/quant.ts --target DIR --draft DIR [flags] (see the module doc)");
    Deno.exit(2);
  }
  const ctx = Number(values.ctx), nTok = Number(values.tokens), k = Number(values.k);
  const int8xs = parseInt8x(String(values.int8x));
  if (int8xs.includes(true) && !int8xAvailable()) {
    console.error(
      "--int8x 1 needs WGSL's packed_4x8_integer_dot_product, which this runtime lacks",
    );
    Deno.exit(2);
  }
  const pplRows = Number(values["ppl-rows"]) || undefined;
  const pplOnly = !!values["ppl-only"];
  const th = await loadModel(values.target, { tokenizer: values.tokenizer });
  const dh = await loadModel(values.draft, { tokenizer: values.tokenizer });
  const tok = th.tokenizer!;
  let text = tok.encode(await Deno.readTextFile(values.text), { bos: true });
  const pplTokens = Number(values["ppl-tokens"]);
  if (pplTokens > 0) text = text.slice(0, pplTokens);
  const gpu = await requestGpu();
  console.log(
    `${gpu.adapterName}; perplexity on ${values.text} (${text.length} tokens, ctx ${ctx}, ` +
      `${pplRows ? `chunks of <= ${pplRows} rows` : "prefill-sized chunks"})`,
  );
  const adapter = adapterFacts(gpu);
  const rowsT = Math.min(ctx, 128);
  const refStore = new WeightStore(gpu);
  const reference = await LlamaGpu.create(gpu, refStore, th, {
    label: "reference",
    maxSeq: ctx,
    maxT: rowsT,
    maxLogitRows: rowsT,
    formats: formatsOf(th, "f16", "default"),
  });
  const prompts = PROMPTS.map((p) => tok.encode(p, { bos: true }).slice(0, 64));
  const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const quiet = { onTokens: () => {}, cancelled: () => false };
  const decode = async (dec: Decoder, kk: number) => {
    await dec.generate(prompts[0], 16, greedy, quiet, kk); // warm-up
    let n = 0, ms = 0, acc = 0, prop = 0;
    for (const p of prompts) {
      const r = await dec.generate(p, nTok, greedy, quiet, kk);
      n += r.tokens.length - 1;
      ms += r.decodeMs;
      acc += r.accepted;
      prop += r.proposed;
    }
    return { tok_s: n / (ms / 1000), acceptance: prop ? acc / prop : 0 };
  };
  const rows: QuantRow[] = [];
  let f16Bytes = 0;
  const run = async (
    name: string,
    targetFormats: Map<string, WeightFormat>,
    draft: { model: LoadedModel; formats: Map<string, WeightFormat> },
    pplOf: boolean,
    int8x: Int8xSetting | null = null,
  ) => {
    matvecTuning.int8x = int8x ?? "auto";
    const store = new WeightStore(gpu);
    let ppl = NaN, kl = NaN, top1 = NaN;
    if (pplOf) {
      const t0 = performance.now();
      const m = await LlamaGpu.create(gpu, store, th, {
        label: "ppl",
        maxSeq: ctx,
        maxT: rowsT,
        maxLogitRows: rowsT,
        formats: targetFormats,
      });
      const r = await perplexity(gpu, m, text, { ctx, reference, rows: pplRows });
      ppl = r.ppl;
      kl = r.kl!;
      top1 = r.top1_agreement!;
      m.destroy();
      console.log(
        `  ${name}${int8x === null ? "" : ` int8x ${int8xName(int8x)}`}: ppl ${ppl.toFixed(4)}, ` +
          `kl ${kl.toFixed(5)}, top-1 ${(100 * top1).toFixed(2)}% on ${r.tokens_scored} ` +
          `tokens (${((performance.now() - t0) / 1000).toFixed(0)} s)`,
      );
    }
    const maxSeq = 1024;
    const vram = await estimateVram({
      target: { model: th, formats: targetFormats },
      kv: "f16",
      speculative: false,
      adapter,
    }, maxSeq);
    const weightBytes = vram.bytes.target_weights;
    if (name === "f16") f16Bytes = weightBytes;
    let plain = { tok_s: NaN, acceptance: NaN }, spec = plain, draftBytes = NaN;
    if (!pplOnly) ({ plain, spec, draftBytes } = await speeds(store, targetFormats, draft));
    matvecTuning.int8x = "auto";
    store.destroy();
    const row: QuantRow = {
      format: name,
      int8x,
      weight_bytes: weightBytes,
      draft_bytes: draftBytes,
      share_of_f16: f16Bytes ? weightBytes / f16Bytes : NaN,
      vram_1024: vramTotal(vram.bytes),
      ppl,
      kl,
      top1,
      plain_tok_s: plain.tok_s,
      spec_tok_s: spec.tok_s,
      speedup: spec.tok_s / plain.tok_s,
      acceptance: spec.acceptance,
    };
    rows.push(row);
    if (!pplOnly) {
      console.log(
        `  ${name}: ${formatBytes(weightBytes)}, ppl ${ppl.toFixed(3)}, kl ${kl.toFixed(4)}, ` +
          `plain ${plain.tok_s.toFixed(1)} tok/s, spec ${spec.tok_s.toFixed(1)} tok/s`,
      );
    }
  };
  /** Greedy decode tok/s plain and speculative (the draft at `draft.formats`), draft bytes. */
  const speeds = async (
    store: WeightStore,
    targetFormats: Map<string, WeightFormat>,
    draft: { model: LoadedModel; formats: Map<string, WeightFormat> },
  ) => {
    const maxSeq = 1024;
    const t = await LlamaGpu.create(gpu, store, th, {
      label: "target",
      maxSeq,
      formats: targetFormats,
    });
    const d = await LlamaGpu.create(gpu, store, draft.model, {
      label: "draft",
      maxSeq,
      formats: draft.formats,
    });
    const plainDec = new Decoder(gpu, t, { kind: "none" });
    const specDec = new Decoder(gpu, t, { kind: "model", draft: d } as Speculation);
    const plain = await decode(plainDec, 1);
    const spec = await decode(specDec, k);
    plainDec.destroy();
    specDec.destroy();
    const withDraft = await estimateVram({
      target: { model: th, formats: targetFormats },
      draft: { model: draft.model, formats: draft.formats },
      kv: "f16",
      speculative: true,
      adapter,
    }, maxSeq);
    t.destroy();
    d.destroy();
    return { plain, spec, draftBytes: withDraft.bytes.draft_weights };
  };
  // The int8x values a row runs at: each of --int8x where its plans hold q8_0 / q4_0 tensors.
  const int8xOf = (...plans: Map<string, WeightFormat>[]) =>
    plans.some((p) => [...p.values()].some((f) => f === "q8_0" || f === "q4_0")) ? int8xs : [null];
  for (const f of values.formats.split(",")) {
    const [q, keep] = f.split("/") as [QuantRequest, string | undefined];
    const quant = q === "f16" ? undefined : q;
    const targetFormats = formatsOf(th, quant ?? "f16", keep === "all" ? "none" : "default");
    const draftFormats = formatsOf(dh, quant ?? "f16", keep === "all" ? "none" : "default");
    for (const int8x of int8xOf(targetFormats, draftFormats)) {
      await run(f, targetFormats, { model: dh, formats: draftFormats }, true, int8x);
    }
  }
  const f16Formats = formatsOf(th, "f16", "default");
  for (const q of pplOnly ? [] : values.self.split(",").filter((s: string) => s !== "")) {
    const selfFormats = selfDraftFormats(th, f16Formats, q as QuantRequest, { f16: true });
    for (const int8x of int8xOf(selfFormats)) {
      await run(
        `f16 + self-draft ${q}`,
        f16Formats,
        { model: th, formats: selfFormats },
        false,
        int8x,
      );
    }
  }
  reference.destroy();
  refStore.destroy();
  const head = [
    "format",
    "int8x",
    "weights",
    "of f16",
    "draft +",
    "VRAM@1024",
    "PPL",
    "KL",
    "top-1",
    "plain tok/s",
    `spec k=${k} tok/s`,
    "speedup",
    "accept",
  ];
  const fmt = (x: number, d: number) => Number.isNaN(x) ? "-" : x.toFixed(d);
  const pct = (x: number, d: number, unit: string) => Number.isNaN(x) ? "-" : fmt(x, d) + unit;
  const body = rows.map((r) => [
    r.format,
    r.int8x === null ? "-" : int8xName(r.int8x),
    formatBytes(r.weight_bytes),
    pct(100 * r.share_of_f16, 1, "%"),
    Number.isNaN(r.draft_bytes) ? "-" : formatBytes(r.draft_bytes),
    formatBytes(r.vram_1024),
    fmt(r.ppl, 3),
    fmt(r.kl, 4),
    pct(100 * r.top1, 1, "%"),
    fmt(r.plain_tok_s, 1),
    fmt(r.spec_tok_s, 1),
    pct(r.speedup, 2, "x"),
    pct(100 * r.acceptance, 1, "%"),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (c: string[]) => c.map((x, i) => x.padStart(widths[i])).join("  ");
  console.log(
    `\n${gpu.adapterName}: perplexity on ${text.length} tokens at ctx ${ctx} in ` +
      `${pplRows ? `chunks of <= ${pplRows} rows` : "prefill-sized chunks"}, KL and top-1 vs ` +
      `f16 evaluated the same way; ` +
      (pplOnly ? "no decode measurements (--ppl-only)" : `greedy, ${PROMPTS.length} prompts x ` +
        `${nTok} tokens; spec = the draft model at the same format (self-draft rows: the ` +
        `target's own quantized copy)`),
  );
  console.log([line(head), ...body.map(line)].join("\n"));
  const json = JSON.stringify({
    adapter: gpu.adapterName,
    ctx,
    ppl_tokens: text.length,
    ppl_rows: pplRows ?? null,
    rows,
  });
  if (values.out) await Deno.writeTextFile(values.out, json);
  if (values.json) console.log(json);
  gpu.destroy();
}
