/**
 * `inspect`: a checkpoint's resolved config and tensor table.
 *
 * @module
 */
import { loadModel } from "../models/load.ts";
import { formatInspect, inspectModel } from "../models/inspect.ts";
import { assertReadable, type Command, COMMON_MODEL, requireString } from "./common.ts";

/** The `inspect` command. */
export const inspect: Command = {
  summary: "print a checkpoint's resolved config and tensor table",
  usage: `Usage: deno run -A mod.ts inspect --model <dir|file> [--json]

Prints the resolved model config and a table of tensors (name, shape, dtype, bytes) with totals.

${COMMON_MODEL}
  --json                print one JSON object instead of tables
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    json: { type: "boolean" },
  },
  run: runInspect,
};

async function runInspect(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  await assertReadable(model, "--model");
  const loaded = await loadModel(model, {
    tokenizer: typeof v.tokenizer === "string" ? v.tokenizer : undefined,
  });
  const result = inspectModel(loaded);
  console.log(v.json ? JSON.stringify(result) : formatInspect(result));
  return 0;
}
