/**
 * `quantize`: write a quantized checkpoint as a standard GGUF.
 *
 * @module
 */
import { quantizeToGguf } from "../engine/quantize.ts";
import { formatBytes } from "../engine/vram.ts";
import {
  assertReadable,
  type Command,
  COMMON_MODEL,
  quantOptions,
  requireString,
  UsageError,
} from "./common.ts";

/** The `quantize` command. */
export const quantize: Command = {
  summary: "quantize a checkpoint and write a standard GGUF (llama.cpp names and types)",
  usage:
    `Usage: deno run -A mod.ts quantize --model <dir|file> --quant <q8_0|q4_0|q4_k|q6_k|f16> --out <file.gguf> [flags]

Quantizes every weight matrix with the mixed plan (--keep groups at --keep-format) and writes a
GGUF v3 that llama.cpp and specdec load (specdec loads it back to identical tensors). nf4 has no
GGUF type: use it at load time (generate --quant nf4). The file is written to a temporary name
and renamed, so --out is never left half-written. Prints a table of formats (with --json one
object).

${COMMON_MODEL}
  --out <file.gguf>     output file
  --quant <format>      q8_0, q4_0, q4_k, q6_k or f16 for every matrix but the kept groups (rows
                        whose length is not a multiple of the block fall back: q4_k -> q4_0 -> f16)
  --keep <groups>       kept at higher precision: embed,output,first,last (default) or none
  --keep-format <fmt>   format of the kept groups (default q8_0 for 4-bit --quant, else f16)
  --json                one JSON object on stdout
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    out: { type: "string" },
    json: { type: "boolean" },
    quant: { type: "string" },
    keep: { type: "string" },
    "keep-format": { type: "string" },
  },
  run: runQuantize,
};

async function runQuantize(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  const out = requireString(v, "out");
  await assertReadable(model, "--model");
  const q = quantOptions(v);
  if (!q.quant) throw new UsageError("--quant is required (q8_0, q4_0, q4_k, q6_k or f16)");
  if (q.quant === "nf4") {
    throw new UsageError("nf4 has no GGUF type; use it at load time: generate --quant nf4");
  }
  const json = v.json === true;
  const r = await quantizeToGguf({
    model,
    tokenizer: typeof v.tokenizer === "string" ? v.tokenizer : undefined,
    quant: q.quant,
    keep: q.keep,
    keepFormat: q.keepFormat,
    out,
    onProgress: json ? undefined : (m) => console.error(m),
  });
  const counts = new Map<string, { tensors: number; bytes: number }>();
  for (const c of r.plan.values()) {
    const e = counts.get(c.format) ?? { tensors: 0, bytes: 0 };
    e.tensors++;
    counts.set(c.format, e);
  }
  if (json) {
    console.log(JSON.stringify({
      out,
      tensors: r.tensors,
      bytes_in: r.bytesIn,
      bytes_out: r.bytesOut,
      formats: Object.fromEntries([...counts].map(([f, e]) => [f, e.tensors])),
    }));
  } else {
    for (const [f, e] of counts) {
      console.log(`${f.padEnd(6)} ${String(e.tensors).padStart(5)} tensors`);
    }
    console.log(
      `wrote ${out}: ${r.tensors} tensors, ${formatBytes(r.bytesIn)} -> ${formatBytes(r.bytesOut)}`,
    );
  }
  return 0;
}
