/**
 * The GPU runtime: one adapter and device per process, feature detection, the limits the engine
 * plans with, a pipeline cache keyed by every specialization value, and errors that surface as
 * thrown exceptions carrying the GPU's message and the label of the object involved.
 *
 * @module
 */

/** Optional WebGPU features the engine uses when the adapter has them. */
export interface GpuFeatures {
  /** `shader-f16`: f16 arithmetic and storage in WGSL. */
  readonly f16: boolean;
  /** `timestamp-query`: GPU-side timing of compute passes. */
  readonly timestamp: boolean;
  /** `subgroups`: subgroup operations in WGSL. */
  readonly subgroups: boolean;
}

/** The adapter limits the engine plans with (requested at their adapter maximum). */
export interface GpuLimits {
  /** Largest range of one buffer bindable as storage, in bytes. */
  readonly maxStorageBufferBindingSize: number;
  /** Largest single buffer, in bytes. */
  readonly maxBufferSize: number;
  /** Workgroup (shared) memory per workgroup, in bytes. */
  readonly maxComputeWorkgroupStorageSize: number;
  /** Invocations per workgroup. */
  readonly maxComputeInvocationsPerWorkgroup: number;
  /** Workgroups per dispatch dimension. */
  readonly maxComputeWorkgroupsPerDimension: number;
  /** Storage buffers bindable in one compute shader. */
  readonly maxStorageBuffersPerShaderStage: number;
}

/** Options for {@linkcode requestGpu}. */
export interface RequestGpuOptions {
  /** Adapter preference; default "high-performance". */
  powerPreference?: GPUPowerPreference;
  /** Refuse to use `shader-f16` even where it exists (tests the f32 paths). */
  disableF16?: boolean;
}

/** A GPU error (validation, out-of-memory, internal, or device loss) with the label involved. */
export class GpuError extends Error {
  /** Creates an error for the GPU object named by `label`. */
  constructor(label: string, message: string) {
    super(`GPU error in ${label}: ${message}`);
    this.name = "GpuError";
  }
}

/** One recorded compute dispatch: built once, encoded many times. */
export interface Dispatch {
  /** Hierarchical label, e.g. `target.L7.attn.qkv`. */
  readonly label: string;
  /** The compute pipeline. */
  readonly pipeline: GPUComputePipeline;
  /** Bind group 0 of the pipeline. */
  readonly bindGroup: GPUBindGroup;
  /** Workgroup counts (x, y, z). */
  readonly workgroups: readonly [number, number, number];
}

const LIMIT_NAMES = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
  "maxComputeWorkgroupSizeX",
] as const;

/** How to get an adapter when none exists; shown in every "no adapter" error. */
export const NO_ADAPTER_HELP =
  "No WebGPU adapter found. On a Linux machine without a GPU, install Mesa's software Vulkan " +
  "driver (sudo apt-get install -y mesa-vulkan-drivers) and set XDG_RUNTIME_DIR (e.g. to /tmp); " +
  "with a GPU, install its Vulkan driver.";

/**
 * The engine's handle on the device: creates labelled buffers, caches pipelines, and turns GPU
 * errors into exceptions.
 *
 * @example Request the device and read a buffer back
 * ```ts ignore
 * const gpu = await requestGpu();
 * const buf = gpu.upload("demo", new Float32Array([1, 2, 3]));
 * console.log(new Float32Array(await gpu.read(buf)));
 * ```
 */
export class Gpu {
  /** The WebGPU device. */
  readonly device: GPUDevice;
  /** The adapter's description (e.g. "NVIDIA H100 80GB HBM3"). */
  readonly adapterName: string;
  /** Optional features enabled on the device. */
  readonly features: GpuFeatures;
  /** Limits of the device (the adapter's maxima). */
  readonly limits: GpuLimits;
  /**
   * A software adapter (WebGPU's `isFallbackAdapter`, e.g. Mesa's lavapipe): kernels that have a
   * GPU-shaped and a CPU-shaped work split pick by it (workgroup barriers are coroutine switches
   * there, and wide lanes buy no coalescing).
   */
  readonly software: boolean;
  #pipelines = new Map<string, Promise<GPUComputePipeline>>();
  #pending: GpuError | undefined;
  #lost: GpuError | undefined;
  #allocated = 0;
  #uniformBytes = 0;

  /** Wraps an already created device; use {@linkcode requestGpu} instead. */
  constructor(device: GPUDevice, adapterName: string, features: GpuFeatures, software = false) {
    this.device = device;
    this.software = software;
    this.adapterName = adapterName;
    this.features = features;
    const l = device.limits;
    this.limits = {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    };
    device.addEventListener("uncapturederror", (e) => {
      const err = (e as GPUUncapturedErrorEvent).error;
      this.#pending ??= new GpuError("device", err.message);
    });
    device.lost.then((info) => {
      this.#lost = new GpuError("device", `device lost (${info.reason}): ${info.message}`);
    });
  }

