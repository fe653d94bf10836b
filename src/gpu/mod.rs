//! wgpu plumbing: adapter choice, the capability table every shader variant consults, buffers,
//! the pipeline cache and readback.

mod buffer;
pub mod shader;

pub use buffer::{GpuBuffer, Uniform};
pub use shader::{PipelineKey, ShaderFlags};

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the adapter offers that kernels choose variants by. One table; every variant choice
/// reads it, so forcing a fallback (tests, `--no-f16`) is a matter of clearing a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// `enable f16;` works: f16 storage and arithmetic in shaders.
    pub f16: bool,
    /// Subgroup operations (subgroupAdd, subgroupMax, ...).
    pub subgroups: bool,
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    /// Largest range one storage binding may cover. Tensors beyond it are split.
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    pub max_workgroups_per_dim: u32,
    pub max_storage_buffers_per_stage: u32,
    pub timestamps: bool,
    /// Cooperative matrices of 16 x 16 x 16 f16 with f32 accumulators (NVIDIA tensor cores
    /// through VK_KHR_cooperative_matrix), with what the kernel that uses them assumes: f16,
    /// subgroups of exactly 32 and [`Caps::COOP_WORKGROUP_BYTES`] of workgroup memory.
    pub coop_matrix: bool,
    /// Decode products of 8- and 4-bit weights take their vector quantized to 8 bits and
    /// multiply in integer dot products (`dot4I8Packed`; SPIR-V OpSDot where the driver has
    /// it, else naga's byte-wise fallback). By default on for GPUs and off for CPU adapters
    /// (lavapipe), where the speed-up is small next to the rounding it adds; see
    /// [`GpuOptions::q8_activations`].
    pub q8_activations: bool,
}

impl Caps {
    /// The table for a device with these limits and enabled features; `max_binding` can
    /// only lower the binding limit.
    fn new(
        info: &wgpu::AdapterInfo,
        limits: &wgpu::Limits,
        f16: bool,
        subgroups: bool,
        timestamps: bool,
        coop_offered: bool,
        q8_activations: bool,
        max_binding: u64,
    ) -> Caps {
        let coop_matrix = coop_offered
            && f16
            && subgroups
            && info.subgroup_min_size == 32
            && info.subgroup_max_size == 32
            && limits.max_compute_workgroup_storage_size >= Caps::COOP_WORKGROUP_BYTES
            && limits.max_compute_invocations_per_workgroup >= 256;
        Caps {
            f16,
            subgroups,
            subgroup_min: info.subgroup_min_size,
            subgroup_max: info.subgroup_max_size,
            max_binding: max_binding.min(limits.max_storage_buffer_binding_size).min(limits.max_buffer_size),
            max_buffer: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
            timestamps,
            coop_matrix,
            q8_activations,
        }
    }

    /// Workgroup memory the cooperative-matrix matmul declares (64-token tiles).
    pub const COOP_WORKGROUP_BYTES: u32 = 35840;
    /// The same with 128-token tiles, taken where the adapter has it
    /// ([`crate::kernels::matmul::MatMul::tile_t`]).
    pub const COOP_TILE128_WORKGROUP_BYTES: u32 = 45056;
}

