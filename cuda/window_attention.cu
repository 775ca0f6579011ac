// Fused window attention with the contextual iRPE key term (lomar_fast.ops.window_attention).
//
// For one sequence n and head h (L tokens, head_dim D, a (D, NB) table T shared by the heads):
//
//   s[i, j]  = scale * q_i . k_j + q_i . T[:, bucket(i, j)]
//   P[i, :]  = softmax_j s[i, :],   out_i = sum_j P[i, j] v_j,   lse_i = log sum_j exp s[i, j]
//
// Backward, with P recomputed from the saved lse (fp32):
//
//   dv_j     = sum_i P[i, j] do_i
//   dS[i, j] = P[i, j] (do_i . v_j - do_i . out_i)
//   G[i, b]  = sum_{j : bucket(i, j) = b} dS[i, j]
//   dq_i     = scale * sum_j dS[i, j] k_j + sum_b G[i, b] T[:, b]
//   dk_j     = scale * sum_i dS[i, j] q_i
//   dT[:, b] = sum over every (n, h, i) of q_i G[i, b]
//
// Work split. One block of WA_THREADS threads handles one (n, h) pair at a time and loops over the pairs
// (grid-stride, the grid sized to the resident blocks), so the per-block setup - T^T and the bucket ids
// (and, in the backward, the per-row bucket lists) staged in shared memory - is paid once per block,
// not once per pair. Everything of a pair lives in shared memory as fp32: the q, k, v (and dout) rows,
// the scores and probabilities, dS and G. Inputs are read with 16-byte loads when every row is 16-byte
// aligned (`vec`), element by element otherwise; only the last dimension must be contiguous.
//
// Two kernels per head_dim, by the template argument TC. TC = false: the three kinds of products are small fp32
// GEMMs on CUDA cores with register tiles:
//   * A B^T (scores, dP): a warp owns 8 rows (4 per half-warp), a thread 4 rows x up to 8 columns
//     strided by 16; warps whose rows are all past L skip the work;
//   * A B and A^T B (P v, dq; dv, dk, dT): a thread owns RPT contiguous rows x 4 contiguous columns.
// The iRPE term is folded into the score GEMM: T^T is stored as NB extra "key" rows, so one GEMM gives
// [q k^T | q T] (L x (L4 + NB)); each logit then adds one shared-memory lookup by bucket. In the
// backward, the dq GEMM runs over [dS | G] against [k ; T^T] the same way.
//
// TC = true (bf16 I/O only; the launcher's choice on sm_80 and newer): every product runs on tensor cores as
// mma.sync m16n8k16 with bf16 operands and fp32 accumulation (see "tensor-core products" below). Each warp
// owns a 16-row strip of the product and a run of 8-column tiles; the operands are read from the same fp32
// shared tiles (rounded to bf16 as they are read) and the results go to the same places, so the loads, the
// softmax, the bucket sums G and the layout are shared by both kernels. The table and the probabilities and
// dS enter the products rounded to bf16, as under autocast; softmax, lse and every accumulation stay fp32.
//
// dT: each block keeps its dT contribution (up to 64 x D) in registers across all the pairs it handles
// and writes it once, as a per-block partial, at the end; window_attention_dtable_reduce then sums the
// partials in a fixed order. No atomics: the result is deterministic, and the partials are only
// (blocks x D x NB) floats (a few MB), where one global atomic per (d, b) per pair would put about
// 12k atomics on each of the D x NB addresses at ViT-B sizes.
//
// Shared memory (see wa_layout): the fp32 tiles need more than the default 48 KB for head_dim 64 (about
// 58 KB forward, 100 KB backward at L = 50, NB = 50: 3 and 2 resident blocks per SM on an H100, 2 and 1
// on an A100), so the launcher opts in to the device's larger dynamic shared memory
// (cudaFuncAttributeMaxDynamicSharedMemorySize). fp32 tiles keep the inner loops free of conversions and
// let fp32 inputs use the same code; bf16 tiles would halve the q/k/v part at the price of a conversion
// per operand load. In the forward the score tile reuses the space of q and k, which are dead once the
// scores are in registers.
//
// The I/O dtype (fp32, bf16, fp16) is a run-time argument: one compiled kernel per head_dim, which keeps
// the NVRTC build at first use (and the offline nvcc check) about half as long as a template per
// dtype; the dtype switches sit in the loads and stores only.
//
// Limits: L <= WA_MAX_L, NB <= WA_MAX_NB, D in {32, 64, 80, 128}; the Python side checks them and the
// shared-memory size against the device, and uses the PyTorch computation otherwise. A bucket id outside
// [0, NB) makes its row NaN.
//
// Compiled at run time by NVRTC (through CuPy) and checked offline by nvcc. No CUDA headers are
// included: the 16-bit float types come from float16_bits.cuh, which the loader inlines
// (lomar_fast.ops._cuda_build.cuda_source), so the source does not depend on NVRTC's include paths.

#include "float16_bits.cuh"

#define WA_THREADS 256
#define WA_WARPS (WA_THREADS / 32)
#define WA_MAX_L 64
#define WA_MAX_NB 64
#define WA_BAD_BUCKET 255

__device__ __forceinline__ int wa_round4(int x) { return (x + 3) & ~3; }

// ---------------------------------------------------------------------------------------------------
// Shared-memory layout. Offsets in floats from the start of the dynamic shared memory; the byte arrays
// (bucket ids, bucket lists) follow the floats. Row strides: DS = D + 4 floats for the D-wide rows (an
// odd number of float4s, so 16-byte loads of consecutive rows hit different banks), SE for the score rows
// (columns [0, L4): scores / P / dS; [L4, L4 + NB4): q T / G; then at least 8 columns of slack for the
// A^T B loads that run past the last valid row). The Python launcher mirrors these formulas
// (lomar_fast.ops._window_attention_cuda.shared_bytes); a test compares both.
// ---------------------------------------------------------------------------------------------------
struct WaLayout {
    int L4, NB4, DS, SE;
    int f_v, f_tt, f_end;                                    // forward: q at 0, k at L4*DS, scores at 0
    int b_k, b_v, b_do, b_tt, b_sx, b_lse, b_delta, b_end;   // backward: q at 0
};

__device__ __forceinline__ WaLayout wa_layout(int L, int NB, int D) {
    WaLayout w;
    w.L4 = wa_round4(L);
    w.NB4 = wa_round4(NB);
    w.DS = D + 4;
    w.SE = (w.L4 + w.NB4 + 8) | 4;
    const int rows = w.L4 * w.DS;
    const int qk = max(2 * rows, L * w.SE);
    w.f_v = qk;
    w.f_tt = qk + rows;
    w.f_end = w.f_tt + w.NB4 * w.DS;
    w.b_k = rows;
    w.b_v = 2 * rows;
    w.b_do = 3 * rows;
    w.b_tt = 4 * rows;
    w.b_sx = w.b_tt + w.NB4 * w.DS;
    w.b_lse = w.b_sx + L * w.SE;
    w.b_delta = w.b_lse + WA_MAX_L;
    w.b_end = w.b_delta + WA_MAX_L;
    return w;
}

// Dynamic shared memory of each kernel, in bytes.
__device__ __forceinline__ int wa_fwd_shared_bytes(int L, int NB, int D) {
    return 4 * wa_layout(L, NB, D).f_end + ((L * L + 15) & ~15);
}
__device__ __forceinline__ int wa_bwd_shared_bytes(int L, int NB, int D) {
    return 4 * wa_layout(L, NB, D).b_end + ((2 * L * L + L * (NB + 1) + 15) & ~15);
}

// Thread tiling of the A B and A^T B products: GC groups of 4 columns, TR groups of RPT contiguous rows
// (RPT even, TR * RPT >= 64 rows). For D = 80 only TR * GC = 240 threads take part.
template <int D>
struct WaTile {
    static constexpr int GC = D / 4;
    static constexpr int TR = WA_THREADS / GC;
    static constexpr int RPT = ((WA_MAX_L + TR - 1) / TR + 1) & ~1;
};

// ---------------------------------------------------------------------------------------------------
// global <-> shared conversions
// ---------------------------------------------------------------------------------------------------
// The I/O element type is a run-time argument (one compiled kernel per head_dim serves all three):
// WA_F32, WA_BF16 or WA_F16. The switches are uniform across the block, and the conversions sit only in
// the loads and stores, outside the inner loops.
#define WA_F32 0
#define WA_BF16 1
#define WA_F16 2

__device__ __forceinline__ float wa_half_to_f32(unsigned int bits, int dtype) {
    if (dtype == WA_BF16) {
        lomar_bf16 x;
        x.bits = (unsigned short)bits;
        return to_f32(x);
    }
    lomar_f16 x;
    x.bits = (unsigned short)bits;
    return to_f32(x);
}
__device__ __forceinline__ unsigned int wa_f32_to_half(float f, int dtype) {
    if (dtype == WA_BF16) return from_f32<lomar_bf16>(f).bits;
    return from_f32<lomar_f16>(f).bits;
}
__device__ __forceinline__ unsigned int wa_pack(float a, float b, int dtype) {
    return wa_f32_to_half(a, dtype) | (wa_f32_to_half(b, dtype) << 16);
}

// One element of the I/O type at byte address p, as fp32.
__device__ __forceinline__ float wa_load1(const unsigned char* p, int dtype) {
    if (dtype == WA_F32) return *reinterpret_cast<const float*>(p);
    return wa_half_to_f32(*reinterpret_cast<const unsigned short*>(p), dtype);
}

// A 16-byte chunk (4 fp32 or 8 16-bit values) to fp32 at dst (16-byte aligned).
__device__ __forceinline__ void wa_chunk(float* dst, uint4 u, int dtype) {
    if (dtype == WA_F32) {
        float4 a;
        a.x = __uint_as_float(u.x); a.y = __uint_as_float(u.y); a.z = __uint_as_float(u.z); a.w = __uint_as_float(u.w);
        *reinterpret_cast<float4*>(dst) = a;
    } else {
        float4 a, b;
        a.x = wa_half_to_f32(u.x & 0xffffu, dtype); a.y = wa_half_to_f32(u.x >> 16, dtype);
        a.z = wa_half_to_f32(u.y & 0xffffu, dtype); a.w = wa_half_to_f32(u.y >> 16, dtype);
        b.x = wa_half_to_f32(u.z & 0xffffu, dtype); b.y = wa_half_to_f32(u.z >> 16, dtype);
        b.z = wa_half_to_f32(u.w & 0xffffu, dtype); b.w = wa_half_to_f32(u.w >> 16, dtype);
        reinterpret_cast<float4*>(dst)[0] = a;
        reinterpret_cast<float4*>(dst)[1] = b;
    }
}

