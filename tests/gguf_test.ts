import assert from "@specdec/assert";
import {
  type GgufArray,
  ggufToModel,
  type GgufValue,
  type GgufWriteTensor,
  modelToGguf,
  permuteRopeRows,
  readGguf,
  unpermuteRopeRows,
  writeGguf,
} from "../models/gguf.ts";
import { readLlama2c } from "../models/llama2c.ts";
import { BLOCK_INFO, dequantize, quantize, tensorBytes } from "../models/quant.ts";
import { type DType, FormatError, type HostTensor, type ModelConfig } from "../models/types.ts";
import { assertFormatError } from "./fixtures.ts";

const MODELS = new URL("../../shared/models/", import.meta.url);

/** Reads a shared fixture, failing with a clear message when it is missing. */
function fixture(path: string): Uint8Array {
  const url = new URL(path, MODELS);
  try {
    return Deno.readFileSync(url);
  } catch (e) {
    throw new Error(
      `missing test fixture ${url.pathname} (see shared/models/MANIFEST.md): ${
        (e as Error).message
      }`,
    );
  }
}

function randomBytes(n: number, seed: number): Uint8Array {
  let a = seed >>> 0;
  return Uint8Array.from({ length: n }, () => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return a >>> 24;
  });
}

function f32Bytes(values: number[]): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}

/** The value as an array, or a test failure. */
function arrayValue(v: GgufValue | undefined): GgufArray {
  if (v?.type !== "array") throw new Error(`expected an array value, got ${JSON.stringify(v)}`);
  return v;
}

// ---- vocab-only GGUFs from llama.cpp --------------------------------------------------------------

/** MANIFEST.md: file -> [kv count, tokenizer.ggml.model, n_tokens, general.architecture]. */
const VOCABS: Record<string, [number, string, number, string]> = {
  "ggml-vocab-llama-spm.gguf": [22, "llama", 32000, "llama"],
  "ggml-vocab-phi-3.gguf": [26, "llama", 32064, "phi3"],
  "ggml-vocab-gpt-2.gguf": [16, "gpt2", 50257, "gpt2"],
  "ggml-vocab-deepseek-llm.gguf": [23, "gpt2", 102400, "llama"],
  "ggml-vocab-deepseek-coder.gguf": [25, "gpt2", 32256, "llama"],
  "ggml-vocab-baichuan.gguf": [18, "llama", 64000, "baichuan"],
  "ggml-vocab-falcon.gguf": [18, "gpt2", 65024, "falcon"],
  "ggml-vocab-gpt-neox.gguf": [17, "gpt2", 50432, "gptneox"],
  "ggml-vocab-mpt.gguf": [17, "gpt2", 50432, "mpt"],
  "ggml-vocab-refact.gguf": [18, "gpt2", 49216, "refact"],
  "ggml-vocab-starcoder.gguf": [19, "gpt2", 49152, "starcoder2"],
  "ggml-vocab-bert-bge.gguf": [20, "bert", 30522, "bert"],
};

Deno.test("readGguf() parses every llama.cpp vocab-only GGUF with MANIFEST's counts", () => {
  for (const [file, [kv, model, nTokens, arch]] of Object.entries(VOCABS)) {
    const bytes = fixture(`ggerganov-llama.cpp/${file}`);
    const t0 = performance.now();
    const g = readGguf(bytes, file);
    const ms = performance.now() - t0;
    assert.ok(ms < 5000, `${file} took ${ms} ms`);
    assert.equal(g.version, 3, file);
    assert.equal(g.tensors.length, 0, file);
    assert.equal(g.metadata.size, kv, file);
    assert.deepEqual(g.metadata.get("tokenizer.ggml.model"), { type: "string", value: model });
    assert.deepEqual(g.metadata.get("general.architecture"), { type: "string", value: arch });
    const tokens = arrayValue(g.metadata.get("tokenizer.ggml.tokens"));
    assert.equal(tokens.itemType, "string", file);
    assert.equal(tokens.value.length, nTokens, file);
    assert.equal(g.alignment, 32);
  }
});

