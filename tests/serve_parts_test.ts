/** The server's pure parts: stop strings across pieces, request validation, chat templates. */
import assert from "@specdec/assert";
import { StopMatcher } from "../serve/stop.ts";
import { ApiError, parseRequest } from "../serve/request.ts";
import { FormatError } from "../models/types.ts";
import {
  compileChatTemplate,
  FALLBACK_CHAT_TEMPLATE,
  loadChatTemplate,
} from "../models/chat_template.ts";

Deno.test("StopMatcher finds a stop split across pieces and never releases it", () => {
  const m = new StopMatcher(["END", "\n\n"]);
  const out = ["ab", "cE", "N", "xyz\n", "\nnever"].map((p) => m.push(p));
  assert.deepEqual(out.map((s) => s.text).join(""), "abcENxyz");
  assert.equal(out.at(-1)!.stopped, true);
  const n = new StopMatcher(["END"]);
  assert.equal(n.push("aEN").text, "a");
  assert.equal(n.flush(), "EN");
});

Deno.test("parseRequest() names the field of every bad value", () => {
  const cases: [unknown, string | null][] = [
    [[1], null],
    [{ prompt: 3 }, "prompt"],
    [{ prompt: "a", max_tokens: 0 }, "max_tokens"],
    [{ prompt: "a", temperature: "hot" }, "temperature"],
    [{ prompt: "a", top_p: 0 }, "top_p"],
    [{ prompt: "a", n: 2 }, "n"],
    [{ prompt: "a", stop: [1] }, "stop"],
    [{ prompt: "a", stream: "yes" }, "stream"],
    [{ prompt: [1, -2] }, "prompt"],
    [{ messages: [] }, "messages"],
    [{ messages: [{ role: "robot", content: "x" }] }, "messages[0].role"],
  ];
  for (const [body, param] of cases) {
    const kind = (body as { messages?: unknown }).messages ? "chat" : "completion";
    try {
      parseRequest(body, kind);
      assert.fail(`${JSON.stringify(body)}: accepted`);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      assert.equal(e.status, 400);
      assert.equal(e.param, param, JSON.stringify(body));
    }
  }
  const r = parseRequest({ prompt: [1, 2], stop: "x", seed: 5, temperature: 0 }, "completion");
  assert.deepEqual([r.prompt, r.stop, r.seed, r.temperature], [[1, 2], ["x"], 5, 0]);
});

Deno.test("chat templates: a folder's tokenizer_config.json, the fallback, malformed ones", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/tokenizer_config.json`,
      JSON.stringify({
        bos_token: "<s>",
        eos_token: { content: "</s>" },
        chat_template:
          "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}" +
          "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
      }),
    );
    const t = await loadChatTemplate(dir);
    assert.equal(t.render([{ role: "user", content: "hi" }]), "<s>[user]hi</s>[assistant]");
    assert.deepEqual([...t.specialTokens].sort(), ["</s>", "<s>"]);
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, '{"chat_template": "{% for %}"}');
    await assert.rejects(() => loadChatTemplate(dir), (e: Error) => {
      assert.ok(e instanceof FormatError);
      assert.match(e.message, /tokenizer_config\.json: chat_template: the chat template does not/);
      return true;
    });
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, "{");
    await assert.rejects(() => loadChatTemplate(dir), /tokenizer_config\.json: not valid JSON/);
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, "{}");
    assert.equal((await loadChatTemplate(dir)).source, "fallback");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const f = compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" });
  assert.equal(
    f.render([{ role: "system", content: "be brief" }, { role: "user", content: "hi" }]),
    "system: be brief\nuser: hi\nassistant:",
  );
});
