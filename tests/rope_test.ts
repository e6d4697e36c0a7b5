import { createRope, ropeInvFreq, ropeRef } from "../kernels/rope.ts";
import type { RopeLayout } from "../models/types.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";
import assert from "@specdec/assert";

// Tolerance: f32 angle (pos * invFreq) and GPU cos/sin vs f64: nmse <= 1e-9, max-abs <= 2e-4
// for positions up to ~1000.
const TOL = { nmse: 1e-9, maxAbs: 2e-4 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("ropeInvFreq() is theta^(-2i/d)", () => {
  const f = ropeInvFreq(64, 10000);
  assert.equal(f.length, 32);
  for (let i = 0; i < 32; i++) {
    assert.ok(Math.abs(f[i] / 10000 ** (-2 * i / 64) - 1) < 1e-6, `i=${i}`);
  }
});

Deno.test("ropeInvFreq() applies Llama 3 scaling: keeps high, divides low, blends middle", () => {
  const scaling = {
    type: "llama3" as const,
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  };
  const base = ropeInvFreq(128, 500000);
  const f = ropeInvFreq(128, 500000, scaling);
  let kept = 0, divided = 0, blended = 0;
  for (let i = 0; i < 64; i++) {
    const wavelen = 2 * Math.PI / base[i];
    let want: number;
    if (wavelen < 8192 / 4) {
      want = base[i];
      kept++;
    } else if (wavelen > 8192) {
      want = base[i] / 8;
      divided++;
    } else {
      const smooth = (8192 / wavelen - 1) / (4 - 1);
      want = (1 - smooth) * base[i] / 8 + smooth * base[i];
      assert.ok(want < base[i] && want > base[i] / 8);
      blended++;
    }
    assert.ok(Math.abs(f[i] / want - 1) < 1e-6, `i=${i}: ${f[i]} vs ${want}`);
  }
  assert.ok(kept > 0 && divided > 0 && blended > 0, `${kept} ${divided} ${blended}`);
});

Deno.test("ropeRef() pairs (2i, 2i+1) interleaved and (i, i+d/2) rotate-half", () => {
  const x = new Float32Array([1, 2, 3, 4]); // one head, headDim 4
  const inv = new Float32Array([Math.PI / 2, 0]); // pair 0 turns 90°, pair 1 stays
  const il = ropeRef(x, 1, 4, 1, inv, "interleaved");
  assertClose("interleaved", il, [-2, 1, 3, 4], { nmse: 1e-12, maxAbs: 1e-6 });
  const rh = ropeRef(x, 1, 4, 1, inv, "rotate-half");
  assertClose("rotate-half", rh, [-3, 2, 1, 4], { nmse: 1e-12, maxAbs: 1e-6 });
});

for (const layout of ["interleaved", "rotate-half"] as RopeLayout[]) {
  gpuTest(`rope ${layout} rotates q and k at state[0] + t like the reference`, async (gpu) => {
    const shapes = [
      { nHeads: 1, nKv: 1, headDim: 2, rot: 2 },
      { nHeads: 9, nKv: 3, headDim: 64, rot: 64 },
      { nHeads: 4, nKv: 2, headDim: 48, rot: 32 }, // partial rotary
      { nHeads: 3, nKv: 0, headDim: 6, rot: 6 }, // q only
    ];
    for (const s of shapes) {
      const invF = ropeInvFreq(s.rot, 10000);
      const inv = gpu.upload("invFreq", invF);
      for (const T of [1, 2, 5, 17]) {
        for (const pos0 of [0, 7, 1000]) {
          const q = randomArray(T * s.nHeads * s.headDim, T + pos0 + s.headDim);
          const k = randomArray(T * s.nKv * s.headDim, T + pos0 + 1);
          const qOff = 3, kOff = 5;
          const qInit = new Float32Array(qOff + q.length + 1).fill(11);
          qInit.set(q, qOff);
          const kInit = new Float32Array(kOff + k.length + 1).fill(13);
          kInit.set(k, kOff);
          const qb = gpu.upload("q", qInit, RW), kb = gpu.upload("k", kInit, RW);
          // state[0] is the position; a second word checks nothing else is read.
          const state = gpu.upload("state", new Uint32Array([pos0, 12345]));
          const d = await createRope(gpu, {
            label: "test.rope",
            q: qb,
            qOffset: qOff,
            k: s.nKv ? kb : undefined,
            kOffset: kOff,
            invFreq: inv,
            half: s.rot / 2,
            state,
            layout,
            T,
            nHeads: s.nHeads,
            nKvHeads: s.nKv,
            headDim: s.headDim,
          });
          await gpu.run("test", [d]);
          const name = `rope ${layout} T=${T} pos0=${pos0} heads=${s.nHeads}/${s.nKv} ` +
            `headDim=${s.headDim} rotDim=${s.rot}`;
          const wantQ = qInit.slice();
          wantQ.set(ropeRef(q, s.nHeads, s.headDim, pos0, invF, layout), qOff);
          assertClose(`${name} q`, new Float32Array(await gpu.read(qb)), wantQ, TOL);
          const wantK = kInit.slice();
          if (s.nKv) wantK.set(ropeRef(k, s.nKv, s.headDim, pos0, invF, layout), kOff);
          assertClose(`${name} k`, new Float32Array(await gpu.read(kb)), wantK, TOL);
        }
      }
    }
  });
}