// Four consecutive values to byte address p (16-byte aligned for fp32, 8-byte for the 16-bit types).
__device__ __forceinline__ void wa_store4(unsigned char* p, float a, float b, float c, float d, int dtype) {
    if (dtype == WA_F32) {
        float4 f;
        f.x = a; f.y = b; f.z = c; f.w = d;
        *reinterpret_cast<float4*>(p) = f;
    } else {
        uint2 u;
        u.x = wa_pack(a, b, dtype);
        u.y = wa_pack(c, d, dtype);
        *reinterpret_cast<uint2*>(p) = u;
    }
}

// Rows [0, L) of an (L, D) matrix at byte address src (row stride `row_stride` bytes, last dimension
// contiguous) into shared memory as fp32 with row stride D + 4; rows [L, L4) are zeroed. With `vec`,
// src and row_stride are multiples of 16 bytes.
template <int D>
__device__ __forceinline__ void wa_load_rows(float* dst, const unsigned char* __restrict__ src, long long row_stride,
                                             int L, int L4, int dtype, int vec) {
    constexpr int DS = D + 4;
    if (vec) {
        const int ve = (dtype == WA_F32) ? 4 : 8;  // elements per 16-byte chunk
        const int cpr = D / ve;                    // chunks per row
        for (int e = threadIdx.x; e < L4 * cpr; e += WA_THREADS) {
            const int r = e / cpr;
            const int c = e - r * cpr;
            float* d = dst + r * DS + c * ve;
            if (r < L) {
                wa_chunk(d, *reinterpret_cast<const uint4*>(src + r * row_stride + c * 16), dtype);
            } else {
                for (int t = 0; t < ve; ++t) d[t] = 0.f;
            }
        }
    } else {
        const int es = (dtype == WA_F32) ? 4 : 2;
        for (int e = threadIdx.x; e < L4 * D; e += WA_THREADS) {
            const int r = e / D;
            const int c = e - r * D;
            dst[r * DS + c] = (r < L) ? wa_load1(src + r * row_stride + c * es, dtype) : 0.f;
        }
    }
}

// T^T: row b holds T[:, b] (b < NB); rows [NB, NB4) are zero. The table is (D, NB) fp32 contiguous.
template <int D>
__device__ __forceinline__ void wa_load_table(float* stt, const float* __restrict__ table, int NB, int NB4) {
    constexpr int DS = D + 4;
    for (int e = threadIdx.x; e < NB4 * D; e += WA_THREADS) {
        const int d = e / NB4;
        const int b = e - d * NB4;
        stt[b * DS + d] = (b < NB) ? table[d * NB + b] : 0.f;
    }
}

// Bucket ids as bytes; ids outside [0, NB) become WA_BAD_BUCKET.
__device__ __forceinline__ void wa_load_buckets(unsigned char* sbk, const long long* __restrict__ buckets,
                                                int L, int NB) {
    for (int e = threadIdx.x; e < L * L; e += blockDim.x) {
        const long long b = buckets[e];
        sbk[e] = (b >= 0 && b < NB) ? (unsigned char)b : (unsigned char)WA_BAD_BUCKET;
    }
}

// ---------------------------------------------------------------------------------------------------
// small GEMMs on shared memory
// ---------------------------------------------------------------------------------------------------

// acc[r][c] = sum_{d < D} a[r][d] * b[c][d] for c < ncc (a, b: row pointers, 16-byte aligned).
template <int D, int CC>
__device__ __forceinline__ void wa_mm_abt(float (&acc)[4][CC], const float* const (&a)[4],
                                          const float* const (&b)[CC], int ncc) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < CC; ++c) acc[r][c] = 0.f;
#pragma unroll 1
    for (int d = 0; d < D; d += 4) {
        float4 av[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) av[r] = *reinterpret_cast<const float4*>(a[r] + d);
#pragma unroll
        for (int c = 0; c < CC; ++c) {
            if (c < ncc) {
                const float4 bv = *reinterpret_cast<const float4*>(b[c] + d);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    acc[r][c] = fmaf(av[r].x, bv.x, acc[r][c]);
                    acc[r][c] = fmaf(av[r].y, bv.y, acc[r][c]);
                    acc[r][c] = fmaf(av[r].z, bv.z, acc[r][c]);
                    acc[r][c] = fmaf(av[r].w, bv.w, acc[r][c]);
                }
            }
        }
    }
}

// acc[r][0..3] += sum_{k < K4} a[r][k] * b[k * ldb + 0..3]  (K4 a multiple of 4; b already offset to the
// thread's 4 columns).
template <int RPT>
__device__ __forceinline__ void wa_mm_ab(float (&acc)[RPT][4], const float* const (&a)[RPT],
                                         const float* b, int ldb, int K4) {
#pragma unroll 1
    for (int k = 0; k < K4; k += 4) {
        float4 av[RPT];
#pragma unroll
        for (int r = 0; r < RPT; ++r) av[r] = *reinterpret_cast<const float4*>(a[r] + k);
        const float* bp = b + k * ldb;
        const float4 b0 = *reinterpret_cast<const float4*>(bp);
        const float4 b1 = *reinterpret_cast<const float4*>(bp + ldb);
        const float4 b2 = *reinterpret_cast<const float4*>(bp + 2 * ldb);
        const float4 b3 = *reinterpret_cast<const float4*>(bp + 3 * ldb);
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            acc[r][0] = fmaf(av[r].x, b0.x, acc[r][0]);
            acc[r][1] = fmaf(av[r].x, b0.y, acc[r][1]);
            acc[r][2] = fmaf(av[r].x, b0.z, acc[r][2]);
            acc[r][3] = fmaf(av[r].x, b0.w, acc[r][3]);
            acc[r][0] = fmaf(av[r].y, b1.x, acc[r][0]);
            acc[r][1] = fmaf(av[r].y, b1.y, acc[r][1]);
            acc[r][2] = fmaf(av[r].y, b1.z, acc[r][2]);
            acc[r][3] = fmaf(av[r].y, b1.w, acc[r][3]);
            acc[r][0] = fmaf(av[r].z, b2.x, acc[r][0]);
            acc[r][1] = fmaf(av[r].z, b2.y, acc[r][1]);
            acc[r][2] = fmaf(av[r].z, b2.z, acc[r][2]);
            acc[r][3] = fmaf(av[r].z, b2.w, acc[r][3]);
            acc[r][0] = fmaf(av[r].w, b3.x, acc[r][0]);
            acc[r][1] = fmaf(av[r].w, b3.y, acc[r][1]);
            acc[r][2] = fmaf(av[r].w, b3.z, acc[r][2]);
            acc[r][3] = fmaf(av[r].w, b3.w, acc[r][3]);
        }
    }
}

// acc[r][0..3] += sum_{k < K} a[k * lda + r] * b[k * ldb + 0..3]  (a offset to the thread's RPT rows,
// 8-byte aligned, 16-byte when RPT is a multiple of 4).
template <int RPT>
__device__ __forceinline__ void wa_mm_atb(float (&acc)[RPT][4], const float* a, int lda,
                                          const float* b, int ldb, int K) {
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
        float av[RPT];
        const float* ap = a + k * lda;
        if constexpr (RPT % 4 == 0) {
#pragma unroll
            for (int r = 0; r < RPT; r += 4) {
                const float4 t = *reinterpret_cast<const float4*>(ap + r);
                av[r] = t.x; av[r + 1] = t.y; av[r + 2] = t.z; av[r + 3] = t.w;
            }
        } else {
#pragma unroll
            for (int r = 0; r < RPT; r += 2) {
                const float2 t = *reinterpret_cast<const float2*>(ap + r);
                av[r] = t.x; av[r + 1] = t.y;
            }
        }
        const float4 bv = *reinterpret_cast<const float4*>(b + k * ldb);
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            acc[r][0] = fmaf(av[r], bv.x, acc[r][0]);
            acc[r][1] = fmaf(av[r], bv.y, acc[r][1]);
            acc[r][2] = fmaf(av[r], bv.z, acc[r][2]);
            acc[r][3] = fmaf(av[r], bv.w, acc[r][3]);
        }
    }
}

template <int RPT>
__device__ __forceinline__ void wa_zero(float (&acc)[RPT][4]) {
#pragma unroll
    for (int r = 0; r < RPT; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
}

// Rows i0 + r (< M) of a thread's tile, times `mul`, to byte address dst + i * row_stride (4 values each).
template <int RPT>
__device__ __forceinline__ void wa_store_tile(unsigned char* dst, long long row_stride, int i0, int M,
                                              const float (&acc)[RPT][4], float mul, int dtype) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        if (i0 + r < M) {
            wa_store4(dst + (i0 + r) * row_stride, acc[r][0] * mul, acc[r][1] * mul, acc[r][2] * mul,
                      acc[r][3] * mul, dtype);
        }
    }
}

__device__ __forceinline__ float wa_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float wa_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Logit of column j of a score row: the scaled q.k score plus the q T term of the pair's bucket.
__device__ __forceinline__ float wa_logit(const float* row, const unsigned char* bk, int j, int L4) {
    const int b = bk[j];
    return row[j] + (b != WA_BAD_BUCKET ? row[L4 + b] : __int_as_float(0x7fffffff));
}

// The extended score GEMM [q k^T * scale | q T] of one pair into registers (rows of this warp).
template <int D>
__device__ __forceinline__ void wa_scores(float (&acc)[4][8], const float* sq, const float* sk, const float* stt,
                                          int L, int L4, int NB4, int row0, int col0, int ncc) {
    constexpr int DS = D + 4;
    const float* a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = sq + min(row0 + r, L - 1) * DS;
    const float* b[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int col = col0 + 16 * c;
        b[c] = (col < L4) ? sk + col * DS : stt + min(col - L4, NB4 - 1) * DS;
    }
    wa_mm_abt<D, 8>(acc, a, b, ncc);
}

