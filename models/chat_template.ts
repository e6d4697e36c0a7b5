/**
 * Chat templates: where a model keeps its Jinja `chat_template` (a Hugging Face folder's
 * `chat_template.jinja` or `tokenizer_config.json`, a GGUF file's `tokenizer.chat_template`), and
 * rendering a conversation with it as transformers' `apply_chat_template` does (`messages`,
 * `bos_token`, `eos_token`, `add_generation_prompt: true`), with `@huggingface/jinja`.
 *
 * A model without a template gets {@linkcode FALLBACK_CHAT_TEMPLATE}: one `role: content` line per
 * message, then `assistant:`.
 *
 * @module
 */
import { Template } from "@huggingface/jinja";
import { extname, join } from "@specdec/path";
import { readGguf } from "./gguf.ts";
import { FormatError } from "./types.ts";

/** One message of a conversation. */
export interface ChatMessage {
  /** "system", "user", "assistant" (or any role the template knows). */
  role: string;
  /** The message text. */
  content: string;
}

/** A chat template found with a model, compiled. */
export interface ChatTemplate {
  /** Where it came from (`dir/tokenizer_config.json: chat_template`), or "fallback". */
  readonly source: string;
  /** The BOS token's text passed to the template (`bos_token`), if known. */
  readonly bosToken?: string;
  /** The EOS token's text passed to the template (`eos_token`), if known. */
  readonly eosToken?: string;
  /**
   * Special-token strings the rendered text may contain (BOS, EOS, UNK and the config's added
   * special tokens): the caller maps them to their ids instead of tokenizing them as text.
   */
  readonly specialTokens: readonly string[];
  /** Renders `messages` with `add_generation_prompt: true`; errors name the template's source. */
  render(messages: readonly ChatMessage[]): string;
}

/**
 * The template used when a model has none: `role: content` per message, then `assistant:`, so
 * `[{role: "user", content: "hi"}]` renders as `"user: hi\nassistant:"`.
 */
export const FALLBACK_CHAT_TEMPLATE =
  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" +
  "{% if add_generation_prompt %}assistant:{% endif %}";

/** Where a template was read from, before compiling. */
export interface ChatTemplateSource {
  /** The Jinja text. */
  template: string;
  /** Where it came from, for errors. */
  source: string;
  /** `bos_token` to pass, if the files name one. */
  bosToken?: string;
  /** `eos_token` to pass, if the files name one. */
  eosToken?: string;
  /** Other special-token strings the files name. */
  specialTokens?: string[];
}

/**
 * Compiles a template. Throws a {@linkcode FormatError} naming `src.source` when the Jinja does
 * not parse.
 *
 * @example
 * ```ts
 * import { compileChatTemplate, FALLBACK_CHAT_TEMPLATE } from "./chat_template.ts";
 * const t = compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" });
 * console.log(t.render([{ role: "user", content: "hi" }])); // "user: hi\nassistant:"
 * ```
 */
export function compileChatTemplate(src: ChatTemplateSource): ChatTemplate {
  let compiled: Template;
  try {
    compiled = new Template(src.template);
  } catch (e) {
    throw new FormatError(src.source, `the chat template does not parse: ${(e as Error).message}`);
  }
  const specials = new Set<string>(src.specialTokens ?? []);
  if (src.bosToken) specials.add(src.bosToken);
  if (src.eosToken) specials.add(src.eosToken);
  return {
    source: src.source,
    bosToken: src.bosToken,
    eosToken: src.eosToken,
    specialTokens: [...specials].filter((s) => s !== ""),
    render(messages) {
      try {
        return compiled.render({
          messages: messages.map((m) => ({ role: m.role, content: m.content })),
          bos_token: src.bosToken ?? "",
          eos_token: src.eosToken ?? "",
          add_generation_prompt: true,
        });
      } catch (e) {
        throw new ChatTemplateError(`${src.source}: ${(e as Error).message}`);
      }
    },
  };
}

/**
 * A template failed while rendering a conversation (e.g. its `raise_exception` rejected the
 * roles): the request's fault, not the file's.
 */
export class ChatTemplateError extends Error {
  /** `message` names the template's source and what it said. */
  constructor(message: string) {
    super(message);
    this.name = "ChatTemplateError";
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A token named in tokenizer_config.json: a string or an AddedToken `{content: "..."}`. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (isRecord(v) && typeof v.content === "string") return v.content;
  return undefined;
}

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw e;
  }
}

/**
 * The chat template of a Hugging Face folder: `chat_template.jinja` if present, else
 * `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` from which
 * "default" is taken), with its `bos_token`, `eos_token`, `unk_token`,
 * `additional_special_tokens` and special `added_tokens_decoder` entries. Undefined when the
 * folder has no template. Malformed files throw a {@linkcode FormatError} naming file and field.
 */