  /**
   * Bytes of every non-uniform buffer created through this object so far (weights, caches,
   * scratch, staging), counted when created. The VRAM planner's figures are checked against it.
   */
  get allocatedBytes(): number {
    return this.#allocated;
  }

  /** Bytes of the small uniform (params) buffers created so far, kept apart from the above. */
  get uniformBytes(): number {
    return this.#uniformBytes;
  }

  /** Throws the first GPU error seen since the last check (uncaptured errors, device loss). */
  throwIfFailed(): void {
    if (this.#lost) throw this.#lost;
    const err = this.#pending;
    if (err) {
      this.#pending = undefined;
      throw err;
    }
  }

  /**
   * Runs `fn` inside validation and out-of-memory error scopes and throws a {@linkcode GpuError}
   * naming `label` if either caught something.
   */
  async scoped<T>(label: string, fn: () => T): Promise<T> {
    this.device.pushErrorScope("out-of-memory");
    this.device.pushErrorScope("validation");
    let value: T | undefined, thrown: unknown;
    try {
      value = fn();
    } catch (e) {
      thrown = e;
    }
    const validation = await this.device.popErrorScope();
    const oom = await this.device.popErrorScope();
    if (oom) throw new GpuError(label, `out of memory: ${oom.message}`);
    if (validation) throw new GpuError(label, validation.message);
    if (thrown !== undefined) throw thrown;
    return value as T;
  }

  /** Creates a labelled buffer; throws a clear error if it exceeds the device's limits. */
  buffer(label: string, size: number, usage: GPUBufferUsageFlags): GPUBuffer {
    if (size > this.limits.maxBufferSize) {
      throw new GpuError(
        label,
        `buffer of ${size} bytes exceeds this device's maxBufferSize of ${this.limits.maxBufferSize}`,
      );
    }
    // WebGPU needs sizes to be multiples of 4 for copies and mapping.
    const padded = Math.max(4, Math.ceil(size / 4) * 4);
    if (usage & GPUBufferUsage.UNIFORM) this.#uniformBytes += padded;
    else this.#allocated += padded;
    return this.device.createBuffer({ label, size: padded, usage });
  }

  /** Creates a storage buffer holding `data` (also usable as a copy source and destination). */
  upload(
    label: string,
    data: ArrayBufferView,
    usage: GPUBufferUsageFlags = GPUBufferUsage.STORAGE,
  ): GPUBuffer {
    const buf = this.buffer(
      label,
      data.byteLength,
      usage | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
    );
    this.write(buf, data);
    return buf;
  }

  /** Writes `data` into `buffer` at `offset`, padding the copy to a multiple of 4 bytes. */
  write(buffer: GPUBuffer, data: ArrayBufferView, offset = 0): void {
    const bytes = new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
    if (bytes.byteLength % 4 === 0) {
      this.device.queue.writeBuffer(buffer, offset, bytes);
    } else {
      const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
      padded.set(bytes);
      this.device.queue.writeBuffer(buffer, offset, padded);
    }
  }

  /** Creates a uniform buffer holding `data` (params structs of u32/f32 fields). */
  uniform(label: string, data: ArrayBufferView): GPUBuffer {
    return this.upload(label, data, GPUBufferUsage.UNIFORM);
  }

  /**
   * Reads `size` bytes of `buffer` from `offset` back to the host. Slow (>= ~11 ms per call on
   * Deno, see DESIGN.md): keep it off hot paths.
   */
  async read(buffer: GPUBuffer, offset: number = 0, size?: number): Promise<ArrayBuffer> {
    size ??= buffer.size - offset;
    const staging = this.buffer(
      `${buffer.label}.readback`,
      size,
      GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
    );
    const enc = this.device.createCommandEncoder({ label: `${buffer.label}.readback` });
    enc.copyBufferToBuffer(buffer, offset, staging, 0, Math.ceil(size / 4) * 4);
    this.device.queue.submit([enc.finish()]);
    try {
      await staging.mapAsync(GPUMapMode.READ);
    } catch (e) {
      this.throwIfFailed();
      throw new GpuError(`${buffer.label}.readback`, (e as Error).message);
    }
    this.throwIfFailed();
    const out = staging.getMappedRange().slice(0, size);
    staging.unmap();
    staging.destroy();
    return out;
  }

  /**
   * Returns the compute pipeline for `key`, compiling `code()` once. The key must hold every
   * specialization value baked into the source (tile sizes, formats, dimensions).
   */
  pipeline(key: string, code: () => string, entryPoint = "main"): Promise<GPUComputePipeline> {
    let p = this.#pipelines.get(key);
    if (!p) {
      p = this.#compile(key, code(), entryPoint);
      this.#pipelines.set(key, p);
      p.catch(() => this.#pipelines.delete(key));
    }
    return p;
  }

  async #compile(key: string, source: string, entryPoint: string): Promise<GPUComputePipeline> {
    const module = this.device.createShaderModule({ label: key, code: source });
    try {
      return await this.device.createComputePipelineAsync({
        label: key,
        layout: "auto",
        compute: { module, entryPoint },
      });
    } catch (e) {
      const info = await module.getCompilationInfo();
      const msgs = info.messages.map((m) =>
        `  ${m.type} at ${m.lineNum}:${m.linePos}: ${m.message}`
      );
      throw new GpuError(
        `pipeline ${key}`,
        `${(e as Error).message}${msgs.length ? "\n" + msgs.join("\n") : ""}`,
      );
    }
  }

  /**
   * Creates a bind group for group 0 of `pipeline` with `buffers` bound at 0, 1, 2, ...; an
   * `undefined` entry leaves its binding out (an optional binding the shader does not declare).
   */
  bindGroup(
    label: string,
    pipeline: GPUComputePipeline,
    buffers: readonly (GPUBuffer | GPUBufferBinding | undefined)[],
  ): GPUBindGroup {
    const entries: GPUBindGroupEntry[] = [];
    buffers.forEach((b, i) => {
      if (b) entries.push({ binding: i, resource: "buffer" in b ? b : { buffer: b } });
    });
    return this.device.createBindGroup({ label, layout: pipeline.getBindGroupLayout(0), entries });
  }

  /** Encodes `dispatches` into one compute pass of `encoder`. */
  encode(
    encoder: GPUCommandEncoder,
    label: string,
    dispatches: readonly Dispatch[],
    timestampWrites?: GPUComputePassTimestampWrites,
  ): void {
    const pass = encoder.beginComputePass({ label, timestampWrites });
    for (const d of dispatches) {
      pass.setPipeline(d.pipeline);
      pass.setBindGroup(0, d.bindGroup);
      pass.dispatchWorkgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
    }
    pass.end();
  }

  /** Encodes `dispatches` in one pass, submits, and waits until the GPU is done. */
  async run(label: string, dispatches: readonly Dispatch[]): Promise<void> {
    const enc = this.device.createCommandEncoder({ label });
    this.encode(enc, label, dispatches);
    this.device.queue.submit([enc.finish()]);
    await this.device.queue.onSubmittedWorkDone();
    this.throwIfFailed();
  }

  /** Releases the device. */
  destroy(): void {
    this.device.destroy();
  }
}

/**
 * Acquires the adapter and a device with every optional feature the engine uses that the adapter
 * has, and the adapter's maximum limits.
 *
 * @example
 * ```ts ignore
 * const gpu = await requestGpu();
 * console.log(gpu.adapterName, gpu.features.f16);
 * ```
 */
export async function requestGpu(options: RequestGpuOptions = {}): Promise<Gpu> {
  if (typeof navigator === "undefined" || !navigator.gpu) {
    throw new Error(`WebGPU is not available in this runtime. ${NO_ADAPTER_HELP}`);
  }
  const adapter = await navigator.gpu.requestAdapter({
    powerPreference: options.powerPreference ?? "high-performance",
  });
  if (!adapter) throw new Error(NO_ADAPTER_HELP);
  const want: GPUFeatureName[] = [];
  const f16 = !options.disableF16 && adapter.features.has("shader-f16");
  if (f16) want.push("shader-f16");
  const timestamp = adapter.features.has("timestamp-query");
  if (timestamp) want.push("timestamp-query");
  const subgroups = adapter.features.has("subgroups" as GPUFeatureName);
  if (subgroups) want.push("subgroups" as GPUFeatureName);
  const requiredLimits: Record<string, number> = {};
  for (const name of LIMIT_NAMES) requiredLimits[name] = adapter.limits[name];
  const device = await adapter.requestDevice({
    label: "specdec",
    requiredFeatures: want,
    requiredLimits,
  });
  return new Gpu(device, adapter.info.description || adapter.info.vendor, {
    f16,
    timestamp,
    subgroups,
  }, adapter.info.isFallbackAdapter ?? false);
}

/** Splits `n` workgroups into (x, y) within the per-dimension limit (for very large dispatches). */
export function grid2d(n: number, maxPerDim = 65535): [number, number, number] {
  if (n <= maxPerDim) return [n, 1, 1];
  const y = Math.ceil(n / maxPerDim);
  return [Math.ceil(n / y), y, 1];
}
