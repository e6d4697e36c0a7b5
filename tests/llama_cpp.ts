/**
 * llama.cpp as a peer, for tests and benchmarks only (never imported by the engine): its shared
 * library `libllama` from the prebuilt binaries that the npm package `node-llama-cpp` ships,
 * called directly through `Deno.dlopen`. node-llama-cpp's own JavaScript loader is bypassed, so
 * its pre-load "binding test" (a forked child process) and its fall-back source build never run.
 *
 * Where the binaries are: `$SPECDEC_LLAMA_PEER` (default `~/.cache/specdec/node-llama-cpp-3.21.1`)
 * is a folder where `npm i -E node-llama-cpp@3.21.1` was run (`.ci/run` does this); the CPU build
 * is `node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/`, the Vulkan build
 * `.../linux-x64-vulkan/bins/linux-x64-vulkan/`. `$SPECDEC_LLAMA_LIB_DIR` (or the `dir` argument of
 * {@linkcode openLlamaCpp}) overrides the folder of `libllama*.so` itself, e.g. the Vulkan build
 * installed on its own (`npm i -E --ignore-scripts @node-llama-cpp/linux-x64-vulkan@3.21.1`) or
 * unpacked from a tarball on a machine without npm.
 *
 * The Vulkan build offloads every layer (n_gpu_layers 999) to the Vulkan devices ggml finds; ggml
 * skips CPU Vulkan devices such as Mesa's lavapipe unless `GGML_VK_VISIBLE_DEVICES=0` is set.
 * llama.cpp's log is dropped unless `SPECDEC_LLAMA_LOG=1` (then it goes to stderr).
 *
 * The struct layouts below are those of the llama.h that node-llama-cpp 3.21.1 builds (its
 * `llama/gitRelease.bundle`, release v0.4.0); {@linkcode openLlamaCpp} checks the library's
 * default parameters against them, so a different build fails loudly instead of misbehaving.
 *
 * @module
 */
import { join } from "@specdec/path";

/** The node-llama-cpp version whose prebuilt llama.cpp these tests use (pinned). */
export const NODE_LLAMA_CPP_VERSION = "3.21.1";

/** llama.cpp's `llama_ftype` ids of the file types the tests make (llama.h). */
export const LLAMA_FTYPE = {
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q8_0: 7,
  Q5_0: 8,
  Q5_1: 9,
  Q2_K: 10,
  Q3_K_S: 11,
  Q3_K_M: 12,
  Q4_K_S: 14,
  Q4_K_M: 15,
  Q5_K_S: 16,
  Q5_K_M: 17,
  Q6_K: 18,
} as const;

/** A `llama_ftype` name of {@linkcode LLAMA_FTYPE}. */
export type LlamaFtype = keyof typeof LLAMA_FTYPE;

// Struct sizes (x86-64 SysV; all larger than 16 bytes, so passed by value in memory).
const MODEL_PARAMS_BYTES = 80; // llama_model_params
const CONTEXT_PARAMS_BYTES = 160; // llama_context_params
const QUANT_PARAMS_BYTES = 64; // llama_model_quantize_params
const BATCH_BYTES = 56; // llama_batch: n_tokens i32, then 6 pointers from byte 8
const PERF_BYTES = 48; // llama_perf_context_data: 4 f64, 3 i32 (+ pad)

const words = (bytes: number) => ({ struct: Array(bytes / 8).fill("u64") }) as const;
const MODEL_PARAMS = words(MODEL_PARAMS_BYTES);
const CONTEXT_PARAMS = words(CONTEXT_PARAMS_BYTES);
const QUANT_PARAMS = words(QUANT_PARAMS_BYTES);
const BATCH = words(BATCH_BYTES);
const PERF = words(PERF_BYTES);

