import {
  argmaxAcceptRef,
  argmaxRef,
  argmaxScratchWords,
  argmaxSplit,
  createArgmax,
} from "../kernels/argmax.ts";
import { gpuTest, randomArray } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import assert from "@specdec/assert";

// Tolerance: exact (an index).
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

async function gpuArgmax(gpu: Gpu, logits: Float32Array, T: number, V: number, xOff: number) {
  const buf = new Float32Array(xOff + T * V).fill(1e30);
  buf.set(logits, xOff);
  const idsOff = 2;
  const ids = gpu.upload("ids", new Uint32Array(idsOff + T + 1).fill(777), RW);
  const d = await createArgmax(gpu, {
    label: "test.argmax",
    logits: gpu.upload("logits", buf),
    xOffset: xOff,
    ids,
    idsOffset: idsOff,
    T,
    V,
  });
  await gpu.run("test", [d]);
  const got = new Uint32Array(await gpu.read(ids));
  assert.equal(got[0], 777, "wrote before idsOffset");
  assert.equal(got[idsOff + T], 777, "wrote past T ids");
  return got.slice(idsOff, idsOff + T);
}

Deno.test("argmaxRef() returns the first index of the maximum", () => {
  assert.deepEqual([...argmaxRef(new Float32Array([1, 5, 5, -3, -2, -1]), 2, 3)], [1, 2]);
});

gpuTest("argmax matches the reference on ragged T and V, with offsets", async (gpu) => {
  for (const T of [1, 2, 5, 17]) {
    for (const V of [1, 3, 64, 257, 1031, 32000]) {
      if (T * V > 200000) continue;
      const x = randomArray(T * V, T * 13 + V);
      const got = await gpuArgmax(gpu, x, T, V, 5);
      assert.deepEqual([...got], [...argmaxRef(x, T, V)], `argmax T=${T} V=${V}`);
    }
  }
});

gpuTest("argmax breaks ties toward the lowest index, across invocations", async (gpu) => {
  const V = 32000;
  const x = new Float32Array(3 * V).fill(-1);
  // Row 0: ties at 31999, 700, 5 (different invocations) -> 5.
  for (const i of [31999, 700, 5]) x[i] = 4;
  // Row 1: all equal -> 0.
  x.fill(2, V, 2 * V);
  // Row 2: all -Infinity except nothing -> 0; then a tie of -Infinity rows is index 0.
  x.fill(-Infinity, 2 * V, 3 * V);
  const got = await gpuArgmax(gpu, x, 3, V, 0);
  assert.deepEqual([...got], [5, 0, 0]);
  assert.deepEqual([...got], [...argmaxRef(x, 3, V)]);
});

Deno.test("argmaxSplit() cuts a row into at most 32 slices of whole workgroups", () => {
  assert.deepEqual(argmaxSplit(1), { slice: 1024, slices: 1 });
  assert.deepEqual(argmaxSplit(512), { slice: 1024, slices: 1 });
  assert.deepEqual(argmaxSplit(1025), { slice: 1024, slices: 2 });
  assert.deepEqual(argmaxSplit(32000), { slice: 1024, slices: 32 });
  assert.deepEqual(argmaxSplit(128256), { slice: 4096, slices: 32 });
  for (const V of [1, 7, 1023, 1024, 32769, 151936, 262144]) {
    const { slice, slices } = argmaxSplit(V);
    assert.ok(slices <= 32 && slice % 256 === 0 && slices * slice >= V, `V=${V}`);
    assert.ok((slices - 1) * slice < V, `V=${V}: an empty slice`);
  }
});

gpuTest(
  "argmax: split rows, ties across slices, a large vocabulary, a reused dispatch",
  async (gpu) => {
    // Ties in different slices (1024 elements each at V = 32000): the lowest index wins.
    const V = 32000;
    const x = new Float32Array(3 * V).fill(-5);
    for (const i of [30000, 2049, 3000]) x[i] = 7; // row 0 -> 2049
    x[V + 31999] = 1; // row 1: the very last element (a ragged last slice)
    for (let i = 2 * V; i < 3 * V; i++) x[i] = -Infinity;
    x[2 * V + 17000] = NaN; // row 2: NaN never wins, all -inf -> 0
    assert.deepEqual([...await gpuArgmax(gpu, x, 3, V, 3)], [2049, 31999, 0]);
    // Llama 3's vocabulary, 4096 per slice.
    const big = randomArray(2 * 128256, 99);
    assert.deepEqual([...await gpuArgmax(gpu, big, 2, 128256, 0)], [...argmaxRef(big, 2, 128256)]);
    // The same dispatch run three times over changing logits: the counters reset each time.
    const T = 5;
    const logits = gpu.upload("logits", new Float32Array(T * V), RW);
    const ids = gpu.upload("ids", new Uint32Array(T), RW);
    const d = await createArgmax(gpu, { label: "test.argmax.reuse", logits, ids, T, V });
    for (let rep = 0; rep < 3; rep++) {
      const y = randomArray(T * V, 500 + rep);
      gpu.write(logits, y);
      await gpu.run("test", [d, d]);
      const got = new Uint32Array(await gpu.read(ids));
      assert.deepEqual([...got], [...argmaxRef(y, T, V)], `rep ${rep}`);
    }
  },
);

