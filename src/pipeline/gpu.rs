//! A camera's work on the GPU (the `gpu` feature, engine on CUDA or TensorRT): in the analyser,
//! the preprocessing kernel writes the model input on the device, where the engine reads it; in
//! the worker, the overlay kernel blends the heatmap and makes the anomaly mask (each thread has
//! its own stage and uploads the frame itself). Outlines, boxes and the caption are drawn on the
//! host (`overlay::live`).

use crate::bundle::{Calibration, Manifest};
use crate::engine::ExecutionProvider;
use crate::engine::batch::{DeviceInput, ScoreError};
use crate::gpu::{GpuContext, GpuError, Preprocessor, Staging};
use crate::overlay::heat::Heat;
use crate::preprocess::RgbFrame;
use crate::preprocess::raw::{PixelFormat, PlaneLayout, RawFrame};

/// One camera's kernels and buffers.
pub(super) struct GpuStage {
    kernels: Preprocessor,
    staging: Staging,
}

impl GpuStage {
    /// A GPU stage doing `what` for `camera` when the engine runs on a GPU `provider`; `None` on
    /// the CPU, or when the kernels cannot be used (said once; the camera then uses the host path).
    pub(super) fn for_camera(
        provider: ExecutionProvider,
        camera: &str,
        what: &str,
    ) -> Option<Self> {
        if provider == ExecutionProvider::Cpu {
            return None;
        }
        match GpuContext::try_new().and_then(|gpu| Preprocessor::new(&gpu)) {
            Ok(kernels) => {
                log::info!("[{camera}] {what} on the GPU");
                Some(Self {
                    kernels,
                    staging: Staging::default(),
                })
            }
            Err(e) => {
                log::warn!("[{camera}] GPU kernels unavailable ({e}): {what} on the CPU");
                None
            }
        }
    }

    /// Uploads `frame` and preprocesses it into the model input on the device (waits for it, so
    /// the preprocessing stage's time is its own).
    pub(super) fn preprocess(
        &mut self,
        frame: &RgbFrame,
        manifest: &Manifest,
    ) -> Result<(), GpuError> {
        let raw = raw_rgb(frame)?;
        let size = manifest.model.input_size;
        self.kernels
            .run(&mut self.staging, &raw, size, &manifest.normalisation)?;
        self.kernels
            .stream()
            .synchronize()
            .map_err(|e| GpuError::Driver {
                call: "cuStreamSynchronize",
                message: e.to_string(),
            })
    }

    /// Where [`GpuStage::preprocess`] left the model input on the device, for the session (which
    /// reads it in place, or gathers it into a batch with other cameras' inputs). The buffer stays
    /// this stage's and unchanged until the next `preprocess`, which this camera's analyser only
    /// calls after its inference call has returned.
    pub(super) fn device_input(&self) -> Result<DeviceInput, ScoreError> {
        use cudarc::driver::DevicePtr;

        let input = self
            .staging
            .output()
            .ok_or_else(|| ScoreError::Gpu("no preprocessed input on the GPU".into()))?;
        let (pointer, _record) = input.device_ptr(self.kernels.stream());
        // SAFETY: `preprocess` synchronised the stream that wrote the buffer, and the buffer is
        // this stage's: only the next `preprocess` changes or frees it, and this camera's analyser
        // calls that only after the inference call this input is handed to has returned.
        Ok(unsafe { DeviceInput::new(pointer, input.len()) })
    }

    /// Uploads `frame` and blends the heatmap of `map` over it; returns the pixels and the mask.
    pub(super) fn heat(
        &mut self,
        frame: &RgbFrame,
        map: &[f32],
        map_size: [usize; 2],
        calibration: &Calibration,
    ) -> Result<Heat, GpuError> {
        let raw = raw_rgb(frame)?;
        self.kernels.upload(&mut self.staging, &raw)?;
        self.kernels
            .overlay(&mut self.staging, &raw, map, map_size, calibration)
    }
}

/// `frame`'s packed RGB pixels as the kernels read them.
fn raw_rgb(frame: &RgbFrame) -> Result<RawFrame<'_>, GpuError> {
    let layout = PlaneLayout::packed(PixelFormat::Rgb, frame.width, frame.height);
    RawFrame::new(
        PixelFormat::Rgb,
        frame.width,
        frame.height,
        layout,
        &frame.pixels,
    )
    .map_err(|e| GpuError::Driver {
        call: "frame layout",
        message: e.to_string(),
    })
}
