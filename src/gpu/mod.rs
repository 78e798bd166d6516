//! CUDA through cudarc (only with the `gpu` feature): driver and NVRTC presence checks, the device
//! context and stream, and the preprocessing kernels. cudarc panics when a CUDA library is missing,
//! so nothing here calls into it before checking that the library is there.

pub mod kernels;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::bundle::Calibration;
use crate::overlay::heat::Heat;
use crate::preprocess::Normalisation;
use crate::preprocess::raw::RawFrame;

/// Environment variable naming the NVRTC library explicitly (e.g. `libnvrtc.so.12` unpacked from
/// the PyPI wheel `nvidia-cuda-nvrtc-cu12`), for machines where it is not on the library path.
pub const NVRTC_LIB_ENV: &str = "STPM_NVRTC_LIB";
/// Where `STPM_NVRTC=1 scripts/setup.sh` puts NVRTC, relative to the repository root.
pub const NVRTC_LIB_RELATIVE: &str = "engines/runtime/nvrtc/libnvrtc.so.12";

/// The NVRTC library we were pointed at: `STPM_NVRTC_LIB`, else the one setup installed, if any.
pub fn nvrtc_configured() -> Option<PathBuf> {
    std::env::var_os(NVRTC_LIB_ENV)
        .map(PathBuf::from)
        .or_else(|| crate::paths::find_installed(NVRTC_LIB_RELATIVE).ok())
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0}")]
    NoDriver(String),
    #[error("{0}")]
    NoNvrtc(String),
    #[error("CUDA {call} failed: {message}")]
    Driver { call: &'static str, message: String },
    #[error("NVRTC could not compile the preprocessing kernels: {0}")]
    Compile(String),
    #[error("{what} = {value} does not fit the kernel's 32-bit argument")]
    TooLarge { what: &'static str, value: usize },
}

/// Why the CUDA driver cannot be used, or `None` when its library loads. Checked once per process.
pub fn driver_missing() -> Option<String> {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    MISSING
        .get_or_init(|| {
            // SAFETY: only dlopens (and closes) the library names cudarc itself would load.
            let present = unsafe { cudarc::driver::sys::is_culib_present() };
            (!present).then(|| {
                "no CUDA driver: libcuda.so.1 is not on the library path (no NVIDIA driver here, \
                 or a container started without the GPU)"
                    .to_string()
            })
        })
        .clone()
}

/// Why NVRTC cannot be used, or `None` when it loads. A [`nvrtc_configured`] library is loaded
/// first and kept loaded, so that cudarc's lookup by name finds it by its soname; otherwise cudarc
/// searches the library path.
pub fn nvrtc_missing() -> Option<String> {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    static CONFIGURED: OnceLock<libloading::Library> = OnceLock::new();
    MISSING
        .get_or_init(|| {
            let configured = nvrtc_configured();
            if let Some(path) = &configured {
                // SAFETY: loading NVRTC runs only its own initialisers; it stays loaded for the
                // life of the process, as cudarc expects of the library it binds to.
                match unsafe { libloading::Library::new(path) } {
                    Ok(library) => {
                        let _ = CONFIGURED.set(library);
                    }
                    Err(e) => return Some(format!("cannot load NVRTC {}: {e}", path.display())),
                }
            }
            // SAFETY: only dlopens (and closes) the library names cudarc itself would load.
            let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
            (!present).then(|| match configured {
                Some(path) => format!(
                    "NVRTC {} loaded, but its soname is not one cudarc looks for \
                     (libnvrtc.so.12 or libnvrtc.so.13)",
                    path.display()
                ),
                None => format!(
                    "no NVRTC library (libnvrtc.so.12/13) on the library path or at \
                     {NVRTC_LIB_RELATIVE}; set {NVRTC_LIB_ENV} to one, or run \
                     `STPM_NVRTC=1 scripts/setup.sh` (PyPI nvidia-cuda-nvrtc-cu12, no GPU needed)"
                ),
            })
        })
        .clone()
}

/// Runs a cudarc call that may panic on a library lacking a symbol, as an error instead.
fn guarded<T>(call: &'static str, f: impl FnOnce() -> Result<T, String>) -> Result<T, GpuError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|message| GpuError::Driver { call, message }),
        Err(_) => Err(GpuError::Driver {
            call,
            message: "cudarc panicked (a CUDA library too old for CUDA 13 bindings?)".into(),
        }),
    }
}

