/**
 * Token trees: the ancestor table, greedy acceptance along a tree (CPU reference and the GPU
 * walk), KV compaction (GPU vs reference, f32/f16/q8 with scales), and the whole tree verify on
 * real models: a target forward over the tree with the tree mask, acceptance, compaction; the
 * emitted tokens equal plain greedy decoding and the next pass's logits equal a fresh prefill of
 * the accepted sequence.
 */
import assert from "@specdec/assert";
import { gpuPair, likeliestNext, llama2c } from "./fixtures.ts";
import {
  chainParents,
  TREE_MAX_NODES,
  treeAcceptGreedy,
  treeDepths,
  treeExpandRef,
  treeSees,
  treeTable,
} from "../engine/token_tree.ts";
import { createKvCompact, kvCompactRef, kvRowWords } from "../kernels/kv_compact.ts";
import { createTreeAccept } from "../kernels/tree_accept.ts";
import { createTreeDraft, treeTopkScratchWords } from "../kernels/tree_draft.ts";
import { kvCacheBytes, type KvDType } from "../kernels/kv_write.ts";
import { assertClose, gpuTest, rng } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { chiSquareTest } from "../engine/speculative_math.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadHfFolder } from "../models/hf.ts";
import type { LoadedModel } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const GREEDY = { temperature: 0, topK: 0, topP: 1, seed: 0 };
const quiet = { onTokens: () => {}, cancelled: () => false };

/** A random tree of `n` nodes: each parent uniform among the earlier nodes. */
function randomParents(n: number, seed: number): number[] {
  const r = rng(seed);
  return Array.from({ length: n }, (_, i) => i === 0 ? -1 : Math.floor(r() * i));
}

Deno.test("treeTable() holds each node's ancestors, depth and parent", () => {
  const t = treeTable([-1, 0, 0, 1, 3]);
  assert.deepEqual([...t.subarray(4 * 4, 5 * 4)], [0b11011, 0, 3, 3]);
  assert.equal(t[3], 0xffffffff); // the root's parent, -1 as u32
  assert.ok(treeSees(t, 4, 1) && !treeSees(t, 4, 2) && treeSees(t, 2, 2));
  // Bits past 31 live in word 1.
  const chain = treeTable(chainParents(TREE_MAX_NODES));
  assert.deepEqual([...chain.subarray(63 * 4, 63 * 4 + 3)], [0xffffffff, 0xffffffff, 63]);
  assert.deepEqual([...chain.subarray(40 * 4, 40 * 4 + 3)], [0xffffffff, 0x1ff, 40]);
});

Deno.test("treeDepths() refuses parents that do not precede their child, and big trees", () => {
  assert.throws(() => treeDepths([0]), /node 0 is the root/);
  assert.throws(() => treeDepths([-1, 1]), /node 1: parent 1 must be an earlier node/);
  assert.throws(() => treeDepths([-1, 0, -1]), /node 2: parent -1/);
  assert.throws(() => treeDepths(chainParents(65)), /1\.\.64 nodes, got 65/);
});

Deno.test("treeAcceptGreedy() follows the argmax and stops at the first miss", () => {
  // A chain accepts like the chain rule: tokens 1..3 proposed, argmax agrees on 2 of them.
  const chain = treeAcceptGreedy(chainParents(4), [9, 1, 2, 3], [1, 2, 7, 4]);
  assert.deepEqual(chain, { path: [0, 1, 2], tokens: [1, 2, 7] });
  // A star: the matching sibling is taken wherever it sits.
  const star = treeAcceptGreedy([-1, 0, 0, 0], [9, 4, 5, 6], [6, 0, 0, 3]);
  assert.deepEqual(star, { path: [0, 3], tokens: [6, 3] });
  // No child matches: only the bonus.
  assert.deepEqual(treeAcceptGreedy([-1, 0], [9, 4], [5, 1]), { path: [0], tokens: [5] });
});

