/**
 * A summary of a loaded checkpoint: its resolved config and a table of its tensors (name, shape,
 * dtype, bytes) with totals, as data (`inspectModel`) and as aligned text (`formatInspect`).
 *
 * @module
 */
import { countParams } from "./load.ts";
import type { DType, LoadedModel, ModelConfig } from "./types.ts";

/** One row of the tensor table. */
export interface InspectTensor {
  /** Canonical name. */
  readonly name: string;
  /** Outermost-first shape. */
  readonly shape: readonly number[];
  /** Storage type. */
  readonly dtype: DType;
  /** Stored size in bytes. */
  readonly bytes: number;
}

/** What {@linkcode inspectModel} returns. */
export interface InspectResult {
  /** The resolved config. */
  readonly config: ModelConfig;
  /** Tensors in the model's order (embedding, blocks, output). */
  readonly tensors: InspectTensor[];
  /** Parameter count (tied embeddings once). */
  readonly totalParams: number;
  /** Stored bytes over all tensors. */
  readonly totalBytes: number;
}

/**
 * Summarizes `model`: config, per-tensor rows and totals.
 *
 * @example
 * ```ts ignore
 * import { loadModel } from "./load.ts";
 * import { formatInspect, inspectModel } from "./inspect.ts";
 * console.log(formatInspect(inspectModel(await loadModel("model.bin"))));
 * ```
 */
export function inspectModel(model: LoadedModel): InspectResult {
  const tensors = [...model.tensors.values()].map((t) => ({
    name: t.name,
    shape: t.shape,
    dtype: t.dtype,
    bytes: t.data.byteLength,
  }));
  return {
    config: model.config,
    tensors,
    totalParams: countParams(model.tensors),
    totalBytes: tensors.reduce((a, t) => a + t.bytes, 0),
  };
}

/** `1234567` → `"1,234,567"`. */
function thousands(n: number): string {
  return n.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** Parameter count in millions with one decimal ("61.0M"), or thousands below a million. */
export function formatParams(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(1)}K`;
}

/**
 * Renders an {@linkcode InspectResult} as text: one `key: value` line per config field, then an
 * aligned tensor table and a totals line.
 *
 * @example
 * ```ts
 * import { formatInspect } from "./inspect.ts";
 * const text = formatInspect({
 *   config: { architecture: "llama", dim: 4 } as never,
 *   tensors: [{ name: "output_norm.weight", shape: [4], dtype: "f32", bytes: 16 }],
 *   totalParams: 4,
 *   totalBytes: 16,
 * });
 * console.log(text.includes("output_norm.weight")); // true
 * ```
 */
export function formatInspect(result: InspectResult): string {
  const lines: string[] = [];
  const config = result.config as unknown as Record<string, unknown>;
  const width = Math.max(...Object.keys(config).map((k) => k.length));
  for (const [key, value] of Object.entries(config)) {
    lines.push(`${key.padEnd(width)}  ${JSON.stringify(value)}`);
  }
  lines.push("");
  const rows = [
    ["tensor", "shape", "dtype", "bytes"],
    ...result.tensors.map((t) => [t.name, `[${t.shape.join(", ")}]`, t.dtype, thousands(t.bytes)]),
  ];
  const widths = [0, 1, 2, 3].map((c) => Math.max(...rows.map((r) => r[c].length)));
  for (const r of rows) {
    lines.push(
      [
        r[0].padEnd(widths[0]),
        r[1].padEnd(widths[1]),
        r[2].padEnd(widths[2]),
        r[3].padStart(widths[3]),
      ]
        .join("  "),
    );
  }
  lines.push(
    `${result.tensors.length} tensors, ${thousands(result.totalParams)} parameters ` +
      `(${formatParams(result.totalParams)}), ${thousands(result.totalBytes)} bytes ` +
      `(${(result.totalBytes / 2 ** 20).toFixed(1)} MiB)`,
  );
  return lines.join("\n");
}