__device__ __forceinline__ void wa_store_scores(float* sx, int SE, const float (&acc)[4][8], int L, int L4, int NB,
                                                int row0, int col0, int ncc, float scale) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = row0 + r;
        if (i < L) {
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int col = col0 + 16 * c;
                if (c < ncc && col < L4 + NB) sx[i * SE + col] = (col < L4) ? scale * acc[r][c] : acc[r][c];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// tensor-core products (the TC = true kernels, bf16 I/O)
// ---------------------------------------------------------------------------------------------------
// mma.sync m16n8k16 with bf16 operands and fp32 accumulation (sm_80 and newer). The operands stay in the fp32
// shared tiles above; each is rounded to bf16 (nearest even) as its fragment is read, so q, k, v, dout (bf16
// already) are exact and the table, P, dS and G are rounded as a bf16 flash attention rounds P. Fragment
// layout (PTX ISA, mma.m16n8k16, .row.col), with g = lane / 4 and t2 = 2 * (lane % 4), the lower 16 bits of
// each register holding the element of smaller index:
//   A (16 x 16): a0 = A[g][t2, t2+1], a1 = A[g+8][t2, t2+1], a2 = A[g][t2+8, t2+9], a3 = A[g+8][t2+8, t2+9]
//   B (16 x 8):  b0 = B[t2, t2+1][g], b1 = B[t2+8, t2+9][g]
//   C (16 x 8):  c0, c1 = C[g][t2, t2+1], c2, c3 = C[g+8][t2, t2+1]
// The CPU emulation (tests/kernel_emulation.py) builds the same matrices from the 32 lanes' registers.
#define WA_TC_NT 8  // most n-tiles (8 columns each) one warp holds

__device__ __forceinline__ unsigned int wa_bf16x2(float lo, float hi) {
#if defined(LOMAR_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
    return (unsigned int)from_f32<lomar_bf16>(lo).bits | ((unsigned int)from_f32<lomar_bf16>(hi).bits << 16);
#else
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

__device__ __forceinline__ void wa_mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
#if defined(LOMAR_EMULATION)
    emu_mma_bf16_m16n8k16(c, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("trap;");  // the launcher picks the TC kernels on sm_80 and newer only
#endif
}

// One warp's share of a product whose C is cut into 16-row strips and 8-column n-tiles: the strip at row m0
// and n-tiles [nt0, nt1) (at most WA_TC_NT). Warps per strip: 8, 4, 2, 2 for 1..4 strips. Warp-uniform.
struct WaTcWork {
    int m0, nt0, nt1;
};
__device__ __forceinline__ WaTcWork wa_tc_work(int M, int NT, int warp) {
    const int strips = (M + 15) >> 4;
    const int wps = WA_WARPS / strips;
    const int s = warp / wps;
    const int per = (NT + wps - 1) / wps;
    WaTcWork w;
    w.m0 = 16 * s;
    w.nt0 = (s < strips) ? (warp - s * wps) * per : 0;
    w.nt1 = (s < strips) ? min(NT, w.nt0 + per) : 0;
    return w;
}

// c[j] += A[m0 .. m0+16, 0 .. K16) B[0 .. K16, n-tile nt0 + j] for the warp's n-tiles. fa(row, kk) and
// fb(kk, col) read the fp32 operands; both must give 0 for kk past the product's inner length (K16 is that
// length rounded up to 16), and finite values for rows and columns past the output (they are not stored).
template <typename FA, typename FB>
__device__ __forceinline__ void wa_tc_strip(float (&c)[WA_TC_NT][4], const WaTcWork& w, int K16, FA fa, FB fb) {
    const int lane = threadIdx.x & 31;
    const int r0 = w.m0 + (lane >> 2);
    const int t2 = 2 * (lane & 3);
    for (int k0 = 0; k0 < K16; k0 += 16) {
        const int ka = k0 + t2;
        unsigned int a[4];
        a[0] = wa_bf16x2(fa(r0, ka), fa(r0, ka + 1));
        a[1] = wa_bf16x2(fa(r0 + 8, ka), fa(r0 + 8, ka + 1));
        a[2] = wa_bf16x2(fa(r0, ka + 8), fa(r0, ka + 9));
        a[3] = wa_bf16x2(fa(r0 + 8, ka + 8), fa(r0 + 8, ka + 9));
#pragma unroll
        for (int j = 0; j < WA_TC_NT; ++j) {
            if (w.nt0 + j < w.nt1) {
                const int col = 8 * (w.nt0 + j) + (lane >> 2);
                wa_mma(c[j], a, wa_bf16x2(fb(ka, col), fb(ka + 1, col)), wa_bf16x2(fb(ka + 8, col), fb(ka + 9, col)));
            }
        }
    }
}

// Calls f(row, col, x0, x1) for each pair of the thread's accumulator elements: C[row][col], C[row][col + 1].
template <typename F>
__device__ __forceinline__ void wa_tc_pairs(const float (&c)[WA_TC_NT][4], const WaTcWork& w, F f) {
    const int lane = threadIdx.x & 31;
    const int r0 = w.m0 + (lane >> 2);
    const int t2 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < WA_TC_NT; ++j) {
        if (w.nt0 + j < w.nt1) {
            const int col = 8 * (w.nt0 + j) + t2;
            f(r0, col, c[j][0], c[j][1]);
            f(r0 + 8, col, c[j][2], c[j][3]);
        }
    }
}

// Calls f(row, col, value) for each of the thread's accumulator elements.
template <typename F>
__device__ __forceinline__ void wa_tc_each(const float (&c)[WA_TC_NT][4], const WaTcWork& w, F f) {
    wa_tc_pairs(c, w, [&](int r, int col, float x0, float x1) {
        f(r, col, x0);
        f(r, col + 1, x1);
    });
}

// Rows < M of a warp's C (times mul) as bf16 pairs to byte address dst + row * row_stride (4-byte stores).
__device__ __forceinline__ void wa_tc_store_bf16(unsigned char* dst, long long row_stride, int M,
                                                 const float (&c)[WA_TC_NT][4], const WaTcWork& w, float mul) {
    wa_tc_pairs(c, w, [&](int r, int col, float x0, float x1) {
        if (r < M) *reinterpret_cast<unsigned int*>(dst + r * row_stride + 2 * col) = wa_pack(x0 * mul, x1 * mul, WA_BF16);
    });
}

// The extended scores [q k^T | q T] of one pair on tensor cores (unscaled), the warp's tiles into c.
template <int D>
__device__ __forceinline__ WaTcWork wa_tc_scores(float (&c)[WA_TC_NT][4], const float* sq, const float* sk,
                                                 const float* stt, int L, int L4, int NB4, int warp) {
    constexpr int DS = D + 4;
    const WaTcWork w = wa_tc_work(L, (L4 + NB4 + 7) >> 3, warp);
    wa_zero(c);
    wa_tc_strip(c, w, D,
                [&](int i, int d) { return sq[min(i, L - 1) * DS + d]; },
                [&](int d, int col) {
                    return col < L4 ? sk[col * DS + d] : (col < L4 + NB4 ? stt[(col - L4) * DS + d] : 0.f);
                });
    return w;
}

// Scores of the warp's tiles into the score rows (scaled q.k columns, then the q T columns).
__device__ __forceinline__ void wa_tc_store_scores(float* sx, int SE, const float (&c)[WA_TC_NT][4], const WaTcWork& w,
                                                   int L, int L4, int NB, float scale) {
    wa_tc_each(c, w, [&](int i, int col, float x) {
        if (i < L && col < L4 + NB) sx[i * SE + col] = (col < L4) ? scale * x : x;
    });
}

__device__ __forceinline__ int wa_round16(int x) { return (x + 15) & ~15; }

// ---------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------
// Grid: any number of blocks (each loops over the pairs p = n * H + h); block: WA_THREADS threads;
// dynamic shared memory: wa_fwd_shared_bytes(L, NB, D). Strides are in elements; q, k, v, out have the
// I/O type `dtype`. out: (N, H, L, D) through its strides, last dimension contiguous, rows 16-byte
// aligned; lse: (N * H, L) fp32 contiguous.
template <int D, bool TC>
__global__ void __launch_bounds__(WA_THREADS, (D <= 64 ? 3 : 2))
window_attention_fwd(const void* __restrict__ q, long long q_sn, long long q_sh, long long q_si,
                     const void* __restrict__ k, long long k_sn, long long k_sh, long long k_si,
                     const void* __restrict__ v, long long v_sn, long long v_sh, long long v_si,
                     const float* __restrict__ table,        // (D, NB) fp32 contiguous
                     const long long* __restrict__ buckets,  // (L, L) contiguous
                     void* __restrict__ out, long long o_sn, long long o_sh, long long o_si,
                     float* __restrict__ lse,
                     int H, int L, int NB, long long NP, float scale, int dtype, int vec) {
    using Tile = WaTile<D>;
    constexpr int DS = D + 4;
    constexpr int RPT = Tile::RPT;
    extern __shared__ float4 smem_wa[];
    float* sm = reinterpret_cast<float*>(smem_wa);
    const WaLayout lay = wa_layout(L, NB, D);
    const int L4 = lay.L4;
    const int NB4 = lay.NB4;
    const int SE = lay.SE;
    float* sq = sm;
    float* sk = sm + L4 * DS;
    float* sx = sm;  // scores / P, over q and k
    float* sv = sm + lay.f_v;
    float* stt = sm + lay.f_tt;
    unsigned char* sbk = reinterpret_cast<unsigned char*>(sm + lay.f_end);

    const long long es = (dtype == WA_F32) ? 4 : 2;
    const unsigned char* qb = static_cast<const unsigned char*>(q);
    const unsigned char* kb = static_cast<const unsigned char*>(k);
    const unsigned char* vb = static_cast<const unsigned char*>(v);
    unsigned char* ob = static_cast<unsigned char*>(out);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int row0 = 8 * warp + 4 * (lane >> 4);  // A B^T tiling
    const int col0 = lane & 15;
    const bool warp_rows = 8 * warp < L;
    const int ncc = (L4 + NB + 15) >> 4;
    const int tr = tid / Tile::GC;  // A B tiling
    const int g = tid - tr * Tile::GC;
    const int i0 = tr * RPT;
    const bool tile_rows = tr < Tile::TR && i0 < L;

    wa_load_table<D>(stt, table, NB, NB4);
    wa_load_buckets(sbk, buckets, L, NB);

    for (long long p = blockIdx.x; p < NP; p += gridDim.x) {
        const long long n = p / H;
        const long long h = p - n * H;
        wa_load_rows<D>(sq, qb + (n * q_sn + h * q_sh) * es, q_si * es, L, L4, dtype, vec);
        wa_load_rows<D>(sk, kb + (n * k_sn + h * k_sh) * es, k_si * es, L, L4, dtype, vec);
        wa_load_rows<D>(sv, vb + (n * v_sn + h * v_sh) * es, v_si * es, L, L4, dtype, vec);
        __syncthreads();

        // scores [scale q k^T | q T] through registers: the tile then overwrites q and k
        if constexpr (TC) {
            float c[WA_TC_NT][4];
            const WaTcWork w = wa_tc_scores<D>(c, sq, sk, stt, L, L4, NB4, warp);
            __syncthreads();
            wa_tc_store_scores(sx, SE, c, w, L, L4, NB, scale);
        } else {
            float acc[4][8];
            if (warp_rows) wa_scores<D>(acc, sq, sk, stt, L, L4, NB4, row0, col0, ncc);
            __syncthreads();
            if (warp_rows) wa_store_scores(sx, SE, acc, L, L4, NB, row0, col0, ncc, scale);
        }
        __syncthreads();

        // softmax, one warp per row; P replaces the scores in columns [0, L4) (zero in [L, L4))
        for (int i = warp; i < L; i += WA_WARPS) {
            float* row = sx + i * SE;
            const unsigned char* bk = sbk + i * L;
            const int j0 = lane;
            const int j1 = lane + 32;
            const float s0 = (j0 < L) ? wa_logit(row, bk, j0, L4) : -3.0e38f;
            const float s1 = (j1 < L) ? wa_logit(row, bk, j1, L4) : -3.0e38f;
            const float m = wa_warp_max(fmaxf(s0, s1));
            const float e0 = (j0 < L) ? __expf(s0 - m) : 0.f;
            const float e1 = (j1 < L) ? __expf(s1 - m) : 0.f;
            const float sum = wa_warp_sum(e0 + e1);
            const float inv = 1.f / sum;
            if (j0 < L4) row[j0] = e0 * inv;
            if (j1 < L4) row[j1] = e1 * inv;
            if (lane == 0) lse[p * L + i] = m + __logf(sum);
        }
        __syncthreads();

        // out = P v
        if constexpr (TC) {
            float c[WA_TC_NT][4];
            const WaTcWork w = wa_tc_work(L, D / 8, warp);
            wa_zero(c);
            wa_tc_strip(c, w, wa_round16(L),
                        [&](int i, int j) { return j < L ? sx[min(i, L - 1) * SE + j] : 0.f; },
                        [&](int j, int d) { return j < L ? sv[j * DS + d] : 0.f; });
            wa_tc_store_bf16(ob + (n * o_sn + h * o_sh) * es, o_si * es, L, c, w, 1.f);
        } else if (tile_rows) {
            float o[RPT][4];
            wa_zero(o);
            const float* a[RPT];
#pragma unroll
            for (int r = 0; r < RPT; ++r) a[r] = sx + min(i0 + r, L - 1) * SE;
            wa_mm_ab<RPT>(o, a, sv + 4 * g, DS, L4);
            wa_store_tile<RPT>(ob + (n * o_sn + h * o_sh + 4 * g) * es, o_si * es, i0, L, o, 1.f, dtype);
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------
// For each row i, the keys j grouped by bucket (ascending j within a bucket):
// perm[i * L + off[i * (NB + 1) + b] ...  off[i * (NB + 1) + b + 1]).  Built once per block.
__device__ __forceinline__ void wa_bucket_lists(unsigned char* perm, unsigned char* off, const unsigned char* sbk,
                                                int L, int NB) {
    for (int i = threadIdx.x; i < L; i += blockDim.x) {
        const unsigned char* row = sbk + i * L;
        unsigned char* pr = perm + i * L;
        unsigned char* of = off + i * (NB + 1);
        int pos = 0;
        for (int b = 0; b < NB; ++b) {
            of[b] = (unsigned char)pos;
            for (int j = 0; j < L; ++j) {
                if (row[j] == b) pr[pos++] = (unsigned char)j;
            }
        }
        of[NB] = (unsigned char)pos;
    }
}

// Grid: any number of blocks (each loops over the pairs and writes one dT partial); block: WA_THREADS
// threads; dynamic shared memory: wa_bwd_shared_bytes(L, NB, D). Strides in elements, I/O type `dtype`.
// dq, dk, dv share one set of strides (last dimension contiguous, rows 16-byte aligned);
// dtable_part: (gridDim.x, D, NB) fp32, every element written.
template <int D, bool TC>
__global__ void __launch_bounds__(WA_THREADS, (D <= 64 ? 2 : 1))
window_attention_bwd(const void* __restrict__ q, long long q_sn, long long q_sh, long long q_si,
                     const void* __restrict__ k, long long k_sn, long long k_sh, long long k_si,
                     const void* __restrict__ v, long long v_sn, long long v_sh, long long v_si,
                     const void* __restrict__ o, long long o_sn, long long o_sh, long long o_si,
                     const void* __restrict__ dout, long long do_sn, long long do_sh, long long do_si,
                     const float* __restrict__ lse,          // (N * H, L) fp32 contiguous
                     const float* __restrict__ table,        // (D, NB) fp32 contiguous
                     const long long* __restrict__ buckets,  // (L, L) contiguous
                     void* __restrict__ dq, void* __restrict__ dk, void* __restrict__ dv,
                     long long g_sn, long long g_sh, long long g_si,
                     float* __restrict__ dtable_part,
                     int H, int L, int NB, long long NP, float scale, int dtype, int vec) {
    using Tile = WaTile<D>;
    constexpr int DS = D + 4;
    constexpr int RPT = Tile::RPT;
    extern __shared__ float4 smem_wa[];
    float* sm = reinterpret_cast<float*>(smem_wa);
    const WaLayout lay = wa_layout(L, NB, D);
    const int L4 = lay.L4;
    const int NB4 = lay.NB4;
    const int SE = lay.SE;
    float* sq = sm;
    float* sk = sm + lay.b_k;
    float* sv = sm + lay.b_v;
    float* sdo = sm + lay.b_do;
    float* stt = sm + lay.b_tt;
    float* sx = sm + lay.b_sx;  // [P -> dS | q T -> G]
    float* slse = sm + lay.b_lse;
    float* sdelta = sm + lay.b_delta;
    unsigned char* sbk = reinterpret_cast<unsigned char*>(sm + lay.b_end);
    unsigned char* sperm = sbk + L * L;
    unsigned char* soff = sperm + L * L;

    const long long es = (dtype == WA_F32) ? 4 : 2;
    const unsigned char* qb = static_cast<const unsigned char*>(q);
    const unsigned char* kb = static_cast<const unsigned char*>(k);
    const unsigned char* vb = static_cast<const unsigned char*>(v);
    const unsigned char* ob = static_cast<const unsigned char*>(o);
    const unsigned char* dob = static_cast<const unsigned char*>(dout);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int row0 = 8 * warp + 4 * (lane >> 4);
    const int col0 = lane & 15;
    const bool warp_rows = 8 * warp < L;
    const int ncc_s = (L4 + NB + 15) >> 4;
    const int ncc_p = (L + 15) >> 4;
    const int tr = tid / Tile::GC;
    const int g = tid - tr * Tile::GC;
    const int i0 = tr * RPT;
    const bool tile_rows = tr < Tile::TR && i0 < L;
    const bool tile_buckets = tr < Tile::TR && i0 < NB;

    wa_load_table<D>(stt, table, NB, NB4);
    wa_load_buckets(sbk, buckets, L, NB);
    __syncthreads();
    wa_bucket_lists(sperm, soff, sbk, L, NB);

    float dt[TC ? 1 : RPT][4];  // this block's dT rows b = i0 + r, columns d = 4 g + c, over all its pairs
    float dtc[TC ? WA_TC_NT : 1][4];  // TC: the same sum as the warp's tiles of dT^T (rows b, columns d)
    const WaTcWork wt = wa_tc_work(NB, D / 8, warp);
    const WaTcWork wd = wa_tc_work(L, D / 8, warp);  // TC: the (L x D) products dv, dq, dk
    if constexpr (TC) wa_zero(dtc);
    else wa_zero(dt);

    for (long long p = blockIdx.x; p < NP; p += gridDim.x) {
        const long long n = p / H;
        const long long h = p - n * H;
        wa_load_rows<D>(sq, qb + (n * q_sn + h * q_sh) * es, q_si * es, L, L4, dtype, vec);
        wa_load_rows<D>(sk, kb + (n * k_sn + h * k_sh) * es, k_si * es, L, L4, dtype, vec);
        wa_load_rows<D>(sv, vb + (n * v_sn + h * v_sh) * es, v_si * es, L, L4, dtype, vec);
        wa_load_rows<D>(sdo, dob + (n * do_sn + h * do_sh) * es, do_si * es, L, L4, dtype, vec);
        for (int i = tid; i < L; i += WA_THREADS) slse[i] = lse[p * L + i];
        __syncthreads();

        // delta_i = do_i . out_i (one warp per row)
        {
            const unsigned char* orow0 = ob + (n * o_sn + h * o_sh) * es;
            for (int i = warp; i < L; i += WA_WARPS) {
                const unsigned char* orow = orow0 + i * o_si * es;
                float s = 0.f;
                for (int d = lane; d < D; d += 32) s = fmaf(sdo[i * DS + d], wa_load1(orow + d * es, dtype), s);
                s = wa_warp_sum(s);
                if (lane == 0) sdelta[i] = s;
            }
        }

        // scores [scale q k^T | q T]
        if constexpr (TC) {
            float c[WA_TC_NT][4];
            const WaTcWork w = wa_tc_scores<D>(c, sq, sk, stt, L, L4, NB4, warp);
            wa_tc_store_scores(sx, SE, c, w, L, L4, NB, scale);
        } else {
            float acc[4][8];
            if (warp_rows) {
                wa_scores<D>(acc, sq, sk, stt, L, L4, NB4, row0, col0, ncc_s);
                wa_store_scores(sx, SE, acc, L, L4, NB, row0, col0, ncc_s, scale);
            }
        }
        __syncthreads();

        // P = exp(s - lse), in place (zero in [L, L4))
        for (int i = warp; i < L; i += WA_WARPS) {
            float* row = sx + i * SE;
            const unsigned char* bk = sbk + i * L;
            const float m = slse[i];
            const int j0 = lane;
            const int j1 = lane + 32;
            const float p0 = (j0 < L) ? __expf(wa_logit(row, bk, j0, L4) - m) : 0.f;
            const float p1 = (j1 < L) ? __expf(wa_logit(row, bk, j1, L4) - m) : 0.f;
            if (j0 < L4) row[j0] = p0;
            if (j1 < L4) row[j1] = p1;
        }
        __syncthreads();

        const long long grow = g_si * es;
        const long long hoff = (n * g_sn + h * g_sh) * es;  // this pair's dq, dk, dv rows
        const long long goff = hoff + 4 * g * es;            // CUDA cores: this thread's 4 columns of them
        // dv = P^T do
        if constexpr (TC) {
            float c[WA_TC_NT][4];
            wa_zero(c);
            wa_tc_strip(c, wd, wa_round16(L),
                        [&](int j, int i) { return i < L ? sx[i * SE + min(j, L - 1)] : 0.f; },
                        [&](int i, int d) { return i < L ? sdo[i * DS + d] : 0.f; });
            wa_tc_store_bf16(static_cast<unsigned char*>(dv) + hoff, grow, L, c, wd, 1.f);
            // dP = do v^T, then dS = P (dP - delta) over P
            const WaTcWork w = wa_tc_work(L, (L + 7) >> 3, warp);
            wa_zero(c);
            wa_tc_strip(c, w, D,
                        [&](int i, int d) { return sdo[min(i, L - 1) * DS + d]; },
                        [&](int d, int j) { return sv[min(j, L - 1) * DS + d]; });
            __syncthreads();
            wa_tc_each(c, w, [&](int i, int j, float x) {
                if (i < L && j < L) sx[i * SE + j] *= x - sdelta[i];
            });
        } else {
            if (tile_rows) {
                float acc[RPT][4];
                wa_zero(acc);
                wa_mm_atb<RPT>(acc, sx + i0, SE, sdo + 4 * g, DS, L);
                wa_store_tile<RPT>(static_cast<unsigned char*>(dv) + goff, grow, i0, L, acc, 1.f, dtype);
            }
            // dP = do v^T (registers), then dS = P (dP - delta) over P
            float dp[4][4];
            if (warp_rows) {
                const float* a[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) a[r] = sdo + min(row0 + r, L - 1) * DS;
                const float* b[4];
#pragma unroll
                for (int c = 0; c < 4; ++c) b[c] = sv + min(col0 + 16 * c, L4 - 1) * DS;
                wa_mm_abt<D, 4>(dp, a, b, ncc_p);
            }
            __syncthreads();
            if (warp_rows) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int i = row0 + r;
                    if (i < L) {
                        const float di = sdelta[i];
#pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            const int j = col0 + 16 * c;
                            if (c < ncc_p && j < L) sx[i * SE + j] *= dp[r][c] - di;
                        }
                    }
                }
            }
        }
        __syncthreads();

        // G[i, b] = sum of dS[i, j] over the keys j of bucket b, over the q T columns (zero in [NB, NB4))
        for (int e = tid; e < L * NB4; e += WA_THREADS) {
            const int i = e / NB4;
            const int b = e - i * NB4;
            const float* row = sx + i * SE;
            float s = 0.f;
            if (b < NB) {
                const unsigned char* pr = sperm + i * L;
                const int t1 = soff[i * (NB + 1) + b + 1];
                for (int t = soff[i * (NB + 1) + b]; t < t1; ++t) s += row[pr[t]];
            }
            sx[i * SE + L4 + b] = s;
        }
        __syncthreads();

        if constexpr (TC) {
            // dq = scale * dS k + G T^T
            float c[WA_TC_NT][4];
            wa_zero(c);
            wa_tc_strip(c, wd, wa_round16(L),
                        [&](int i, int j) { return j < L ? sx[min(i, L - 1) * SE + j] : 0.f; },
                        [&](int j, int d) { return j < L ? sk[j * DS + d] : 0.f; });
#pragma unroll
            for (int t = 0; t < WA_TC_NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[t][e] *= scale;
            wa_tc_strip(c, wd, wa_round16(NB),
                        [&](int i, int b) { return b < NB ? sx[min(i, L - 1) * SE + L4 + b] : 0.f; },
                        [&](int b, int d) { return b < NB ? stt[b * DS + d] : 0.f; });
            wa_tc_store_bf16(static_cast<unsigned char*>(dq) + hoff, grow, L, c, wd, 1.f);
            // dk = scale * dS^T q
            wa_zero(c);
            wa_tc_strip(c, wd, wa_round16(L),
                        [&](int j, int i) { return i < L ? sx[i * SE + min(j, L - 1)] : 0.f; },
                        [&](int i, int d) { return i < L ? sq[i * DS + d] : 0.f; });
            wa_tc_store_bf16(static_cast<unsigned char*>(dk) + hoff, grow, L, c, wd, scale);
            // dT^T += G^T q
            wa_tc_strip(dtc, wt, wa_round16(L),
                        [&](int b, int i) { return i < L ? sx[i * SE + L4 + min(b, NB - 1)] : 0.f; },
                        [&](int i, int d) { return i < L ? sq[i * DS + d] : 0.f; });
        } else {
            if (tile_rows) {
                // dq = scale * dS k + G T^T
                float acc[RPT][4];
                wa_zero(acc);
                const float* a[RPT];
#pragma unroll
                for (int r = 0; r < RPT; ++r) a[r] = sx + min(i0 + r, L - 1) * SE;
                wa_mm_ab<RPT>(acc, a, sk + 4 * g, DS, L4);
#pragma unroll
                for (int r = 0; r < RPT; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[r][c] *= scale;
                const float* ag[RPT];
#pragma unroll
                for (int r = 0; r < RPT; ++r) ag[r] = a[r] + L4;
                wa_mm_ab<RPT>(acc, ag, stt + 4 * g, DS, NB4);
                wa_store_tile<RPT>(static_cast<unsigned char*>(dq) + goff, grow, i0, L, acc, 1.f, dtype);

                // dk = scale * dS^T q
                wa_zero(acc);
                wa_mm_atb<RPT>(acc, sx + i0, SE, sq + 4 * g, DS, L);
                wa_store_tile<RPT>(static_cast<unsigned char*>(dk) + goff, grow, i0, L, acc, scale, dtype);
            }
            // dT^T += G^T q
            if (tile_buckets) wa_mm_atb<RPT>(dt, sx + L4 + i0, SE, sq + 4 * g, DS, L);
        }
        __syncthreads();
    }

    if constexpr (TC) {
        float* part = dtable_part + (long long)blockIdx.x * D * NB;
        wa_tc_each(dtc, wt, [&](int b, int d, float x) {
            if (b < NB) part[d * NB + b] = x;
        });
    } else if (tile_buckets) {
        float* part = dtable_part + (long long)blockIdx.x * D * NB;
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            const int b = i0 + r;
            if (b < NB) {
#pragma unroll
                for (int c = 0; c < 4; ++c) part[(4 * g + c) * NB + b] = dt[r][c];
            }
        }
    }
}

// dtable[e] = sum over the blocks p of part[p * count + e], in block order (deterministic).
__global__ void window_attention_dtable_reduce(const float* __restrict__ part, float* __restrict__ out,
                                               int parts, int count) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= count) return;
    float s = 0.f;
#pragma unroll 4
    for (int p = 0; p < parts; ++p) s += part[(long long)p * count + e];
    out[e] = s;
}