const SYMBOLS = {
  llama_backend_init: { parameters: [], result: "void" },
  llama_log_set: { parameters: ["function", "pointer"], result: "void" },
  llama_model_default_params: { parameters: [], result: MODEL_PARAMS },
  llama_context_default_params: { parameters: [], result: CONTEXT_PARAMS },
  llama_model_quantize_default_params: { parameters: [], result: QUANT_PARAMS },
  llama_model_load_from_file: { parameters: ["buffer", MODEL_PARAMS], result: "pointer" },
  llama_model_free: { parameters: ["pointer"], result: "void" },
  llama_model_size: { parameters: ["pointer"], result: "u64" },
  llama_model_get_vocab: { parameters: ["pointer"], result: "pointer" },
  llama_vocab_n_tokens: { parameters: ["pointer"], result: "i32" },
  llama_tokenize: {
    parameters: ["pointer", "buffer", "i32", "buffer", "i32", "bool", "bool"],
    result: "i32",
  },
  llama_init_from_model: { parameters: ["pointer", CONTEXT_PARAMS], result: "pointer" },
  llama_free: { parameters: ["pointer"], result: "void" },
  llama_get_memory: { parameters: ["pointer"], result: "pointer" },
  llama_memory_clear: { parameters: ["pointer", "bool"], result: "void" },
  llama_batch_init: { parameters: ["i32", "i32", "i32"], result: BATCH },
  llama_batch_free: { parameters: [BATCH], result: "void" },
  llama_decode: { parameters: ["pointer", BATCH], result: "i32" },
  llama_get_logits_ith: { parameters: ["pointer", "i32"], result: "pointer" },
  llama_perf_context: { parameters: ["pointer"], result: PERF },
  llama_perf_context_reset: { parameters: ["pointer"], result: "void" },
  llama_model_quantize: { parameters: ["buffer", "buffer", "buffer"], result: "u32" },
  llama_print_system_info: { parameters: [], result: "pointer" },
} as const;

const GGML_SYMBOLS = {
  ggml_backend_load_all_from_path: { parameters: ["buffer"], result: "void" },
  ggml_backend_dev_count: { parameters: [], result: "usize" },
  ggml_backend_dev_get: { parameters: ["usize"], result: "pointer" },
  ggml_backend_dev_name: { parameters: ["pointer"], result: "pointer" },
  ggml_backend_dev_description: { parameters: ["pointer"], result: "pointer" },
  ggml_backend_dev_type: { parameters: ["pointer"], result: "i32" },
  ggml_backend_dev_memory: { parameters: ["pointer", "buffer", "buffer"], result: "void" },
} as const;

const GGML_BASE_SYMBOLS = {
  ggml_get_type_traits: { parameters: ["i32"], result: "pointer" },
  ggml_quantize_chunk: {
    parameters: ["i32", "buffer", "buffer", "i64", "i64", "i64", "pointer"],
    result: "usize",
  },
} as const;

/** ggml's `to_float` of a type: `(const void * x, float * y, int64_t k)`. */
const TO_FLOAT = { parameters: ["buffer", "buffer", "i64"], result: "void" } as const;

type Lib = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/** Which prebuilt build to open. */
export type LlamaBuild = "cpu" | "vulkan";

/** An opened libllama with its backends loaded. */
export interface LlamaCpp {
  /** The raw symbols (see llama.h). */
  readonly lib: Lib;
  /** Folder of the shared libraries. */
  readonly dir: string;
  /** Which build. */
  readonly build: LlamaBuild;
  /** llama.cpp's system info line (CPU features, backends). */
  readonly systemInfo: string;
  /** The ggml devices found, "name: description" (e.g. "Vulkan0: NVIDIA H200", "CPU: ..."). */
  readonly devices: readonly string[];
  /**
   * The non-CPU ggml devices (those a model's layers are offloaded to), "name: description";
   * never empty for the Vulkan build ({@linkcode openLlamaCpp} throws otherwise).
   */
  readonly gpuDevices: readonly string[];
  /** Free and total bytes of each of {@linkcode gpuDevices} now (`ggml_backend_dev_memory`). */
  gpuMemory(): { free: number; total: number }[];
  /** libggml-base: ggml's own quantizers and dequantizers. */
  readonly ggmlBase: Deno.DynamicLibrary<typeof GGML_BASE_SYMBOLS>["symbols"];
}

/** The folder where node-llama-cpp is installed (`$SPECDEC_LLAMA_PEER` or the default). */
export function llamaPeerDir(): string {
  return Deno.env.get("SPECDEC_LLAMA_PEER") ??
    join(
      Deno.env.get("HOME") ?? "/root",
      ".cache/specdec",
      `node-llama-cpp-${NODE_LLAMA_CPP_VERSION}`,
    );
}

/** The folder of `libllama*.so` for `build`, from the environment (see the module doc). */
export function llamaLibDir(build: LlamaBuild = "cpu"): string {
  const explicit = Deno.env.get("SPECDEC_LLAMA_LIB_DIR");
  if (explicit) return explicit;
  const peer = llamaPeerDir();
  const pkg = build === "cpu" ? "linux-x64" : "linux-x64-vulkan";
  return join(peer, "node_modules/@node-llama-cpp", pkg, "bins", pkg);
}

