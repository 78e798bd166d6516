//! CUDA C source of the preprocessing kernels, compiled at start-up by NVRTC. The maths is
//! `preprocess::raw::raw_to_chw`'s op for op (half-pixel bilinear taps, edges clamped, BT.601
//! limited-range YUV, per-channel scale/offset); compiled with `--fmad=false` so that no multiply
//! and add are fused and results match the CPU twin to float rounding.

use crate::preprocess::raw::PixelFormat;

/// Name of the float32 kernel in [`PREPROCESS_CU`].
pub const PREPROCESS_F32: &str = "stpm_preprocess_f32";
/// Name of the float16 kernel (same maths, output rounded to half) for FP16 engines.
pub const PREPROCESS_F16: &str = "stpm_preprocess_f16";
/// Name of the overlay kernel: `overlay::heat::blend` on the GPU.
pub const OVERLAY_RGB: &str = "stpm_overlay_rgb";

/// The format code the kernels switch on.
pub fn format_code(format: PixelFormat) -> i32 {
    match format {
        PixelFormat::Rgb => 0,
        PixelFormat::Bgr => 1,
        PixelFormat::Rgbx => 2,
        PixelFormat::Bgrx => 3,
        PixelFormat::Nv12 => 4,
        PixelFormat::I420 => 5,
    }
}

/// Kernel source. One thread per output pixel writes its three channels; launch with a 2-D grid
/// covering `out_w`×`out_h`. Arguments (both kernels):
/// `frame` (bytes of one frame, all planes), `format` ([`format_code`]), `width`, `height`,
/// `stride0..2` (bytes per row of each plane), `offset1`, `offset2` (byte offsets of planes 1 and 2),
/// `out`, `out_offset` (elements: image index × 3 × out_h × out_w), `out_w`, `out_h`,
/// `scale0..2` = 1 / (255·std), `shift0..2` = mean / std.
pub const PREPROCESS_CU: &str = r#"
// stpm-stream preprocessing (src/gpu/kernels.rs): frame in its GStreamer format -> NCHW tensor.
// Keep in step with src/preprocess/raw.rs (the CPU twin) and src/preprocess/mod.rs (bilinear_taps).

#define FORMAT_RGB 0
#define FORMAT_BGR 1
#define FORMAT_RGBX 2
#define FORMAT_BGRX 3
#define FORMAT_NV12 4
#define FORMAT_I420 5

// bilinear_taps: half-pixel centres (OpenCV INTER_LINEAR, PyTorch align_corners=False).
__device__ __forceinline__ void bilinear_taps(int out_index, int in_size, int out_size,
                                              int* low, int* high, float* weight) {
    float scale = (float)in_size / (float)out_size;
    float src = fmaxf(((float)out_index + 0.5f) * scale - 0.5f, 0.0f);
    int first = min((int)floorf(src), in_size - 1);
    *low = first;
    *high = min(first + 1, in_size - 1);
    *weight = src - (float)first;
}

__device__ __forceinline__ float clamp_255(float value) {
    return fminf(fmaxf(value, 0.0f), 255.0f);
}

// BT.601 limited range, the literals of preprocess::raw::yuv_to_rgb.
__device__ __forceinline__ float3 yuv_to_rgb(float y, float u, float v) {
    float luma = 1.164383f * (y - 16.0f);
    float d = u - 128.0f;
    float e = v - 128.0f;
    float r = luma + 1.596027f * e;
    float g = luma - 0.391762f * d - 0.812968f * e;
    float b = luma + 2.017232f * d;
    return make_float3(clamp_255(r), clamp_255(g), clamp_255(b));
}

struct Frame {
    const unsigned char* bytes;
    int format;
    int stride0, stride1, stride2;
    long long offset1, offset2;
};

// RGB of pixel (x, y); NV12/I420 chroma is the sample of the 2x2 block the pixel is in.
__device__ __forceinline__ float3 rgb_at(const Frame& frame, int x, int y) {
    const unsigned char* row = frame.bytes + (long long)y * frame.stride0;
    switch (frame.format) {
    case FORMAT_NV12: {
        const unsigned char* uv =
            frame.bytes + frame.offset1 + (long long)(y / 2) * frame.stride1 + (x / 2) * 2;
        return yuv_to_rgb((float)row[x], (float)uv[0], (float)uv[1]);
    }
    case FORMAT_I420: {
        float u = (float)frame.bytes[frame.offset1 + (long long)(y / 2) * frame.stride1 + x / 2];
        float v = (float)frame.bytes[frame.offset2 + (long long)(y / 2) * frame.stride2 + x / 2];
        return yuv_to_rgb((float)row[x], u, v);
    }
    case FORMAT_RGBX: { const unsigned char* p = row + x * 4; return make_float3(p[0], p[1], p[2]); }
    case FORMAT_BGRX: { const unsigned char* p = row + x * 4; return make_float3(p[2], p[1], p[0]); }
    case FORMAT_BGR:  { const unsigned char* p = row + x * 3; return make_float3(p[2], p[1], p[0]); }
    default:          { const unsigned char* p = row + x * 3; return make_float3(p[0], p[1], p[2]); }
    }
}

__device__ __forceinline__ float bilinear(float p00, float p01, float p10, float p11,
                                          float wx, float wy) {
    float top = p00 * (1.0f - wx) + p01 * wx;
    float bottom = p10 * (1.0f - wx) + p11 * wx;
    return top * (1.0f - wy) + bottom * wy;
}