// ---------------------------------------------------------------------------------------------------
// warp-tiled tensor-core kernels (window_attention_mma_fwd / _bwd: bf16 I/O, sm_80 and newer)
// ---------------------------------------------------------------------------------------------------
// The same formulas as above, laid out as a flash attention for one short sequence: a block of WM_THREADS
// (4 warps) handles one (n, h) pair at a time (grid-stride over the pairs, as above), warp w owning the
// 16-row strip of queries [16 w, 16 w + 16). k, v (and q, dout in the backward) are copied to shared memory as
// bf16 with cp.async, every copy of a pair in flight at once (rows of D + 8 elements: the eight rows an ldmatrix
// reads start in different banks); every operand of mma.sync
// comes from shared memory through ldmatrix (.trans where the product needs the transposed tile), or
// straight from the accumulators of the previous product (P and dS as the A operand: the m16n8 C fragment
// of two adjacent n-tiles is the m16k16 A fragment). The forward reads the strip's q fragments straight from
// global memory (no q tile). Scores, the softmax, P and dS stay in registers; the only shared-memory round
// trip inside a strip is the iRPE lookup: q T of the strip goes to an fp32 scratch tile and each logit reads
// its bucket's column (fp32, as the kernels above: the PyTorch path under autocast rounds it to bf16).
//
// Backward, per pair: each warp recomputes P of its strip from the saved lse, dP = do v^T, dS, and writes
// P and dS (bf16) to shared tiles and G (the bucket sums of dS, from the fp32 dS in a fixed order) to a
// third; dq = scale dS k + G T^T from the registers and the G tile. After one block barrier
// warp w computes the 16 keys [16 w, 16 w + 16) of dk = scale dS^T q and dv = P^T do, and the 16 buckets
// [16 w, 16 w + 16) of dT^T += G^T q, kept in registers over the block's pairs and written as the block's
// partial at the end (reduced by window_attention_dtable_reduce, as above).
//
// Tiles have WM_ROWS = 64 rows (L, NB <= 64); rows past L (past NB for T^T) are zeroed once per block and
// never written again, so padded rows and columns enter every product as zeros. Requirements (checked by
// the Python side, which uses the kernels above otherwise): bf16, every row 16-byte aligned, D a multiple
// of 16.
#define WM_THREADS 128
#define WM_ROWS 64
#define WM_PS (WM_ROWS + 8)  // row stride (elements) of the L- and NB-wide bf16 tiles (P, dS, G)
#define WM_QS (WM_ROWS + 4)  // row stride (floats) of the fp32 q T scratch
#define WM_NEG (-3.0e38f)    // the logit of a padded key: exp() of it is 0
// forward blocks per SM at head_dim <= 64 (about 48 KB of shared memory each): four fit an sm_90 SM (228 KB), three
// an sm_80 one (164 KB); the register cap follows, so sm_80 does not spill for a fourth block that cannot start.
// At four, the sm_90 head_dim 64 forward spills 48 bytes under its 128-register cap; -DWM_FWD_BLOCKS=N (the Python
// side passes $LOMAR_WM_FWD_BLOCKS) sets N for every architecture, to time three against four.
#ifndef WM_FWD_BLOCKS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WM_FWD_BLOCKS 4
#else
#define WM_FWD_BLOCKS 3
#endif
#endif

