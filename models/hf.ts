/**
 * Hugging Face model folders: `config.json` resolved into a {@linkcode ModelConfig}, and
 * `model.safetensors` (or shards listed by `model.safetensors.index.json`) mapped to canonical
 * llama.cpp tensor names with every shape checked against the config. Weights keep their stored
 * dtype (f32/f16/bf16) and the rotate-half RoPE layout transformers uses.
 *
 * @module
 */
import { basename, join } from "@specdec/path";
import { readSafetensors, type SafetensorsFile } from "./safetensors.ts";
import {
  FormatError,
  type HostTensor,
  type LoadedModel,
  type ModelConfig,
  type RopeScaling,
} from "./types.ts";

/** The `model_type` values this reader resolves. */
export const HF_MODEL_TYPES = ["llama", "mistral", "qwen2"] as const;

/** Bound on any integer hyperparameter: rejects corrupt values before they size anything. */
const MAX_DIM = 1 << 24;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * Resolves a parsed `config.json` of a Llama, Mistral or Qwen2 model. Throws a
 * {@linkcode FormatError} naming `fileName` and the field for a missing, mistyped or
 * inconsistent value, and for features this project does not run (other model types, RoPE
 * scalings other than Llama 3's, partial rotary embeddings, biases on the output or MLP
 * projections, activations other than SiLU, pre-quantized checkpoints). A sliding window
 * (Mistral's `sliding_window`, Qwen2's with `use_sliding_window`) caps `maxSeqLen` at the
 * window, where full attention is exact (see {@linkcode ModelConfig.maxSeqLen}).
 *
 * @example
 * ```ts
 * import { readHfConfig } from "./hf.ts";
 * const config = readHfConfig({
 *   model_type: "llama", hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
 *   intermediate_size: 128, vocab_size: 100, max_position_embeddings: 256, rms_norm_eps: 1e-5,
 * }, "config.json");
 * console.log(config.headDim, config.nKvHeads); // 16 4
 * ```
 */