gpuTest("tree walk kernel matches treeAcceptGreedy() on random trees", async (gpu) => {
  const V = 37;
  for (const [n, seed] of [[1, 1], [2, 2], [7, 3], [19, 4], [33, 5], [64, 6]]) {
    const parents = randomParents(n, seed);
    const r = rng(seed + 100);
    // Few distinct tokens, so children often repeat the argmax (and siblings collide).
    const tokens = Array.from({ length: n }, () => Math.floor(r() * 4));
    const logits = new Float32Array(n * V);
    for (let i = 0; i < logits.length; i++) logits[i] = r();
    const argmax: number[] = [];
    for (let i = 0; i < n; i++) {
      const a = Math.floor(r() * 4);
      logits[i * V + a] = 2; // the target's greedy token after node i
      argmax.push(a);
    }
    const want = treeAcceptGreedy(parents, tokens, argmax);
    const b = (name: string, bytes: number) => gpu.buffer(name, bytes, RW);
    const outTokens = b("out_tokens", 4 * n), outCount = b("out_count", 4), path = b("path", 4 * n);
    const ds = await createTreeAccept(gpu, {
      label: "test.tree_accept",
      targetLogits: gpu.upload("logits", logits),
      tokens: gpu.upload("tokens", new Uint32Array([5, 5, ...tokens])),
      tokensOffset: 2,
      table: gpu.upload("table", treeTable(parents)),
      argmax: b("argmax", 4 * n),
      outTokens,
      outCount,
      path,
      nodes: n,
      V,
    });
    await gpu.run("test", ds);
    const count = new Uint32Array(await gpu.read(outCount))[0];
    assert.equal(count, want.path.length, `n=${n}`);
    assert.deepEqual([...new Uint32Array(await gpu.read(outTokens)).slice(0, count)], want.tokens);
    assert.deepEqual([...new Uint32Array(await gpu.read(path)).slice(0, count)], want.path);
  }
});

gpuTest("KV compaction kernel matches kvCompactRef() for f32, f16 and q8 caches", async (gpu) => {
  const shapes: [KvDType, number, number, number][] = [
    ["f32", 3, 8, 2],
    ["f16", 3, 64, 3],
    ["q8", 2, 32, 1],
    ["q8", 3, 64, 2],
  ];
  for (const [dtype, nKvHeads, headDim, layers] of shapes) {
    for (const [nodes, base, seed] of [[1, 0, 1], [9, 5, 2], [TREE_MAX_NODES, 17, 3]]) {
      const maxSeq = base + nodes + 7;
      const parents = randomParents(nodes, seed);
      const r = rng(seed);
      // The accepted path: a random root-to-node path of the tree.
      const end = Math.floor(r() * nodes);
      const path = [end];
      while (path[0] !== 0) path.unshift(parents[path[0]]);
      const words = Math.ceil(kvCacheBytes(dtype, layers, maxSeq, nKvHeads, headDim) / 4);
      const k0 = Uint32Array.from({ length: words }, () => (r() * 2 ** 32) >>> 0);
      const v0 = Uint32Array.from({ length: words }, () => (r() * 2 ** 32) >>> 0);
      const kCache = gpu.upload("k", k0, RW), vCache = gpu.upload("v", v0, RW);
      const d = await createKvCompact(gpu, {
        label: "test.compact",
        kCache,
        vCache,
        state: gpu.upload("state", new Uint32Array([base + nodes, 0, 0, 0])),
        path: gpu.upload("path", new Uint32Array([...path, 99, 99])),
        count: gpu.upload("count", new Uint32Array([path.length])),
        nodes,
        dtype,
        layers,
        maxSeq,
        nKvHeads,
        headDim,
      });
      await gpu.run("test", [d]);
      const { values, scales } = kvRowWords(dtype, nKvHeads, headDim);
      const s = { layers, maxSeq, rowWords: values, scaleWords: scales };
      const name = `${dtype} kv=${nKvHeads}x${headDim} layers=${layers} nodes=${nodes} ` +
        `path=[${path}]`;
      for (const [buf, init] of [[kCache, k0], [vCache, v0]] as const) {
        const want = init.slice();
        kvCompactRef(want, s, base, path, path.length);
        const got = new Uint32Array(await gpu.read(buf)).slice(0, words);
        assert.deepEqual(got, want, name);
        if (path.length > 1 && path.some((j, i) => j !== i)) assert.notDeepEqual(got, init);
      }
    }
  }
});