/// Compiles [`kernels::PREPROCESS_CU`] to PTX with NVRTC; needs no GPU, only the NVRTC library.
pub fn compile_kernels() -> Result<Ptx, GpuError> {
    compile_source(kernels::PREPROCESS_CU, "stpm_preprocess.cu")
}

/// Compiles CUDA C `source` with our options (`--fmad=false`); a compile error carries NVRTC's log.
fn compile_source(source: &str, name: &str) -> Result<Ptx, GpuError> {
    if let Some(why) = nvrtc_missing() {
        return Err(GpuError::NoNvrtc(why));
    }
    let options = CompileOptions {
        fmad: Some(false),
        name: Some(name.into()),
        ..Default::default()
    };
    let compiled = catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(source, options)
    }))
    .map_err(|_| GpuError::Compile("cudarc panicked inside NVRTC".into()))?;
    compiled.map_err(|e| {
        GpuError::Compile(match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        })
    })
}

/// Device 0 and one stream of our own.
pub struct GpuContext {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl GpuContext {
    /// Opens device 0; an error (never a panic) when there is no driver or no device.
    pub fn try_new() -> Result<Self, GpuError> {
        if let Some(why) = driver_missing() {
            return Err(GpuError::NoDriver(why));
        }
        let context = guarded("context creation on device 0", || {
            CudaContext::new(0).map_err(|e| e.to_string())
        })?;
        let stream = guarded("stream creation", || {
            context.new_stream().map_err(|e| e.to_string())
        })?;
        Ok(Self { context, stream })
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> Result<String, GpuError> {
        self.context.name().map_err(|e| GpuError::Driver {
            call: "cuDeviceGetName",
            message: e.to_string(),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// The compiled preprocessing kernels loaded on a context.
pub struct Preprocessor {
    stream: Arc<CudaStream>,
    f32_kernel: CudaFunction,
    overlay_kernel: CudaFunction,
}

fn driver_error(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Driver {
        call,
        message: e.to_string(),
    }
}

fn kernel_int(what: &'static str, value: usize) -> Result<i32, GpuError> {
    i32::try_from(value).map_err(|_| GpuError::TooLarge { what, value })
}

impl Preprocessor {
    /// Compiles (NVRTC) and loads the kernels on `gpu`.
    pub fn new(gpu: &GpuContext) -> Result<Self, GpuError> {
        let ptx = compile_kernels()?;
        let module = gpu
            .context
            .load_module(ptx)
            .map_err(driver_error("cuModuleLoadData"))?;
        let f32_kernel = module
            .load_function(kernels::PREPROCESS_F32)
            .map_err(driver_error("cuModuleGetFunction"))?;
        let overlay_kernel = module
            .load_function(kernels::OVERLAY_RGB)
            .map_err(driver_error("cuModuleGetFunction"))?;
        Ok(Self {
            stream: Arc::clone(&gpu.stream),
            f32_kernel,
            overlay_kernel,
        })
    }

    /// Preprocesses one frame into a fresh host tensor [3, H, W] (`size` = [H, W]): a checking
    /// path (tests, the GPU check); the live one keeps a [`Staging`] and the tensor on the device.
    pub fn to_chw(
        &self,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
    ) -> Result<Vec<f32>, GpuError> {
        let mut staging = Staging::default();
        self.run(&mut staging, frame, size, norm)?;
        self.download(&staging)
    }

    /// Copies `frame` into `staging`'s pinned buffer, uploads it asynchronously and queues the
    /// kernel that writes the [3, H, W] tensor into `staging`'s device buffer. Allocates only when
    /// the frame or output size changes (a camera's frames keep theirs), so the steady state does
    /// no allocation; returns once the work is queued, before it has run.
    pub fn run(
        &self,
        staging: &mut Staging,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
    ) -> Result<(), GpuError> {
        self.run_at(staging, frame, size, norm, Slot { index: 0, batch: 1 })
    }

    /// [`Preprocessor::run`] for image `slot.index` of a batch of `slot.batch` images: the output
    /// buffer holds the whole batch, for one inference call on several cameras' frames.
    pub fn run_at(
        &self,
        staging: &mut Staging,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
        slot: Slot,
    ) -> Result<(), GpuError> {
        self.upload(staging, frame)?;
        self.launch(staging, frame, size, norm, slot)
    }

    /// The stream the kernels run on (an engine reading their output waits for it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The frame's bytes into pinned memory, then an asynchronous copy to the device (for
    /// [`Preprocessor::overlay`] on a frame that is not preprocessed here).
    pub fn upload(&self, staging: &mut Staging, frame: &RawFrame) -> Result<(), GpuError> {
        let len = frame.data.len();
        if staging.pinned.as_ref().is_none_or(|p| p.len() != len) {
            staging.pinned = None;
            // SAFETY: the whole buffer is written below before any copy reads it.
            let pinned = unsafe { self.stream.context().alloc_pinned::<u8>(len) }
                .map_err(driver_error("cuMemHostAlloc"))?;
            staging.pinned = Some(pinned);
        }
        let device = reuse(&mut staging.frame, len, &self.stream)?;
        let Some(pinned) = staging.pinned.as_mut() else {
            return Err(GpuError::Driver {
                call: "staging",
                message: "pinned buffer missing after allocation".into(),
            });
        };
        // Waits for the previous upload from this buffer to finish before overwriting it.
        pinned
            .as_mut_slice()
            .map_err(driver_error("cuEventSynchronize"))?
            .copy_from_slice(frame.data);
        self.stream
            .memcpy_htod(pinned, device)
            .map_err(driver_error("cuMemcpyHtoDAsync"))
    }

    /// Queues the kernel on the frame already uploaded to `staging`.
    fn launch(
        &self,
        staging: &mut Staging,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
        slot: Slot,
    ) -> Result<(), GpuError> {
        let [out_h, out_w] = size;
        let image_len = 3 * out_h * out_w;
        if slot.index >= slot.batch {
            return Err(GpuError::TooLarge {
                what: "batch index",
                value: slot.index,
            });
        }
        let out_len = image_len * slot.batch;
        reuse(&mut staging.out, out_len, &self.stream)?;
        let bytes = uploaded(&staging.frame, frame)?;
        let Some(out) = staging.out.as_mut() else {
            return Err(GpuError::Driver {
                call: "staging",
                message: "no output buffer after allocation".into(),
            });
        };
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
        let args = FrameArgs::of(frame)?;
        let (w, h) = (kernel_int("width", out_w)?, kernel_int("height", out_h)?);
        let out_offset = (slot.index * image_len) as i64;
        let config = pixel_grid(out_w, out_h);
        let mut launch = self.stream.launch_builder(&self.f32_kernel);
        args.push(&mut launch, bytes);
        launch
            .arg(out)
            .arg(&out_offset)
            .arg(&w)
            .arg(&h)
            .arg(&scale[0])
            .arg(&scale[1])
            .arg(&scale[2])
            .arg(&shift[0])
            .arg(&shift[1])
            .arg(&shift[2]);
        // SAFETY: the argument list matches stpm_preprocess_f32's signature; RawFrame::new checked
        // that every row of every plane lies inside the frame's bytes, which `bytes` holds (same
        // length, checked above), and `out` holds `slot.batch` images of 3·out_h·out_w floats, so
        // image `slot.index` (< batch, checked above) fits.
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(driver_error("cuLaunchKernel"))
    }

    /// `overlay::heat::blend` on the GPU for the frame the last [`Preprocessor::run`] or
    /// [`Preprocessor::upload`] put in `staging`: uploads `map` (raw scores, `map_size` =
    /// [H, W]), runs the overlay kernel and returns the blended RGB pixels and the anomaly mask.
    pub fn overlay(
        &self,
        staging: &mut Staging,
        frame: &RawFrame,
        map: &[f32],
        map_size: [usize; 2],
        calibration: &Calibration,
    ) -> Result<Heat, GpuError> {
        let [map_h, map_w] = map_size;
        if map.len() != map_h * map_w || map.is_empty() {
            return Err(GpuError::TooLarge {
                what: "anomaly map length for its size",
                value: map.len(),
            });
        }
        let pixels = frame.width * frame.height;
        let stream = &self.stream;
        let map_device = reuse(&mut staging.map, map.len(), stream)?;
        stream
            .memcpy_htod(map, map_device)
            .map_err(driver_error("cuMemcpyHtoDAsync"))?;
        reuse(&mut staging.heat, pixels * 3, stream)?;
        reuse(&mut staging.mask, pixels, stream)?;
        let bytes = uploaded(&staging.frame, frame)?;
        let (Some(map_device), Some(out), Some(mask)) = (
            staging.map.as_ref(),
            staging.heat.as_mut(),
            staging.mask.as_mut(),
        ) else {
            return Err(GpuError::Driver {
                call: "staging",
                message: "overlay buffers missing after allocation".into(),
            });
        };
        let args = FrameArgs::of(frame)?;
        let (map_w, map_h) = (
            kernel_int("map width", map_w)?,
            kernel_int("map height", map_h)?,
        );
        let config = pixel_grid(frame.width, frame.height);
        let mut launch = stream.launch_builder(&self.overlay_kernel);
        args.push(&mut launch, bytes);
        launch
            .arg(map_device)
            .arg(&map_w)
            .arg(&map_h)
            .arg(&calibration.threshold)
            .arg(&calibration.floor)
            .arg(out)
            .arg(mask);
        // SAFETY: the arguments match stpm_overlay_rgb's signature; `bytes` holds the frame
        // (RawFrame::new checked its planes; same length, checked above), `map_device` holds
        // map_h·map_w floats, `out` 3 bytes and `mask` 1 byte per frame pixel, the most the grid
        // (one thread per pixel, bounds-checked) writes.
        unsafe { launch.launch(config) }.map_err(driver_error("cuLaunchKernel"))?;
        let (Some(out), Some(mask)) = (staging.heat.as_ref(), staging.mask.as_ref()) else {
            return Err(GpuError::Driver {
                call: "staging",
                message: "overlay buffers missing".into(),
            });
        };
        Ok(Heat {
            pixels: stream
                .clone_dtoh(out)
                .map_err(driver_error("cuMemcpyDtoH"))?,
            mask: stream
                .clone_dtoh(mask)
                .map_err(driver_error("cuMemcpyDtoH"))?,
        })
    }

    /// The tensor the last [`Preprocessor::run`] wrote, copied to the host (waits for it).
    pub fn download(&self, staging: &Staging) -> Result<Vec<f32>, GpuError> {
        let out = staging.out.as_ref().ok_or_else(|| GpuError::Driver {
            call: "staging",
            message: "download before any run".into(),
        })?;
        self.stream
            .clone_dtoh(out)
            .map_err(driver_error("cuMemcpyDtoH"))
    }

    /// Times the preprocessing of `frame` over `iterations` runs after a warm-up: end to end
    /// (host copy into pinned memory, upload, kernel; the stream drained at the end) and the
    /// kernel alone (CUDA events around back-to-back launches on the uploaded frame).
    pub fn time(
        &self,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
        iterations: usize,
    ) -> Result<PreprocessTiming, GpuError> {
        let mut staging = Staging::default();
        for _ in 0..10 {
            self.run(&mut staging, frame, size, norm)?;
        }
        self.stream
            .synchronize()
            .map_err(driver_error("cuStreamSynchronize"))?;
        let started = std::time::Instant::now();
        for _ in 0..iterations {
            self.run(&mut staging, frame, size, norm)?;
        }
        self.stream
            .synchronize()
            .map_err(driver_error("cuStreamSynchronize"))?;
        let end_to_end_ms = started.elapsed().as_secs_f64() * 1e3 / iterations.max(1) as f64;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(timing)
            .map_err(driver_error("cuEventRecord"))?;
        for _ in 0..iterations {
            self.launch(&mut staging, frame, size, norm, Slot { index: 0, batch: 1 })?;
        }
        let end = self
            .stream
            .record_event(timing)
            .map_err(driver_error("cuEventRecord"))?;
        end.synchronize()
            .map_err(driver_error("cuEventSynchronize"))?;
        let kernel_ms = start
            .elapsed_ms(&end)
            .map_err(driver_error("cuEventElapsedTime"))? as f64
            / iterations.max(1) as f64;
        Ok(PreprocessTiming {
            end_to_end_ms,
            kernel_ms,
        })
    }
}

/// Per-frame milliseconds from [`Preprocessor::time`].
#[derive(Debug, Clone, Copy)]
pub struct PreprocessTiming {
    /// Host copy into pinned memory + upload + kernel, per frame, pipelined on one stream.
    pub end_to_end_ms: f64,
    /// The kernel alone.
    pub kernel_ms: f64,
}

/// A frame's description as the kernels take it (their `PREPROCESS_ARGS` after the bytes).
struct FrameArgs {
    format: i32,
    width: i32,
    height: i32,
    strides: [i32; 3],
    offsets: [i64; 2],
}

impl FrameArgs {
    fn of(frame: &RawFrame) -> Result<Self, GpuError> {
        let strides = &frame.layout.strides;
        Ok(Self {
            format: kernels::format_code(frame.format),
            width: kernel_int("frame width", frame.width)?,
            height: kernel_int("frame height", frame.height)?,
            strides: [
                kernel_int("stride", strides[0])?,
                kernel_int("stride", strides[1])?,
                kernel_int("stride", strides[2])?,
            ],
            offsets: [
                kernel_int64("plane offset", frame.layout.offsets[1])?,
                kernel_int64("plane offset", frame.layout.offsets[2])?,
            ],
        })
    }

    /// Pushes the frame's bytes and this description, in the kernels' argument order.
    fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>, bytes: &'a CudaSlice<u8>) {
        launch
            .arg(bytes)
            .arg(&self.format)
            .arg(&self.width)
            .arg(&self.height)
            .arg(&self.strides[0])
            .arg(&self.strides[1])
            .arg(&self.strides[2])
            .arg(&self.offsets[0])
            .arg(&self.offsets[1]);
    }
}

/// One 16×16 block per 16×16 pixels of a `width`×`height` image (one thread per pixel).
fn pixel_grid(width: usize, height: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((width as u32).div_ceil(16), (height as u32).div_ceil(16), 1),
        block_dim: (16, 16, 1),
        shared_mem_bytes: 0,
    }
}

fn kernel_int64(what: &'static str, value: usize) -> Result<i64, GpuError> {
    i64::try_from(value).map_err(|_| GpuError::TooLarge { what, value })
}

/// Where in a batch an image goes.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub index: usize,
    pub batch: usize,
}

/// The buffers preprocessing reuses from frame to frame: the frame in pinned (page-locked) host
/// memory, the frame on the device and the output tensor on the device.
#[derive(Default)]
pub struct Staging {
    pinned: Option<PinnedHostSlice<u8>>,
    frame: Option<CudaSlice<u8>>,
    out: Option<CudaSlice<f32>>,
    /// The overlay's anomaly map, blended frame and mask.
    map: Option<CudaSlice<f32>>,
    heat: Option<CudaSlice<u8>>,
    mask: Option<CudaSlice<u8>>,
}

/// The device copy of `frame` that an upload left in `buffer`; an error when nothing was
/// uploaded or the upload was of a frame of another size.
fn uploaded<'a>(
    buffer: &'a Option<CudaSlice<u8>>,
    frame: &RawFrame,
) -> Result<&'a CudaSlice<u8>, GpuError> {
    match buffer {
        Some(bytes) if bytes.len() == frame.data.len() => Ok(bytes),
        Some(bytes) => Err(GpuError::Driver {
            call: "staging",
            message: format!(
                "the uploaded frame has {} bytes, this one {}",
                bytes.len(),
                frame.data.len()
            ),
        }),
        None => Err(GpuError::Driver {
            call: "staging",
            message: "no frame uploaded".into(),
        }),
    }
}

/// `slot` holding a device buffer of exactly `len` elements: the one there when it has that length,
/// else a new one (a camera's sizes do not change, so this allocates once per size).
fn reuse<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
    stream: &Arc<CudaStream>,
) -> Result<&'a mut CudaSlice<T>, GpuError> {
    if slot.as_ref().is_none_or(|buffer| buffer.len() != len) {
        *slot = None;
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(driver_error("cuMemAlloc"))?,
        );
    }
    slot.as_mut().ok_or_else(|| GpuError::Driver {
        call: "cuMemAlloc",
        message: "no buffer after allocation".into(),
    })
}

