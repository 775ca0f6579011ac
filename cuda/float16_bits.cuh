// 16-bit float types carried as raw bits, and their conversions to and from fp32, shared by the kernels.
// No CUDA headers are included, so the sources do not depend on which headers NVRTC can find.
// bf16 rounds to nearest even and keeps NaN a (quiet) NaN; fp16 converts with PTX cvt.
#pragma once

struct lomar_bf16 { unsigned short bits; };
struct lomar_f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(lomar_bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }
__device__ __forceinline__ float to_f32(lomar_f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ lomar_bf16 from_f32<lomar_bf16>(float x) {
    unsigned int u = __float_as_uint(x);
    lomar_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}
template <> __device__ __forceinline__ lomar_f16 from_f32<lomar_f16>(float x) {
    lomar_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
