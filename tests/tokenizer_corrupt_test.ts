/**
 * Corrupt tokenizer files: truncations and byte flips must give an Error naming the file (or, for
 * a flip that keeps the structure valid, a working tokenizer), never a hang, a crash of another
 * kind, or a giant allocation.
 */
import assert from "@specdec/assert";
import { rng } from "./harness.ts";
import { parseTokenizer } from "../models/tokenizer.ts";
import { FormatError } from "../models/types.ts";

const DIR = new URL("../../shared/models/", import.meta.url);

async function read(rel: string): Promise<Uint8Array> {
  const url = new URL(rel, DIR);
  try {
    return await Deno.readFile(url);
  } catch {
    throw new Error(`missing fixture ${url.pathname} (see shared/models/MANIFEST.md)`);
  }
}

/** Parses `bytes` as `name`; returns "error" for a FormatError naming the file, else "ok". */
function attempt(bytes: Uint8Array, name: string): "error" | "ok" {
  try {
    const tok = parseTokenizer(bytes, name);
    tok.decode(tok.encode("Hello, world! 🦙 12345"));
    return "ok";
  } catch (e) {
    assert.ok(e instanceof FormatError, `${name}: not a FormatError: ${e}`);
    assert.match((e as Error).message, new RegExp(`^${name.replaceAll(".", "\\.")}: `));
    return "error";
  }
}

function cutPoints(n: number, count: number, seed: number): number[] {
  const r = rng(seed);
  const pts = new Set([0, 1, 3, 4, 5, 8, n - 1, n - 2]);
  while (pts.size < count) pts.add(Math.floor(r() * n));
  return [...pts].filter((p) => p >= 0 && p < n).sort((a, b) => a - b);
}

function flipped(bytes: Uint8Array, seed: number, flips: number): Uint8Array {
  const r = rng(seed);
  const out = bytes.slice();
  for (let i = 0; i < flips; i++) out[Math.floor(r() * out.length)] ^= 1 + Math.floor(r() * 255);
  return out;
}

/** Byte offsets where a llama2.c tokenizer.bin record ends (a cut there is a valid shorter file). */
function llama2cBoundaries(bytes: Uint8Array): Set<number> {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const ends = new Set<number>();
  for (let o = 4; o + 8 <= bytes.length;) {
    o += 8 + v.getInt32(o + 4, true);
    ends.add(o);
  }
  return ends;
}

Deno.test("truncated tokenizer.model (protobuf) always fails with an error naming the file", async () => {
  const bytes = await read("icppWorld-icpp_llm/tok512.model");
  for (const cut of cutPoints(bytes.length, 120, 1)) {
    assert.equal(attempt(bytes.subarray(0, cut), "tok512.model"), "error", `cut at ${cut}`);
  }
  const big = await read("karpathy-llama2.c/tokenizer.model");
  for (const cut of cutPoints(big.length, 12, 2)) {
    assert.equal(attempt(big.subarray(0, cut), "tokenizer.model"), "error", `cut at ${cut}`);
  }
});

Deno.test("truncated tokenizer.bin fails with an error naming the file unless cut at a record end", async () => {
  const bytes = await read("icppWorld-icpp_llm/tok512.bin");
  const ends = llama2cBoundaries(bytes);
  let errors = 0;
  for (const cut of cutPoints(bytes.length, 150, 3)) {
    const got = attempt(bytes.subarray(0, cut), "tok512.bin");
    if (got === "ok") assert.ok(ends.has(cut) && cut > 40, `cut at ${cut} parsed without error`);
    else errors++;
  }
  assert.ok(errors > 100, `${errors} errors`);
});

Deno.test("truncated tokenizer.json always fails with an error naming the file", () => {
  const vocab: Record<string, number> = {};
  "abcdefghij".split("").forEach((c, i) => (vocab[c] = i));
  vocab["ab"] = 10;
  const text = JSON.stringify({
    model: { type: "BPE", vocab, merges: ["a b"] },
    added_tokens: [{ id: 11, content: "<|end|>", special: true }],
    pre_tokenizer: { type: "ByteLevel", use_regex: true },
  });
  const bytes = new TextEncoder().encode(text);
  assert.equal(attempt(bytes, "tokenizer.json"), "ok");
  for (let cut = 0; cut < bytes.length; cut++) {
    assert.equal(attempt(bytes.subarray(0, cut), "tokenizer.json"), "error", `cut at ${cut}`);
  }
  let errors = 0;
  for (let seed = 0; seed < 200; seed++) {
    if (attempt(flipped(bytes, seed, 1 + (seed % 3)), "tokenizer.json") === "error") errors++;
  }
  assert.ok(errors > 100, `${errors} errors`);
});

Deno.test("byte flips in tokenizer.model and tokenizer.bin give a working tokenizer or a FormatError", async () => {
  for (
    const [rel, name] of [["icppWorld-icpp_llm/tok512.model", "tok512.model"], [
      "icppWorld-icpp_llm/tok512.bin",
      "tok512.bin",
    ]]
  ) {
    const bytes = await read(rel);
    let errors = 0;
    for (let seed = 0; seed < 150; seed++) {
      if (attempt(flipped(bytes, seed, 1 + (seed % 8)), name) === "error") errors++;
    }
    console.log(`${name}: ${errors}/150 flipped files rejected`);
    assert.ok(errors > 0);
  }
  // A flipped length field that claims most of the address space is rejected before allocating.
  const bin = (await read("icppWorld-icpp_llm/tok512.bin")).slice();
  new DataView(bin.buffer).setInt32(8, 0x7fffffff, true);
  assert.equal(attempt(bin, "tok512.bin"), "error");
  const model = (await read("icppWorld-icpp_llm/tok512.model")).slice();
  model.set([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], 0); // pieces: length 2^32 - 1
  assert.equal(attempt(model, "tok512.model"), "error");
});

Deno.test("a tiktoken file with a bad line or rank fails with an error naming the file", () => {
  const enc = (s: string) => new TextEncoder().encode(s);
  assert.equal(attempt(enc("YQ== 0\nYg== 1\n"), "tokenizer.model"), "ok");
  assert.equal(attempt(enc("YQ== 0\nYg== 5\n"), "tokenizer.model"), "error");
  assert.equal(attempt(enc("YQ== 0\nY!== 1\n"), "tokenizer.model"), "error");
  assert.equal(attempt(enc("YQ== 0\nYQ== 1\n"), "tokenizer.model"), "error");
});