const opened = new Map<string, LlamaCpp>();

function cstr(s: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(s + "\0");
}

/** The struct bytes Deno returned, as a DataView. */
function view(s: Uint8Array): DataView {
  return new DataView(s.buffer, s.byteOffset, s.byteLength);
}

/**
 * Opens libllama of `build` (once per process), loads its ggml backends and silences its log.
 * `dir`: the folder of its libraries (default {@linkcode llamaLibDir}). Throws an `Error` saying
 * how to install it when the library is missing, when the library's default parameters do not
 * match the struct layouts this file was written for, and when the Vulkan build finds no
 * Vulkan device.
 */
export function openLlamaCpp(build: LlamaBuild = "cpu", dir = llamaLibDir(build)): LlamaCpp {
  const have = opened.get(`${build}\0${dir}`);
  if (have) return have;
  let file: string | undefined;
  try {
    file = [...Deno.readDirSync(dir)].map((e) => e.name).find((n) => /^libllama\..*so$/.test(n));
  } catch { /* reported below */ }
  const names = file ? [...Deno.readDirSync(dir)].map((e) => e.name) : [];
  const ggmlFile = names.find((n) => /^libggml\..*so$/.test(n));
  const baseFile = names.find((n) => /^libggml-base.*\.so$/.test(n));
  if (!file || !ggmlFile || !baseFile) {
    throw new Error(
      `llama.cpp (${build}) not found: no libllama*.so / libggml*.so in ${dir}. Install the ` +
        `pinned peer with \`mkdir -p DIR && cd DIR && npm i -E --ignore-scripts ` +
        `node-llama-cpp@${NODE_LLAMA_CPP_VERSION}${
          build === "cpu" ? "" : ` @node-llama-cpp/linux-x64-vulkan@${NODE_LLAMA_CPP_VERSION}`
        }\` (DIR = $SPECDEC_LLAMA_PEER, default ` +
        `~/.cache/specdec/node-llama-cpp-${NODE_LLAMA_CPP_VERSION}; .ci/run does this for the ` +
        `CPU build), or name the folder of the libraries with $SPECDEC_LLAMA_LIB_DIR.`,
    );
  }
  const lib = Deno.dlopen(join(dir, file), SYMBOLS).symbols;
  const ggml = Deno.dlopen(join(dir, ggmlFile), GGML_SYMBOLS).symbols;
  const ggmlBase = Deno.dlopen(join(dir, baseFile), GGML_BASE_SYMBOLS).symbols;
  // Drop llama.cpp's log lines (model loading prints ~100 of them per file). The callback must
  // be native code, not a Deno.UnsafeCallback: the library is shared by every test worker of a
  // `deno test --parallel` process, so a JS callback of one worker would be called from the
  // others' threads (blocking until its own isolate runs it, or crashing once that worker has
  // exited; full-suite runs with a JS callback hung once and segfaulted once). glibc's endpwent() takes no arguments and does nothing unless
  // the passwd database is open (it never is here); the three arguments are ignored (x86-64 ABI).
  const libc = Deno.dlopen("libc.so.6", {
    dlsym: { parameters: ["pointer", "buffer"], result: "pointer" },
    dlopen: { parameters: ["buffer", "i32"], result: "pointer" },
  }).symbols;
  // One more reference to each library that is never released: when a test worker ends, Deno
  // closes its handles, and the libraries (with ggml's CPU backends and their threads) must not
  // be unmapped under the other workers.
  for (const f of [file, ggmlFile, baseFile]) libc.dlopen(cstr(join(dir, f)), 2 /* RTLD_NOW */);
  const noop = libc.dlsym(null, cstr("endpwent")); // RTLD_DEFAULT
  if (noop === null) throw new Error("dlsym(endpwent) failed: no glibc?");
  // SPECDEC_LLAMA_LOG=1 keeps llama.cpp's own log on stderr (its default logger), e.g. to see
  // which devices ggml found and how many layers a model offloaded.
  if (Deno.env.get("SPECDEC_LLAMA_LOG") !== "1") lib.llama_log_set(noop, null);
  ggml.ggml_backend_load_all_from_path(cstr(dir));
  lib.llama_backend_init();

  // Layout checks against the library's own defaults (llama-context.cpp, llama-model.cpp).
  const cp = view(lib.llama_context_default_params());
  const mp = view(lib.llama_model_default_params());
  const qp = view(lib.llama_model_quantize_default_params());
  const ok = cp.getUint32(0, true) === 512 && cp.getUint32(4, true) === 2048 &&
    cp.getUint32(8, true) === 512 && cp.getUint32(12, true) === 1 &&
    mp.getInt32(16, true) === -1 && mp.getUint8(74) === 1 && // use_extra_bufts = true
    qp.getInt32(4, true) === LLAMA_FTYPE.Q8_0 && qp.getUint8(17) === 1; // quantize_output_tensor
  if (!ok) {
    throw new Error(
      `${join(dir, file)}: default parameters do not match the llama.h layout of ` +
        `node-llama-cpp ${NODE_LLAMA_CPP_VERSION} that tests/llama_cpp.ts was written for`,
    );
  }
  const info = Deno.UnsafePointerView.getCString(lib.llama_print_system_info()!);
  const devices: string[] = [], gpuDevices: string[] = [], gpuPtrs: Deno.PointerValue[] = [];
  for (let i = 0n; i < BigInt(ggml.ggml_backend_dev_count()); i++) {
    const dev = ggml.ggml_backend_dev_get(i);
    const str = (p: Deno.PointerValue) => p ? Deno.UnsafePointerView.getCString(p) : "?";
    const name = `${str(ggml.ggml_backend_dev_name(dev))}: ${
      str(ggml.ggml_backend_dev_description(dev))
    }`;
    devices.push(name);
    if (ggml.ggml_backend_dev_type(dev) !== 0 /* GGML_BACKEND_DEVICE_TYPE_CPU */) {
      gpuDevices.push(name);
      gpuPtrs.push(dev);
    }
  }
  if (build === "vulkan" && gpuDevices.length === 0) {
    throw new Error(
      `llama.cpp vulkan (${dir}) found no Vulkan device (ggml devices: ${devices.join(", ")}). ` +
        `Is a Vulkan driver installed (VK_DRIVER_FILES=${
          Deno.env.get("VK_DRIVER_FILES") ?? "unset"
        })? ggml skips CPU devices such as lavapipe unless GGML_VK_VISIBLE_DEVICES=0.`,
    );
  }
  const gpuMemory = () =>
    gpuPtrs.map((dev) => {
      const free = new BigUint64Array(1), total = new BigUint64Array(1);
      ggml.ggml_backend_dev_memory(
        dev,
        new Uint8Array(free.buffer),
        new Uint8Array(total.buffer),
      );
      return { free: Number(free[0]), total: Number(total[0]) };
    });
  const out = { lib, dir, build, systemInfo: info, ggmlBase, devices, gpuDevices, gpuMemory };
  opened.set(`${build}\0${dir}`, out);
  return out;
}

