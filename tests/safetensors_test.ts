import assert from "@specdec/assert";
import { encodeSafetensors, MAX_HEADER_BYTES, readSafetensors } from "../models/safetensors.ts";
import { bf16ToF32, f16ToF32, tensorToF32 } from "../models/convert.ts";
import { assertFormatError } from "./fixtures.ts";

const DRAFT = new URL("../../shared/models/pycode-pair/draft/model.safetensors", import.meta.url);

async function readFixture(url: URL): Promise<Uint8Array> {
  try {
    return await Deno.readFile(url);
  } catch (e) {
    throw new Error(`fixture ${url.pathname} is missing (see shared/models/MANIFEST.md): ${e}`);
  }
}

const f32Bytes = (a: number[]) => new Uint8Array(new Float32Array(a).buffer);

Deno.test("readSafetensors() returns views into the file for f32, f16 and bf16 tensors", () => {
  const bytes = encodeSafetensors([
    { name: "a", dtype: "F32", shape: [2, 3], data: f32Bytes([1, 2, 3, 4, 5, 6]) },
    { name: "b", dtype: "F16", shape: [2], data: new Uint8Array([0x00, 0x3c, 0x00, 0xc0]) },
    { name: "c", dtype: "BF16", shape: [1, 1], data: new Uint8Array([0x40, 0x40]) },
    { name: "ids", dtype: "I64", shape: [1], data: new Uint8Array(8) },
  ], { format: "pt" });
  const file = readSafetensors(bytes, "x.safetensors");
  assert.deepEqual(file.metadata, { format: "pt" });
  assert.deepEqual([...file.tensors.keys()], ["a", "b", "c"]);
  assert.deepEqual(file.unsupported, new Map([["ids", "I64"]]));
  const a = file.tensors.get("a")!;
  assert.equal(a.dtype, "f32");
  assert.deepEqual(a.shape, [2, 3]);
  assert.equal(a.data.buffer, bytes.buffer, "a view, not a copy");
  assert.deepEqual(
    [...tensorToF32({ name: "a", dtype: "f32", shape: a.shape, data: a.data })],
    [1, 2, 3, 4, 5, 6],
  );
  assert.deepEqual([...f16ToF32(file.tensors.get("b")!.data)], [1, -2]);
  assert.deepEqual([...bf16ToF32(file.tensors.get("c")!.data)], [3]);
});

Deno.test("f16ToF32() and bf16ToF32() convert unaligned views and special values", () => {
  const raw = new Uint8Array([0xff, 0x00, 0x7c, 0x01, 0x00, 0x00, 0x80]);
  // Offset 1 is not 2-byte aligned: [0x7c00 = +inf, 0x0001 = smallest subnormal, 0x8000 = -0].
  const f16 = f16ToF32(raw.subarray(1, 7));
  assert.deepEqual([f16[0], f16[1], Object.is(f16[2], -0)], [Infinity, 2 ** -24, true]);
  const bf = bf16ToF32(new Uint8Array([0x80, 0xbf, 0xc0, 0x7f]));
  assert.equal(bf[0], -1);
  assert.ok(Number.isNaN(bf[1]));
  assert.throws(() => f16ToF32(new Uint8Array(3)), RangeError);
  assert.throws(
    () => tensorToF32({ name: "q", dtype: "q8_0", shape: [32], data: new Uint8Array(34) }),
    /q8_0/,
  );
});

Deno.test("readSafetensors() reads the pycode draft's 29 f16 tensors", async () => {
  const bytes = await readFixture(DRAFT);
  const file = readSafetensors(bytes, "model.safetensors");
  assert.equal(file.tensors.size, 29);
  assert.equal(file.unsupported.size, 0);
  const emb = file.tensors.get("model.embed_tokens.weight")!;
  assert.deepEqual([emb.dtype, emb.shape], ["f16", [32000, 256]]);
  // Values read independently with Python's struct module.
  assert.deepEqual(
    [...f16ToF32(file.tensors.get("model.norm.weight")!.data).subarray(0, 3)],
    [1.9541015625, 1.9072265625, 2.001953125],
  );
});

