/**
 * The quantization benchmark: per weight format, in one process and side by side, the target's
 * weight bytes (and their share of f16), total VRAM at a 1024 context (planner figures, equal to
 * the allocated bytes), perplexity, KL divergence from f16 and same-top-token rate on a held-out
 * text, and greedy decode tok/s plain and speculative (the draft model at the same format), plus
 * self-draft rows (f16 target drafted by a quantized copy of itself).
 *
 *   deno run -A bench/quant.ts --target DIR --draft DIR [--text F] [--ctx 512] [--ppl-tokens N]
 *                              [--tokens 128] [--formats f16,q8_0,q4_k,q4_0,nf4] [--k 4]
 *                              [--self q4_0,nf4] [--json] [--out F]
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

/** One format's figures. */
export interface QuantRow {
  format: string;
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
      json: { type: "boolean" },
      out: { type: "string" },
    },
  });
  if (!values.target || !values.draft) {
    console.error("usage: bench/quant.ts --target DIR --draft DIR [flags] (see the module doc)");
    Deno.exit(2);
  }
  const ctx = Number(values.ctx), nTok = Number(values.tokens), k = Number(values.k);
  const th = await loadModel(values.target, { tokenizer: values.tokenizer });
  const dh = await loadModel(values.draft, { tokenizer: values.tokenizer });
  const tok = th.tokenizer!;
  let text = tok.encode(await Deno.readTextFile(values.text), { bos: true });
  const pplTokens = Number(values["ppl-tokens"]);
  if (pplTokens > 0) text = text.slice(0, pplTokens);
  const gpu = await requestGpu();
  console.log(
    `${gpu.adapterName}; perplexity on ${values.text} (${text.length} tokens, ctx ${ctx})`,
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
  ) => {
    const store = new WeightStore(gpu);
    let ppl = NaN, kl = NaN, top1 = NaN;
    if (pplOf) {
      const m = await LlamaGpu.create(gpu, store, th, {
        label: "ppl",
        maxSeq: ctx,
        maxT: rowsT,
        maxLogitRows: rowsT,
        formats: targetFormats,
      });
      const r = await perplexity(gpu, m, text, { ctx, reference });
      ppl = r.ppl;
      kl = r.kl!;
      top1 = r.top1_agreement!;
      m.destroy();
    }
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
    const vram = await estimateVram({
      target: { model: th, formats: targetFormats },
      kv: "f16",
      speculative: false,
      adapter,
    }, maxSeq);
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
    const weightBytes = vram.bytes.target_weights;
    if (name === "f16") f16Bytes = weightBytes;
    const row: QuantRow = {
      format: name,
      weight_bytes: weightBytes,
      draft_bytes: withDraft.bytes.draft_weights,
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
    console.log(
      `  ${name}: ${formatBytes(weightBytes)}, ppl ${ppl.toFixed(3)}, kl ${kl.toFixed(4)}, ` +
        `plain ${plain.tok_s.toFixed(1)} tok/s, spec ${spec.tok_s.toFixed(1)} tok/s`,
    );
    t.destroy();
    d.destroy();
    store.destroy();
  };
  for (const f of values.formats.split(",")) {
    const [q, keep] = f.split("/") as [QuantRequest, string | undefined];
    const quant = q === "f16" ? undefined : q;
    await run(
      f,
      formatsOf(th, quant ?? "f16", keep === "all" ? "none" : "default"),
      { model: dh, formats: formatsOf(dh, quant ?? "f16", keep === "all" ? "none" : "default") },
      true,
    );
  }
  const f16Formats = formatsOf(th, "f16", "default");
  for (const q of values.self.split(",").filter((s: string) => s !== "")) {
    await run(
      `f16 + self-draft ${q}`,
      f16Formats,
      { model: th, formats: selfDraftFormats(th, f16Formats, q as QuantRequest, { f16: true }) },
      false,
    );
  }
  reference.destroy();
  refStore.destroy();
  const head = [
    "format",
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
  const body = rows.map((r) => [
    r.format,
    formatBytes(r.weight_bytes),
    fmt(100 * r.share_of_f16, 1) + "%",
    formatBytes(r.draft_bytes),
    formatBytes(r.vram_1024),
    fmt(r.ppl, 3),
    fmt(r.kl, 4),
    Number.isNaN(r.top1) ? "-" : fmt(100 * r.top1, 1) + "%",
    fmt(r.plain_tok_s, 1),
    fmt(r.spec_tok_s, 1),
    fmt(r.speedup, 2) + "x",
    fmt(100 * r.acceptance, 1) + "%",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (c: string[]) => c.map((x, i) => x.padStart(widths[i])).join("  ");
  console.log(
    `\n${gpu.adapterName}: greedy, ${PROMPTS.length} prompts x ${nTok} tokens; spec = the ` +
      `draft model at the same format (self-draft rows: the target's own quantized copy)`,
  );
  console.log([line(head), ...body.map(line)].join("\n"));
  const json = JSON.stringify({ adapter: gpu.adapterName, ctx, ppl_tokens: text.length, rows });
  if (values.out) await Deno.writeTextFile(values.out, json);
  if (values.json) console.log(json);
  gpu.destroy();
}