/**
 * A tree around the greedy continuation `g` (g[0] = the root's token): `depth` levels of
 * `width` siblings, the true token g[d] at sibling (d + shift) % width of the path's node and
 * wrong tokens elsewhere; every wrong node of a level but the last gets a wrong child too, so
 * non-path nodes interleave with the path. `missAt` (if given) replaces the true token at that
 * depth with a wrong one: acceptance must stop before it.
 */
function greedyTree(g: number[], depth: number, width: number, V: number, missAt?: number) {
  const parents = [-1], tokens = [g[0]];
  let pathNode = 0;
  const wrong = (t: number, i: number) => (t + 1 + i * 7) % V;
  for (let d = 1; d <= depth; d++) {
    let next = -1;
    const decoys: number[] = [];
    for (let i = 0; i < width; i++) {
      const on = i === (d + 1) % width && d !== missAt;
      parents.push(pathNode);
      tokens.push(on ? g[d] : wrong(g[d], i));
      if (on) next = parents.length - 1;
      else decoys.push(parents.length - 1);
    }
    for (const dec of decoys.slice(0, 1)) {
      parents.push(dec);
      tokens.push(g[d + 1]); // the right token under the wrong parent: must not be taken
    }
    if (next < 0) break;
    pathNode = next;
  }
  return { parents, tokens };
}

/**
 * On `target`: prefill `prompt`, take the greedy continuation `g` (plain decoder), verify the
 * tree around it in one forward, accept and compact; the emitted tokens must be g's, and one
 * more step must give a fresh prefill's logits.
 */