template <int D>
struct WmLayout {
    static constexpr int RS = D + 8;                // row stride (elements) of the D-wide tiles
    static constexpr int TILE = WM_ROWS * RS;       // elements of a D-wide tile
    static constexpr int PTILE = WM_ROWS * WM_PS;   // elements of an L-wide tile
};

// Dynamic shared memory of the two kernels, in bytes (the Python launcher mirrors these).
__device__ __forceinline__ int wm_fwd_shared_bytes(int L, int NB, int D) {
    (void)NB;
    return 2 * 3 * WM_ROWS * (D + 8) + 4 * WM_ROWS * WM_QS + ((L * L + 15) & ~15);
}
__device__ __forceinline__ int wm_bwd_shared_bytes(int L, int NB, int D) {
    return 2 * (5 * WM_ROWS * (D + 8) + 3 * WM_ROWS * WM_PS) + 4 * (WM_ROWS * WM_QS + 2 * WM_ROWS) +
           ((2 * L * L + L * (NB + 1) + 15) & ~15);
}

// ldmatrix .x4 (.trans with TRANS): lane l gives the address of row l % 8 of 8x8 matrix l / 8 (16 bytes,
// 16-byte aligned); register m receives matrix m's elements (row lane / 4, columns 2 (lane % 4) + 0, 1), or
// transposed (rows 2 (lane % 4) + 0, 1, column lane / 4), the lower 16 bits holding the first.
template <bool TRANS>
__device__ __forceinline__ void wm_ldsm(unsigned int (&r)[4], const unsigned short* p) {
#if defined(LOMAR_EMULATION)
    emu_ldmatrix_x4(r, p, TRANS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    }
#else
    (void)p;
    r[0] = r[1] = r[2] = r[3] = 0u;
    asm volatile("trap;");
#endif
}

