/**
 * specdec: a speculative-decoding LLM inference engine on WebGPU, for Deno.
 *
 * Load a Llama-family checkpoint (Hugging Face folder, GGUF or llama2.c `.bin`) into a GPU worker
 * and stream generated text:
 *
 * ```ts ignore
 * import { Engine } from "@specdec/specdec";
 *
 * const engine = await Engine.load({ model: "path/to/model" });
 * for await (const chunk of engine.generate({ prompt: "def fib(n):", temperature: 0 })) {
 *   console.log(chunk.text);
 * }
 * await engine.dispose();
 * ```
 *
 * Run as a program, it is the command line: `deno run -A mod.ts <command> --help`.
 *
 * @module
 */
export { DEFAULT_GENERATE, Engine, WorkerError } from "./engine/engine.ts";
export type {
  BatchFigures,
  GenerateChunk,
  GenerateOptions,
  GenerateStats,
  LoadOptions,
  ModelInfo,
  StopReason,
} from "./engine/protocol.ts";
export { Gpu, GpuError, requestGpu } from "./engine/gpu.ts";
export type { Dispatch, GpuFeatures, GpuLimits, RequestGpuOptions } from "./engine/gpu.ts";
export { loadModel } from "./models/load.ts";
export type { LoadModelOptions } from "./models/load.ts";
export { loadTokenizerFile } from "./models/tokenizer.ts";
export { FormatError } from "./models/types.ts";
export type {
  DType,
  HostTensor,
  LoadedModel,
  ModelConfig,
  RopeLayout,
  RopeScaling,
  StreamDecoder,
  Tokenizer,
} from "./models/types.ts";
export type { WeightFormat } from "./kernels/qformats.ts";
export { WEIGHT_FORMATS } from "./kernels/qformats.ts";
export type { KvDType } from "./kernels/kv_write.ts";
export { parseKeep, planQuant, QUANT_REQUESTS } from "./engine/quant_plan.ts";
export type {
  KeepGroup,
  QuantPlanOptions,
  QuantRequest,
  TensorChoice,
} from "./engine/quant_plan.ts";
export { quantizeToGguf } from "./engine/quantize.ts";
export type { QuantizeOptions, QuantizeResult } from "./engine/quantize.ts";
export { formatPlanTable, planConfigurations } from "./engine/planner.ts";
export type { PlanRequest, PlanRow } from "./engine/planner.ts";
export {
  estimateVram,
  formatBytes,
  parseBytes,
  VRAM_CATEGORIES,
  vramTotal,
} from "./engine/vram.ts";
export type {
  AdapterFacts,
  PlannedModel,
  VramBytes,
  VramCategory,
  VramSetup,
} from "./engine/vram.ts";
export { perplexity, PERPLEXITY_DEFINITION, perplexityTokens } from "./engine/perplexity.ts";
export type { PerplexityOptions, PerplexityResult } from "./engine/perplexity.ts";
export { LlamaGpu } from "./models/llama.ts";
export type { LlamaGpuOptions, LogitRows, TokenSource, TreeRows } from "./models/llama.ts";
export { parseTreeShape, TREE_MAX_NODES, treeTable } from "./engine/token_tree.ts";
export type { TreeShape } from "./engine/token_tree.ts";
export { WeightStore } from "./engine/weights.ts";
export type { StoredFormat, StoredTensor } from "./engine/weights.ts";
export { main } from "./cli/main.ts";

import { main } from "./cli/main.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
