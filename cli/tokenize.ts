/**
 * `tokenize`: the token ids of a text.
 *
 * @module
 */
import { type Command, COMMON_MODEL, loadTokenizerFor, UsageError } from "./common.ts";

/** The `tokenize` command. */
export const tokenize: Command = {
  summary: "print the token ids of a text",
  usage: `Usage: deno run -A mod.ts tokenize --model <dir|file> --text "..." [--bos] [--json]

Prints the token ids of --text, space-separated (with --json: {"ids":[...]}).
Without --bos no BOS token is added.

${COMMON_MODEL}
  --text <text>         the text to tokenize
  --bos                 add the BOS token first
  --json                print one JSON object {"ids":[...]}
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    text: { type: "string" },
    bos: { type: "boolean" },
    json: { type: "boolean" },
  },
  run: runTokenize,
};

async function runTokenize(v: Record<string, string | boolean | undefined>): Promise<number> {
  const text = v.text;
  if (typeof text !== "string") throw new UsageError("--text is required");
  const tok = await loadTokenizerFor(v);
  const ids = tok.encode(text, { bos: v.bos === true });
  console.log(v.json ? JSON.stringify({ ids }) : ids.join(" "));
  return 0;
}