Deno.test("readSafetensors() rejects every truncation of a real file with a FormatError", async () => {
  const bytes = await readFixture(DRAFT);
  const headerEnd = 8 + Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const points = new Set([
    0,
    1,
    7,
    8,
    9,
    headerEnd - 1,
    headerEnd,
    headerEnd + 1,
    bytes.length - 1,
  ]);
  for (let i = 0; points.size < 40; i++) points.add(Math.floor((bytes.length * i) / 31) + 3);
  for (const n of points) {
    if (n >= bytes.length) continue;
    assertFormatError(
      () => readSafetensors(bytes.subarray(0, n), "draft.safetensors"),
      "draft.safetensors",
      /too short|header length .* exceeds|not valid UTF-8 JSON|ends at data byte|needs more than/,
      `truncated to ${n} bytes`,
    );
  }
});

Deno.test("readSafetensors() rejects absurd header lengths before allocating", async () => {
  const bytes = (await readFixture(DRAFT)).slice(0, 4096);
  const view = new DataView(bytes.buffer);
  for (const len of [2n ** 40n, 2n ** 64n - 1n, BigInt(bytes.length - 7)]) {
    view.setBigUint64(0, len, true);
    assertFormatError(
      () => readSafetensors(bytes, "big.safetensors"),
      "big.safetensors",
      /header length \d+ exceeds/,
      `header length ${len}`,
    );
  }
  const huge = new Uint8Array(8);
  new DataView(huge.buffer).setBigUint64(0, BigInt(MAX_HEADER_BYTES + 1), true);
  assertFormatError(() => readSafetensors(huge, "h"), "h", /exceeds/, "MAX_HEADER_BYTES + 1");
});

Deno.test("readSafetensors() names the tensor and field for each inconsistent header entry", () => {
  const cases: [string, RegExp][] = [
    ['{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', /"t".*span 4 bytes.*needs 8/],
    ['{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', /"t".*end before they begin/],
    ['{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4000]}}', /"t": ends at data byte 4000/],
    ['{"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}}', /"t": "data_offsets" must be two/],
    ['{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', /"t": shape .* invalid dimension/],
    ['{"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}', /invalid dimension 1.5/],
    ['{"t":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}', /"t": "shape" is missing/],
    ['{"t":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}', /"t": unknown dtype "Q9"/],
    ['{"t":{"shape":[1],"data_offsets":[0,4]}}', /"t": "dtype" is missing/],
    ['{"t":{"dtype":"F32","shape":[65536,65536,65536,65536],"data_offsets":[0,4]}}', /needs more/],
    ['{"t":[1]}', /"t": entry is not an object/],
    ['{"__metadata__":{"a":1}}', /"__metadata__"."a" is not a string/],
    ["[1,2]", /not an object/],
    ["{", /not valid UTF-8 JSON/],
  ];
  for (const [json, what] of cases) {
    const header = new TextEncoder().encode(json);
    const bytes = new Uint8Array(8 + header.length + 16);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(header.length), true);
    bytes.set(header, 8);
    assertFormatError(() => readSafetensors(bytes, "c.safetensors"), "c.safetensors", what, json);
  }
  const invalidUtf8 = new Uint8Array([2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]);
  assertFormatError(() => readSafetensors(invalidUtf8, "u"), "u", /UTF-8/, "invalid UTF-8");
});

Deno.test("readSafetensors() rejects header-length byte flips of a real file", async () => {
  const bytes = await readFixture(DRAFT);
  assert.equal(readSafetensors(bytes, "flip.safetensors").tensors.size, 29);
  for (let byte = 0; byte < 8; byte++) {
    for (const mask of [0x01, 0x10, 0x80, 0xff]) {
      bytes[byte] ^= mask; // flipped in place, restored below
      assertFormatError(
        () => readSafetensors(bytes, "flip.safetensors"),
        "flip.safetensors",
        /header length|not valid UTF-8 JSON|ends at data byte|needs more/,
        `byte ${byte} ^ ${mask}`,
      );
      bytes[byte] ^= mask;
    }
  }
});

Deno.test("encodeSafetensors() refuses a tensor whose bytes do not match its shape", () => {
  assert.throws(
    () => encodeSafetensors([{ name: "w", dtype: "F16", shape: [3], data: new Uint8Array(4) }]),
    /"w" has 4 bytes; shape \[3\] of F16 needs 6/,
  );
});