Deno.test("readGguf() reads llama-spm's typed values and ggufToModel() resolves its config", () => {
  const g = readGguf(fixture("ggerganov-llama.cpp/ggml-vocab-llama-spm.gguf"), "spm.gguf");
  const m = g.metadata;
  assert.deepEqual(m.get("llama.block_count"), { type: "u32", value: 32 });
  assert.deepEqual(m.get("llama.attention.layer_norm_rms_epsilon"), {
    type: "f32",
    value: Math.fround(1e-5),
  });
  assert.deepEqual(m.get("tokenizer.ggml.add_bos_token"), { type: "bool", value: true });
  const tokens = arrayValue(m.get("tokenizer.ggml.tokens"));
  const types = arrayValue(m.get("tokenizer.ggml.token_type"));
  assert.deepEqual(tokens.value.slice(0, 3), ["<unk>", "<s>", "</s>"]);
  assert.equal(tokens.value[259], "\u2581\u2581"); // "▁▁": multi-byte UTF-8 decoded
  assert.equal(types.itemType, "i32");
  assert.deepEqual(types.value.slice(0, 4), [2, 3, 3, 6]);
  const { config, tensors } = ggufToModel(g, "spm.gguf");
  assert.equal(tensors.size, 0);
  assert.deepEqual(config, {
    architecture: "llama",
    dim: 4096,
    nLayers: 32,
    nHeads: 32,
    nKvHeads: 32,
    headDim: 128,
    ffnDim: 11008,
    vocabSize: 32000,
    maxSeqLen: 4096,
    normEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: "interleaved",
    tiedEmbeddings: true,
    qkvBias: false,
    bosId: 1,
    eosIds: [2],
  });
});

Deno.test("writeGguf() of what readGguf() read reproduces every vocab GGUF byte for byte", () => {
  for (const file of Object.keys(VOCABS)) {
    const bytes = fixture(`ggerganov-llama.cpp/${file}`);
    const again = writeGguf({ metadata: [...readGguf(bytes, file).metadata], tensors: [] });
    // llama.cpp writes no trailing padding without tensors; token pieces with a leading U+FEFF
    // and multi-byte UTF-8 must survive the string decode/encode.
    assert.ok(
      again.byteLength === bytes.byteLength && again.every((v, i) => v === bytes[i]),
      `${file}: rewritten bytes differ`,
    );
  }
});

// ---- write/read round trips -------------------------------------------------------------------------

const ALL_VALUES: [string, GgufValue][] = [
  ["t.u8", { type: "u8", value: 255 }],
  ["t.i8", { type: "i8", value: -128 }],
  ["t.u16", { type: "u16", value: 65535 }],
  ["t.i16", { type: "i16", value: -32768 }],
  ["t.u32", { type: "u32", value: 4294967295 }],
  ["t.i32", { type: "i32", value: -2147483648 }],
  ["t.f32", { type: "f32", value: Math.fround(-0.1) }],
  ["t.bool", { type: "bool", value: true }],
  ["t.bool0", { type: "bool", value: false }],
  ["t.string", { type: "string", value: "héllo ▁ 🙂" }],
  ["t.empty", { type: "string", value: "" }],
  ["t.u64", { type: "u64", value: (1n << 64n) - 1n }],
  ["t.i64", { type: "i64", value: -(1n << 63n) }],
  ["t.f64", { type: "f64", value: Math.PI }],
  ["a.u8", { type: "array", itemType: "u8", value: [0, 1, 255] }],
  ["a.i8", { type: "array", itemType: "i8", value: [-1, 127] }],
  ["a.u16", { type: "array", itemType: "u16", value: [7] }],
  ["a.i16", { type: "array", itemType: "i16", value: [-7, 300] }],
  ["a.u32", { type: "array", itemType: "u32", value: [1, 2, 3] }],
  ["a.i32", { type: "array", itemType: "i32", value: [-5] }],
  ["a.f32", { type: "array", itemType: "f32", value: [0.5, -2, Math.fround(1e-3)] }],
  ["a.bool", { type: "array", itemType: "bool", value: [true, false] }],
  ["a.string", { type: "array", itemType: "string", value: ["a", "", "ü"] }],
  ["a.u64", { type: "array", itemType: "u64", value: [0n, 1n << 40n] }],
  ["a.i64", { type: "array", itemType: "i64", value: [-3n] }],
  ["a.f64", { type: "array", itemType: "f64", value: [1e300, -0.25] }],
  ["a.empty", { type: "array", itemType: "u32", value: [] }],
  ["a.nested", {
    type: "array",
    itemType: "array",
    value: [
      { type: "array", itemType: "string", value: ["x", "y"] },
      { type: "array", itemType: "array", value: [{ type: "array", itemType: "i8", value: [1] }] },
    ],
  }],
];

