// Window gather (lomar_fast.ops.window_gather), forward only.
//
// One block per window patch (row = b * K + k of the output, patch t in row-major window order).
// In one pass over the patch's pixels the block
//   * reads the p x p x 3 pixels of the image (uint8 NHWC normalized with mean/std, or float NCHW
//     taken as is; any strides),
//   * writes the patch vector, ordered (row in patch, column in patch, channel), in the output dtype
//     - to every position (patches: (B*K, w*w, V)), or
//     - only when the patch is visible, at its rank among the visible patches ((B*K, w*w - n_mask, V)),
//   * and, when the patch is masked, writes its target at its rank among the masked patches
//     (targets: (B*K, n_mask, V) fp32), normalized by its own mean and unbiased variance when
//     norm_pix is set.
// V = p * p * 3.
//
// Compiled at run time by NVRTC (through CuPy) and checked offline by nvcc. No CUDA headers are
// included: the 16-bit float types come from float16_bits.cuh, which the loader inlines
// (lomar_fast.ops._cuda_build.cuda_source), so the source does not depend on NVRTC's include paths.

#include "float16_bits.cuh"

// Pixel loaders: uint8 pixels are normalized ((x / 255 - mean) / std, fp32, as the reference);
// float pixels are taken as they are.
__device__ __forceinline__ float load_pixel(const unsigned char* p, long long off, float mean, float stdv) {
    return ((float)p[off] / 255.0f - mean) / stdv;
}
template <typename T>
__device__ __forceinline__ float load_pixel(const T* p, long long off, float, float) {
    return to_f32(p[off]);
}

#define LOMAR_GATHER_THREADS 256

// Sum over the block; every thread gets the result. `red` holds at least 33 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = (lane < nwarps) ? red[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) red[32] = s;
    }
    __syncthreads();
    const float total = red[32];
    __syncthreads();  // red may be reused by the next call
    return total;
}

// Grid: (B * K * w * w) blocks of LOMAR_GATHER_THREADS threads (a multiple of 32).
// Shared memory: V floats (dynamic).
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(LOMAR_GATHER_THREADS)
window_gather(const TIn* __restrict__ img, long long s_b, long long s_c, long long s_y, long long s_x,
              const long long* __restrict__ windows,    // (B, K, 2) contiguous (top, left) in patches
              const unsigned char* __restrict__ masks,  // (B, K, w*w) contiguous, nonzero = masked
              TOut* __restrict__ patches, float* __restrict__ targets,
              int K, int p, int w, int n_mask, int visible_only, int norm_pix,
              float mean0, float mean1, float mean2, float std0, float std1, float std2) {
    extern __shared__ float vals[];  // [V]
    __shared__ float red[33];
    __shared__ int s_rank;

    const int ww = w * w;
    const int V = p * p * 3;
    const long long row = blockIdx.x / ww;  // b * K + k
    const int t = (int)(blockIdx.x - row * ww);
    const long long b = row / K;
    const unsigned char* mrow = masks + row * ww;
    const bool masked = mrow[t] != 0;

    // rank of patch t among the masked patches of its window: count of masked positions before t
    if (threadIdx.x < 32) {
        int cnt = 0;
        for (int k0 = 0; k0 < t; k0 += 32) {
            const int k = k0 + (int)threadIdx.x;
            const bool mk = (k < t) && (mrow[k] != 0);
            cnt += __popc(__ballot_sync(0xffffffffu, mk));
        }
        if (threadIdx.x == 0) s_rank = cnt;
    }

    const long long top = windows[row * 2 + 0] + t / w;
    const long long left = windows[row * 2 + 1] + t % w;
    const TIn* base = img + b * s_b + (top * p) * s_y + (left * p) * s_x;
    const int p3 = p * 3;

    __syncthreads();
    const int rank = s_rank;  // among masked positions (if masked)
    const int vis_rank = t - rank;  // among visible positions (if visible)

    TOut* prow = nullptr;
    if (!visible_only) {
        prow = patches + (row * ww + t) * (long long)V;
    } else if (!masked && vis_rank < ww - n_mask) {  // a window with too few masked patches: no row past its own
        prow = patches + (row * (ww - n_mask) + vis_rank) * (long long)V;
    }

    float local = 0.f;
    for (int e = threadIdx.x; e < V; e += blockDim.x) {
        const int py = e / p3;
        const int rem = e - py * p3;
        const int px = rem / 3;
        const int c = rem - px * 3;
        const float mc = (c == 0) ? mean0 : ((c == 1) ? mean1 : mean2);
        const float sc = (c == 0) ? std0 : ((c == 1) ? std1 : std2);
        const float v = load_pixel(base, py * s_y + px * s_x + c * s_c, mc, sc);
        if (prow != nullptr) prow[e] = from_f32<TOut>(v);
        vals[e] = v;
        local += v;
    }

    // block-uniform branch: masked and rank are the same for every thread of the block
    if (!masked || rank >= n_mask) return;
    float* trow = targets + (row * n_mask + rank) * (long long)V;
    if (!norm_pix) {
        for (int e = threadIdx.x; e < V; e += blockDim.x) trow[e] = vals[e];
        return;
    }
    const float mean_v = block_sum(local, red) / (float)V;  // block_sum syncs, so vals[] is complete
    float sq = 0.f;
    for (int e = threadIdx.x; e < V; e += blockDim.x) {
        const float dv = vals[e] - mean_v;
        sq += dv * dv;
    }
    const float var = block_sum(sq, red) / (float)(V - 1);
    const float denom = sqrtf(var + 1e-6f);
    for (int e = threadIdx.x; e < V; e += blockDim.x) trow[e] = (vals[e] - mean_v) / denom;
}

// Explicit instantiations (see irpe.cu).
#define LOMAR_GATHER_INST(TIN, TOUT)                                                                    \
    template __global__ void window_gather<TIN, TOUT>(const TIN*, long long, long long, long long, long long, \
                                                      const long long*, const unsigned char*, TOUT*, float*, \
                                                      int, int, int, int, int, int, float, float, float,     \
                                                      float, float, float);
LOMAR_GATHER_INST(unsigned char, float)
LOMAR_GATHER_INST(unsigned char, lomar_bf16)
LOMAR_GATHER_INST(unsigned char, lomar_f16)
LOMAR_GATHER_INST(float, float)
LOMAR_GATHER_INST(float, lomar_bf16)
LOMAR_GATHER_INST(float, lomar_f16)
LOMAR_GATHER_INST(lomar_bf16, float)
LOMAR_GATHER_INST(lomar_bf16, lomar_bf16)
LOMAR_GATHER_INST(lomar_bf16, lomar_f16)
LOMAR_GATHER_INST(lomar_f16, float)
LOMAR_GATHER_INST(lomar_f16, lomar_bf16)
LOMAR_GATHER_INST(lomar_f16, lomar_f16)
