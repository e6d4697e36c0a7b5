/**
 * The command line end to end (subprocesses): JSON output shape, streamed text equals the JSON
 * text, clear errors for bad flags and impossible requests.
 */
import assert from "@specdec/assert";
import { fixture } from "./fixtures.ts";
import { testGpu } from "./harness.ts";
import { numberFlag, parseTokenList, UsageError } from "../cli/common.ts";

const MOD = new URL("../mod.ts", import.meta.url).pathname;

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MOD, ...args],
    env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp", NO_COLOR: "1" },
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

const noGpu = typeof (await testGpu()) === "string";
const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");

Deno.test("numberFlag() and parseTokenList() reject malformed values with the flag's name", () => {
  assert.equal(numberFlag({ n: "5" }, "n", 1, 0, 10), 5);
  assert.equal(numberFlag({}, "n", 7, 0, 10), 7);
  assert.throws(() => numberFlag({ n: "x" }, "n", 1, 0, 10), /--n must be an integer/);
  assert.throws(() => numberFlag({ n: "1.5" }, "n", 1, 0, 10), /--n must be an integer/);
  assert.throws(() => numberFlag({ n: "11" }, "n", 1, 0, 10), /--n must be in \[0, 10\]/);
  assert.deepEqual(parseTokenList("1, 2,3"), [1, 2, 3]);
  assert.throws(() => parseTokenList("1,,2"), UsageError);
  assert.throws(() => parseTokenList("1,-2"), /not a token id/);
  assert.throws(() => parseTokenList("600", 512), /outside the vocabulary/);
});