__device__ __forceinline__ void wm_syncwarp() {
#if defined(LOMAR_EMULATION)
    __syncwarp();
#else
    __syncwarp(0xffffffffu);
#endif
}

// The A fragment (16 x 16) at rows r0, columns k0 of a row-major tile (row stride ld elements).
__device__ __forceinline__ void wm_frag_a(unsigned int (&a)[4], const unsigned short* m, int ld, int r0, int k0) {
    const int l = threadIdx.x & 31;
    wm_ldsm<false>(a, m + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + k0 + (l >> 4) * 8);
}
// The A fragment of A[r][k] = M[k][r] (M row-major): rows r0, columns k0 of the transposed tile.
__device__ __forceinline__ void wm_frag_at(unsigned int (&a)[4], const unsigned short* m, int ld, int r0, int k0) {
    const int l = threadIdx.x & 31;
    wm_ldsm<true>(a, m + (k0 + (l & 7) + (l >> 4) * 8) * ld + r0 + ((l >> 3) & 1) * 8);
}
// B fragments (16 x 8) of the n-tiles n0 and n0 + 8 at k0, B[k][n] = M[n][k] (M row-major: one row per
// output column, as k for q k^T): b[0], b[1] for n0; b[2], b[3] for n0 + 8.
__device__ __forceinline__ void wm_frag_b_nk(unsigned int (&b)[4], const unsigned short* m, int ld, int n0, int k0) {
    const int l = threadIdx.x & 31;
    wm_ldsm<false>(b, m + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
// The same for B[k][n] = M[k][n] (M row-major: one row per k, as v for P v).
__device__ __forceinline__ void wm_frag_b_kn(unsigned int (&b)[4], const unsigned short* m, int ld, int k0, int n0) {
    const int l = threadIdx.x & 31;
    wm_ldsm<true>(b, m + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// The A fragment at k-step kk of the accumulators of n-tiles 2 kk and 2 kk + 1, rounded to bf16.
__device__ __forceinline__ void wm_acc_to_a(unsigned int (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = wa_bf16x2(c0[0], c0[1]);
    a[1] = wa_bf16x2(c0[2], c0[3]);
    a[2] = wa_bf16x2(c1[0], c1[1]);
    a[3] = wa_bf16x2(c1[2], c1[3]);
}

// c[2 p], c[2 p + 1] += A B over k in [0, K16) for the n-tile pairs p < np (M = the A tile, B from bk as
// wm_frag_b_kn): the products G T^T, dS^T q, P^T do, G^T q.
template <int NT, bool AT>
__device__ __forceinline__ void wm_mm_kn(float (&c)[NT][4], const unsigned short* am, int lda, int r0,
                                         const unsigned short* bm, int ldb, int K16) {
    for (int k0 = 0; k0 < K16; k0 += 16) {
        unsigned int a[4];
        if (AT) wm_frag_at(a, am, lda, r0, k0);
        else wm_frag_a(a, am, lda, r0, k0);
#pragma unroll
        for (int p = 0; p < NT / 2; ++p) {
            unsigned int b[4];
            wm_frag_b_kn(b, bm, ldb, k0, 16 * p);
            wa_mma(c[2 * p], a, b[0], b[1]);
            wa_mma(c[2 * p + 1], a, b[2], b[3]);
        }
    }
}

// c += A B over the 16-key steps kp < nkp: A from the accumulators of the key n-tiles 2 kp, 2 kp + 1 (P or dS,
// rounded to bf16), B the rows [16 kp, 16 kp + 16) of a D-wide tile read as K x N (v for P v, k for dS k).
template <int D>
__device__ __forceinline__ void wm_acc_mm(float (&c)[D / 8][4], const float (&p)[8][4], const unsigned short* bm,
                                          int nkp) {
#pragma unroll
    for (int kp = 0; kp < 4; ++kp) {
        if (kp >= nkp) break;
        unsigned int a[4];
        wm_acc_to_a(a, p[2 * kp], p[2 * kp + 1]);
#pragma unroll
        for (int x = 0; x < D / 16; ++x) {
            unsigned int b[4];
            wm_frag_b_kn(b, bm, WmLayout<D>::RS, 16 * kp, 16 * x);
            wa_mma(c[2 * x], a, b[0], b[1]);
            wa_mma(c[2 * x + 1], a, b[2], b[3]);
        }
    }
}

// Calls f(row, col, x0, x1) for each pair of a warp's accumulator elements C[row][col], C[row][col + 1] in the
// n-tiles [0, nt) of the strip at rows r0.
template <int NT, typename F>
__device__ __forceinline__ void wm_pairs(const float (&c)[NT][4], int r0, int nt, F f) {
    const int lane = threadIdx.x & 31;
    const int r = r0 + (lane >> 2);
    const int t2 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        if (j < nt) {
            f(r, 8 * j + t2, c[j][0], c[j][1]);
            f(r + 8, 8 * j + t2, c[j][2], c[j][3]);
        }
    }
}

// Rows below M of a warp's accumulators (the strip at r0), times mul, as bf16 to dst + row * rs + col
// (elements; 4-byte stores).
template <int NT>
__device__ __forceinline__ void wm_store_rows(unsigned short* dst, long long rs, int r0, int M, const float (&c)[NT][4],
                                              float mul) {
    wm_pairs(c, r0, NT, [&](int r, int col, float x0, float x1) {
        if (r < M) *reinterpret_cast<unsigned int*>(dst + r * rs + col) = wa_bf16x2(x0 * mul, x1 * mul);
    });
}

// A warp's accumulators of n-tiles [0, nt) as bf16 to the tile rows r0.. (row stride ld elements).
__device__ __forceinline__ void wm_store_tile(unsigned short* m, int ld, int r0, int nt, const float (&c)[8][4]) {
    wm_pairs(c, r0, nt, [&](int r, int col, float x0, float x1) {
        *reinterpret_cast<unsigned int*>(m + r * ld + col) = wa_bf16x2(x0, x1);
    });
}

// The same as fp32 (8-byte stores).
__device__ __forceinline__ void wm_store_tile_f32(float* m, int ld, int r0, int nt, const float (&c)[8][4]) {
    wm_pairs(c, r0, nt, [&](int r, int col, float x0, float x1) {
        float2 x;
        x.x = x0;
        x.y = x1;
        *reinterpret_cast<float2*>(m + r * ld + col) = x;
    });
}

// 16 bytes from global src to shared dst (both 16-byte aligned), asynchronously (cp.async, sm_80 and newer): all
// of a thread's copies are in flight at once; wm_copies_wait() waits for them (then a barrier publishes them).
__device__ __forceinline__ void wm_copy16(unsigned short* dst, const unsigned short* src) {
#if defined(LOMAR_EMULATION)
    emu_cp_async16(dst, src);  // lands at the thread's next wm_copies_wait()
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src));
#else
    (void)dst;
    (void)src;
    asm volatile("trap;");
#endif
}

__device__ __forceinline__ void wm_copies_wait() {
#if defined(LOMAR_EMULATION)
    emu_cp_async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Rows [0, L) of an (L, D) bf16 matrix at src (row stride in elements, rows 16-byte aligned) into a tile, with
// wm_copy16 (complete after wm_copies_wait()).
template <int D>
__device__ __forceinline__ void wm_load_rows(unsigned short* dst, const unsigned short* __restrict__ src,
                                             long long rs, int L) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int RS = WmLayout<D>::RS;
    for (int e = threadIdx.x; e < L * CPR; e += WM_THREADS) {
        const int r = e / CPR;
        const int c = e - r * CPR;
        wm_copy16(dst + r * RS + 8 * c, src + r * rs + 8 * c);
    }
}

// Once per block: zero the rows [from, WM_ROWS) of a tile (row stride ld elements).
__device__ __forceinline__ void wm_zero_rows(unsigned short* m, int ld, int from) {
    for (int e = threadIdx.x + from * ld; e < WM_ROWS * ld; e += WM_THREADS) m[e] = 0;
}

// T^T as bf16: row b holds T[:, b] (b < NB), zero rows after.
template <int D>
__device__ __forceinline__ void wm_load_table(unsigned short* stt, const float* __restrict__ table, int NB) {
    constexpr int RS = WmLayout<D>::RS;
    for (int e = threadIdx.x; e < WM_ROWS * D; e += WM_THREADS) {
        const int b = e / D;
        const int d = e - b * D;
        stt[b * RS + d] = (b < NB) ? from_f32<lomar_bf16>(table[d * NB + b]).bits : (unsigned short)0;
    }
}

// The A fragments of the 16-row strip at r0 of a D-wide bf16 tile in shared memory.
template <int D>
__device__ __forceinline__ void wm_strip_frags(unsigned int (&a)[D / 16][4], const unsigned short* m, int r0) {
#pragma unroll
    for (int x = 0; x < D / 16; ++x) wm_frag_a(a[x], m, WmLayout<D>::RS, r0, 16 * x);
}

// The same from an (L, D) bf16 matrix in global memory (row stride rs elements; 4-byte loads), zero past row L.
template <int D>
__device__ __forceinline__ void wm_strip_frags_global(unsigned int (&a)[D / 16][4], const unsigned short* __restrict__ src,
                                                      long long rs, int r0, int L) {
    const int lane = threadIdx.x & 31;
    const int r = r0 + (lane >> 2);
    const int t2 = 2 * (lane & 3);
    const unsigned short* p0 = src + r * rs + t2;
    const unsigned short* p1 = p0 + 8 * rs;
#pragma unroll
    for (int x = 0; x < D / 16; ++x) {
        a[x][0] = r < L ? *reinterpret_cast<const unsigned int*>(p0 + 16 * x) : 0u;
        a[x][1] = r + 8 < L ? *reinterpret_cast<const unsigned int*>(p1 + 16 * x) : 0u;
        a[x][2] = r < L ? *reinterpret_cast<const unsigned int*>(p0 + 16 * x + 8) : 0u;
        a[x][3] = r + 8 < L ? *reinterpret_cast<const unsigned int*>(p1 + 16 * x + 8) : 0u;
    }
}

// c = A B^T over the D columns for the n-tile pairs p < np: A the strip's fragments, B the rows
// [16 p, 16 p + 16) of a D-wide tile (q k^T, q T, do v^T).
template <int D>
__device__ __forceinline__ void wm_abt(float (&c)[8][4], const unsigned int (&a)[D / 16][4], const unsigned short* bm,
                                       int np) {
    constexpr int RS = WmLayout<D>::RS;
    wa_zero(c);
#pragma unroll
    for (int x = 0; x < D / 16; ++x) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            if (p < np) {
                unsigned int b[4];
                wm_frag_b_nk(b, bm, RS, 16 * p, 16 * x);
                wa_mma(c[2 * p], a[x], b[0], b[1]);
                wa_mma(c[2 * p + 1], a[x], b[2], b[3]);
            }
        }
    }
}

