import assert from "@specdec/assert";
import { commitRef, type CommitState, createCommit, RUN, RUN_SLOTS } from "../kernels/commit.ts";
import { createNgram, ngramRef } from "../kernels/ngram.ts";
import { advanceRef, createAdvance } from "../kernels/advance.ts";
import { gpuTest, rng } from "./harness.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("commitRef() appends accepted tokens, rolls positions back and stops at EOS", () => {
  const s: CommitState = {
    run: new Uint32Array(RUN_SLOTS),
    out: new Uint32Array(8),
    history: new Uint32Array(16),
    targetPos: 10,
    draftPos: 10,
    verifyIn: new Uint32Array(5),
  };
  s.run[RUN.maxTokens] = 8;
  s.run[RUN.promptLen] = 3;
  commitRef(s, [7, 8, 9], 2, 4, [2]); // 1 draft token accepted + correction 8; k = 4
  assert.equal(s.targetPos, 10 - 3);
  assert.deepEqual([...s.out.subarray(0, 2)], [7, 8]);
  assert.deepEqual([...s.history.subarray(3, 5)], [7, 8]);
  assert.equal(s.verifyIn[0], 8);
  assert.equal(s.run[RUN.accepted], 1);
  commitRef(s, [5, 2, 6], 3, 2, [2]); // EOS (2) mid-cycle: 6 is dropped
  assert.equal(s.run[RUN.count], 4);
  assert.equal(s.run[RUN.done], 1);
  assert.deepEqual([...s.out.subarray(0, 5)], [7, 8, 5, 2, 0]);
});

Deno.test("ngramRef() proposes what followed the latest earlier match of the longest n-gram", () => {
  // ... 1 2 3 4 ... 1 2 3 → propose 4 5; the 2-gram "2 3" also matches but 3-grams win.
  assert.deepEqual(ngramRef([9, 1, 2, 3, 4, 5, 2, 3, 7, 1, 2, 3], 2, 3), [4, 5]);
  // No match at all: repeat the last token.
  assert.deepEqual(ngramRef([1, 2, 3], 3, 3), [3, 3, 3]);
  // The proposal runs past the end of the history: repeat its last token.
  assert.deepEqual(ngramRef([5, 6, 5], 3, 2), [6, 5, 5]);
});

gpuTest(
  "commit kernel matches commitRef over random cycles, including EOS and max tokens",
  async (gpu) => {
    const r = rng(7);
    for (const [k, maxTokens] of [[1, 20], [4, 9], [7, 40]]) {
      const eos = [2, 11];
      const host: CommitState = {
        run: new Uint32Array(RUN_SLOTS),
        out: new Uint32Array(64),
        history: new Uint32Array(128),
        targetPos: 50,
        draftPos: 60,
        verifyIn: new Uint32Array(k + 1),
      };
      host.run[RUN.maxTokens] = maxTokens;
      host.run[RUN.promptLen] = 5;
      const b = {
        outTokens: gpu.buffer("t.outTokens", (k + 1) * 4, RW),
        outCount: gpu.buffer("t.outCount", 4, RW),
        run: gpu.upload("t.run", host.run, RW),
        out: gpu.upload("t.out", host.out, RW),
        history: gpu.upload("t.history", host.history, RW),
        targetState: gpu.upload("t.ts", new Uint32Array([50, 0, 0, 0]), RW),
        draftState: gpu.upload("t.ds", new Uint32Array([60, 0, 0, 0]), RW),
        verifyIn: gpu.upload("t.vin", host.verifyIn, RW),
      };
      const commit = await createCommit(gpu, { label: "t.commit", ...b, k, eos });
      // Each cycle the models advance by k + 1 (as their forwards do) before the commit.
      const advT = await createAdvance(gpu, { label: "t.advT", state: b.targetState, by: k + 1 });
      const advD = await createAdvance(gpu, { label: "t.advD", state: b.draftState, by: k + 1 });
      for (let cycle = 0; cycle < 12; cycle++) {
        const count = 1 + Math.floor(r() * (k + 1));
        const toks = Array.from({ length: k + 1 }, () => Math.floor(r() * 40) + 3);
        if (r() < 0.1) toks[Math.floor(r() * count)] = eos[cycle % 2];
        gpu.write(b.outTokens, new Uint32Array(toks));
        gpu.write(b.outCount, new Uint32Array([count]));
        await gpu.run("t", [advT, advD, commit]);
        host.targetPos += k + 1;
        host.draftPos += k + 1;
        commitRef(host, toks, count, k, eos);
      }
      const read = async (buf: GPUBuffer) => [...new Uint32Array(await gpu.read(buf))];
      assert.deepEqual(await read(b.run), [...host.run], `k=${k} run`);
      assert.deepEqual(await read(b.out), [...host.out], `k=${k} out`);
      assert.deepEqual(await read(b.history), [...host.history], `k=${k} history`);
      assert.equal((await read(b.targetState))[0], host.targetPos);
      assert.equal((await read(b.draftState))[0], host.draftPos);
      assert.equal((await read(b.verifyIn))[0], host.verifyIn[0]);
    }
  },
);

gpuTest(
  "ngram kernel matches ngramRef and writes one-hot q rows (ragged histories)",
  async (gpu) => {
    const r = rng(3);
    const advanceState = new Uint32Array([4]);
    advanceRef(advanceState, 3);
    assert.equal(advanceState[0], 7);
    for (
      const [len, k, maxN, V] of [[1, 2, 3, 5], [2, 1, 1, 7], [37, 4, 3, 11], [300, 8, 3, 33], [
        700,
        3,
        2,
        6,
      ]]
    ) {
      const history = Array.from({ length: len }, () => Math.floor(r() * 6)); // small alphabet: many matches
      const run = new Uint32Array(RUN_SLOTS);
      run[RUN.promptLen] = len - Math.min(len - 1, 3);
      run[RUN.count] = Math.min(len - 1, 3);
      const b = {
        history: gpu.upload("t.h", new Uint32Array(history)),
        run: gpu.upload("t.run", run),
        verifyIn: gpu.buffer("t.vin", (k + 1) * 4, RW),
        q: gpu.buffer("t.q", k * V * 4, RW),
      };
      const d = await createNgram(gpu, { label: "t.ngram", ...b, k, maxN, V });
      await gpu.run("t", [d]);
      const want = ngramRef(history, k, maxN).map((t) => t % V);
      const vin = [...new Uint32Array(await gpu.read(b.verifyIn))].slice(1);
      assert.deepEqual(vin, ngramRef(history, k, maxN), `len=${len} k=${k} n=${maxN}`);
      const q = new Float32Array(await gpu.read(b.q));
      for (let i = 0; i < k; i++) {
        for (let v = 0; v < V; v++) {
          assert.equal(q[i * V + v], v === vin[i] ? 1 : 0, `q[${i}, ${v}] (token ${want[i]})`);
        }
      }
    }
  },
);
