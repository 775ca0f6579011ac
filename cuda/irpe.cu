// Contextual iRPE on keys (lomar_fast.ops.irpe).
//
//   forward:  bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]
//   backward: G[n, h, i, b]    = sum_{j : bucket(i, j) = b} grad_bias[n, h, i, j]
//             (dq = G @ T^T and dT = sum q^T G are dense GEMMs done by cuBLAS on the host side)
//
// Rows are the flattened (n, h, i) triples, m = (n * H + h) * L + i.
//
// The forward writes into a (M, Lp) buffer, Lp = L rounded up to a multiple of 8, padding zeroed,
// which the caller views as (N, H, L, L) with strides (H*L*Lp, L*Lp, Lp, 1): the layout that
// scaled_dot_product_attention's memory-efficient kernel accepts as attn_mask without a copy.
//
// Compiled at run time by NVRTC (through CuPy) and checked offline by nvcc. No CUDA headers are
// included: the 16-bit float types come from float16_bits.cuh, which the loader inlines
// (lomar_fast.ops._cuda_build.cuda_source), so the source does not depend on NVRTC's include paths.

#include "float16_bits.cuh"

#define LOMAR_IRPE_ROWS 32      // rows of the flattened (n, h, i) space per tile
#define LOMAR_IRPE_THREADS 256  // threads per block of the forward kernel

// Forward. Each lane owns one bucket column b and keeps T[:, b] in registers (D of them); the
// queries of a tile of rows are staged in shared memory as fp32 and read as broadcasts, so each
// dot product costs D FMAs and D/4 shared loads. The (rows x NB) projections then go to shared
// memory and every output element is one shared-memory lookup by bucket.
//
// Grid-stride over tiles; the block must have LOMAR_IRPE_THREADS threads and NB <= 32 * 8.
// Shared memory: LOMAR_IRPE_ROWS * (D + 32 * ceil(NB / 32)) floats.
template <typename T, int D>
__global__ void __launch_bounds__(LOMAR_IRPE_THREADS)
irpe_fwd(const T* __restrict__ q, long long q_sn, long long q_sh, long long q_si, long long q_sd,
         const T* __restrict__ table,             // (D, NB) contiguous, in q's dtype
         const long long* __restrict__ buckets,   // (L, L) contiguous
         T* __restrict__ out,                     // (M, Lp) contiguous
         int H, int L, int NB, int Lp, long long M) {
    extern __shared__ float4 smem_fwd[];
    float* qs = reinterpret_cast<float*>(smem_fwd);  // [ROWS][D]
    const int nchunks = (NB + 31) / 32;
    const int nbp = nchunks * 32;
    float* qt = qs + LOMAR_IRPE_ROWS * D;              // [ROWS][nbp]

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const int chunk = warp % nchunks;
    const int group = warp / nchunks;
    const int ngroups = nwarps / nchunks;
    const int b = chunk * 32 + lane;

    float tcol[D];
#pragma unroll
    for (int d = 0; d < D; ++d) tcol[d] = (b < NB) ? to_f32(table[d * NB + b]) : 0.f;

    const float nan = __int_as_float(0x7fffffff);
    const long long ntiles = (M + LOMAR_IRPE_ROWS - 1) / LOMAR_IRPE_ROWS;
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long m0 = tile * LOMAR_IRPE_ROWS;
        const int rows = (int)min((long long)LOMAR_IRPE_ROWS, M - m0);

        for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
            const int r = e / D;
            const int d = e - r * D;
            const long long m = m0 + r;
            const long long nh = m / L;
            const long long i = m - nh * L;
            const long long n = nh / H;
            const long long h = nh - n * H;
            qs[e] = to_f32(q[n * q_sn + h * q_sh + i * q_si + d * q_sd]);
        }
        __syncthreads();

        if (group < ngroups) {
            for (int r = group; r < rows; r += ngroups) {
                const float4* qr = reinterpret_cast<const float4*>(qs + r * D);
                float acc = 0.f;
#pragma unroll
                for (int d4 = 0; d4 < D / 4; ++d4) {
                    const float4 v = qr[d4];
                    acc = fmaf(v.x, tcol[4 * d4 + 0], acc);
                    acc = fmaf(v.y, tcol[4 * d4 + 1], acc);
                    acc = fmaf(v.z, tcol[4 * d4 + 2], acc);
                    acc = fmaf(v.w, tcol[4 * d4 + 3], acc);
                }
                qt[r * nbp + b] = acc;
            }
        }
        __syncthreads();

        T* orow = out + m0 * Lp;
        for (int e = threadIdx.x; e < rows * Lp; e += blockDim.x) {
            const int r = e / Lp;
            const int j = e - r * Lp;
            float v = 0.f;
            if (j < L) {
                const long long i = (m0 + r) % L;
                const long long bk = buckets[i * L + j];
                v = (bk >= 0 && bk < NB) ? qt[r * nbp + (int)bk] : nan;
            }
            orow[e] = from_f32<T>(v);
        }
        __syncthreads();
    }
}