/** Options of {@linkcode LlamaCppModel.load}. */
export interface LlamaCppModelOptions {
  /** Context length (KV cache) in tokens. */
  nCtx: number;
  /** CPU threads (default 2). */
  threads?: number;
  /** Layers offloaded to the GPU (Vulkan build; default all). */
  gpuLayers?: number;
}

/** Timings of the last decode calls since {@linkcode LlamaCppModel.resetPerf} (llama_perf). */
export interface LlamaCppPerf {
  /** Milliseconds spent on prompt batches. */
  promptMs: number;
  /** Prompt tokens evaluated. */
  promptTokens: number;
  /** Milliseconds spent on single-token decodes. */
  evalMs: number;
  /** Single tokens decoded. */
  evalTokens: number;
}

/** One GGUF loaded in llama.cpp with one context (sequence 0). */
export class LlamaCppModel {
  readonly #l: Lib;
  readonly #model: Deno.PointerValue;
  readonly #ctx: Deno.PointerValue;
  readonly #batch: Uint8Array;
  readonly #nCtx: number;
  /** Vocabulary size (logits per row). */
  readonly vocabSize: number;
  /** Bytes of the model's tensors as llama.cpp holds them. */
  readonly modelBytes: number;
  #vocab: Deno.PointerValue;

  private constructor(l: Lib, model: Deno.PointerValue, ctx: Deno.PointerValue, nCtx: number) {
    this.#l = l;
    this.#model = model;
    this.#ctx = ctx;
    this.#nCtx = nCtx;
    this.#vocab = l.llama_model_get_vocab(model);
    this.vocabSize = l.llama_vocab_n_tokens(this.#vocab);
    this.modelBytes = Number(l.llama_model_size(model));
    this.#batch = l.llama_batch_init(nCtx, 0, 1);
  }

  /** Loads `path` (throws naming the file when llama.cpp refuses it). */
  static load(cpp: LlamaCpp, path: string, opts: LlamaCppModelOptions): LlamaCppModel {
    const l = cpp.lib;
    const mp = l.llama_model_default_params();
    view(mp).setInt32(16, opts.gpuLayers ?? (cpp.build === "cpu" ? 0 : 999), true);
    const model = l.llama_model_load_from_file(cstr(path), mp);
    if (model === null) throw new Error(`llama.cpp could not load ${path}`);
    const cp = l.llama_context_default_params();
    const v = view(cp), threads = opts.threads ?? 2;
    for (const o of [0, 4, 8]) v.setUint32(o, opts.nCtx, true); // n_ctx, n_batch, n_ubatch
    v.setInt32(28, threads, true);
    v.setInt32(32, threads, true);
    const ctx = l.llama_init_from_model(model, cp);
    if (ctx === null) {
      l.llama_model_free(model);
      throw new Error(`llama.cpp could not create a ${opts.nCtx}-token context for ${path}`);
    }
    return new LlamaCppModel(l, model, ctx, opts.nCtx);
  }

  /** llama.cpp's tokenization of `text` (with BOS when `bos`). */
  tokenize(text: string, bos: boolean): number[] {
    const bytes = new TextEncoder().encode(text);
    const out = new Int32Array(bytes.length + 8);
    const n = this.#l.llama_tokenize(
      this.#vocab,
      bytes,
      bytes.length,
      new Uint8Array(out.buffer),
      out.length,
      bos,
      false,
    );
    if (n < 0) throw new Error(`llama_tokenize needs ${-n} tokens`);
    return [...out.subarray(0, n)];
  }