/** Tensors of every dtype with random bytes, 1-D to 4-D, rows a whole number of blocks. */
function allDtypeTensors(): GgufWriteTensor[] {
  return (Object.keys(BLOCK_INFO) as DType[]).map((dtype, i) => {
    const block = BLOCK_INFO[dtype].blockSize;
    const shape = [[3, 2 * block], [5 * block], [2, 1, 3, block], [1, 3, block]][i % 4];
    const n = shape.reduce((a, b) => a * b, 1);
    return {
      name: `blk.${i}.${dtype}.weight`,
      dtype,
      shape,
      data: randomBytes(tensorBytes(dtype, n), i + 1),
    };
  });
}

Deno.test("writeGguf() round-trips every metadata value type and every dtype's bytes", () => {
  const tensors = allDtypeTensors();
  for (const alignment of [32, 64]) {
    const bytes = writeGguf({ metadata: ALL_VALUES, tensors }, alignment);
    const g = readGguf(bytes, "rt.gguf");
    assert.equal(g.version, 3);
    assert.equal(g.alignment, alignment);
    const want = new Map(ALL_VALUES);
    if (alignment !== 32) want.set("general.alignment", { type: "u32", value: alignment });
    assert.deepEqual(new Map([...g.metadata].sort()), new Map([...want].sort()));
    assert.equal(g.tensors.length, tensors.length);
    g.tensors.forEach((t, i) => {
      const w = tensors[i];
      assert.equal(t.name, w.name);
      assert.equal(t.dtype, w.dtype);
      assert.deepEqual(t.shape, w.shape);
      assert.deepEqual(t.ne, [...w.shape].reverse());
      assert.equal(t.size, w.data.byteLength);
      assert.equal((g.dataOffset + t.offset) % alignment, 0, `${t.name} aligned`);
      assert.deepEqual(t.data, w.data, `${t.name} bytes`);
    });
    // Writing what was read gives the same file, byte for byte.
    const again = writeGguf({ metadata: [...g.metadata], tensors: g.tensors }, alignment);
    assert.deepEqual(again, bytes);
  }
});

Deno.test("writeGguf() rejects out-of-range values, bad shapes and wrong data lengths", () => {
  const t = (over: Partial<GgufWriteTensor>) => ({
    metadata: [],
    tensors: [{
      name: "w",
      dtype: "q8_0" as DType,
      shape: [2, 32],
      data: new Uint8Array(68),
      ...over,
    }],
  });
  assert.throws(
    () => writeGguf({ metadata: [["k", { type: "u8", value: 256 }]], tensors: [] }),
    /"k".*u8/,
  );
  assert.throws(
    () => writeGguf({ metadata: [["k", { type: "i32", value: 1.5 }]], tensors: [] }),
    /i32/,
  );
  assert.throws(
    () => writeGguf({ metadata: [["k", { type: "u64", value: -1n }]], tensors: [] }),
    /u64/,
  );
  assert.throws(() => writeGguf(t({ shape: [2, 16], data: new Uint8Array(34) })), /not a multiple/);
  assert.throws(() => writeGguf(t({ data: new Uint8Array(67) })), /needs 68 bytes, got 67/);
  assert.throws(() => writeGguf(t({ shape: [1, 1, 1, 1, 32] })), /1 to 4 positive/);
  assert.throws(() => writeGguf(t({}), 48), /power of two/);
  assert.throws(
    () => writeGguf({ metadata: [["general.alignment", { type: "u32", value: 64 }]], tensors: [] }),
    /general.alignment = 64 but alignment is 32/,
  );
});

// ---- corrupt input ----------------------------------------------------------------------------------

/** A small written GGUF and the byte offsets of its header fields. */
function smallGguf(): { bytes: Uint8Array; at: Record<string, number> } {
  const bytes = writeGguf({
    metadata: [
      ["general.architecture", { type: "string", value: "llama" }],
      ["a.str", { type: "array", itemType: "string", value: ["ab", "cd"] }],
    ],
    tensors: [
      { name: "x", dtype: "f32", shape: [2, 3], data: f32Bytes([1, 2, 3, 4, 5, 6]) },
      { name: "y", dtype: "q4_0", shape: [32], data: randomBytes(18, 3) },
    ],
  });
  // Layout: 24-byte header; key 1 (8 + 20) at 24, type at 52, value len at 56, value at 64;
  // key 2 (8 + 5) at 69, type at 82, item type at 86, count at 90, item 0 len at 98 ...
  const key2 = 24 + 8 + 20 + 4 + 8 + 5;
  const infos = key2 + 8 + 5 + 4 + 4 + 8 + (8 + 2) * 2; // tensor "x" info
  return {
    bytes,
    at: {
      tensorCount: 8,
      kvCount: 16,
      key1Len: 24,
      type1: 52,
      value1Len: 56,
      itemType2: key2 + 13 + 4,
      count2: key2 + 13 + 8,
      item0Len: key2 + 13 + 16,
      xNameLen: infos,
      xDims: infos + 9,
      xNe0: infos + 13,
      xNe1: infos + 21,
      xType: infos + 29,
      xOffset: infos + 33,
      yType: infos + 41 + 9 + 4 + 8,
      yOffset: infos + 41 + 9 + 4 + 8 + 4,
    },
  };
}

