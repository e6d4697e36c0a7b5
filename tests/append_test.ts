import { appendRef, createAppend } from "../kernels/append.ts";
import { advanceRef, createAdvance } from "../kernels/advance.ts";
import { gpuTest } from "./harness.ts";
import assert from "@specdec/assert";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("appendRef() stops at EOS and at capacity, then ignores further tokens", () => {
  const loop = new Uint32Array(2), out = new Uint32Array(4);
  for (const id of [5, 6, 2, 7]) appendRef(id, loop, out, 4, [2]);
  assert.deepEqual([...loop], [3, 1]);
  assert.deepEqual([...out], [5, 6, 2, 0]);
  const loop2 = new Uint32Array(2), out2 = new Uint32Array(2);
  for (const id of [5, 6, 7]) appendRef(id, loop2, out2, 2, [2]);
  assert.deepEqual([...loop2], [2, 1]);
});

gpuTest("append and advance kernels match their references over a token sequence", async (gpu) => {
  const eos = [2, 9], maxOut = 6, seq = [4, 8, 1, 9, 3, 3];
  const token = gpu.buffer("t.token", 8, RW);
  const loop = gpu.upload("t.loop", new Uint32Array(2), RW);
  const out = gpu.upload("t.out", new Uint32Array(maxOut), RW);
  const state = gpu.upload("t.state", new Uint32Array([7, 0]), RW);
  const d = await createAppend(gpu, {
    label: "t.append",
    token,
    tokenOffset: 1,
    loop,
    out,
    maxOut,
    eos,
  });
  const adv = await createAdvance(gpu, { label: "t.adv", state, by: 3 });
  const rl = new Uint32Array(2), ro = new Uint32Array(maxOut), rs = new Uint32Array([7, 0]);
  for (const id of seq) {
    gpu.write(token, new Uint32Array([0, id]));
    await gpu.run("t", [d, adv]);
    appendRef(id, rl, ro, maxOut, eos);
    advanceRef(rs, 3);
  }
  assert.deepEqual([...new Uint32Array(await gpu.read(loop))], [...rl]);
  assert.deepEqual([...new Uint32Array(await gpu.read(out))], [...ro]);
  assert.deepEqual([...new Uint32Array(await gpu.read(state))], [...rs]);
});