// Logits of the strip in place: scale q.k + (q T)[bucket] from the fp32 q T scratch rows (sqt); WM_NEG past
// column L, 0 in rows past L, NaN for a bad bucket.
__device__ __forceinline__ void wm_logits(float (&s)[8][4], const float* sqt, const unsigned char* sbk,
                                          int r0, int L, float scale) {
    const int lane = threadIdx.x & 31;
    const int t2 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = r0 + (lane >> 2) + 8 * (e >> 1);
            const int col = 8 * j + t2 + (e & 1);
            float x = WM_NEG;
            if (i >= L) {
                x = 0.f;
            } else if (col < L) {
                const int b = sbk[i * L + col];
                x = scale * s[j][e] +
                    (b != WA_BAD_BUCKET ? sqt[i * WM_QS + b] : __int_as_float(0x7fffffff));
            }
            s[j][e] = x;
        }
}

// The strip's logits into s from its q fragments: q T goes to the fp32 scratch sqt first (the warp's rows),
// then s = q k^T and the lookup of wm_logits.
template <int D>
__device__ __forceinline__ void wm_strip_logits(float (&s)[8][4], const unsigned int (&qa)[D / 16][4],
                                                const unsigned short* sk, const unsigned short* stt, float* sqt,
                                                const unsigned char* sbk, int r0, int L, int NB, float scale) {
    const int nbp = (NB + 15) >> 4;
    wm_abt<D>(s, qa, stt, nbp);
    wm_store_tile_f32(sqt, WM_QS, r0, 2 * nbp, s);
    wm_abt<D>(s, qa, sk, (L + 15) >> 4);
    wm_syncwarp();
    wm_logits(s, sqt, sbk, r0, L, scale);
}

// Grid: any number of blocks; block: WM_THREADS; dynamic shared memory: wm_fwd_shared_bytes(L, NB, D).
// Strides in elements (bf16); out through its strides; lse (N * H, L) fp32 contiguous.
template <int D>
__global__ void __launch_bounds__(WM_THREADS, (D <= 64 ? WM_FWD_BLOCKS : 2))
window_attention_mma_fwd(const unsigned short* __restrict__ q, long long q_sn, long long q_sh, long long q_si,
                         const unsigned short* __restrict__ k, long long k_sn, long long k_sh, long long k_si,
                         const unsigned short* __restrict__ v, long long v_sn, long long v_sh, long long v_si,
                         const float* __restrict__ table, const long long* __restrict__ buckets,
                         unsigned short* __restrict__ out, long long o_sn, long long o_sh, long long o_si,
                         float* __restrict__ lse, int H, int L, int NB, long long NP, float scale) {
    using Lay = WmLayout<D>;
    constexpr int RS = Lay::RS;
    extern __shared__ float4 smem_wm[];
    unsigned short* sk = reinterpret_cast<unsigned short*>(smem_wm);
    unsigned short* sv = sk + Lay::TILE;
    unsigned short* stt = sv + Lay::TILE;
    float* sqt = reinterpret_cast<float*>(stt + Lay::TILE);  // q T of each strip (the warp's 16 rows)
    unsigned char* sbk = reinterpret_cast<unsigned char*>(sqt + WM_ROWS * WM_QS);

    const int lane = threadIdx.x & 31;
    const int r0 = 16 * (threadIdx.x >> 5);
    const int nkp = (L + 15) >> 4;  // 16-key steps (pairs of key n-tiles)

    wm_zero_rows(sk, RS, L);
    wm_zero_rows(sv, RS, L);
    wm_load_table<D>(stt, table, NB);
    wa_load_buckets(sbk, buckets, L, NB);

    for (long long p = blockIdx.x; p < NP; p += gridDim.x) {
        const long long n = p / H;
        const long long h = p - n * H;
        unsigned int qa[D / 16][4];
        if (r0 < L) wm_strip_frags_global<D>(qa, q + n * q_sn + h * q_sh, q_si, r0, L);
        wm_load_rows<D>(sk, k + n * k_sn + h * k_sh, k_si, L);
        wm_load_rows<D>(sv, v + n * v_sn + h * v_sh, v_si, L);
        wm_copies_wait();
        __syncthreads();
        if (r0 < L) {
            float s[8][4];
            wm_strip_logits<D>(s, qa, sk, stt, sqt, sbk, r0, L, NB, scale);
            // softmax of rows g (elements 0, 1) and g + 8 (2, 3); a row's columns are spread over a lane quad
            float m[2] = {WM_NEG, WM_NEG};
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) m[e >> 1] = fmaxf(m[e >> 1], s[j][e]);
            float l[2] = {0.f, 0.f};
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                m[x] = fmaxf(m[x], __shfl_xor_sync(0xffffffffu, m[x], 1));
                m[x] = fmaxf(m[x], __shfl_xor_sync(0xffffffffu, m[x], 2));
            }
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[j][e] = __expf(s[j][e] - m[e >> 1]);
                    l[e >> 1] += s[j][e];
                }
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
                l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
            }
            const float inv[2] = {1.f / l[0], 1.f / l[1]};
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] *= inv[e >> 1];
            const int i = r0 + (lane >> 2);
            if ((lane & 3) == 0) {
                if (i < L) lse[p * L + i] = m[0] + __logf(l[0]);
                if (i + 8 < L) lse[p * L + i + 8] = m[1] + __logf(l[1]);
            }
            // out = P v: P from the registers, v through ldmatrix.trans
            float o[D / 8][4];
            wa_zero(o);
            wm_acc_mm<D>(o, s, sv, nkp);
            wm_store_rows(out + n * o_sn + h * o_sh, o_si, r0, L, o, 1.f);
        }
        __syncthreads();
    }
}