Deno.test("generate rejects bad flags before loading anything", async () => {
  const cases: [string[], RegExp][] = [
    [["generate", "--model", stories, "--prompt", "a", "--bogus"], /Unknown option '--bogus'/],
    [["generate", "--prompt", "a"], /--model is required/],
    [["generate", "--model", stories], /exactly one of --prompt or --prompt-tokens/],
    [["generate", "--model", stories, "--prompt", "a", "--top-p", "0"], /--top-p must be in/],
    [["generate", "--model", stories, "--prompt", "a", "--max-tokens", "-3"], /--max-tokens/],
    [["generate", "--model", "/nonexistent/model.bin", "--prompt", "a"], /no such file/],
    [["frobnicate"], /unknown command "frobnicate"/],
    [["generate", "--model", stories, "--prompt", "a", "--quant", "q3"], /--quant must be one of/],
    [
      ["generate", "--model", stories, "--prompt", "a", "--kv", "q4"],
      /--kv must be f16, q8 or f32/,
    ],
    [["generate", "--model", stories, "--prompt", "a", "--vram", "6XB"], /--vram: cannot read/],
    [["generate", "--model", stories, "--prompt", "a", "--keep", "embed,x"], /unknown group "x"/],
    [
      ["generate", "--model", stories, "--prompt", "a", "--spec", "self", "--draft", stories],
      /drop --draft/,
    ],
    [
      ["quantize", "--model", stories, "--quant", "nf4", "--out", "/tmp/x.gguf"],
      /nf4 has no GGUF type/,
    ],
    [["perplexity", "--model", stories, "--file", "/nonexistent.txt"], /--file .* no such file/],
    [
      ["generate", "--model", stories, "--prompt", "a", "--draft-tree", "6by3"],
      /--draft-tree: tree shape "6by3" is not DEPTHxWIDTH/,
    ],
    [
      ["generate", "--model", stories, "--prompt", "a", "--draft-tree", "9x8"],
      /--draft-tree: tree depth 9 x width 8 needs 73 nodes/,
    ],
    [["generate", "--model", stories, "--prompt", "a", "--draft-tree", "3x2"], /pass --draft/],
    [
      ["generate", "--model", stories, "--prompt", "a", "--spec", "ngram", "--draft-tree", "3x2"],
      /--draft-tree drafts with a model/,
    ],
  ];
  for (const [args, re] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: exit ${r.code}\n${r.stderr}`);
    assert.match(r.stderr, re);
  }
});

Deno.test("every command prints its --help", async () => {
  for (const cmd of ["generate", "tokenize", "inspect", "plan", "perplexity", "quantize"]) {
    const r = await cli(cmd, "--help");
    assert.equal(r.code, 0);
    assert.match(r.stdout, new RegExp(`Usage: deno run -A mod.ts ${cmd}`));
  }
});

Deno.test("tokenize --json prints exactly one object of ids, BOS only with --bos", async () => {
  const a = await cli(
    "tokenize",
    "--model",
    stories,
    "--tokenizer",
    tok512,
    "--text",
    "Once upon",
    "--json",
  );
  assert.equal(a.code, 0, a.stderr);
  const ids = JSON.parse(a.stdout).ids as number[];
  assert.ok(ids.length > 0 && ids[0] !== 1);
  const b = await cli(
    "tokenize",
    "--model",
    stories,
    "--tokenizer",
    tok512,
    "--text",
    "Once upon",
    "--bos",
    "--json",
  );
  assert.deepEqual(JSON.parse(b.stdout).ids, [1, ...ids]);
});

Deno.test({
  name: "generate --json prints one object whose text matches the streamed text",
  ignore: noGpu,
  async fn() {
    const args = [
      "--model",
      stories,
      "--tokenizer",
      tok512,
      "--prompt",
      "Once upon a time",
      "--max-tokens",
      "40",
      "--temperature",
      "0",
    ];
    const j = await cli("generate", ...args, "--json");
    assert.equal(j.code, 0, j.stderr);
    const obj = JSON.parse(j.stdout);
    assert.equal(obj.tokens.length, 40);
    assert.equal(obj.stats.generated_tokens, 40);
    assert.equal(obj.stats.stop_reason, "max-tokens");
    assert.match(obj.text, /Lily/);
    const s = await cli("generate", ...args);
    assert.equal(s.code, 0, s.stderr);
    assert.equal(s.stdout, obj.text);
    assert.match(s.stderr, /prefill .* tok\/s .* decode .* tok\/s/);
  },
});

Deno.test({
  name: "generate refuses a prompt longer than the context with a clear error",
  ignore: noGpu,
  async fn() {
    const ids = Array.from({ length: 40 }, () => "300").join(",");
    const r = await cli(
      "generate",
      "--model",
      stories,
      "--prompt-tokens",
      ids,
      "--ctx",
      "32",
      "--json",
    );
    assert.equal(r.code, 1);
    assert.match(r.stderr, /prompt has 40 tokens but the context holds 32/);
    assert.equal(r.stdout, "");
  },
});

Deno.test({
  name: "generate stops at the context length and says so",
  ignore: noGpu,
  async fn() {
    const r = await cli(
      "generate",
      "--model",
      stories,
      "--prompt-tokens",
      "1",
      "--ctx",
      "16",
      "--max-tokens",
      "100",
      "--temperature",
      "0",
      "--json",
    );
    assert.equal(r.code, 0, r.stderr);
    const obj = JSON.parse(r.stdout);
    assert.equal(obj.stats.stop_reason, "context");
    assert.equal(obj.tokens.length, 16);
  },
});

Deno.test({
  name: "Ctrl-C (SIGINT) during generate stops it cleanly with the stats so far",
  ignore: noGpu,
  async fn() {
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        MOD,
        "generate",
        "--model",
        stories,
        "--tokenizer",
        tok512,
        "--prompt-tokens",
        "1",
        "--max-tokens",
        "500",
        "--temperature",
        "0",
      ],
      env: { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp", NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const reader = child.stdout.getReader();
    let text = "";
    while (text.length < 20) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    child.kill("SIGINT");
    while (!(await reader.read()).done) { /* drain */ }
    const { code } = await child.status;
    const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
    assert.equal(code, 130, stderr);
    assert.match(stderr, /stopped: cancelled/);
  },
});

Deno.test({
  name: "plan --json lists configurations with exact bytes and marks the one that fits",
  ignore: noGpu,
  fn: async () => {
    const args = ["plan", "--model", stories, "--tokenizer", tok512, "--ctx", "128", "--json"];
    const r = await cli(...args, "--vram", "1.2MiB");
    assert.equal(r.code, 0, r.stderr);
    const plan = JSON.parse(r.stdout);
    const chosen = plan.configurations.filter((c: { chosen: boolean }) => c.chosen);
    assert.equal(chosen.length, 1);
    assert.ok(chosen[0].total <= 1.2 * 2 ** 20 && chosen[0].fits);
    // Nothing fits 10 kB: exit 1, no row chosen.
    const none = await cli(...args, "--vram", "10kB");
    assert.equal(none.code, 1);
    assert.ok(JSON.parse(none.stdout).configurations.every((c: { fits: boolean }) => !c.fits));
  },
});

Deno.test({
  name: "quantize writes a GGUF that generates exactly what --quant at load generates",
  ignore: noGpu,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      const out = `${dir}/s-q8.gguf`;
      const q = await cli(
        "quantize",
        "--model",
        stories,
        "--tokenizer",
        tok512,
        "--quant",
        "q8_0",
        "--out",
        out,
        "--json",
      );
      assert.equal(q.code, 0, q.stderr);
      assert.ok(JSON.parse(q.stdout).bytes_out < JSON.parse(q.stdout).bytes_in);
      const gen = ["--prompt-tokens", "1", "--temperature", "0", "--max-tokens", "40", "--json"];
      const a = await cli("generate", "--model", out, ...gen);
      const b = await cli(
        "generate",
        "--model",
        stories,
        "--tokenizer",
        tok512,
        "--quant",
        "q8_0",
        ...gen,
      );
      assert.equal(a.code, 0, a.stderr);
      assert.equal(b.code, 0, b.stderr);
      assert.deepEqual(JSON.parse(a.stdout).tokens, JSON.parse(b.stdout).tokens);
      assert.equal(
        JSON.parse(a.stdout).stats.vram.target_weights,
        JSON.parse(b.stdout).stats.vram.target_weights,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "perplexity --json --kl reports ppl, tokens_scored, kl and top1_agreement",
  ignore: noGpu,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      const file = `${dir}/t.txt`;
      await Deno.writeTextFile(
        file,
        "Once upon a time, there was a little girl named Lily. ".repeat(6),
      );
      const r = await cli(
        "perplexity",
        "--model",
        stories,
        "--tokenizer",
        tok512,
        "--file",
        file,
        "--ctx",
        "32",
        "--quant",
        "q8_0",
        "--kl",
        "--json",
      );
      assert.equal(r.code, 0, r.stderr);
      const j = JSON.parse(r.stdout);
      assert.ok(j.ppl > 1 && j.ppl < 20, r.stdout); // the model knows this sentence
      assert.ok(
        j.tokens_scored > 60 && j.kl >= 0 && j.kl < 0.01 && j.top1_agreement > 0.9,
        r.stdout,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "generate --draft-tree prints the greedy tokens and the tree shape in the stats",
  ignore: noGpu,
  async fn() {
    const draft = await fixture("saltyduckegg-llama2xs.c/model.bin");
    const args = ["--model", stories, "--tokenizer", tok512, "--prompt", "Once upon a time"];
    const common = [...args, "--max-tokens", "24", "--temperature", "0", "--json"];
    const plain = await cli("generate", ...common);
    assert.equal(plain.code, 0, plain.stderr);
    const tree = await cli("generate", ...common, "--draft", draft, "--draft-tree", "4x2");
    assert.equal(tree.code, 0, tree.stderr);
    const a = JSON.parse(plain.stdout), b = JSON.parse(tree.stdout);
    assert.deepEqual(b.tokens, a.tokens);
    assert.equal(b.stats.tree_shape, "4x2");
    assert.equal(a.stats.tree_shape, null);
    assert.ok(b.stats.tokens_per_pass > 1, JSON.stringify(b.stats));
  },
});