export function readHfConfig(json: unknown, fileName: string): ModelConfig {
  function fail(msg: string): never {
    throw new FormatError(fileName, msg);
  }
  if (!isRecord(json)) fail("the top level is not a JSON object");
  const c = json;
  const present = (key: string) => c[key] !== undefined && c[key] !== null;
  function int(key: string, fallback?: number, min = 1): number {
    if (!present(key)) {
      if (fallback !== undefined) return fallback;
      fail(`"${key}" is missing`);
    }
    const v = c[key];
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > MAX_DIM * 64) {
      fail(`"${key}" must be an integer in [${min}, ${MAX_DIM * 64}], got ${JSON.stringify(v)}`);
    }
    return v;
  }
  function positive(key: string, fallback: number, obj = c, where = ""): number {
    const v = obj[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      fail(`"${where}${key}" must be a positive number, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  const modelType = c.model_type;
  if (!HF_MODEL_TYPES.includes(modelType as typeof HF_MODEL_TYPES[number])) {
    fail(
      `"model_type" ${JSON.stringify(modelType)} is not supported ` +
        `(supported: ${HF_MODEL_TYPES.join(", ")})`,
    );
  }
  const architecture = modelType as ModelConfig["architecture"];

  const dim = int("hidden_size");
  const nLayers = int("num_hidden_layers");
  const nHeads = int("num_attention_heads");
  const nKvHeads = int("num_key_value_heads", nHeads);
  if (nHeads % nKvHeads !== 0) {
    fail(`"num_attention_heads" ${nHeads} is not a multiple of "num_key_value_heads" ${nKvHeads}`);
  }
  if (!present("head_dim") && dim % nHeads !== 0) {
    fail(`"hidden_size" ${dim} is not a multiple of "num_attention_heads" ${nHeads}`);
  }
  const headDim = int("head_dim", dim / nHeads);
  if (headDim % 2 !== 0) fail(`"head_dim" ${headDim} must be even for RoPE`);
  const ffnDim = int("intermediate_size");
  const vocabSize = int("vocab_size");
  const maxSeqLen = int("max_position_embeddings");
  for (
    const [key, v] of Object.entries({
      hidden_size: dim,
      intermediate_size: ffnDim,
      vocab_size: vocabSize,
      head_dim: headDim,
    })
  ) {
    if (v > MAX_DIM) fail(`"${key}" ${v} exceeds the ${MAX_DIM} limit`);
  }
  const normEps = positive("rms_norm_eps", 1e-6);

  // transformers 5 moves rope_theta / rope_type into "rope_parameters"; older configs keep
  // "rope_theta" at the top level and the scaling in "rope_scaling".
  const ropeParams = c.rope_parameters;
  if (present("rope_parameters") && !isRecord(ropeParams)) {
    fail(`"rope_parameters" is not an object`);
  }
  let ropeTheta = positive("rope_theta", 10000);
  if (isRecord(ropeParams)) {
    ropeTheta = positive("rope_theta", ropeTheta, ropeParams, "rope_parameters.");
  }
  const scalingKey = present("rope_scaling") ? "rope_scaling" : "rope_parameters";
  const scalingRaw = c[scalingKey];
  let ropeScaling: RopeScaling | undefined;
  if (scalingRaw !== undefined && scalingRaw !== null) {
    if (!isRecord(scalingRaw)) fail(`"${scalingKey}" is not an object`);
    const s = scalingRaw;
    const type = s.rope_type ?? s.type ?? "default";
    if (type === "llama3") {
      const where = `${scalingKey}.`;
      const need = (key: string) => {
        if (s[key] === undefined || s[key] === null) fail(`"${where}${key}" is missing (llama3)`);
        return positive(key, NaN, s, where);
      };
      const factor = need("factor");
      const lowFreqFactor = need("low_freq_factor");
      const highFreqFactor = need("high_freq_factor");
      const original = need("original_max_position_embeddings");
      if (highFreqFactor <= lowFreqFactor) {
        fail(`"${where}high_freq_factor" must exceed "${where}low_freq_factor"`);
      }
      if (!Number.isInteger(original)) {
        fail(`"${where}original_max_position_embeddings" must be an integer`);
      }
      ropeScaling = {
        type: "llama3",
        factor,
        lowFreqFactor,
        highFreqFactor,
        originalMaxPositionEmbeddings: original,
      };
    } else if (type !== "default") {
      fail(
        `"${scalingKey}" type ${JSON.stringify(type)} is not supported ` +
          `(supported: llama3, or none)`,
      );
    }
  }

  // Sliding-window attention: Mistral's `sliding_window`; Qwen2's only with
  // `use_sliding_window` and only on layers from `max_window_layers` on; transformers 5 lists
  // each layer's kind in `layer_types`. Attention past the window is not implemented, so the
  // usable context is capped at the window, inside which full causal attention is exact.
  let windowed: boolean;
  if (present("layer_types")) {
    const kinds = c.layer_types;
    if (
      !Array.isArray(kinds) || kinds.length !== nLayers ||
      kinds.some((k) => k !== "full_attention" && k !== "sliding_attention")
    ) {
      fail(
        `"layer_types" must list "full_attention" or "sliding_attention" for each of the ` +
          `${nLayers} layers, got ${JSON.stringify(kinds).slice(0, 200)}`,
      );
    }
    windowed = kinds.includes("sliding_attention");
  } else if (architecture === "mistral") {
    windowed = true;
  } else if (architecture === "qwen2") {
    const use = c.use_sliding_window ?? false;
    if (typeof use !== "boolean") fail(`"use_sliding_window" must be true or false`);
    windowed = use && int("max_window_layers", 28, 0) < nLayers;
  } else {
    windowed = false;
  }
  const slidingWindow = windowed && present("sliding_window") ? int("sliding_window") : undefined;
  if (windowed && present("layer_types") && slidingWindow === undefined) {
    fail(`"layer_types" has sliding_attention layers but "sliding_window" is missing`);
  }

  if (present("quantization_config")) {
    const q = c.quantization_config;
    const method = isRecord(q) ? q.quant_method : undefined;
    fail(
      `"quantization_config" (${JSON.stringify(method ?? q).slice(0, 80)}) is not supported: ` +
        `use the unquantized (f16/bf16/f32) checkpoint, or a GGUF file`,
    );
  }
  if (present("partial_rotary_factor") && c.partial_rotary_factor !== 1) {
    fail(
      `"partial_rotary_factor" ${
        JSON.stringify(c.partial_rotary_factor)
      } is not supported (RoPE over the whole head only)`,
    );
  }

  const tied = c.tie_word_embeddings ?? false;
  if (typeof tied !== "boolean") fail(`"tie_word_embeddings" must be true or false`);
  for (const key of ["attention_bias", "mlp_bias"]) {
    if (architecture !== "qwen2" && present(key) && c[key] !== false) {
      fail(
        `"${key}": ${JSON.stringify(c[key])} is not supported (no biases besides Qwen2's Q/K/V)`,
      );
    }
  }
  const act = c.hidden_act ?? "silu";
  if (act !== "silu") fail(`"hidden_act" ${JSON.stringify(act)} is not supported (only silu)`);

  function tokenId(key: string, v: unknown): number {
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v >= vocabSize) {
      fail(`"${key}" must be a token id in [0, ${vocabSize}), got ${JSON.stringify(v)}`);
    }
    return v;
  }
  const bosId = present("bos_token_id") ? tokenId("bos_token_id", c.bos_token_id) : undefined;
  const eosRaw = present("eos_token_id") ? c.eos_token_id : [];
  const eosIds = Array.isArray(eosRaw)
    ? eosRaw.map((v) => tokenId("eos_token_id", v))
    : [tokenId("eos_token_id", eosRaw)];

  return {
    architecture,
    dim,
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    ffnDim,
    vocabSize,
    maxSeqLen: Math.min(maxSeqLen, slidingWindow ?? Infinity),
    ...(slidingWindow !== undefined ? { slidingWindow } : {}),
    normEps,
    ropeTheta,
    ropeLayout: "rotate-half",
    ...(ropeScaling ? { ropeScaling } : {}),
    tiedEmbeddings: tied,
    qkvBias: architecture === "qwen2",
    ...(bosId !== undefined ? { bosId } : {}),
    eosIds,
  };
}