async function checkTreeVerify(
  gpu: Gpu,
  model: LoadedModel,
  prompt: number[],
  kv?: KvDType,
): Promise<void> {
  const store = new WeightStore(gpu);
  const t = await LlamaGpu.create(gpu, store, model, {
    label: "target",
    maxSeq: 128,
    maxLogitRows: TREE_MAX_NODES,
    kv,
  });
  const V = t.config.vocabSize, P = prompt.length;
  const g = (await new Decoder(gpu, t).generate(prompt, 10, GREEDY, quiet)).tokens;
  const b = (name: string, bytes: number) => gpu.buffer(name, bytes, RW);
  const shapes: [number, number, number | undefined][] = [[5, 3, undefined], [4, 2, 3], [
    1,
    4,
    undefined,
  ]];
  for (const [depth, width, missAt] of shapes) {
    const { parents, tokens } = greedyTree(g, depth, width, V, missAt);
    const N = parents.length;
    const table = gpu.upload("tree.table", treeTable(parents));
    const nodes = gpu.upload("tree.tokens", new Uint32Array(tokens));
    const outTokens = b("out_tokens", 4 * N), outCount = b("out_count", 4), path = b("path", 4 * N);
    // The prompt in the cache (rows 0..P-1); the root g[0] is node 0 at row P.
    const promptBuf = gpu.upload("prompt", new Uint32Array(prompt));
    t.setPosition(0);
    const dispatches = [
      ...await t.plan(P, { buffer: promptBuf, offset: 0 }, "none"),
      ...await t.plan(N, { buffer: nodes, offset: 0 }, "all", { table, first: 0 }),
      ...await createTreeAccept(gpu, {
        label: "tree.accept",
        targetLogits: t.logits,
        tokens: nodes,
        table,
        argmax: b("argmax", 4 * N),
        outTokens,
        outCount,
        path,
        nodes: N,
        V,
      }),
      await createKvCompact(gpu, {
        label: "tree.compact",
        kCache: t.kvCaches.k,
        vCache: t.kvCaches.v,
        state: t.state,
        path,
        count: outCount,
        nodes: N,
        dtype: t.kvType,
        layers: t.config.nLayers,
        maxSeq: t.maxSeq,
        nKvHeads: t.config.nKvHeads,
        headDim: t.config.headDim,
      }),
    ];
    await gpu.run("tree verify", dispatches);
    const count = new Uint32Array(await gpu.read(outCount))[0];
    const m = missAt === undefined ? depth : missAt - 1;
    const name = `${model.source} ${depth}x${width} miss=${missAt} kv=${t.kvType}`;
    assert.equal(count, m + 1, `${name}: accepted ${count - 1}`);
    const emitted = [...new Uint32Array(await gpu.read(outTokens)).slice(0, count)];
    assert.deepEqual(emitted, g.slice(1, m + 2), name);
    // Cache rows 0..P+m now hold prompt + g[0..m]; the bonus g[m+1] goes to row P+m+1.
    t.setPosition(P + m + 1);
    const bonus = gpu.upload("bonus", new Uint32Array([g[m + 1]]));
    await gpu.run("step", await t.plan(1, { buffer: bonus, offset: 0 }, "last"));
    const after = new Float32Array(await gpu.read(t.logits, 0, V * 4));
    const seq = gpu.upload("seq", new Uint32Array([...prompt, ...g.slice(0, m + 2)]));
    t.setPosition(0);
    await gpu.run("fresh", await t.plan(P + m + 2, { buffer: seq, offset: 0 }, "last"));
    const fresh = new Float32Array(await gpu.read(t.logits, 0, V * 4));
    // Same bound as the chain's rollback test: a wrong row moves logits by ~10.
    assertClose(`${name}: logits after compaction vs fresh`, after, fresh, {
      nmse: 1e-6,
      maxAbs: 2e-2,
    });
  }
  t.destroy();
  store.destroy();
}

gpuTest(
  "tree verify on the tiny model: greedy path accepted, compacted cache = fresh prefill",
  async (gpu) => {
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    await checkTreeVerify(gpu, target, [1, 403, 407, 261]);
    await checkTreeVerify(gpu, target, [1, 403, 407, 261], "q8");
  },
);

gpuTest(
  "tree verify on the pycode target: greedy path accepted, compacted cache = fresh prefill",
  async (gpu) => {
    const target = await loadHfFolder(await fixture("pycode-pair/target"));
    await checkTreeVerify(gpu, target, [1, 1053, 2897, 13, 5215, 10876, 13]);
  },
);

