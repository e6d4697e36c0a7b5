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
export { main } from "./engine/cli.ts";

import { main } from "./engine/cli.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