/// Whether the adapter runs 16 x 16 x 16 f16 x f16 + f32 cooperative matrices per subgroup.
fn coop_f16_offered(adapter: &wgpu::Adapter) -> bool {
    adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        && adapter.cooperative_matrix_properties().iter().any(|p| {
            p.m_size == 16
                && p.n_size == 16
                && p.k_size == 16
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
}

/// Whether to use 8-bit activations: the option, else the environment, else on for GPUs.
fn q8_activations(option: Option<bool>, device: wgpu::DeviceType) -> Result<bool> {
    if let Some(v) = option {
        return Ok(v);
    }
    if std::env::var_os("LONGWAVE_NO_Q8_ACTIVATIONS").is_some() {
        return Ok(false);
    }
    match std::env::var("LONGWAVE_Q8_ACTIVATIONS").ok().as_deref().map(str::trim) {
        None | Some("") => Ok(device != wgpu::DeviceType::Cpu),
        Some("1" | "on") => Ok(true),
        Some("0" | "off") => Ok(false),
        Some(v) => Err(Error::InvalidArgument(format!("LONGWAVE_Q8_ACTIVATIONS={v:?}: use on or off"))),
    }
}

/// How to pick and configure the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name, or an index from `longwave info`.
    /// Falls back to the `LONGWAVE_ADAPTER` environment variable.
    pub adapter: Option<String>,
    /// Do not use shader-f16 even if offered.
    pub no_f16: bool,
    /// Do not use subgroup operations even if offered.
    pub no_subgroups: bool,
    /// Do not use cooperative matrices (matrix units) even if offered. Falls back to the
    /// `LONGWAVE_NO_COOP_MATRIX` environment variable (any value).
    pub no_coop_matrix: bool,
    /// Whether decode products of 8- and 4-bit weights quantize their vectors to 8 bits
    /// ([`Caps::q8_activations`]); None: the adapter's default (on for GPUs, off for CPU
    /// adapters). Falls back to `LONGWAVE_Q8_ACTIVATIONS` (`on`/`1` or `off`/`0`);
    /// `LONGWAVE_NO_Q8_ACTIVATIONS` (any value) also turns them off.
    pub q8_activations: Option<bool>,
    /// Pretend the binding limit is this small (tests of tensor splitting; large tensors are
    /// split into chunks of at most this many bytes). Falls back to `LONGWAVE_MAX_BINDING`
    /// (bytes, or with a K/M/G suffix).
    pub max_binding: Option<u64>,
    /// Refuse to allocate more than this many bytes of buffers (to share a GPU, or to see
    /// what fits in a smaller one). Falls back to `LONGWAVE_GPU_MEMORY` (bytes, or with a
    /// K/M/G suffix).
    pub memory_budget: Option<u64>,
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<f64>().ok().map(|v| (v * mul as f64) as u64)
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Caps,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Validation / out-of-memory errors the device reported outside an error scope.
    device_errors: Arc<Mutex<Vec<String>>>,
    /// Bytes of live storage buffers allocated through this handle, and the budget.
    pub(crate) allocated: Arc<std::sync::atomic::AtomicU64>,
    pub memory_budget: Option<u64>,
}

const DRIVER_HINT: &str = "wgpu found no Vulkan, Metal, DX12 or GL adapter. On Debian/Ubuntu \
without a GPU install the software Vulkan driver: `sudo apt-get install mesa-vulkan-drivers \
libvulkan1`; with a GPU, install its vendor's Vulkan driver. `vulkaninfo --summary` (package \
vulkan-tools) shows what the system sees.";

fn make_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    // The GL backend computes poorly and slowly; only use it when nothing else exists.
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::PRIMARY;
    }
    wgpu::Instance::new(desc)
}

/// Adapters wgpu can see, in preference order (discrete, integrated, virtual, CPU).
pub fn list_adapters() -> Vec<wgpu::Adapter> {
    let instance = make_instance();
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters.sort_by_key(|a| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    });
    adapters
}

impl Gpu {
    pub fn new(opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let adapters = list_adapters();
        if adapters.is_empty() {
            return Err(Error::NoAdapter { hint: DRIVER_HINT.into() });
        }
        let wanted = opts.adapter.clone().or_else(|| std::env::var("LONGWAVE_ADAPTER").ok());
        let adapter = match wanted {
            None => adapters.into_iter().next().unwrap(),
            Some(w) => {
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                let pick = match w.parse::<usize>() {
                    Ok(i) if i < adapters.len() => Some(i),
                    _ => names.iter().position(|n| n.to_lowercase().contains(&w.to_lowercase())),
                };
                match pick {
                    Some(i) => adapters.into_iter().nth(i).unwrap(),
                    None => {
                        return Err(Error::NoAdapter {
                            hint: format!("no adapter matches {w:?}; available: {names:?}"),
                        })
                    }
                }
            }
        };
        Gpu::from_adapter(&adapter, opts)
    }