export async function folderChatTemplate(dir: string): Promise<ChatTemplateSource | undefined> {
  const cfgPath = join(dir, "tokenizer_config.json");
  const cfgText = await readIfExists(cfgPath);
  let cfg: Record<string, unknown> = {};
  if (cfgText !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(cfgText);
    } catch (e) {
      throw new FormatError(cfgPath, `not valid JSON: ${(e as Error).message}`);
    }
    if (!isRecord(parsed)) throw new FormatError(cfgPath, "the top level is not a JSON object");
    cfg = parsed;
  }
  const specials: string[] = [];
  for (const key of ["unk_token", "pad_token"]) {
    const t = tokenText(cfg[key]);
    if (t) specials.push(t);
  }
  if (Array.isArray(cfg.additional_special_tokens)) {
    for (const t of cfg.additional_special_tokens) {
      const s = tokenText(t);
      if (s) specials.push(s);
    }
  }
  if (isRecord(cfg.added_tokens_decoder)) {
    for (const t of Object.values(cfg.added_tokens_decoder)) {
      if (isRecord(t) && t.special === true && typeof t.content === "string") {
        specials.push(t.content);
      }
    }
  }
  const common = {
    bosToken: tokenText(cfg.bos_token),
    eosToken: tokenText(cfg.eos_token),
    specialTokens: specials,
  };
  const jinjaPath = join(dir, "chat_template.jinja");
  const jinja = await readIfExists(jinjaPath);
  if (jinja !== undefined) return { template: jinja, source: jinjaPath, ...common };
  const t = cfg.chat_template;
  if (t === undefined || t === null) return undefined;
  const source = `${cfgPath}: chat_template`;
  if (typeof t === "string") return { template: t, source, ...common };
  if (Array.isArray(t)) {
    const named = t.find((e) => isRecord(e) && e.name === "default") ?? t[0];
    if (!isRecord(named) || typeof named.template !== "string") {
      throw new FormatError(
        cfgPath,
        `"chat_template" is a list without a {"name": "default", "template": "..."} entry`,
      );
    }
    return { template: named.template, source: `${source} (${named.name})`, ...common };
  }
  throw new FormatError(
    cfgPath,
    `"chat_template" must be a string or a list of {name, template}, got ${typeof t}`,
  );
}

/**
 * The chat template of a GGUF file (`tokenizer.chat_template`), with the BOS/EOS token texts
 * from `tokenizer.ggml.tokens` at `tokenizer.ggml.bos_token_id` / `eos_token_id`. Undefined when
 * the file has no template. Reads the whole file (its metadata is parsed by `readGguf`).
 */
export async function ggufChatTemplate(path: string): Promise<ChatTemplateSource | undefined> {
  const gguf = readGguf(await Deno.readFile(path), path);
  const t = gguf.metadata.get("tokenizer.chat_template");
  if (t === undefined) return undefined;
  if (t.type !== "string") {
    throw new FormatError(path, `"tokenizer.chat_template" is a ${t.type}, not a string`);
  }
  const tokens = gguf.metadata.get("tokenizer.ggml.tokens");
  const pieces = tokens?.type === "array" && tokens.itemType === "string" ? tokens.value : [];
  const piece = (key: string) => {
    const v = gguf.metadata.get(key);
    return v && typeof v.value === "number" ? pieces[v.value] : undefined;
  };
  return {
    template: t.value,
    source: `${path}: tokenizer.chat_template`,
    bosToken: piece("tokenizer.ggml.bos_token_id"),
    eosToken: piece("tokenizer.ggml.eos_token_id"),
  };
}

/**
 * The compiled chat template of the model at `modelPath` (folder or `.gguf`), or the
 * {@linkcode FALLBACK_CHAT_TEMPLATE} (source "fallback") when it has none; llama2.c `.bin` files
 * never carry one. `bosToken`/`eosToken` fill in token texts the files do not name (e.g. from
 * the tokenizer's pieces).
 */
export async function loadChatTemplate(
  modelPath: string,
  defaults: { bosToken?: string; eosToken?: string } = {},
): Promise<ChatTemplate> {
  const info = await Deno.stat(modelPath);
  const found = info.isDirectory
    ? await folderChatTemplate(modelPath)
    : extname(modelPath).toLowerCase() === ".gguf"
    ? await ggufChatTemplate(modelPath)
    : undefined;
  const src = found ?? { template: FALLBACK_CHAT_TEMPLATE, source: "fallback" };
  return compileChatTemplate({
    ...src,
    bosToken: src.bosToken ?? defaults.bosToken,
    eosToken: src.eosToken ?? defaults.eosToken,
  });
}