  /** Empties the KV cache (sequence 0 starts again at position 0). */
  clear(): void {
    this.#l.llama_memory_clear(this.#l.llama_get_memory(this.#ctx), true);
  }

  /**
   * Evaluates `tokens` at positions `pos0 ..` in one llama_decode; returns the logits of the rows
   * asked for by `outputs` ("last" or "all"), each a `Float32Array` of {@linkcode vocabSize}.
   */
  decode(tokens: readonly number[], pos0: number, outputs: "last" | "all"): Float32Array[] {
    const n = tokens.length;
    this.#eval(tokens, pos0, outputs === "all");
    const rows: Float32Array[] = [];
    for (let i = outputs === "all" ? 0 : n - 1; i < n; i++) {
      const p = this.#l.llama_get_logits_ith(this.#ctx, i);
      rows.push(
        new Float32Array(Deno.UnsafePointerView.getArrayBuffer(p!, 4 * this.vocabSize)).slice(),
      );
    }
    return rows;
  }

  /** One llama_decode of `tokens` at `pos0 ..`, logits for every row (`all`) or the last. */
  #eval(tokens: readonly number[], pos0: number, all: boolean): void {
    const n = tokens.length;
    if (n < 1 || pos0 + n > this.#nCtx) {
      throw new RangeError(
        `decode: ${n} tokens at ${pos0} do not fit a ${this.#nCtx}-token context`,
      );
    }
    const b = view(this.#batch);
    b.setInt32(0, n, true);
    const arr = (at: number, len: number) => {
      const p = Deno.UnsafePointer.create(b.getBigUint64(at, true));
      return Deno.UnsafePointerView.getArrayBuffer(p!, len);
    };
    const tok = new Int32Array(arr(8, 4 * n)), pos = new Int32Array(arr(24, 4 * n));
    const nSeq = new Int32Array(arr(32, 4 * n)), seqPtrs = new BigUint64Array(arr(40, 8 * n));
    const logits = new Int8Array(arr(48, n));
    for (let i = 0; i < n; i++) {
      tok[i] = tokens[i];
      pos[i] = pos0 + i;
      nSeq[i] = 1;
      const seq = Deno.UnsafePointer.create(seqPtrs[i]);
      new Int32Array(Deno.UnsafePointerView.getArrayBuffer(seq!, 4))[0] = 0;
      logits[i] = all || i === n - 1 ? 1 : 0;
    }
    const rc = this.#l.llama_decode(this.#ctx, this.#batch);
    if (rc !== 0) throw new Error(`llama_decode returned ${rc}`);
  }