    /// Uses a device an application already owns (e.g. the one its renderer draws with).
    /// The capability table is read from the device's enabled features and limits, so the
    /// kernels use exactly what the app enabled: request `SHADER_F16` and `SUBGROUP` and the
    /// adapter's limits when creating the device to get the fast paths.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Arc<Gpu> {
        let features = device.features();
        let caps = Caps::new(
            &info,
            &device.limits(),
            features.contains(wgpu::Features::SHADER_F16),
            features.contains(wgpu::Features::SUBGROUP),
            features.contains(wgpu::Features::TIMESTAMP_QUERY),
            // The properties live on the adapter, which an app's device does not expose.
            false,
            info.device_type != wgpu::DeviceType::Cpu,
            u64::MAX,
        );
        let device_errors = Arc::new(Mutex::new(Vec::new()));
        Arc::new(Gpu {
            device,
            queue,
            info,
            caps,
            pipelines: Mutex::new(HashMap::new()),
            device_errors,
            allocated: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            memory_budget: None,
        })
    }

    pub fn from_adapter(adapter: &wgpu::Adapter, opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let features = adapter.features();
        let limits = adapter.limits();
        let mut want = wgpu::Features::empty();
        let f16 = features.contains(wgpu::Features::SHADER_F16) && !opts.no_f16;
        let subgroups = features.contains(wgpu::Features::SUBGROUP) && !opts.no_subgroups;
        let timestamps = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        if f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        if timestamps {
            want |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let no_coop = opts.no_coop_matrix || std::env::var_os("LONGWAVE_NO_COOP_MATRIX").is_some();
        let coop = f16 && subgroups && !no_coop && coop_f16_offered(adapter);
        if coop {
            want |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        // Ask for everything the adapter has: binding sizes and workgroup storage decide how
        // large a tensor fits in one binding and which tiles fit.
        let desc = wgpu::DeviceDescriptor {
            label: Some("longwave"),
            required_features: want,
            required_limits: limits.clone(),
            // SAFETY: the only experimental feature requested is cooperative matrices, used by
            // one kernel (matmul_coop.wgsl) whose results the parity tests check on every
            // adapter that offers them.
            experimental_features: if coop {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Gpu(format!("could not open {}: {e}", info.name)))?;
        let device_errors = Arc::new(Mutex::new(Vec::new()));
        let sink = device_errors.clone();
        // The default handler panics; a library must report instead.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let max_binding = opts
            .max_binding
            .or_else(|| std::env::var("LONGWAVE_MAX_BINDING").ok().and_then(|v| parse_bytes(&v)))
            .unwrap_or(u64::MAX);
        let q8 = q8_activations(opts.q8_activations, info.device_type)?;
        let caps = Caps::new(&info, &limits, f16, subgroups, timestamps, coop, q8, max_binding);
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            caps,
            pipelines: Mutex::new(HashMap::new()),
            device_errors,
            allocated: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            memory_budget: opts
                .memory_budget
                .or_else(|| std::env::var("LONGWAVE_GPU_MEMORY").ok().and_then(|v| parse_bytes(&v))),
        }))
    }

    /// Shader flags for this device's capabilities.
    pub fn flags(&self) -> ShaderFlags {
        ShaderFlags::from_caps(&self.caps)
    }

    /// A compute pipeline from the cache, compiled on first use. Never called per token.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.lock().unwrap().get(key) {
            return Ok(p.clone());
        }
        let source = shader::compose(key)?;
        // Driver failures (an internal error) as well as validation errors.
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc =
            wgpu::ShaderModuleDescriptor { label: Some(key.name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // Bounds checks stay on. Loop bounding (naga adding an iteration counter to every
        // loop, so that a driver cannot treat an endless loop as unreachable) is off: the
        // counter kept NVIDIA's compiler from unrolling our short fixed loops, which left
        // register arrays in local memory and serialised independent loads (decode 27-29%
        // slower on an H200; benches/RESULTS.md). LONGWAVE_SHADER_CHECKS=strict turns it
        // back on, e.g. to rule it out when a driver misbehaves.
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = std::env::var("LONGWAVE_SHADER_CHECKS").is_ok_and(|v| v == "strict");
        // SAFETY: with loop bounding off, wgpu requires that no shader loops forever. Every
        // loop in shaders/ runs to a bound taken from a constant, a workgroup size, a buffer
        // length or a parameter the host validated (contexts, row counts, sizes), and steps
        // towards it without overflow at the sizes the host allows.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let constants: Vec<(&str, f64)> = key.constants.iter().map(|(k, v)| (*k, *v as f64)).collect();
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.name),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let failed = pollster::block_on(scope.pop());
        if let Some(e) = failed.or(pollster::block_on(internal.pop())) {
            return Err(Error::Gpu(format!("shader {} ({:?}) failed to build: {e}", key.name, key.flags)));
        }
        let p = Arc::new(pipeline);
        self.pipelines.lock().unwrap().insert(key.clone(), p.clone());
        Ok(p)
    }

    pub fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry { binding: i as u32, resource: r.clone() })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries })
    }

    /// Errors the device reported since the last call (validation, out of memory).
    pub fn take_errors(&self) -> Result<()> {
        let errs: Vec<String> = std::mem::take(&mut *self.device_errors.lock().unwrap());
        if errs.is_empty() {
            Ok(())
        } else if errs.iter().any(|e| e.to_lowercase().contains("out of memory")) {
            Err(Error::OutOfMemory(errs.join("; ")))
        } else {
            Err(Error::Gpu(errs.join("; ")))
        }
    }

    /// Blocks until submission `index` is done (later submissions may still run).
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.take_errors()
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.take_errors()
    }

    /// One line describing the adapter.
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }
}