/** One tensor the config calls for: canonical name, Hugging Face name and expected shape. */
export interface ExpectedTensor {
  /** Canonical llama.cpp name, e.g. "blk.0.attn_q.weight". */
  readonly name: string;
  /** Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight". */
  readonly hfName: string;
  /** Shape implied by the config, outermost-first. */
  readonly shape: readonly number[];
}

/**
 * Every tensor a model with `config` needs, with its canonical llama.cpp name, its Hugging Face
 * name and its shape (`[out, in]` for linear weights). No `output.weight` when embeddings are tied.
 *
 * @example
 * ```ts
 * import { hfTensorPlan } from "./hf.ts";
 * import type { ModelConfig } from "./types.ts";
 * const config: ModelConfig = {
 *   architecture: "llama", dim: 8, nLayers: 1, nHeads: 2, nKvHeads: 1, headDim: 4, ffnDim: 16,
 *   vocabSize: 10, maxSeqLen: 32, normEps: 1e-5, ropeTheta: 10000, ropeLayout: "rotate-half",
 *   tiedEmbeddings: true, qkvBias: false, eosIds: [],
 * };
 * console.log(hfTensorPlan(config).length); // 2 + 9
 * ```
 */
export function hfTensorPlan(config: ModelConfig): ExpectedTensor[] {
  const { dim, nHeads, nKvHeads, headDim, ffnDim, vocabSize } = config;
  const q = nHeads * headDim;
  const kv = nKvHeads * headDim;
  const plan: ExpectedTensor[] = [
    { name: "token_embd.weight", hfName: "model.embed_tokens.weight", shape: [vocabSize, dim] },
  ];
  for (let l = 0; l < config.nLayers; l++) {
    const hf = `model.layers.${l}.`;
    const blk = `blk.${l}.`;
    const add = (name: string, hfName: string, shape: number[]) =>
      plan.push({ name: blk + name, hfName: hf + hfName, shape });
    add("attn_norm.weight", "input_layernorm.weight", [dim]);
    add("attn_q.weight", "self_attn.q_proj.weight", [q, dim]);
    add("attn_k.weight", "self_attn.k_proj.weight", [kv, dim]);
    add("attn_v.weight", "self_attn.v_proj.weight", [kv, dim]);
    if (config.qkvBias) {
      add("attn_q.bias", "self_attn.q_proj.bias", [q]);
      add("attn_k.bias", "self_attn.k_proj.bias", [kv]);
      add("attn_v.bias", "self_attn.v_proj.bias", [kv]);
    }
    add("attn_output.weight", "self_attn.o_proj.weight", [dim, q]);
    add("ffn_norm.weight", "post_attention_layernorm.weight", [dim]);
    add("ffn_gate.weight", "mlp.gate_proj.weight", [ffnDim, dim]);
    add("ffn_up.weight", "mlp.up_proj.weight", [ffnDim, dim]);
    add("ffn_down.weight", "mlp.down_proj.weight", [dim, ffnDim]);
  }
  plan.push({ name: "output_norm.weight", hfName: "model.norm.weight", shape: [dim] });
  if (!config.tiedEmbeddings) {
    plan.push({ name: "output.weight", hfName: "lm_head.weight", shape: [vocabSize, dim] });
  }
  return plan;
}

async function readFileOr(path: string, what: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new FormatError(path, `${what} not found`);
    throw e;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

function parseJson(bytes: Uint8Array, file: string): unknown {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new FormatError(file, `not valid UTF-8 JSON: ${(e as Error).message}`);
  }
}