impl Staging {
    /// The output tensor on the device (all images of the batch), once a run has made it.
    pub fn output(&self) -> Option<&CudaSlice<f32>> {
        self.out.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::RgbFrame;
    use crate::preprocess::raw::{self, PixelFormat};

    /// True when NVRTC can be used; a skip (with its reason) only when nobody pointed us at a
    /// library: a configured NVRTC (`STPM_NVRTC_LIB`, or setup's) that does not load is a failure.
    fn nvrtc_or_skip(test: &str) -> bool {
        match nvrtc_missing() {
            None => true,
            Some(why) if nvrtc_configured().is_some() => panic!("{why}"),
            Some(why) => {
                eprintln!("SKIPPED {test}: {why}");
                false
            }
        }
    }

    const IMAGENET: Normalisation = Normalisation {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// `len` xorshift bytes.
    fn random_bytes(state: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state >> 24) as u8
            })
            .collect()
    }

    /// The overlay kernel against `overlay::heat::blend` on every format, with maps smaller than,
    /// equal to and larger than the frame.
    #[test]
    fn overlay_kernel_matches_the_cpu_twin_on_every_format() {
        let Some(gpu) = preprocessor_or_skip("overlay_kernel_matches_the_cpu_twin_on_every_format")
        else {
            return;
        };
        let calibration = Calibration {
            threshold: 0.5,
            floor: 0.1,
            method: "test".into(),
            n_images: 1,
            good_median: 0.2,
        };
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut staging = Staging::default();
        for (width, height, map_size) in [
            (640, 480, [256, 256]),
            (37, 23, [64, 48]),
            (1920, 1080, [256, 256]),
        ] {
            let rgb = RgbFrame {
                width,
                height,
                pixels: random_bytes(&mut state, width * height * 3),
            };
            let map: Vec<f32> = random_bytes(&mut state, map_size[0] * map_size[1])
                .into_iter()
                .map(|b| b as f32 / 255.0)
                .collect();
            for format in PixelFormat::ALL {
                let (layout, data) = raw::encode(&rgb, format, 64);
                let frame = match RawFrame::new(format, width, height, layout, &data) {
                    Ok(frame) => frame,
                    Err(e) => panic!("{e}"),
                };
                let expected =
                    match crate::overlay::heat::blend(&frame, &map, map_size, &calibration) {
                        Ok(heat) => heat,
                        Err(e) => panic!("{e}"),
                    };
                let got = gpu
                    .run(&mut staging, &frame, [64, 64], &IMAGENET)
                    .and_then(|()| gpu.overlay(&mut staging, &frame, &map, map_size, &calibration));
                let got = match got {
                    Ok(heat) => heat,
                    Err(e) => panic!("{format}: {e}"),
                };
                let max_diff = got
                    .pixels
                    .iter()
                    .zip(&expected.pixels)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap_or(0);
                let mask_flips = got
                    .mask
                    .iter()
                    .zip(&expected.mask)
                    .filter(|(a, b)| a != b)
                    .count();
                let anomalous = expected.mask.iter().filter(|&&m| m > 0).count();
                eprintln!(
                    "overlay {format} {width}x{height}, map {map_size:?}: max pixel diff {max_diff}, \
                     mask flips {mask_flips} of {} ({anomalous} anomalous)",
                    width * height
                );
                assert_eq!(got.pixels.len(), expected.pixels.len());
                assert!(anomalous > 0 && anomalous < width * height);
                assert!(
                    max_diff <= 1 && mask_flips == 0,
                    "{format} {width}x{height}"
                );
            }
        }
    }

    /// The kernels loaded on device 0, or `None` (a printed skip) when there is no CUDA driver.
    fn preprocessor_or_skip(test: &str) -> Option<Preprocessor> {
        if let Some(why) = driver_missing() {
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        // A machine with a GPU but no NVRTC is a broken GPU setup, not a reason to skip.
        if let Some(why) = nvrtc_missing() {
            panic!("the CUDA driver is here but NVRTC is not: {why}");
        }
        match GpuContext::try_new().and_then(|gpu| Preprocessor::new(&gpu)) {
            Ok(preprocessor) => Some(preprocessor),
            Err(e) => panic!("driver and NVRTC are present, yet: {e}"),
        }
    }

    /// Max abs difference between the kernel's tensor and the CPU twin's for `frame`.
    fn diff_to_cpu(
        got: Result<Vec<f32>, GpuError>,
        frame: &RawFrame,
        size: [usize; 2],
        norm: &Normalisation,
    ) -> f32 {
        let got = match got {
            Ok(got) => got,
            Err(e) => panic!("{}: {e}", frame.format),
        };
        let mut expected = vec![0.0; 3 * size[0] * size[1]];
        raw::raw_to_chw(frame, size, norm, &mut expected);
        assert_eq!(got.len(), expected.len());
        got.iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    }

    #[test]
    fn kernels_compile_with_nvrtc_when_it_is_present() {
        if !nvrtc_or_skip("kernels_compile_with_nvrtc_when_it_is_present") {
            return;
        }
        let ptx = match compile_kernels() {
            Ok(ptx) => ptx.to_src(),
            Err(e) => panic!("{e}"),
        };
        eprintln!(
            "NVRTC compiled the preprocessing kernels: {} bytes of PTX",
            ptx.len()
        );
        for kernel in [
            kernels::PREPROCESS_F32,
            kernels::PREPROCESS_F16,
            kernels::OVERLAY_RGB,
        ] {
            assert!(
                ptx.contains(&format!(".entry {kernel}")),
                "{kernel} missing"
            );
        }
        // --fmad=false: the CPU twin has no fused multiply-adds, so neither may the kernels.
        assert!(!ptx.contains("fma.rn.f32"), "fused multiply-add in the PTX");
        assert!(
            ptx.contains("cvt.rn.f16.f32"),
            "no float16 conversion in the PTX"
        );
    }

    #[test]
    fn compile_errors_carry_the_nvrtc_log() {
        if !nvrtc_or_skip("compile_errors_carry_the_nvrtc_log") {
            return;
        }
        let broken = "extern \"C\" __global__ void broken(float* out) { out[0] = undefined_name; }";
        let message = compile_source(broken, "broken.cu")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("broken.cu") && message.contains("undefined_name"),
            "{message}"
        );
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        match (driver_missing(), GpuContext::try_new()) {
            (Some(why), Err(GpuError::NoDriver(message))) => {
                assert_eq!(why, message);
                eprintln!("SKIPPED GPU context checks: {why}");
            }
            (None, Ok(gpu)) => {
                let name = gpu.device_name().unwrap_or_default();
                eprintln!("GPU: {name}");
                assert!(!name.is_empty());
            }
            (missing, result) => panic!(
                "driver check {missing:?} disagrees with context creation {:?}",
                result.err()
            ),
        }
    }

    /// The GPU check of `scripts/gpu-check.sh`: every format, several sizes, against the CPU twin.
    #[test]
    fn kernel_matches_the_cpu_reference_on_every_format() {
        let Some(gpu) = preprocessor_or_skip("kernel_matches_the_cpu_reference_on_every_format")
        else {
            return;
        };
        let norm = IMAGENET;
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random_frame = |width: usize, height: usize| RgbFrame {
            width,
            height,
            pixels: random_bytes(&mut state, width * height * 3),
        };
        let mut staging = Staging::default();
        for (width, height, size) in [
            (640, 480, [256, 256]),
            (37, 23, [64, 48]),
            (1920, 1080, [224, 224]),
        ] {
            let rgb = random_frame(width, height);
            for format in PixelFormat::ALL {
                for align in [1, 64] {
                    let (layout, data) = raw::encode(&rgb, format, align);
                    let frame = match RawFrame::new(format, width, height, layout, &data) {
                        Ok(frame) => frame,
                        Err(e) => panic!("{e}"),
                    };
                    // One staging for every case: buffers are re-made as sizes change.
                    let got = gpu
                        .run(&mut staging, &frame, size, &norm)
                        .and_then(|()| gpu.download(&staging));
                    let max_diff = diff_to_cpu(got, &frame, size, &norm);
                    eprintln!(
                        "{format} {width}x{height} align {align} -> {size:?}: max abs diff {max_diff:e}"
                    );
                    assert!(max_diff <= 1e-3, "{format} {width}x{height}: {max_diff}");
                }
            }
        }
    }

    /// Per-frame preprocessing time on the GPU (run by `scripts/gpu-check.sh` with `--ignored`):
    /// a measurement, printed; it asserts only that the timed buffers still hold the right tensor.
    #[test]
    #[ignore = "a GPU measurement; scripts/gpu-check.sh runs it"]
    fn preprocess_timing_on_the_gpu() {
        let Some(gpu) = preprocessor_or_skip("preprocess_timing_on_the_gpu") else {
            return;
        };
        let norm = IMAGENET;
        for (width, height, format) in [
            (640, 480, PixelFormat::Rgb),
            (1920, 1080, PixelFormat::Nv12),
            (3840, 2160, PixelFormat::Nv12),
        ] {
            let rgb = crate::preprocess::test_frame(width, height, |x, y, c| {
                ((x * 7 + y * 13 + c * 61) % 256) as u8
            });
            let (layout, data) = raw::encode(&rgb, format, 64);
            let frame = match RawFrame::new(format, width, height, layout, &data) {
                Ok(frame) => frame,
                Err(e) => panic!("{e}"),
            };
            let timing = match gpu.time(&frame, [256, 256], &norm, 500) {
                Ok(timing) => timing,
                Err(e) => panic!("{e}"),
            };
            eprintln!(
                "GPU preprocess {format} {width}x{height} -> 256x256: {:.3} ms/frame with upload \
                 ({:.0} frames/s), kernel {:.4} ms",
                timing.end_to_end_ms,
                1e3 / timing.end_to_end_ms,
                timing.kernel_ms
            );
            let got = gpu.to_chw(&frame, [256, 256], &norm);
            let max_diff = diff_to_cpu(got, &frame, [256, 256], &norm);
            assert!(max_diff <= 1e-3, "{format}: {max_diff}");

            // The overlay: a 256x256 map blended over the frame uploaded above, results on the
            // host, against the plain-Rust twin on this CPU (one thread).
            let map: Vec<f32> = (0..256 * 256).map(|i| (i % 97) as f32 / 96.0).collect();
            let calibration = Calibration {
                threshold: 0.5,
                floor: 0.1,
                method: "timing".into(),
                n_images: 1,
                good_median: 0.2,
            };
            let mut staging = Staging::default();
            if let Err(e) = gpu.run(&mut staging, &frame, [256, 256], &norm) {
                panic!("{e}");
            }
            let mut overlay_ms = Vec::new();
            let mut last = None;
            for _ in 0..100 {
                let started = std::time::Instant::now();
                match gpu.overlay(&mut staging, &frame, &map, [256, 256], &calibration) {
                    Ok(heat) => last = Some(heat),
                    Err(e) => panic!("{e}"),
                }
                overlay_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
            overlay_ms.sort_by(f64::total_cmp);
            let mut cpu_ms = Vec::new();
            let mut twin = None;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                twin = crate::overlay::heat::blend(&frame, &map, [256, 256], &calibration).ok();
                cpu_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
            cpu_ms.sort_by(f64::total_cmp);
            eprintln!(
                "GPU overlay {format} {width}x{height}: {:.3} ms/frame with map upload and results \
                 download (median of 100); CPU twin {:.1} ms",
                overlay_ms[overlay_ms.len() / 2],
                cpu_ms[1]
            );
            let masks = (last.map(|heat| heat.mask), twin.map(|heat| heat.mask));
            assert!(
                masks.0.is_some() && masks.0 == masks.1,
                "{format}: the GPU overlay's mask differs from the twin's"
            );
        }
    }
}