// Backward bucket reduction: G[m, b] = sum_{j : bucket(i, j) = b} g[m, j], accumulated in fp32
// in shared memory (no global atomics), written once in the gradient's dtype.
//
// A tile of `rows` rows is staged in shared memory (gradient as fp32, bucket ids as int; row
// stride ls = L | 1 so that lanes walking different rows hit different banks). Then `parts`
// threads per row each sum a contiguous slice of the row into a private partial row (stride
// nbs = NB | 1); the partials are added in a fixed order, so the result is deterministic.
//
// blockDim.x = rows * parts. Shared memory: rows * (2 * ls + parts * nbs) floats.
template <typename T>
__global__ void irpe_bwd_reduce(const T* __restrict__ g, long long g_sn, long long g_sh, long long g_si, long long g_sj,
                                const long long* __restrict__ buckets,  // (L, L) contiguous
                                T* __restrict__ G,                     // (M, NB) contiguous
                                int H, int L, int NB, long long M, int rows_per_tile, int parts) {
    extern __shared__ float4 smem_bwd[];
    const int ls = L | 1;
    const int nbs = NB | 1;
    float* gs = reinterpret_cast<float*>(smem_bwd);          // [rows][ls]
    int* bs = reinterpret_cast<int*>(gs + rows_per_tile * ls);  // [rows][ls]
    float* part = reinterpret_cast<float*>(bs + rows_per_tile * ls);  // [parts][rows][nbs]

    const int chunk = (L + parts - 1) / parts;
    const long long ntiles = (M + rows_per_tile - 1) / rows_per_tile;
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long m0 = tile * rows_per_tile;
        const int rows = (int)min((long long)rows_per_tile, M - m0);

        for (int e = threadIdx.x; e < rows * L; e += blockDim.x) {
            const int r = e / L;
            const int j = e - r * L;
            const long long m = m0 + r;
            const long long nh = m / L;
            const long long i = m - nh * L;
            const long long n = nh / H;
            const long long h = nh - n * H;
            gs[r * ls + j] = to_f32(g[n * g_sn + h * g_sh + i * g_si + j * g_sj]);
            bs[r * ls + j] = (int)buckets[i * L + j];
        }
        for (int e = threadIdx.x; e < parts * rows_per_tile * nbs; e += blockDim.x) part[e] = 0.f;
        __syncthreads();

        {
            const int r = threadIdx.x % rows_per_tile;
            const int p = threadIdx.x / rows_per_tile;
            if (r < rows && p < parts) {
                float* acc = part + (p * rows_per_tile + r) * nbs;
                const int j1 = min(L, (p + 1) * chunk);
                for (int j = p * chunk; j < j1; ++j) {
                    const int bk = bs[r * ls + j];
                    if (bk >= 0 && bk < NB) acc[bk] += gs[r * ls + j];
                }
            }
        }
        __syncthreads();

        T* grow = G + m0 * NB;
        for (int e = threadIdx.x; e < rows * NB; e += blockDim.x) {
            const int r = e / NB;
            const int bk = e - r * NB;
            float s = 0.f;
            for (int p = 0; p < parts; ++p) s += part[(p * rows_per_tile + r) * nbs + bk];
            grow[e] = from_f32<T>(s);
        }
        __syncthreads();
    }
}

// Explicit instantiations: nvcc then compiles (and warns about) every variant the runtime can
// ask NVRTC for; NVRTC finds the same ones by name expression.
template __global__ void irpe_fwd<float, 32>(const float*, long long, long long, long long, long long, const float*, const long long*, float*, int, int, int, int, long long);
template __global__ void irpe_fwd<float, 64>(const float*, long long, long long, long long, long long, const float*, const long long*, float*, int, int, int, int, long long);
template __global__ void irpe_fwd<float, 128>(const float*, long long, long long, long long, long long, const float*, const long long*, float*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_bf16, 32>(const lomar_bf16*, long long, long long, long long, long long, const lomar_bf16*, const long long*, lomar_bf16*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_bf16, 64>(const lomar_bf16*, long long, long long, long long, long long, const lomar_bf16*, const long long*, lomar_bf16*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_bf16, 128>(const lomar_bf16*, long long, long long, long long, long long, const lomar_bf16*, const long long*, lomar_bf16*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_f16, 32>(const lomar_f16*, long long, long long, long long, long long, const lomar_f16*, const long long*, lomar_f16*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_f16, 64>(const lomar_f16*, long long, long long, long long, long long, const lomar_f16*, const long long*, lomar_f16*, int, int, int, int, long long);
template __global__ void irpe_fwd<lomar_f16, 128>(const lomar_f16*, long long, long long, long long, long long, const lomar_f16*, const long long*, lomar_f16*, int, int, int, int, long long);
template __global__ void irpe_bwd_reduce<float>(const float*, long long, long long, long long, long long, const long long*, float*, int, int, int, long long, int, int);
template __global__ void irpe_bwd_reduce<lomar_bf16>(const lomar_bf16*, long long, long long, long long, long long, const long long*, lomar_bf16*, int, int, int, long long, int, int);
template __global__ void irpe_bwd_reduce<lomar_f16>(const lomar_f16*, long long, long long, long long, long long, const long long*, lomar_f16*, int, int, int, long long, int, int);
