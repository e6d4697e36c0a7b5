/**
 * The command line: `deno run -A mod.ts <command> [flags]`. Each command lives in its own file
 * under `cli/`, validates its flags before any model or GPU work and has its own `--help`.
 *
 * @module
 */
import { parseArgs } from "@specdec/cli";
import { type Command, UsageError } from "./common.ts";
import { generate } from "./generate.ts";
import { plan } from "./plan.ts";
import { perplexityCommand as perplexity } from "./perplexity.ts";
import { quantize } from "./quantize.ts";
import { tokenize } from "./tokenize.ts";
import { inspect } from "./inspect.ts";
import { serve } from "./serve.ts";

const COMMANDS: Record<string, Command> = {
  generate,
  serve,
  plan,
  perplexity,
  quantize,
  tokenize,
  inspect,
};

function mainUsage(): string {
  const lines = Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(10)} ${c.summary}`);
  return `specdec: speculative-decoding LLM inference on WebGPU

Usage: deno run -A mod.ts <command> [flags]   (each command has --help)

Commands:
${lines.join("\n")}`;
}

/** Runs the CLI with `args`; returns the process exit code. */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(mainUsage());
    return name ? 0 : 2;
  }
  const cmd = COMMANDS[name];
  if (!cmd) {
    console.error(`error: unknown command "${name}"\n\n${mainUsage()}`);
    return 2;
  }
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: rest,
      options: { ...cmd.flags, help: { type: "boolean", short: "h" } },
      strict: true,
      allowPositionals: false,
    }).values as Record<string, string | boolean | undefined>;
  } catch (e) {
    console.error(`error: ${(e as Error).message}\n\n${cmd.usage}`);
    return 2;
  }
  if (values.help) {
    console.log(cmd.usage);
    return 0;
  }
  try {
    return await cmd.run(values);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`error: ${e.message}\n(see: deno run -A mod.ts ${name} --help)`);
      return 2;
    }
    const err = e as Error;
    console.error(`error: ${err.message}`);
    if (Deno.env.get("SPECDEC_DEBUG")) console.error(err.stack);
    return 1;
  }
}