// The three normalised channel values of output pixel (x, y).
__device__ __forceinline__ float3 preprocess_pixel(const Frame& frame, int width, int height,
                                                   int x, int y, int out_w, int out_h,
                                                   float3 scale, float3 shift) {
    int x0, x1, y0, y1;
    float wx, wy;
    bilinear_taps(x, width, out_w, &x0, &x1, &wx);
    bilinear_taps(y, height, out_h, &y0, &y1, &wy);
    float3 p00 = rgb_at(frame, x0, y0);
    float3 p01 = rgb_at(frame, x1, y0);
    float3 p10 = rgb_at(frame, x0, y1);
    float3 p11 = rgb_at(frame, x1, y1);
    return make_float3(bilinear(p00.x, p01.x, p10.x, p11.x, wx, wy) * scale.x - shift.x,
                       bilinear(p00.y, p01.y, p10.y, p11.y, wx, wy) * scale.y - shift.y,
                       bilinear(p00.z, p01.z, p10.z, p11.z, wx, wy) * scale.z - shift.z);
}

#define PREPROCESS_ARGS                                                                        \
    const unsigned char* bytes, int format, int width, int height, int stride0, int stride1,   \
    int stride2, long long offset1, long long offset2
#define OUTPUT_ARGS                                                                            \
    long long out_offset, int out_w, int out_h, float scale0, float scale1, float scale2,       \
    float shift0, float shift1, float shift2

#define PREPROCESS_BODY                                                                        \
    int x = blockIdx.x * blockDim.x + threadIdx.x;                                             \
    int y = blockIdx.y * blockDim.y + threadIdx.y;                                             \
    if (x >= out_w || y >= out_h) return;                                                      \
    Frame frame = {bytes, format, stride0, stride1, stride2, offset1, offset2};                \
    float3 value = preprocess_pixel(frame, width, height, x, y, out_w, out_h,                  \
                                    make_float3(scale0, scale1, scale2),                       \
                                    make_float3(shift0, shift1, shift2));                      \
    long long plane = (long long)out_w * out_h;                                                \
    long long at = out_offset + (long long)y * out_w + x;

extern "C" __global__ void stpm_preprocess_f32(PREPROCESS_ARGS, float* out, OUTPUT_ARGS) {
    PREPROCESS_BODY
    out[at] = value.x;
    out[at + plane] = value.y;
    out[at + 2 * plane] = value.z;
}

// float -> IEEE half, round to nearest even (no cuda_fp16.h needed under NVRTC).
__device__ __forceinline__ unsigned short to_half(float value) {
    unsigned short half;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half) : "f"(value));
    return half;
}

extern "C" __global__ void stpm_preprocess_f16(PREPROCESS_ARGS, unsigned short* out,
                                               OUTPUT_ARGS) {
    PREPROCESS_BODY
    out[at] = to_half(value.x);
    out[at + plane] = to_half(value.y);
    out[at + 2 * plane] = to_half(value.z);
}

// overlay::heat::blend, op for op: the raw map (map_w x map_h) resized to the frame, normalised
// with the calibration (threshold -> 0.5, floor -> 0), JET blended where the level (normalised x 255,
// rounded) is above 127; packed RGB out and a 0/255 mask. One thread per frame pixel.
__device__ __forceinline__ float jet_channel(float v, float offset) {
    return roundf(fminf(fmaxf(1.5f - fabsf(4.0f * v - offset), 0.0f), 1.0f) * 255.0f);
}

__device__ __forceinline__ unsigned char to_byte(float value) {
    return (unsigned char)fminf(fmaxf(roundf(value), 0.0f), 255.0f);
}

extern "C" __global__ void stpm_overlay_rgb(PREPROCESS_ARGS, const float* map, int map_w,
                                            int map_h, float threshold, float floor_value,
                                            unsigned char* out, unsigned char* mask) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= width || y >= height) return;
    Frame frame = {bytes, format, stride0, stride1, stride2, offset1, offset2};
    int x0, x1, y0, y1;
    float wx, wy;
    bilinear_taps(x, map_w, width, &x0, &x1, &wx);
    bilinear_taps(y, map_h, height, &y0, &y1, &wy);
    float raw = bilinear(map[y0 * map_w + x0], map[y0 * map_w + x1], map[y1 * map_w + x0],
                         map[y1 * map_w + x1], wx, wy);
    float span = fmaxf(threshold - floor_value, 1.1920929e-7f);
    float normalised = fminf(fmaxf(0.5f + 0.5f * (raw - threshold) / span, 0.0f), 1.0f);
    int level = (int)roundf(normalised * 255.0f);
    float3 p = rgb_at(frame, x, y);
    long long at = (long long)y * width + x;
    unsigned char* pixel = out + at * 3;
    if (level > 127) {
        float v = (float)level / 255.0f;
        pixel[0] = to_byte(p.x * (1.0f - 0.6f) + jet_channel(v, 3.0f) * 0.6f);
        pixel[1] = to_byte(p.y * (1.0f - 0.6f) + jet_channel(v, 2.0f) * 0.6f);
        pixel[2] = to_byte(p.z * (1.0f - 0.6f) + jet_channel(v, 1.0f) * 0.6f);
        mask[at] = 255;
    } else {
        pixel[0] = to_byte(p.x);
        pixel[1] = to_byte(p.y);
        pixel[2] = to_byte(p.z);
        mask[at] = 0;
    }
}
"#;