gpuTest("tree draft kernels match treeExpandRef() over two levels, ties included", async (gpu) => {
  // One slice (V <= 1024), several (ragged last slices of 1 and 7 ids: fewer than width), 32.
  const cases = [[7, 1, 1], [37, 3, 2], [300, 8, 3], [512, 2, 4], [4097, 8, 5], [3074, 3, 6]];
  const scratch = gpu.buffer("scratch", treeTopkScratchWords(32000) * 4, RW);
  for (const [V, width, seed] of [...cases, [32000, 4, 7]]) {
    const r = rng(seed);
    // Values on a coarse grid, so rows hold ties that the order must break by id.
    const rand = (n: number) => Float32Array.from({ length: n }, () => Math.round(r() * 12) / 2);
    const b = (name: string, bytes: number) => gpu.buffer(name, bytes, RW);
    const tokens = b("tokens", 4 * (TREE_MAX_NODES + 3)), scores = b("scores", 4 * TREE_MAX_NODES);
    const table = b("table", 16 * TREE_MAX_NODES), cand = b("cand", 8 * TREE_MAX_NODES);
    gpu.write(table, treeTable([-1]));
    gpu.write(scores, new Float32Array(TREE_MAX_NODES));
    const parents = [-1], tok = [0], score = [0];
    let first = 0, R = 1;
    for (let level = 1; level <= 2; level++) {
      const logits = rand(R * V);
      const want = treeExpandRef(logits, R, V, width, first, score.slice(first, first + R));
      const ds = await createTreeDraft(gpu, {
        label: "test.tree_draft",
        logits: gpu.upload("logits", logits),
        cand,
        scratch,
        tokens,
        tokensOffset: 3,
        scores,
        table,
        R,
        width,
        parentFirst: first,
        newFirst: first + R,
        V,
      });
      await gpu.run("test", ds);
      first += R;
      R = width;
      for (const n of want) parents.push(n.parent), tok.push(n.token), score.push(n.score);
      const name = `V=${V} width=${width} level=${level}`;
      const got = new Uint32Array(await gpu.read(tokens)).slice(3 + first, 3 + first + width);
      assert.deepEqual([...got], want.map((n) => n.token), `${name} tokens`);
      const gotScores = new Float32Array(await gpu.read(scores)).slice(first, first + width);
      assertClose(`${name} scores`, gotScores, want.map((n) => n.score), {
        nmse: 1e-10,
        maxAbs: 1e-5,
      });
    }
    const n = parents.length;
    assert.deepEqual(
      [...new Uint32Array(await gpu.read(table)).slice(0, 4 * n)],
      [...treeTable(parents)],
      `V=${V} width=${width} table`,
    );
  }
});

gpuTest(
  "tiny pair: tree speculation greedy equals plain greedy (auto, 1x1, 3x2, 6x3, 4x8, 21x3)",
  async (gpu) => {
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 256, TREE_MAX_NODES);
    const n = 48, prompt = [1, 403, 407, 261]; // BOS "Once upon a"
    const plain = await new Decoder(gpu, t).generate(prompt, n, GREEDY, quiet);
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const chain = await spec.generate(prompt, n, GREEDY, quiet, 3);
    // auto: the shape from the measured costs and the running acceptance, same tokens.
    const auto = await spec.generate(prompt, n, GREEDY, quiet, 4, "auto");
    assert.deepEqual(auto.tokens, plain.tokens, "auto");
    assert.ok(auto.tree && auto.treeCycles, "auto reports its shapes");
    assert.ok(auto.targetPasses < n, `auto: ${auto.targetPasses} passes for ${n}`);
    const costs = await spec.treeCosts();
    assert.ok(costs.verify.length >= 3 && costs.draft.length >= 3, JSON.stringify(costs));
    for (const [depth, width] of [[1, 1], [3, 2], [6, 3], [4, 8], [21, 3]]) {
      const r = await spec.generate(prompt, n, GREEDY, quiet, 4, { depth, width });
      assert.deepEqual(r.tokens, plain.tokens, `${depth}x${width}`);
      assert.ok(r.targetPasses < n, `${depth}x${width}: ${r.targetPasses} passes for ${n}`);
      if (depth === 3 && width === 2) {
        // The same depth as the chain k = 3, with more candidates: never fewer tokens per pass.
        assert.ok(
          r.targetPasses <= chain.targetPasses,
          `${r.targetPasses} vs ${chain.targetPasses}`,
        );
      }
    }
    // Stops at max tokens mid-cycle, and near the end of the cache falls back to chains.
    const r7 = await spec.generate(prompt, 7, GREEDY, quiet, 4, { depth: 6, width: 3 });
    assert.deepEqual(r7.tokens, plain.tokens.slice(0, 7));
    const { t: t2, d: d2, destroy: destroy2 } = await gpuPair(
      gpu,
      target,
      draft,
      40,
      TREE_MAX_NODES,
    );
    const short = await new Decoder(gpu, t2).generate(prompt, 64, GREEDY, quiet);
    const end = new Decoder(gpu, t2, { kind: "model", draft: d2 });
    const r = await end.generate(prompt, 64, GREEDY, quiet, 4, { depth: 6, width: 3 });
    assert.deepEqual(r.tokens, short.tokens);
    assert.equal(r.stop, "context");
    end.destroy();
    destroy2();
    spec.destroy();
    destroy();
  },
);