function patched(
  bytes: Uint8Array,
  at: number,
  kind: "u32" | "u64",
  v: number | bigint,
): Uint8Array {
  const out = bytes.slice(), dv = new DataView(out.buffer);
  if (kind === "u32") dv.setUint32(at, Number(v), true);
  else dv.setBigUint64(at, BigInt(v), true);
  return out;
}

Deno.test("readGguf() small-file field offsets used by the corruption tests are right", () => {
  const { bytes, at } = smallGguf();
  const dv = new DataView(bytes.buffer);
  assert.equal(dv.getBigUint64(at.tensorCount, true), 2n);
  assert.equal(dv.getUint32(at.type1, true), 8); // string
  assert.equal(dv.getUint32(at.itemType2, true), 8);
  assert.equal(dv.getBigUint64(at.count2, true), 2n);
  assert.equal(dv.getBigUint64(at.xNameLen, true), 1n);
  assert.equal(dv.getUint32(at.xDims, true), 2);
  assert.equal(dv.getBigUint64(at.xNe0, true), 3n);
  assert.equal(dv.getUint32(at.xType, true), 0);
  assert.equal(dv.getUint32(at.yType, true), 2);
  assert.equal(dv.getBigUint64(at.yOffset, true), 32n);
});

Deno.test("readGguf() rejects corrupted header fields at once with errors naming the field", () => {
  const { bytes, at } = smallGguf();
  const f = "bad.gguf";
  const cases: [string, Uint8Array, RegExp][] = [
    ["magic", patched(bytes, 0, "u32", 0x4c4d4747), /not a GGUF file: magic is "GGML"/],
    ["v1", patched(bytes, 4, "u32", 1), /version 1: GGUF v1/],
    ["big-endian", patched(bytes, 4, "u32", 0x03000000), /big-endian/],
    [
      "2^40 tensors",
      patched(bytes, at.tensorCount, "u64", 2n ** 40n),
      /tensor_count .* is 1099511627776/,
    ],
    [
      "2^64-1 tensors",
      patched(bytes, at.tensorCount, "u64", 2n ** 64n - 1n),
      /tensor_count .* larger/,
    ],
    ["kv count", patched(bytes, at.kvCount, "u64", 2n ** 50n), /metadata_kv_count/],
    ["key length 2^50", patched(bytes, at.key1Len, "u64", 2n ** 50n), /metadata key #0 length/],
    [
      "value type 13",
      patched(bytes, at.type1, "u32", 13),
      /"general.architecture" value type .* 13/,
    ],
    [
      "string length",
      patched(bytes, at.value1Len, "u64", 2n ** 50n),
      /"general.architecture" length/,
    ],
    ["array item type", patched(bytes, at.itemType2, "u32", 99), /"a.str" item type .* 99/],
    [
      "array count",
      patched(bytes, at.count2, "u64", 2n ** 40n),
      /"a.str" item count .* 1099511627776/,
    ],
    ["array item length", patched(bytes, at.item0Len, "u64", 2n ** 33n), /"a.str" item length/],
    ["tensor name length", patched(bytes, at.xNameLen, "u64", 2n ** 45n), /tensor #0 name length/],
    ["5 dims", patched(bytes, at.xDims, "u32", 5), /tensor "x" has 5 dimensions/],
    ["0 dims", patched(bytes, at.xDims, "u32", 0), /tensor "x" has 0 dimensions/],
    ["ne 0", patched(bytes, at.xNe1, "u64", 0), /tensor "x" has ne\[1\] = 0/],
    [
      "ne overflow",
      patched(patched(bytes, at.xNe0, "u64", 2n ** 40n), at.xNe1, "u64", 2n ** 40n),
      /2\^53/,
    ],
    [
      "big ne",
      patched(bytes, at.xNe1, "u64", 2n ** 40n),
      /tensor "x": data ends at byte \d+ but the file has/,
    ],
    ["type 20", patched(bytes, at.xType, "u32", 20), /tensor "x" has ggml type id 20/],
    ["type 2^31", patched(bytes, at.xType, "u32", 2 ** 31), /type id 2147483648/],
    [
      "q4_0 row",
      patched(bytes, at.xType, "u32", 2),
      /ne\[0\] = 3 is not a multiple of the q4_0 block 32/,
    ],
    [
      "misaligned",
      patched(bytes, at.yOffset, "u64", 33),
      /tensor "y": data offset 33 is not a multiple of/,
    ],
    ["far offset", patched(bytes, at.yOffset, "u64", 2n ** 40n), /tensor "y": data ends at byte/],
    ["huge offset", patched(bytes, at.yOffset, "u64", 2n ** 63n), /tensor "y" offset .* larger/],
  ];
  const t0 = performance.now();
  for (const [what, b, re] of cases) assertFormatError(() => readGguf(b, f), f, re, what);
  assert.ok(performance.now() - t0 < 2000, "corrupt headers must fail fast");
});

Deno.test("readGguf() rejects a bad general.alignment and duplicate keys or tensors", () => {
  const meta = (v: GgufValue): [string, GgufValue][] => [["general.alignment", v]];
  // Write with a valid alignment, then patch the stored value (the writer refuses bad ones).
  const ok = writeGguf({ metadata: meta({ type: "u32", value: 64 }), tensors: [] }, 64);
  const at = ok.byteLength - 4;
  assertFormatError(
    () => readGguf(patched(ok, at, "u32", 3), "a.gguf"),
    "a.gguf",
    /alignment.*power-of-two.*3/,
    "3",
  );
  assertFormatError(
    () => readGguf(patched(ok, at, "u32", 0), "a.gguf"),
    "a.gguf",
    /alignment/,
    "0",
  );
  const dup = writeGguf({
    metadata: [["k1", { type: "u8", value: 1 }], ["k2", { type: "u8", value: 2 }]],
    tensors: [],
  });
  dup[dup.byteLength - 6] = "1".charCodeAt(0); // rename k2 -> k1 (value 1 + type 4 + "2")
  assertFormatError(() => readGguf(dup, "d.gguf"), "d.gguf", /"k1" appears twice/, "duplicate key");
});

Deno.test("readGguf() truncated anywhere throws a FormatError naming the file, never hangs", () => {
  const { bytes } = smallGguf();
  const g = readGguf(bytes, "ok");
  const last = g.tensors[g.tensors.length - 1];
  const dataEnd = g.dataOffset + last.offset + last.size;
  const vocab = fixture("ggerganov-llama.cpp/ggml-vocab-llama-spm.gguf");
  const t0 = performance.now();
  for (
    const [file, b, end] of [["small.gguf", bytes, dataEnd], [
      "vocab.gguf",
      vocab,
      vocab.byteLength,
    ]] as const
  ) {
    for (let k = 0; k < 40; k++) {
      const cut = Math.floor((k * end) / 40) + (k % 3); // spread out, plus a few odd offsets
      if (cut >= end) continue;
      assertFormatError(
        () => readGguf(b.subarray(0, cut), file),
        file,
        /./,
        `${file} cut at ${cut}`,
      );
    }
  }
  assert.ok(performance.now() - t0 < 10000, "truncated files must fail fast");
});

Deno.test("readGguf() with any single header byte flipped parses or throws a FormatError", () => {
  const { bytes } = smallGguf();
  const g = readGguf(bytes, "ok");
  for (let i = 0; i < g.dataOffset; i++) {
    for (const x of [0xff, 0x80, 0x01, 0x10]) {
      const b = bytes.slice();
      b[i] ^= x;
      try {
        readGguf(b, "flip.gguf");
      } catch (e) {
        if (!(e instanceof FormatError)) throw new Error(`byte ${i} ^ ${x}: ${e}`);
        assert.match(e.message, /^flip\.gguf: /);
      }
    }
  }
});

// ---- models -----------------------------------------------------------------------------------------

/** A tiny llama-shaped model with random f32 weights. */
function tinyModel(overrides: Partial<ModelConfig> = {}): {
  config: ModelConfig;
  tensors: Map<string, HostTensor>;
} {
  const config: ModelConfig = {
    architecture: "llama",
    dim: 16,
    nLayers: 2,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 4,
    ffnDim: 24,
    vocabSize: 10,
    maxSeqLen: 64,
    normEps: 1e-6,
    ropeTheta: 500000,
    ropeLayout: "interleaved",
    tiedEmbeddings: false,
    qkvBias: false,
    bosId: 1,
    eosIds: [2, 7],
    ...overrides,
  };
  const tensors = new Map<string, HostTensor>();
  let seed = 1;
  const add = (name: string, shape: number[]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const u = randomBytes(n, seed++);
    const data = f32Bytes([...u].map((v) => (v - 128) / 64));
    tensors.set(name, { name, dtype: "f32", shape, data });
  };
  const { dim, headDim, nHeads, nKvHeads, ffnDim, vocabSize } = config;
  add("token_embd.weight", [vocabSize, dim]);
  for (let l = 0; l < config.nLayers; l++) {
    add(`blk.${l}.attn_norm.weight`, [dim]);
    add(`blk.${l}.attn_q.weight`, [nHeads * headDim, dim]);
    add(`blk.${l}.attn_k.weight`, [nKvHeads * headDim, dim]);
    add(`blk.${l}.attn_v.weight`, [nKvHeads * headDim, dim]);
    if (config.qkvBias) {
      add(`blk.${l}.attn_q.bias`, [nHeads * headDim]);
      add(`blk.${l}.attn_k.bias`, [nKvHeads * headDim]);
      add(`blk.${l}.attn_v.bias`, [nKvHeads * headDim]);
    }
    add(`blk.${l}.attn_output.weight`, [dim, nHeads * headDim]);
    add(`blk.${l}.ffn_norm.weight`, [dim]);
    add(`blk.${l}.ffn_gate.weight`, [ffnDim, dim]);
    add(`blk.${l}.ffn_up.weight`, [ffnDim, dim]);
    add(`blk.${l}.ffn_down.weight`, [dim, ffnDim]);
  }
  add("output_norm.weight", [dim]);
  if (!config.tiedEmbeddings) add("output.weight", [vocabSize, dim]);
  return { config, tensors };
}

Deno.test("modelToGguf() then ggufToModel() gives back the config and identical tensors", () => {
  for (
    const over of [{}, { tiedEmbeddings: true, eosIds: [2] }, {
      architecture: "qwen2" as const,
      qkvBias: true,
      ropeLayout: "rotate-half" as const,
    }]
  ) {
    const { config, tensors } = tinyModel(over);
    const bytes = modelToGguf(config, tensors, { name: "tiny" });
    const g = readGguf(bytes, "tiny.gguf");
    assert.deepEqual(g.metadata.get("general.name"), { type: "string", value: "tiny" });
    const back = ggufToModel(g, "tiny.gguf");
    assert.deepEqual(back.config, config);
    assert.deepEqual([...back.tensors.keys()], [...tensors.keys()]);
    for (const [name, t] of tensors) assert.deepEqual(back.tensors.get(name), t, name);
  }
});

Deno.test("modelToGguf() stores a rotate-half llama as interleaved (permuted Q/K rows)", () => {
  const { config, tensors } = tinyModel({ ropeLayout: "rotate-half" });
  const back = ggufToModel(readGguf(modelToGguf(config, tensors), "p.gguf"), "p.gguf");
  assert.equal(back.config.ropeLayout, "interleaved");
  const q = tensors.get("blk.1.attn_q.weight")!, k = tensors.get("blk.1.attn_k.weight")!;
  assert.deepEqual(back.tensors.get(q.name), permuteRopeRows(q, config.nHeads));
  assert.deepEqual(back.tensors.get(k.name), permuteRopeRows(k, config.nKvHeads));
  assert.deepEqual(unpermuteRopeRows(back.tensors.get(k.name)!, config.nKvHeads), k);
  assert.deepEqual(back.tensors.get("blk.1.attn_v.weight"), tensors.get("blk.1.attn_v.weight"));
});

Deno.test("modelToGguf() permutes block-quantized Q/K rows whole (q8_0, q4_0, q4_k, q6_k)", () => {
  const dims = { dim: 256, headDim: 32, nHeads: 8, nKvHeads: 2, ffnDim: 32 };
  for (const dtype of ["q8_0", "q4_0", "q4_k", "q6_k"] as const) {
    for (const [arch, from] of [["llama", "rotate-half"], ["qwen2", "interleaved"]] as const) {
      const base = tinyModel({
        ...dims,
        architecture: arch,
        ropeLayout: from,
        qkvBias: arch === "qwen2",
      });
      const tensors = new Map(base.tensors);
      for (const name of ["blk.0.attn_q.weight", "blk.1.attn_k.weight"]) {
        const t = tensors.get(name)!, n = t.shape[0] * t.shape[1];
        const values = new Float32Array(t.data.slice().buffer);
        tensors.set(name, { ...t, dtype, data: quantize(dtype, values) });
        assert.equal(values.length, n);
      }
      const back = ggufToModel(readGguf(modelToGguf(base.config, tensors), "q.gguf"), "q.gguf");
      const what = `${dtype} ${arch}`;
      assert.equal(back.config.ropeLayout, arch === "llama" ? "interleaved" : "rotate-half", what);
      for (
        const [name, heads] of [["blk.0.attn_q.weight", 8], ["blk.1.attn_k.weight", 2]] as const
      ) {
        const t = tensors.get(name)!, got = back.tensors.get(name)!;
        const moved = arch === "llama" ? permuteRopeRows(t, heads) : unpermuteRopeRows(t, heads);
        assert.equal(got.dtype, dtype, what);
        assert.deepEqual(got.data, moved.data, `${what} ${name}`);
        // The values are those of the source rows, moved as the f32 permutation moves them.
        const rows = t.shape[0], cols = t.shape[1];
        const src = dequantize(dtype, t.data, rows * cols);
        const f32: HostTensor = { ...t, dtype: "f32", data: new Uint8Array(src.buffer) };
        const wantRows = arch === "llama"
          ? permuteRopeRows(f32, heads)
          : unpermuteRopeRows(f32, heads);
        assert.deepEqual(
          dequantize(dtype, got.data, rows * cols),
          new Float32Array(wantRows.data.slice().buffer),
          `${what} ${name} values`,
        );
      }
      assert.deepEqual(back.tensors.get("blk.0.attn_k.weight"), permuteOrNot(base, arch));
    }
  }
});

/** blk.0.attn_k.weight (f32) as the writer must store it for `arch`. */
function permuteOrNot(
  m: { config: ModelConfig; tensors: Map<string, HostTensor> },
  arch: "llama" | "qwen2",
): HostTensor {
  const k = m.tensors.get("blk.0.attn_k.weight")!;
  return arch === "llama"
    ? permuteRopeRows(k, m.config.nKvHeads)
    : unpermuteRopeRows(k, m.config.nKvHeads);
}

Deno.test("modelToGguf() writes the SentencePiece whitespace flags as tokenizer.ggml bools", () => {
  const { config, tensors } = tinyModel();
  const tokenizer = {
    model: "llama",
    tokens: ["<unk>", "<s>", "</s>"],
    scores: [0, 0, 0],
    addSpacePrefix: false,
    removeExtraWhitespaces: true,
  };
  const g = readGguf(modelToGguf(config, tensors, { tokenizer }), "t.gguf");
  assert.deepEqual(g.metadata.get("tokenizer.ggml.add_space_prefix"), {
    type: "bool",
    value: false,
  });
  assert.deepEqual(g.metadata.get("tokenizer.ggml.remove_extra_whitespaces"), {
    type: "bool",
    value: true,
  });
  const plain = readGguf(
    modelToGguf(config, tensors, { tokenizer: { model: "llama", tokens: ["a"] } }),
    "p.gguf",
  );
  assert.ok(!plain.metadata.has("tokenizer.ggml.add_space_prefix"));
});

Deno.test("permuteRopeRows() maps rotate-half pairs (i, i+h/2) to interleaved pairs (2i, 2i+1)", () => {
  const rows = (t: HostTensor) => [...new Float32Array(t.data.slice().buffer)];
  const t: HostTensor = {
    name: "q",
    dtype: "f32",
    shape: [8],
    data: f32Bytes([0, 1, 2, 3, 4, 5, 6, 7]),
  };
  assert.deepEqual(rows(permuteRopeRows(t, 1)), [0, 4, 1, 5, 2, 6, 3, 7]);
  assert.deepEqual(rows(permuteRopeRows(t, 2)), [0, 2, 1, 3, 4, 6, 5, 7]);
  assert.deepEqual(rows(unpermuteRopeRows(t, 1)), [0, 2, 4, 6, 1, 3, 5, 7]);
  // Whole quantized rows move: a q8_0 [8, 32] tensor round-trips bytewise.
  const q8: HostTensor = { name: "k", dtype: "q8_0", shape: [8, 32], data: randomBytes(8 * 34, 5) };
  const p = permuteRopeRows(q8, 2);
  assert.deepEqual(p.data.subarray(34, 68), q8.data.subarray(68, 102)); // row 1 <- row 2
  assert.deepEqual(unpermuteRopeRows(p, 2), q8);
  assert.throws(() => permuteRopeRows(t, 3), /not 3 heads of an even size/);
});

Deno.test("permuteRopeRows(): interleaved RoPE on permuted weights equals rotate-half RoPE", () => {
  const heads = 2, hd = 8, din = 3, theta = 10000, pos = 5;
  const w: HostTensor = {
    name: "q",
    dtype: "f32",
    shape: [heads * hd, din],
    data: f32Bytes([...randomBytes(heads * hd * din, 9)].map((v) => v / 255 - 0.5)),
  };
  const x = [0.3, -1.2, 0.7];
  const matvec = (t: HostTensor) => {
    const m = new Float32Array(t.data.slice().buffer);
    return Array.from(
      { length: heads * hd },
      (_, r) => x.reduce((s, xv, c) => s + m[r * din + c] * xv, 0),
    );
  };
  const rot = (a: number, b: number, i: number): [number, number] => {
    const ang = pos * theta ** ((-2 * i) / hd);
    return [a * Math.cos(ang) - b * Math.sin(ang), a * Math.sin(ang) + b * Math.cos(ang)];
  };
  const qHalf = matvec(w), qInter = matvec(permuteRopeRows(w, heads));
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd / 2; i++) {
      const [a, b] = rot(qHalf[h * hd + i], qHalf[h * hd + i + hd / 2], i); // rotate-half pair
      const [c, d] = rot(qInter[h * hd + 2 * i], qInter[h * hd + 2 * i + 1], i); // interleaved pair
      assert.ok(Math.abs(a - c) < 1e-6 && Math.abs(b - d) < 1e-6, `head ${h} pair ${i}`);
    }
  }
});