gpuTest("argmax accept mode equals the greedy accept of a chain", async (gpu) => {
  for (const V of [61, 1031, 32000]) {
    for (const k of [1, 2, 4, 7, 16]) {
      const logits = randomArray((k + 1) * V, V + k);
      const ref0 = argmaxRef(logits, k + 1, V);
      // Draft chains agreeing on 0..k leading tokens (then a wrong one).
      for (const agree of new Set([0, 1, k >> 1, k])) {
        const draft = Array.from(ref0.slice(0, k));
        if (agree < k) draft[agree] = (draft[agree] + 1) % V;
        const off = 3;
        const tokens = new Uint32Array(off + k + 2).fill(V + 5);
        tokens.set(draft, off);
        const ids = gpu.upload("out", new Uint32Array(k + 2).fill(999999), RW);
        const outCount = gpu.upload("count", new Uint32Array([77]), RW);
        const d = await createArgmax(gpu, {
          label: "test.argmax.accept",
          logits: gpu.upload("logits", logits),
          ids,
          T: k + 1,
          V,
          accept: { draftTokens: gpu.upload("tokens", tokens), tokensOffset: off, outCount },
        });
        // Twice: the second run must see reset counters.
        for (let rep = 0; rep < 2; rep++) {
          await gpu.run("test", [d]);
          const want = argmaxAcceptRef(logits, draft, V);
          const got = new Uint32Array(await gpu.read(ids));
          const count = new Uint32Array(await gpu.read(outCount))[0];
          assert.equal(count, want.count, `V=${V} k=${k} agree=${agree}`);
          assert.equal(count, agree + 1);
          assert.deepEqual([...got.slice(0, k + 1)], [...want.ids], `V=${V} k=${k}`);
          assert.equal(got[k + 1], 999999, "wrote past k + 1 ids");
        }
      }
    }
  }
});

gpuTest("argmax dispatches of different T share one scratch, in one submission", async (gpu) => {
  // The decoder's pattern: plain rows, draft rows and accept rows interleaved over one scratch
  // of C rows; a layout that moved with T would leave stale counters behind.
  const V = 3001, C = 17;
  const scratch = {
    buffer: gpu.buffer("test.scratch", argmaxScratchWords(C, V) * 4, RW),
    rows: C,
  };
  const Ts = [1, 17, 5, 2, 17, 1, 9];
  const logits = Ts.map((T, i) => randomArray(T * V, 70 + i));
  const ids = Ts.map((T) => gpu.upload("ids", new Uint32Array(T + 1).fill(999999), RW));
  const counts = Ts.map(() => gpu.upload("count", new Uint32Array([77]), RW));
  const miss = (T: number) => Math.min(T >> 1, T - 2); // the first wrong draft token
  const dispatches = [];
  for (let i = 0; i < Ts.length; i++) {
    const T = Ts[i];
    const accept = i % 2 === 1 && T > 1;
    const draft = Array.from(argmaxRef(logits[i], T, V).slice(0, T - 1));
    if (accept) draft[miss(T)] = (draft[miss(T)] + 1) % V;
    dispatches.push(
      await createArgmax(gpu, {
        label: `test.argmax.shared${i}`,
        logits: gpu.upload("logits", logits[i]),
        ids: ids[i],
        T,
        V,
        scratch,
        accept: accept
          ? { draftTokens: gpu.upload("tokens", new Uint32Array(draft)), outCount: counts[i] }
          : undefined,
      }),
    );
  }
  // Twice in one submission.
  await gpu.run("test", [...dispatches, ...dispatches]);
  for (let i = 0; i < Ts.length; i++) {
    const got = new Uint32Array(await gpu.read(ids[i]));
    assert.deepEqual([...got.slice(0, Ts[i])], [...argmaxRef(logits[i], Ts[i], V)], `T=${Ts[i]}`);
    assert.equal(got[Ts[i]], 999999, "wrote past T ids");
    const count = new Uint32Array(await gpu.read(counts[i]))[0];
    assert.equal(count, i % 2 === 1 && Ts[i] > 1 ? miss(Ts[i]) + 1 : 77, `count, T=${Ts[i]}`);
  }
  // A scratch too small for T is refused.
  await assert.rejects(
    createArgmax(gpu, {
      label: "test.argmax.small",
      logits: gpu.upload("logits", logits[1]),
      ids: ids[1],
      T: 17,
      V,
      scratch: { buffer: scratch.buffer, rows: 9 },
    }),
    /scratch of 9 rows/,
  );
});
