// llama.cpp's speculative decoding through node-llama-cpp (its DraftSequenceTokenPredictor), for
// bench/peers.ts, which spawns this with Node. Input: one JSON argument
//   {peer, target, draft, prompts: number[][], tokens, k, threads, gpu: false | "vulkan"}
// Output (stdout): one JSON line {plain_tok_s, spec_tok_s, validated, refuted, plain, spec}, where
// the rates count the new tokens after the first over the wall time after the first (the first
// one includes the prompt pass), summed over the prompts, greedy (temperature 0).
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const o = JSON.parse(process.argv[2]);
const { getLlama, DraftSequenceTokenPredictor } = await import(
  pathToFileURL(join(o.peer, "node_modules/node-llama-cpp/dist/index.js")).href
);
const llama = await getLlama({ gpu: o.gpu, build: "never", logLevel: "error" });
const ctxSize = Math.max(...o.prompts.map((p) => p.length)) + o.tokens + 2 * o.k + 8;
const target = await llama.loadModel({ modelPath: o.target });
const draft = await llama.loadModel({ modelPath: o.draft });

/** Greedy continuations of every prompt on `seq`; returns [outputs, tokens after the first, ms]. */
async function run(seq) {
  const outs = [];
  let n = 0, ms = 0;
  for (const p of o.prompts) {
    await seq.clearHistory();
    const out = [];
    let t1 = 0;
    for await (const t of seq.evaluate(p, { temperature: 0 })) {
      out.push(t);
      if (out.length === 1) t1 = performance.now();
      if (out.length >= o.tokens) break;
    }
    ms += performance.now() - t1;
    n += out.length - 1;
    outs.push(out);
  }
  return [outs, n, ms];
}

const plainCtx = await target.createContext({ contextSize: ctxSize, threads: o.threads });
const [plain, pn, pms] = await run(plainCtx.getSequence());
await plainCtx.dispose();

const draftCtx = await draft.createContext({ contextSize: ctxSize, threads: o.threads });
const specCtx = await target.createContext({ contextSize: ctxSize, threads: o.threads });
const predictor = new DraftSequenceTokenPredictor(draftCtx.getSequence(), {
  minTokens: o.k,
  maxTokens: o.k,
  minConfidence: 0,
});
const seq = specCtx.getSequence({ tokenPredictor: predictor });
const [spec, sn, sms] = await run(seq);
const stats = seq.tokenPredictions;
console.log(JSON.stringify({
  plain_tok_s: pn / (pms / 1000),
  spec_tok_s: sn / (sms / 1000),
  validated: stats.validated,
  refuted: stats.refuted,
  plain,
  spec,
}));
await specCtx.dispose();
await draftCtx.dispose();
await llama.dispose();
