/**
 * Quality of the quantized formats on the real pycode target, measured on a held-out code text
 * (tests/data/heldout_code.py, written for this project): q8_0 perplexity within 1% of f16, and
 * the 4-bit formats (default mixed plan) within the bounds stated below, with their KL divergence
 * from f16. Windows of 128 tokens keep this affordable on lavapipe.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import { planFormats, type QuantRequest } from "../engine/quant_plan.ts";
import { perplexity, type PerplexityResult } from "../engine/perplexity.ts";
import type { Gpu } from "../engine/gpu.ts";
import type { LoadedModel } from "../models/types.ts";

const CTX = 128;
const TOKENS = 3 * CTX; // three full windows

/** Bounds (relative PPL increase over f16; mean KL from f16) defended by the measured values. */
// Measured on lavapipe (384 tokens): q8_0 +0.04% (KL 0.00006), q4_0 +0.15% (KL 0.0169),
// q4_k +0.25%, nf4 -0.71%. The 4-bit bounds allow about four times the largest change seen.
const BOUNDS: Record<string, { ppl: number; kl?: number }> = {
  q8_0: { ppl: 0.01, kl: 0.001 },
  q4_0: { ppl: 0.03, kl: 0.05 },
  q4_k: { ppl: 0.03 },
  nf4: { ppl: 0.03 },
};

async function run(
  gpu: Gpu,
  model: LoadedModel,
  tokens: number[],
  quant: QuantRequest | undefined,
  reference?: LlamaGpu,
): Promise<PerplexityResult> {
  const store = new WeightStore(gpu);
  const formats = planFormats(model.config, model.tensors, { quant, f16: true });
  const m = await LlamaGpu.create(gpu, store, model, {
    label: quant ?? "f16",
    maxSeq: CTX,
    maxT: CTX,
    maxLogitRows: CTX,
    formats,
  });
  try {
    return await perplexity(gpu, m, tokens, { ctx: CTX, reference });
  } finally {
    m.destroy();
    store.destroy();
  }
}

gpuTest(
  "pycode target on held-out code: q8_0 PPL within 1% of f16; 4-bit formats bounded",
  async (gpu) => {
    const model = await loadModel(await fixture("pycode-pair/target"));
    const text = await Deno.readTextFile(new URL("./data/heldout_code.py", import.meta.url));
    const tokens = model.tokenizer!.encode(text, { bos: true }).slice(0, TOKENS);
    assert.equal(tokens.length, TOKENS);
    const refStore = new WeightStore(gpu);
    const reference = await LlamaGpu.create(gpu, refStore, model, {
      label: "reference",
      maxSeq: CTX,
      maxT: CTX,
      maxLogitRows: CTX,
    });
    try {
      const f16 = await perplexity(gpu, reference, tokens, { ctx: CTX });
      assert.ok(f16.ppl > 1 && f16.ppl < 60, `f16 PPL ${f16.ppl} is implausible for a code model`);
      const report = [`f16 ppl ${f16.ppl.toFixed(4)}`];
      for (const [quant, bound] of Object.entries(BOUNDS)) {
        const r = await run(
          gpu,
          model,
          tokens,
          quant as QuantRequest,
          bound.kl === undefined ? undefined : reference,
        );
        const rel = r.ppl / f16.ppl - 1;
        report.push(
          `${quant} ppl ${r.ppl.toFixed(4)} (${(100 * rel).toFixed(2)}%)` +
            (r.kl === undefined
              ? ""
              : ` kl ${r.kl.toFixed(5)} top1 ${r.top1_agreement!.toFixed(3)}`),
        );
        assert.ok(Math.abs(rel) <= bound.ppl, `${quant}: ${report.join("; ")}`);
        if (bound.kl !== undefined) {
          assert.ok(r.kl! > 0 && r.kl! <= bound.kl, `${quant} KL: ${report.join("; ")}`);
        }
      }
      console.log(report.join("\n"));
    } finally {
      reference.destroy();
      refStore.destroy();
    }
  },
  { features: ["shader-f16"] },
);