gpuTest("pycode pair: tree speculation greedy equals plain greedy (6x3, auto)", async (gpu) => {
  const target = await loadHfFolder(await fixture("pycode-pair/target"));
  const draft = await loadHfFolder(await fixture("pycode-pair/draft"));
  const { t, d, destroy } = await gpuPair(gpu, target, draft, 96, TREE_MAX_NODES);
  // BOS "import os\nimport sys\n\n\ndef main():\n"
  const prompt = [1, 1053, 2897, 13, 5215, 10876, 13, 13, 13, 1753, 1667, 7295, 13];
  const n = 12;
  const plain = await new Decoder(gpu, t).generate(prompt, n, GREEDY, quiet);
  const spec = new Decoder(gpu, t, { kind: "model", draft: d });
  for (const shape of [{ depth: 6, width: 3 }, "auto" as const]) {
    const r = await spec.generate(prompt, n, GREEDY, quiet, 4, shape);
    assert.deepEqual(r.tokens, plain.tokens, JSON.stringify(shape));
  }
  spec.destroy();
  destroy();
});

gpuTest(
  "tree speculation refuses n-gram drafts and trees the target cannot verify",
  async (gpu) => {
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const store = new WeightStore(gpu);
    const t = await LlamaGpu.create(gpu, store, target, { label: "target", maxSeq: 64 });
    const d = await LlamaGpu.create(gpu, store, draft, { label: "draft", maxSeq: 64 });
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const go = (dec: Decoder, s: typeof GREEDY, shape: { depth: number; width: number }) =>
      dec.generate([1, 403], 4, s, quiet, 4, shape);
    await assert.rejects(
      () => go(spec, GREEDY, { depth: 6, width: 3 }),
      /verifies 19 rows but the target holds logits for 17/,
    );
    await assert.rejects(
      () => go(spec, GREEDY, { depth: 2, width: 9 }),
      /tree width 9 is outside \[1, 8\]/,
    );
    const ngram = new Decoder(gpu, t, { kind: "ngram", maxN: 3 });
    await assert.rejects(() => go(ngram, GREEDY, { depth: 2, width: 2 }), /needs a draft model/);
    ngram.destroy();
    spec.destroy();
    t.destroy();
    d.destroy();
    store.destroy();
  },
);

gpuTest(
  "sampled tree speculation keeps the target's distribution (chi-square, real model)",
  async (gpu) => {
    // As the chain's test in speculative_test.ts: among runs whose first token (the target's own
    // sampler) is the likeliest t*, the first tree cycle's first token must follow p(· | t*).
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 64, TREE_MAX_NODES);
    const prompt = [1, 403, 407, 261, 378, 432]; // BOS "Once upon a time, there"
    const s = { temperature: 1.3, topK: 10, topP: 1 };
    const V = t.config.vocabSize;
    const { tStar, p1 } = await likeliestNext(gpu, t, prompt, s);
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const counts = new Array(V).fill(0);
    let used = 0, deep = 0;
    for (let seed = 1; seed <= 300; seed++) {
      const r = await spec.generate(prompt, 2, { ...s, seed }, quiet, 4, { depth: 2, width: 3 });
      if (r.tokens[0] !== tStar) continue;
      counts[r.tokens[1]]++;
      used++;
      if (r.accepted > 0) deep++;
    }
    assert.ok(used >= 80, `only ${used} runs started with the most likely token`);
    assert.ok(deep > 0, "no run accepted a drafted token");
    const { pValue, stat, df } = chiSquareTest(counts, p1);
    // Fixed seeds make this deterministic; a wrong acceptance rule gives p-values << 1e-3.
    assert.ok(pValue > 0.001, `chi-square ${stat.toFixed(1)} on ${df} df, p-value ${pValue}`);
    spec.destroy();
    destroy();
  },
);