// Grid: any number of blocks (each writes one dT partial); block: WM_THREADS; dynamic shared memory:
// wm_bwd_shared_bytes(L, NB, D). Strides in elements (bf16); dq, dk, dv share one set of strides;
// dtable_part: (gridDim.x, D, NB) fp32, every element written.
template <int D>
__global__ void __launch_bounds__(WM_THREADS, 2)
window_attention_mma_bwd(const unsigned short* __restrict__ q, long long q_sn, long long q_sh, long long q_si,
                         const unsigned short* __restrict__ k, long long k_sn, long long k_sh, long long k_si,
                         const unsigned short* __restrict__ v, long long v_sn, long long v_sh, long long v_si,
                         const unsigned short* __restrict__ o, long long o_sn, long long o_sh, long long o_si,
                         const unsigned short* __restrict__ dout, long long do_sn, long long do_sh, long long do_si,
                         const float* __restrict__ lse, const float* __restrict__ table,
                         const long long* __restrict__ buckets, unsigned short* __restrict__ dq,
                         unsigned short* __restrict__ dk, unsigned short* __restrict__ dv, long long g_sn,
                         long long g_sh, long long g_si, float* __restrict__ dtable_part, int H, int L, int NB,
                         long long NP, float scale) {
    using Lay = WmLayout<D>;
    constexpr int RS = Lay::RS;
    extern __shared__ float4 smem_wm[];
    unsigned short* sq = reinterpret_cast<unsigned short*>(smem_wm);
    unsigned short* sk = sq + Lay::TILE;
    unsigned short* sv = sk + Lay::TILE;
    unsigned short* sdo = sv + Lay::TILE;
    unsigned short* stt = sdo + Lay::TILE;
    unsigned short* sp = stt + Lay::TILE;    // P
    unsigned short* sds = sp + Lay::PTILE;   // dS
    unsigned short* sg = sds + Lay::PTILE;   // G
    float* sqt = reinterpret_cast<float*>(sg + Lay::PTILE);  // q T of each strip, then its dS in fp32
    float* slse = sqt + WM_ROWS * WM_QS;
    float* sdelta = slse + WM_ROWS;
    unsigned char* sbk = reinterpret_cast<unsigned char*>(sdelta + WM_ROWS);
    unsigned char* sperm = sbk + L * L;
    unsigned char* soff = sperm + L * L;

    const int lane = threadIdx.x & 31;
    const int w = threadIdx.x >> 5;
    const int r0 = 16 * w;
    const int nkp = (L + 15) >> 4;
    const int nbp = (NB + 15) >> 4;
    const int nbc = 16 * nbp;  // the G columns the products read

    wm_zero_rows(sq, RS, L);
    wm_zero_rows(sk, RS, L);
    wm_zero_rows(sv, RS, L);
    wm_zero_rows(sdo, RS, L);
    wm_load_table<D>(stt, table, NB);
    wa_load_buckets(sbk, buckets, L, NB);
    for (int i = threadIdx.x; i < WM_ROWS; i += WM_THREADS) sdelta[i] = 0.f;
    __syncthreads();
    wa_bucket_lists(sperm, soff, sbk, L, NB);

    float dtc[D / 8][4];  // dT^T rows [r0, r0 + 16) (buckets), all D columns, over the block's pairs
    wa_zero(dtc);

    for (long long p = blockIdx.x; p < NP; p += gridDim.x) {
        const long long n = p / H;
        const long long h = p - n * H;
        wm_load_rows<D>(sq, q + n * q_sn + h * q_sh, q_si, L);
        wm_load_rows<D>(sk, k + n * k_sn + h * k_sh, k_si, L);
        wm_load_rows<D>(sv, v + n * v_sn + h * v_sh, v_si, L);
        wm_load_rows<D>(sdo, dout + n * do_sn + h * do_sh, do_si, L);
        for (int i = threadIdx.x; i < L; i += WM_THREADS) slse[i] = lse[p * L + i];
        // delta_i = do_i . out_i: two lanes per row (16-byte loads of out, the row's dout from global too)
        {
            const int i = r0 + (lane >> 1);
            const int half = lane & 1;
            float acc = 0.f;
            if (i < L) {
                const unsigned short* orow = o + n * o_sn + h * o_sh + i * o_si + half * (D / 2);
                const unsigned short* drow = dout + n * do_sn + h * do_sh + i * do_si + half * (D / 2);
#pragma unroll
                for (int c = 0; c < D / 16; ++c) {
                    const uint4 a = *reinterpret_cast<const uint4*>(orow + 8 * c);
                    const uint4 b = *reinterpret_cast<const uint4*>(drow + 8 * c);
                    const unsigned int av[4] = {a.x, a.y, a.z, a.w};
                    const unsigned int bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        acc = fmaf(__uint_as_float(av[x] << 16), __uint_as_float(bv[x] << 16), acc);
                        acc = fmaf(__uint_as_float(av[x] & 0xffff0000u), __uint_as_float(bv[x] & 0xffff0000u), acc);
                    }
                }
            }
            acc += __shfl_xor_sync(0xffffffffu, acc, 1);
            if (i < L && half == 0) sdelta[i] = acc;
        }
        wm_copies_wait();
        __syncthreads();

        if (r0 < L) {
            float s[8][4];
            {
                unsigned int qa[D / 16][4];
                wm_strip_frags<D>(qa, sq, r0);
                wm_strip_logits<D>(s, qa, sk, stt, sqt, sbk, r0, L, NB, scale);
            }
            // P = exp(logit - lse): zero past column L (WM_NEG) and in rows past L
            float dp[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = r0 + (lane >> 2) + 8 * (e >> 1);
                    s[j][e] = (i < L) ? __expf(s[j][e] - slse[i]) : 0.f;
                }
            // dP = do v^T, then dS = P (dP - delta)
            {
                unsigned int da[D / 16][4];
                wm_strip_frags<D>(da, sdo, r0);
                wm_abt<D>(dp, da, sv, nkp);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = r0 + (lane >> 2) + 8 * (e >> 1);
                    dp[j][e] = s[j][e] * (dp[j][e] - sdelta[i]);
                }
            wm_store_tile(sp, WM_PS, r0, 2 * nkp, s);
            wm_store_tile(sds, WM_PS, r0, 2 * nkp, dp);
            wm_syncwarp();  // the lanes' reads of q T (wm_logits) are done: dS in fp32 takes its place
            wm_store_tile_f32(sqt, WM_QS, r0, 2 * nkp, dp);
            wm_syncwarp();
            // G[i, b]: dS of row i (fp32) summed over the keys of bucket b, in ascending key order (zero past NB
            // and in rows past L)
            for (int e = lane; e < 16 * nbc; e += 32) {
                const int i = r0 + e / nbc;
                const int b = e - (i - r0) * nbc;
                float acc = 0.f;
                if (i < L && b < NB) {
                    const unsigned char* pr = sperm + i * L;
                    const int t1 = soff[i * (NB + 1) + b + 1];
                    for (int x = soff[i * (NB + 1) + b]; x < t1; ++x) acc += sqt[i * WM_QS + pr[x]];
                }
                sg[i * WM_PS + b] = from_f32<lomar_bf16>(acc).bits;
            }
            wm_syncwarp();
            // dq = scale dS k + G T^T
            float c[D / 8][4];
            wa_zero(c);
            wm_acc_mm<D>(c, dp, sk, nkp);
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[j][e] *= scale;
            wm_mm_kn<D / 8, false>(c, sg, WM_PS, r0, stt, RS, nbc);
            wm_store_rows(dq + n * g_sn + h * g_sh, g_si, r0, L, c, 1.f);
        }
        __syncthreads();

        const int k16 = 16 * nkp;
        if (r0 < L) {
            // keys [r0, r0 + 16): dk = scale dS^T q, dv = P^T do
            float c[D / 8][4];
            wa_zero(c);
            wm_mm_kn<D / 8, true>(c, sds, WM_PS, r0, sq, RS, k16);
            wm_store_rows(dk + n * g_sn + h * g_sh, g_si, r0, L, c, scale);
            wa_zero(c);
            wm_mm_kn<D / 8, true>(c, sp, WM_PS, r0, sdo, RS, k16);
            wm_store_rows(dv + n * g_sn + h * g_sh, g_si, r0, L, c, 1.f);
        }
        // buckets [r0, r0 + 16): dT^T += G^T q
        if (r0 < NB) wm_mm_kn<D / 8, true>(dtc, sg, WM_PS, r0, sq, RS, k16);
        __syncthreads();
    }

    if (r0 < NB) {
        float* part = dtable_part + (long long)blockIdx.x * D * NB;
        const int b = r0 + (lane >> 2);
        const int t2 = 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int bb = b + 8 * (e >> 1);
                if (bb < NB) part[(8 * j + t2 + (e & 1)) * NB + bb] = dtc[j][e];
            }
    }
}

// Explicit instantiations: nvcc then compiles (and warns about) every variant the runtime can
// ask NVRTC for; NVRTC finds the same ones by name expression.
#define WA_INSTANTIATE(D, TC)                                                                              \
    template __global__ void window_attention_fwd<D, TC>(                                                  \
        const void*, long long, long long, long long, const void*, long long, long long, long long,       \
        const void*, long long, long long, long long, const float*, const long long*, void*, long long,   \
        long long, long long, float*, int, int, int, long long, float, int, int);                         \
    template __global__ void window_attention_bwd<D, TC>(                                                  \
        const void*, long long, long long, long long, const void*, long long, long long, long long,       \
        const void*, long long, long long, long long, const void*, long long, long long, long long,       \
        const void*, long long, long long, long long, const float*, const float*, const long long*,       \
        void*, void*, void*, long long, long long, long long, float*, int, int, int, long long, float,    \
        int, int);
WA_INSTANTIATE(32, false)
WA_INSTANTIATE(64, false)
WA_INSTANTIATE(80, false)
WA_INSTANTIATE(128, false)
WA_INSTANTIATE(32, true)
WA_INSTANTIATE(64, true)
WA_INSTANTIATE(80, true)
WA_INSTANTIATE(128, true)
#define WM_INSTANTIATE(D)                                                                                   \
    template __global__ void window_attention_mma_fwd<D>(                                                  \
        const unsigned short*, long long, long long, long long, const unsigned short*, long long, long long, \
        long long, const unsigned short*, long long, long long, long long, const float*, const long long*,  \
        unsigned short*, long long, long long, long long, float*, int, int, int, long long, float);          \
    template __global__ void window_attention_mma_bwd<D>(                                                  \
        const unsigned short*, long long, long long, long long, const unsigned short*, long long, long long, \
        long long, const unsigned short*, long long, long long, long long, const unsigned short*, long long, \
        long long, long long, const unsigned short*, long long, long long, long long, const float*,          \
        const float*, const long long*, unsigned short*, unsigned short*, unsigned short*, long long,       \
        long long, long long, float*, int, int, int, long long, float);
WM_INSTANTIATE(32)
WM_INSTANTIATE(64)
WM_INSTANTIATE(80)
WM_INSTANTIATE(128)