  /**
   * Like {@linkcode decode} with outputs "last", but returns only the argmax of that row (first
   * index on ties), read in place without copying the row (for timing loops).
   */
  decodeArgmax(tokens: readonly number[], pos0: number): number {
    const n = tokens.length;
    this.#eval(tokens, pos0, false);
    const p = this.#l.llama_get_logits_ith(this.#ctx, n - 1);
    return argmax(new Float32Array(Deno.UnsafePointerView.getArrayBuffer(p!, 4 * this.vocabSize)));
  }

  /** Greedy continuation of `prompt` by `n` tokens (argmax, first index on ties), fresh cache. */
  greedy(prompt: readonly number[], n: number): number[] {
    this.clear();
    let row = this.decode(prompt, 0, "last")[0];
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const t = argmax(row);
      out.push(t);
      if (i + 1 < n) row = this.decode([t], prompt.length + i, "last")[0];
    }
    return out;
  }

  /** Logit rows of every position of `tokens` (one batch, fresh cache). */
  logits(tokens: readonly number[]): Float32Array[] {
    this.clear();
    return this.decode(tokens, 0, "all");
  }

  /** Resets llama.cpp's timing counters. */
  resetPerf(): void {
    this.#l.llama_perf_context_reset(this.#ctx);
  }

  /** llama.cpp's timing counters since the last {@linkcode resetPerf}. */
  perf(): LlamaCppPerf {
    const v = view(this.#l.llama_perf_context(this.#ctx));
    return {
      promptMs: v.getFloat64(16, true),
      evalMs: v.getFloat64(24, true),
      promptTokens: v.getInt32(32, true),
      evalTokens: v.getInt32(36, true),
    };
  }

  /** Frees the context, the batch and the model. */
  close(): void {
    this.#l.llama_batch_free(this.#batch);
    this.#l.llama_free(this.#ctx);
    this.#l.llama_model_free(this.#model);
  }
}

/** Index of the largest value (the first one on ties). */
export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/**
 * Has llama.cpp quantize the GGUF `input` into `output` as `ftype` (`llama_model_quantize`, its
 * default mixture rules, no importance matrix). Throws naming both files on failure.
 */
export function llamaQuantize(
  cpp: LlamaCpp,
  input: string,
  output: string,
  ftype: LlamaFtype,
  threads = 2,
): void {
  const qp = cpp.lib.llama_model_quantize_default_params();
  const v = view(qp);
  v.setInt32(0, threads, true);
  v.setInt32(4, LLAMA_FTYPE[ftype], true);
  const rc = cpp.lib.llama_model_quantize(cstr(input), cstr(output), qp);
  if (rc !== 0) {
    throw new Error(`llama_model_quantize(${input} -> ${output}, ${ftype}) returned ${rc}`);
  }
}

/**
 * ggml's own quantization of `values` (`[rows, cols]`) to ggml type id `type`
 * (`ggml_quantize_chunk`, no importance matrix: what llama-quantize does without `--imatrix`).
 */
export function ggmlQuantize(
  cpp: LlamaCpp,
  type: number,
  values: Float32Array,
  rows: number,
  cols: number,
  bytes: number,
): Uint8Array {
  const out = new Uint8Array(bytes);
  const src = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const n = cpp.ggmlBase.ggml_quantize_chunk(type, src, out, 0n, BigInt(rows), BigInt(cols), null);
  if (Number(n) !== bytes) {
    throw new Error(`ggml_quantize_chunk(type ${type}) wrote ${n} bytes, want ${bytes}`);
  }
  return out;
}

/** ggml's own dequantization (`type_traits.to_float`) of `n` values of type id `type`. */
export function ggmlDequantize(
  cpp: LlamaCpp,
  type: number,
  data: Uint8Array,
  n: number,
): Float32Array {
  const traits = cpp.ggmlBase.ggml_get_type_traits(type);
  if (traits === null) throw new Error(`ggml has no traits for type ${type}`);
  const fn = new Deno.UnsafePointerView(traits).getPointer(40); // to_float
  if (fn === null) throw new Error(`ggml type ${type} has no to_float`);
  const y = new Float32Array(n);
  new Deno.UnsafeFnPointer(fn as Deno.PointerObject<typeof TO_FLOAT>, TO_FLOAT).call(
    data as Uint8Array<ArrayBuffer>,
    new Uint8Array(y.buffer),
    BigInt(n),
  );
  return y;
}
