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
    for (int e = threadIdx.x; e < L * L; e += WA_THREADS) {
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

__device__ __forceinline__ void wa_tc_zero(float (&c)[WA_TC_NT][4]) {
#pragma unroll
    for (int j = 0; j < WA_TC_NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[j][e] = 0.f;
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
    wa_tc_zero(c);
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
            wa_tc_zero(c);
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
    for (int i = threadIdx.x; i < L; i += WA_THREADS) {
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
    if constexpr (TC) wa_tc_zero(dtc);
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
            wa_tc_zero(c);
            wa_tc_strip(c, wd, wa_round16(L),
                        [&](int j, int i) { return i < L ? sx[i * SE + min(j, L - 1)] : 0.f; },
                        [&](int i, int d) { return i < L ? sdo[i * DS + d] : 0.f; });
            wa_tc_store_bf16(static_cast<unsigned char*>(dv) + hoff, grow, L, c, wd, 1.f);
            // dP = do v^T, then dS = P (dP - delta) over P
            const WaTcWork w = wa_tc_work(L, (L + 7) >> 3, warp);
            wa_tc_zero(c);
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
            wa_tc_zero(c);
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
            wa_tc_zero(c);
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
