/**
 * llama.cpp's tokenizer test vectors: `X.gguf.inp` holds the inputs, each followed by a line
 * `__ggml_vocab_test__`; `X.gguf.out` holds the expected ids (no BOS) per input, one line each.
 * llama.cpp runs them with add_special=false, parse_special=false, as `encode(text)` does.
 */
import assert from "@specdec/assert";
import { loadTokenizerFile } from "../models/tokenizer.ts";
import type { Tokenizer } from "../models/types.ts";

const DIR = new URL("../../shared/models/", import.meta.url);
const VOCAB = new URL("ggerganov-llama.cpp/", DIR);

async function fixture(url: URL): Promise<string> {
  try {
    await Deno.stat(url);
  } catch {
    throw new Error(`missing fixture ${url.pathname} (see shared/models/MANIFEST.md)`);
  }
  return url.pathname;
}

/** Splits an `.inp` file as llama.cpp's test-tokenizer-0 does. */
function readCases(inp: string): string[] {
  const sep = "\n__ggml_vocab_test__\n";
  const cases: string[] = [];
  for (let pos = 0; pos < inp.length;) {
    const next = inp.indexOf(sep, pos);
    if (next < 0) {
      cases.push(inp.slice(pos));
      break;
    }
    cases.push(inp.slice(pos, next));
    pos = next + sep.length;
  }
  return cases;
}

async function checkVectors(name: string, tok: Tokenizer, vectors: string): Promise<void> {
  const cases = readCases(await Deno.readTextFile(await fixture(new URL(`${vectors}.inp`, VOCAB))));
  const out = (await Deno.readTextFile(await fixture(new URL(`${vectors}.out`, VOCAB)))).split(
    "\n",
  );
  assert.equal(cases.length, 46, `${vectors}.inp: expected 46 cases`);
  let pass = 0;
  const failures: string[] = [];
  cases.forEach((text, i) => {
    const line = out[i].trim();
    const want = line === "" ? [] : line.split(" ").map(Number);
    const got = tok.encode(text);
    if (got.length === want.length && got.every((id, j) => id === want[j])) pass++;
    else failures.push(`#${i} ${JSON.stringify(text)}: got [${got}] want [${want}]`);
  });
  console.log(`${name}: ${pass}/${cases.length} cases exact`);
  assert.deepEqual(failures, [], `${name}: ${failures.length} cases differ`);
}

const GGUF_VOCABS = [
  "llama-spm",
  "phi-3",
  "gpt-2",
  "deepseek-llm",
  "deepseek-coder",
  "falcon",
  "mpt",
  "refact",
  "starcoder",
];

for (const v of GGUF_VOCABS) {
  Deno.test(`encode() matches every llama.cpp vector of ggml-vocab-${v} (GGUF vocabulary)`, async () => {
    const tok = await loadTokenizerFile(await fixture(new URL(`ggml-vocab-${v}.gguf`, VOCAB)));
    await checkVectors(`ggml-vocab-${v}.gguf`, tok, `ggml-vocab-${v}.gguf`);
  });
}

Deno.test("encode() matches every llama-spm vector with Llama 2's tokenizer.model and tokenizer.bin", async () => {
  for (const f of ["tokenizer.model", "tokenizer.bin"]) {
    const tok = await loadTokenizerFile(await fixture(new URL(`karpathy-llama2.c/${f}`, DIR)));
    await checkVectors(`karpathy-llama2.c/${f}`, tok, "ggml-vocab-llama-spm.gguf");
  }
});

Deno.test("encode() matches every llama-bpe vector with Llama 3's tiktoken tokenizer.model", async () => {
  const tok = await loadTokenizerFile(
    await fixture(new URL("meta-llama-llama3/tokenizer.model", DIR)),
  );
  assert.equal(tok.vocabSize, 128256);
  await checkVectors("meta-llama-llama3/tokenizer.model", tok, "ggml-vocab-llama-bpe.gguf");
});