/**
 * Validates a parsed `model.safetensors.index.json` and returns its `weight_map` (tensor name →
 * shard file name). Shard names must be plain file names inside the folder.
 *
 * @example
 * ```ts
 * import { readHfIndex } from "./hf.ts";
 * const map = readHfIndex({ weight_map: { "model.norm.weight": "model-00001-of-00001.safetensors" } }, "index.json");
 * console.log(map.get("model.norm.weight")); // "model-00001-of-00001.safetensors"
 * ```
 */
export function readHfIndex(json: unknown, fileName: string): Map<string, string> {
  if (!isRecord(json) || !isRecord(json.weight_map)) {
    throw new FormatError(fileName, `"weight_map" is missing or not an object`);
  }
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(json.weight_map)) {
    if (
      typeof shard !== "string" || shard === "" || shard.includes("/") || shard.includes("\\") ||
      shard === "." || shard === ".."
    ) {
      throw new FormatError(
        fileName,
        `"weight_map"."${name}" must be a shard file name in the folder, got ${
          JSON.stringify(shard)
        }`,
      );
    }
    map.set(name, shard);
  }
  return map;
}

/**
 * Reads a Hugging Face model folder (config.json plus model.safetensors or an index with shards)
 * into canonical host tensors. The tokenizer is left to the caller (see `loadModel`).
 *
 * @example
 * ```ts ignore
 * import { loadHfFolder } from "./hf.ts";
 * const model = await loadHfFolder("../shared/models/pycode-pair/draft");
 * console.log(model.config.dim); // 256
 * ```
 */
export async function loadHfFolder(
  dir: string,
  options: { onProgress?: (msg: string) => void } = {},
): Promise<Omit<LoadedModel, "tokenizer">> {
  const progress = options.onProgress ?? (() => {});
  const configPath = join(dir, "config.json");
  if (!(await exists(configPath))) {
    throw new FormatError(dir, "no config.json here (is this a Hugging Face model folder?)");
  }
  const config = readHfConfig(parseJson(await Deno.readFile(configPath), configPath), configPath);

  // Which file holds each Hugging Face tensor name.
  const indexPath = join(dir, "model.safetensors.index.json");
  const singlePath = join(dir, "model.safetensors");
  let where: (hfName: string) => string | undefined;
  let files: string[];
  if (await exists(indexPath)) {
    const map = readHfIndex(parseJson(await Deno.readFile(indexPath), indexPath), indexPath);
    where = (hfName) => {
      const shard = map.get(hfName);
      return shard === undefined ? undefined : join(dir, shard);
    };
    files = [...new Set(map.values())].map((s) => join(dir, s));
  } else if (await exists(singlePath)) {
    where = () => singlePath;
    files = [singlePath];
  } else {
    throw new FormatError(
      dir,
      "neither model.safetensors nor model.safetensors.index.json is here " +
        "(PyTorch .bin checkpoints are not supported)",
    );
  }

  const plan = hfTensorPlan(config);
  const shards = new Map<string, SafetensorsFile>();
  for (const file of files) {
    // Only read shards that hold a tensor we need; each one once.
    if (!plan.some((t) => where(t.hfName) === file)) continue;
    const size = (await Deno.stat(file).catch(() => ({ size: 0 }))).size;
    progress(`reading ${basename(file)} (${(size / 1e6).toFixed(1)} MB)`);
    shards.set(file, readSafetensors(await readFileOr(file, "shard listed in the index"), file));
  }

  const tensors = new Map<string, HostTensor>();
  for (const t of plan) {
    const file = where(t.hfName);
    const shard = file === undefined ? undefined : shards.get(file);
    const found = shard?.tensors.get(t.hfName);
    if (file === undefined || shard === undefined) {
      throw new FormatError(indexPath, `"weight_map" does not list tensor "${t.hfName}"`);
    }
    if (found === undefined) {
      const dtype = shard.unsupported.get(t.hfName);
      if (dtype !== undefined) {
        throw new FormatError(
          file,
          `tensor "${t.hfName}" has dtype ${dtype}; only F32, F16, BF16 load`,
        );
      }
      const hint = t.name === "output.weight"
        ? ` (config.json says tie_word_embeddings is false)`
        : "";
      throw new FormatError(file, `tensor "${t.hfName}" is missing${hint}`);
    }
    if (found.shape.length !== t.shape.length || found.shape.some((d, i) => d !== t.shape[i])) {
      throw new FormatError(
        file,
        `tensor "${t.hfName}" has shape [${found.shape}], but config.json implies [${t.shape}]`,
      );
    }
    tensors.set(t.name, { name: t.name, dtype: found.dtype, shape: t.shape, data: found.data });
  }
  return { source: dir, format: "safetensors", config, tensors };
}
