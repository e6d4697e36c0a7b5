/**
 * Attention benchmarks at pycode target shapes (9 heads, 3 kv heads, headDim 64, S = 1024 keys):
 * decode (T=1), verify (T=8) and prefill of the last 512 rows (T=512), each kernel variant by name,
 * with the engine's default KV cache (f16, or f32 without shader-f16) and with the 8-bit cache (q8). Deno.bench times whole submissions
 * (dominated by Deno's ~11 ms poll); the GB/s lines printed first come from GPU timestamps over
 * back-to-back repetitions and count the K/V bytes each forward must read at least once.
 *
 * Run: `XDG_RUNTIME_DIR=/tmp deno bench -A bench/attention_bench.ts`
 */
import { type Dispatch, type Gpu, requestGpu } from "../engine/gpu.ts";
import { type AttentionVariant, createAttention } from "../kernels/attention.ts";
import { kvCacheBytes, type KvDType, kvDType, kvQ8CacheImage } from "../kernels/kv_write.ts";
import { randomArray } from "../tests/harness.ts";

const SHAPE = { nHeads: 9, nKvHeads: 3, headDim: 64, maxSeq: 1024, layers: 1, layer: 0 };
const S = 1024;
/** Variants measured per T (naive prefill is left out: minutes on a software adapter). */
const CASES: [number, AttentionVariant[]][] = [
  [1, ["flash-split", "flash", "naive"]],
  [8, ["flash-split", "flash", "naive"]],
  [512, ["flash", "flash-split"]],
];

const gpu = await requestGpu();
const DTYPES: KvDType[] = [kvDType(gpu), "q8"];
const cacheElems = SHAPE.maxSeq * SHAPE.nKvHeads * SHAPE.headDim;
const toCache = (a: Float32Array, dtype: KvDType) =>
  dtype === "q8" ? kvQ8CacheImage(a, SHAPE.headDim) : dtype === "f16" ? Float16Array.from(a) : a;
const caches = new Map(DTYPES.map((dtype) => [dtype, {
  k: gpu.upload(`bench.k_cache.${dtype}`, toCache(randomArray(cacheElems, 1), dtype)),
  v: gpu.upload(`bench.v_cache.${dtype}`, toCache(randomArray(cacheElems, 2), dtype)),
}]));
/** K/V bytes a forward over S keys reads at least once (q8: int8 values and scales). */
const kvBytes = (dtype: KvDType) => 2 * kvCacheBytes(dtype, 1, S, SHAPE.nKvHeads, SHAPE.headDim);

async function build(T: number, variant: AttentionVariant, dtype: KvDType): Promise<Dispatch[]> {
  // pos = S - T: the last query row sees all S keys.
  const state = gpu.upload(`bench.state.T${T}`, new Uint32Array([S - T]));
  const q = gpu.upload(`bench.q.T${T}`, randomArray(T * SHAPE.nHeads * SHAPE.headDim, 3));
  const out = gpu.buffer(`bench.out.T${T}`, q.size, GPUBufferUsage.STORAGE);
  return await createAttention(gpu, {
    label: `bench.attn.T${T}.${variant}.${dtype}`,
    q,
    kCache: caches.get(dtype)!.k,
    vCache: caches.get(dtype)!.v,
    state,
    out,
    dtype,
    T,
    variant,
    ...SHAPE,
  });
}

/** Seconds per forward from GPU timestamps around `reps` repetitions in one pass. */
async function gpuSeconds(
  g: Gpu,
  dispatches: Dispatch[],
  reps: number,
): Promise<number | undefined> {
  if (!g.features.timestamp) return undefined;
  const querySet = g.device.createQuerySet({ label: "bench.ts", type: "timestamp", count: 2 });
  const resolve = g.buffer(
    "bench.ts.resolve",
    16,
    GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  );
  const enc = g.device.createCommandEncoder({ label: "bench.ts" });
  const all = Array.from({ length: reps }, () => dispatches).flat();
  g.encode(enc, "bench.attn", all, {
    querySet,
    beginningOfPassWriteIndex: 0,
    endOfPassWriteIndex: 1,
  });
  enc.resolveQuerySet(querySet, 0, 2, resolve, 0);
  g.device.queue.submit([enc.finish()]);
  const [t0, t1] = new BigUint64Array(await g.read(resolve));
  querySet.destroy();
  return Number(t1 - t0) / 1e9 / reps;
}

for (const [T, variants] of CASES) {
  for (const [variant, dtype] of variants.flatMap((v) => DTYPES.map((d) => [v, d] as const))) {
    const dispatches = await build(T, variant, dtype);
    await gpu.run("bench.warmup", dispatches);
    const sec = await gpuSeconds(gpu, dispatches, T > 64 ? 5 : 50);
    const name = `attention ${variant} T=${T} S=${S} ${dtype} (9/3 heads, hd 64)`;
    if (sec === undefined) console.log(`${name}: no timestamp-query, GB/s not measured`);
    else {
      console.log(
        `${name}: ${(sec * 1e6).toFixed(1)} us, K/V reads ${
          (kvBytes(dtype) / sec / 1e9).toFixed(2)
        } GB/s` +
          ` on ${gpu.adapterName}`,
      );
    }
    Deno.bench({
      name,
      group: `T=${T}`,
      baseline: variant === variants[0] && dtype === DTYPES[0],
      async fn() {
        await gpu.run("bench.attn", dispatches);
      },
    });
  }
}