Deno.test("ggufToModel() names the missing key, bad architecture or mismatched tensor", () => {
  const { config, tensors } = tinyModel();
  const g = readGguf(modelToGguf(config, tensors), "m.gguf");
  const without = (key: string) => ({
    ...g,
    metadata: new Map([...g.metadata].filter(([k]) => k !== key)),
  });
  for (
    const key of [
      "llama.embedding_length",
      "llama.block_count",
      "llama.attention.head_count",
      "llama.feed_forward_length",
      "llama.context_length",
      "llama.attention.layer_norm_rms_epsilon",
      "general.architecture",
    ]
  ) {
    assertFormatError(
      () => ggufToModel(without(key), "m.gguf"),
      "m.gguf",
      new RegExp(`"${key}" is missing`),
      key,
    );
  }
  const gpt2 = {
    ...g,
    metadata: new Map(g.metadata).set("general.architecture", { type: "string", value: "gpt2" }),
  };
  assertFormatError(
    () => ggufToModel(gpt2, "m.gguf"),
    "m.gguf",
    /"gpt2"; supported: "llama", "qwen2"/,
    "arch",
  );
  const wrongFfn = {
    ...g,
    metadata: new Map(g.metadata).set("llama.feed_forward_length", { type: "u32", value: 25 }),
  };
  assertFormatError(
    () => ggufToModel(wrongFfn, "m.gguf"),
    "m.gguf",
    /tensor "blk.0.ffn_gate.weight" has shape \[24,16\], expected \[25,16\]/,
    "shape",
  );
  const noK = { ...g, tensors: g.tensors.filter((t) => t.name !== "blk.1.attn_k.weight") };
  assertFormatError(
    () => ggufToModel(noK, "m.gguf"),
    "m.gguf",
    /tensor "blk.1.attn_k.weight" is missing/,
    "tensor",
  );
  const strHeads = {
    ...g,
    metadata: new Map(g.metadata).set("llama.attention.head_count", { type: "string", value: "4" }),
  };
  assertFormatError(
    () => ggufToModel(strHeads, "m.gguf"),
    "m.gguf",
    /"llama.attention.head_count" is a string/,
    "type",
  );
});

Deno.test("stories260K from .bin and from a GGUF written by writeGguf give identical tensors and configs", () => {
  const fromBin = readLlama2c(fixture("icppWorld-icpp_llm/stories260K.bin"), "stories260K.bin");
  const bytes = modelToGguf(fromBin.config, fromBin.tensors, { name: "stories260K" });
  const fromGguf = ggufToModel(readGguf(bytes, "stories260K.gguf"), "stories260K.gguf");
  assert.deepEqual(fromGguf.config, fromBin.config);
  assert.deepEqual([...fromGguf.tensors.keys()], [...fromBin.tensors.keys()]);
  for (const [name, t] of fromBin.tensors) {
    const u = fromGguf.tensors.get(name)!;
    assert.equal(u.dtype, t.dtype, name);
    assert.deepEqual(u.shape, t.shape, name);
    assert.deepEqual(u.data, t.data, name);
  }
});
