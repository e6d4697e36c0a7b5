/**
 * `serve`: the OpenAI-compatible HTTP server (serve/server.ts) on `Deno.serve`. Loads the model
 * pair first (with progress), prints the address, and on Ctrl-C stops accepting, lets admitted
 * requests finish, releases the GPU and exits 0 (a second Ctrl-C cancels them).
 *
 * @module
 */
import { basename } from "@specdec/path";
import { Engine } from "../engine/engine.ts";
import { formatBytes } from "../engine/vram.ts";
import {
  type ChatTemplate,
  compileChatTemplate,
  loadChatTemplate,
} from "../models/chat_template.ts";
import { SpecdecServer } from "../serve/server.ts";
import {
  assertReadable,
  bytesFlag,
  type Command,
  COMMON_MODEL,
  numberFlag,
  QUANT_FLAG_SPECS,
  QUANT_FLAGS,
  quantOptions,
  requireString,
  specFlag,
  treeFlag,
  UsageError,
} from "./common.ts";

/** The `serve` command. */
export const serve: Command = {
  summary: "serve the model over an OpenAI-compatible HTTP API",
  usage: `Usage: deno run -A mod.ts serve --model <dir|file> [flags]

Serves POST /v1/completions and POST /v1/chat/completions (with "stream": true as server-sent
events ending in "data: [DONE]"), GET /v1/models and GET /health. Requests decode one at a time
in arrival order (speculatively when a draft is loaded), or with --parallel N > 1 up to N
together (continuous batching over a paged KV cache; with a draft, greedy requests speculate
in the batch); up to --queue more wait, and past that a request gets 503 with Retry-After. Responses carry usage and finish_reason, and specdec's
figures (acceptance, tokens per target pass, decode tok/s) under "specdec". Chat prompts are
rendered with the model's chat template (tokenizer_config.json / chat_template.jinja / GGUF
tokenizer.chat_template, or --chat-template); a model without one gets "role: content" lines
then "assistant:". Request defaults are OpenAI's: temperature 1, top_p 1, no top_k, a random
seed, max_tokens up to the context. Ctrl-C finishes admitted requests, then exits.

${COMMON_MODEL}
  --draft <dir|file>    draft model for speculative decoding (same vocabulary as --model)
  --draft-tokenizer <f> tokenizer of the draft when it carries none (default: --tokenizer)
  --spec <kind>         proposals: model (default with --draft), self, ngram or none
  --draft-tokens <k>    draft tokens per cycle, 1..16, or auto (default 4)
  --draft-tree <DxW>    draft a token tree instead (e.g. 6x3, or auto)
  --host <addr>         address to listen on (default 127.0.0.1)
  --port <n>            port (default 8080; 0 picks a free one)
  --alias <name>        the model name clients use (default: the model's file or folder name)
  --api-key <key>       require "Authorization: Bearer <key>" on /v1/* (default: open)
  --queue <n>           most requests waiting while the decoding slots are taken (default 16)
  --parallel <n>        sequences decoded together, 1..64 (default 1: one at a time). With a
                        draft, greedy requests speculate in the batch (--draft-tokens k, "auto"
                        = 4); sampled ones, --spec ngram and --draft-tree take turns serially
  --chat-template <f>   a Jinja chat template file to use instead of the model's
  --ctx <n>             KV-cache rows, the most prompt + generated tokens (default: the model's)
${QUANT_FLAGS}
  --vram <size>         VRAM budget (e.g. 6GB): the most precise setup that fits, or refuse
  --no-f16              use f32 weights and KV cache even where shader-f16 exists
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    draft: { type: "string" },
    "draft-tokenizer": { type: "string" },
    spec: { type: "string" },
    "draft-tokens": { type: "string" },
    "draft-tree": { type: "string" },
    host: { type: "string" },
    port: { type: "string" },
    alias: { type: "string" },
    "api-key": { type: "string" },
    queue: { type: "string" },
    parallel: { type: "string" },
    "chat-template": { type: "string" },
    ctx: { type: "string" },
    "no-f16": { type: "boolean" },
    ...QUANT_FLAG_SPECS,
    vram: { type: "string" },
  },
  run: runServe,
};

async function runServe(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  const spec = specFlag(v);
  const draftTree = treeFlag(v);
  const draft = typeof v.draft === "string" ? v.draft : undefined;
  const selfDraft = v.spec === "self";
  if (selfDraft && draft) throw new UsageError("--spec self drafts with the target: drop --draft");
  if (spec === "model" && !draft && !selfDraft) {
    throw new UsageError("--spec model needs a draft model: pass --draft <dir|file>");
  }
  if (draftTree !== undefined && spec !== "model") {
    throw new UsageError(
      "--draft-tree drafts with a model: pass --draft <dir|file> or --spec self",
    );
  }
  if (draftTree !== undefined && v["draft-tokens"] !== undefined) {
    throw new UsageError("give one of --draft-tokens (a chain) or --draft-tree (a tree)");
  }
  const draftTokens = v["draft-tokens"] === "auto"
    ? "auto" as const
    : numberFlag(v, "draft-tokens", 4, 1, 16);
  const host = typeof v.host === "string" ? v.host : "127.0.0.1";
  if (host === "") throw new UsageError("--host is empty");
  const port = numberFlag(v, "port", 8080, 0, 65535);
  const queue = numberFlag(v, "queue", 16, 0, 1 << 16);
  const parallel = numberFlag(v, "parallel", 1, 1, 64);
  if (v["api-key"] === "") throw new UsageError("--api-key is empty");
  const apiKey = v["api-key"] as string | undefined;
  const ctx = v.ctx === undefined ? undefined : numberFlag(v, "ctx", 0, 1, 1 << 20);
  const quant = quantOptions(v);
  const vram = v.vram === undefined ? undefined : bytesFlag(v.vram, "--vram");
  await assertReadable(model, "--model");
  if (draft) await assertReadable(draft, "--draft");
  if (typeof v.tokenizer === "string") await assertReadable(v.tokenizer, "--tokenizer");
  let chatTemplate: ChatTemplate;
  if (typeof v["chat-template"] === "string") {
    const file = v["chat-template"];
    await assertReadable(file, "--chat-template");
    chatTemplate = compileChatTemplate({ template: await Deno.readTextFile(file), source: file });
  } else chatTemplate = await loadChatTemplate(model);
  const modelId = typeof v.alias === "string" && v.alias !== ""
    ? v.alias
    : basename(model.replace(/\/+$/, ""));

  const engine = await Engine.load(
    {
      model,
      tokenizer: v.tokenizer as string | undefined,
      draft,
      draftTokenizer: v["draft-tokenizer"] as string | undefined,
      maxSeq: ctx,
      noF16: v["no-f16"] === true,
      ...quant,
      selfDraft,
      vram,
      parallel,
      batchDraftTokens: typeof draftTokens === "number" ? draftTokens : undefined,
    },
    (m) => console.error(m),
  );
  const server = new SpecdecServer(engine, {
    modelId,
    chatTemplate,
    apiKey,
    queue,
    spec,
    draftTokens,
    draftTree,
    log: (line) => console.error(`[${new Date().toISOString()}] ${line}`),
  });
  let http: Deno.HttpServer;
  try {
    http = Deno.serve({
      hostname: host,
      port,
      onListen: () => {},
      onError: (e) => {
        console.error(`error: ${(e as Error).message}`);
        return new Response("internal error", { status: 500 });
      },
    }, (req) => server.handle(req));
  } catch (e) {
    await engine.dispose();
    throw new UsageError(`cannot listen on ${host}:${port}: ${(e as Error).message}`);
  }
  const addr = http.addr as Deno.NetAddr;
  const info = engine.info;
  if (parallel > 1 && server.slots === 1) {
    console.error(
      `note: --parallel ${parallel} batches plain decoding and draft-model chains; ` +
        `${draftTree ? "--draft-tree" : `--spec ${spec}`} takes turns: drop it to batch`,
    );
  } else if (parallel > 1 && info.draft && spec === "model") {
    console.error(
      `note: greedy requests speculate in the batch; sampled ones (temperature > 0) take turns`,
    );
  }
  console.error(
    `serving "${modelId}" (context ${info.kvRows} tokens, ${info.draft ? "with a draft" : spec},` +
      ` VRAM ${formatBytes(Object.values(info.vram).reduce((a, b) => a + b, 0))}, ` +
      `${server.slots > 1 ? `${server.slots} sequences batched, ` : ""}chat template: ` +
      `${chatTemplate.source}) on http://${addr.hostname}:${addr.port}` +
      `${apiKey ? " (API key required)" : ""}`,
  );
  let interrupts = 0;
  const stopped = new Promise<void>((resolve) => {
    const onSignal = () => {
      interrupts++;
      if (interrupts === 1) {
        const { active, waiting } = server.load;
        console.error(
          `stopping: finishing ${
            active + waiting
          } admitted request(s); Ctrl-C again to cancel them`,
        );
        resolve();
      } else {
        console.error("cancelling the remaining requests");
        server.cancel();
      }
    };
    Deno.addSignalListener("SIGINT", onSignal);
    Deno.addSignalListener("SIGTERM", onSignal);
  });
  await stopped;
  // Refuse new work, let admitted requests finish (a second Ctrl-C cancels them), close the
  // listener once their responses have ended, and only then release the GPU.
  await Promise.all([server.drain(), http.shutdown()]);
  await engine.dispose();
  console.error("stopped");
  return 0;
}
