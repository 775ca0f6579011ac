"""CPU emulation of the CUDA kernels in ``cuda/`` (catches indexing and synchronization errors without a GPU).

The .cu sources are compiled as host C++ with a small emulation layer: one std::thread per CUDA
thread, std::barrier for __syncthreads and the warp collectives, blocks run one after another
(so __shared__ becomes static storage and the dynamic shared memory one static buffer). fp16
conversions (inline PTX) are stubbed out; the fp32 and bf16 paths are exercised for real.

It also holds what both kernel test files share: the architectures and dtypes checked, the GPU-only
marker and the toolchain requirement.

A test module builds one shared library from the sources it needs plus its own ``extern "C"`` entry
points (each calling ``emu_launch(grid, block, [&] { ns::kernel(...); })``), loads it with ctypes and
passes arguments through :func:`c_args`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch

from lomar_fast.ops import _cuda_build as cb

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def launched() -> Iterator[list[str]]:
    """The kernels ``lomar_fast.ops._cuda_build.launch`` starts inside the block, by name expression. The ops fall
    back to PyTorch where a kernel cannot run (dtype, shared memory, alignment), and the fallback gives the same
    values and layout: a GPU test asserts on this list that the kernel itself ran."""
    names: list[str] = []
    real = cb.launch

    def spy(filename, name_expressions, kernel, *args, **kwargs):
        names.append(kernel)
        return real(filename, name_expressions, kernel, *args, **kwargs)

    cb.launch = spy
    try:
        yield names
    finally:
        cb.launch = real


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_test(fn):
    """Mark a test as GPU-only: skipped cleanly without a CUDA device (or without CuPy)."""
    if not _has_cuda():
        fn = pytest.mark.skip(reason="needs a CUDA device")(fn)
    elif not _has_cupy():
        fn = pytest.mark.skip(reason="CuPy is not installed (pip install 'lomar_fast[gpu]')")(fn)
    return pytest.mark.gpu(fn)


EMU_LAYER = r"""#include <thread>
#include <barrier>
#include <memory>
#include <vector>
#include <cstring>
#include <cmath>
#include <functional>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) float4 { float x, y, z, w; };  // CUDA's alignments: a misaligned
struct alignas(8) float2 { float x, y; };  // vector access trips the alignment
struct alignas(16) uint4 { unsigned x, y, z, w; };  // sanitizer
struct alignas(8) uint2 { unsigned x, y; };
static dim3 blockIdx, blockDim, gridDim;
static thread_local dim3 threadIdx;
static std::barrier<>* g_bar = nullptr;
static std::barrier<>* g_warp_bar[32];
static unsigned g_warp_scratch[32][32];
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
// Under the race check (LOMAR_RACE_CHECK, a ThreadSanitizer build) a warp instruction exchanges its lanes'
// registers without ordering their memory, as on a GPU: its barriers and its scratch traffic are hidden from the
// sanitizer, so only __syncwarp and __syncthreads order one thread's shared-memory writes before another's reads.
#ifdef LOMAR_RACE_CHECK
extern "C" {
void AnnotateIgnoreSyncBegin(const char*, int); void AnnotateIgnoreSyncEnd(const char*, int);
void AnnotateIgnoreReadsBegin(const char*, int); void AnnotateIgnoreReadsEnd(const char*, int);
void AnnotateIgnoreWritesBegin(const char*, int); void AnnotateIgnoreWritesEnd(const char*, int);
}
#define EMU_QUIET_BEGIN() (AnnotateIgnoreSyncBegin(__FILE__, __LINE__), AnnotateIgnoreReadsBegin(__FILE__, __LINE__), \
                           AnnotateIgnoreWritesBegin(__FILE__, __LINE__))
#define EMU_QUIET_END() (AnnotateIgnoreWritesEnd(__FILE__, __LINE__), AnnotateIgnoreReadsEnd(__FILE__, __LINE__), \
                         AnnotateIgnoreSyncEnd(__FILE__, __LINE__))
#else
#define EMU_QUIET_BEGIN() ((void)0)
#define EMU_QUIET_END() ((void)0)
#endif
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned __ballot_sync(unsigned, bool pred) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  EMU_QUIET_BEGIN();
  g_warp_scratch[w][l] = pred; g_warp_bar[w]->arrive_and_wait();
  unsigned r = 0; for (int i = 0; i < 32; ++i) if (g_warp_scratch[w][i]) r |= 1u << i;
  g_warp_bar[w]->arrive_and_wait();
  EMU_QUIET_END();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  EMU_QUIET_BEGIN();
  g_warp_scratch[w][l] = __float_as_uint(v); g_warp_bar[w]->arrive_and_wait();
  float r = __uint_as_float(g_warp_scratch[w][l ^ o]);
  g_warp_bar[w]->arrive_and_wait();
  EMU_QUIET_END();
  return r;
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 as a warp collective: every lane publishes its
// registers, each lane rebuilds A (16 x 16) and B (16 x 8) by the PTX fragment layout and computes its own
// four accumulator elements (c0, c1: row g; c2, c3: row g + 8; columns 2 (lane % 4) + 0, 1).
#define LOMAR_EMULATION 1
static unsigned g_mma_frag[32][32][6];
inline float emu_bf16(unsigned bits) { return __uint_as_float((bits & 0xffffu) << 16); }
// fp16 <-> fp32 as the PTX cvt instructions do them (cvt.rn: round to nearest even), in integer arithmetic
inline float emu_f16_to_f32(unsigned short h) {
  int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  float r = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 0x400), e - 25);
  return (h & 0x8000) ? -r : r;
}
inline unsigned short emu_f32_to_f16(float f) {
  unsigned x; std::memcpy(&x, &f, 4);
  unsigned short s = (unsigned short)((x >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (std::isnan(f)) return s | 0x7e00u;
  if (a >= 65520.f) return s | 0x7c00u;                                     // past the largest half: inf
  if (a < 6.103515625e-05f) return s | (unsigned short)std::nearbyint(a * 16777216.f);  // subnormal halves
  unsigned e = ((x >> 23) & 0xffu) - 112u, m = x & 0x7fffffu;                // rebias 127 -> 15
  unsigned out = (e << 10) | (m >> 13), rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) out += 1;           // may carry into the exponent
  return s | (unsigned short)out;
}
inline void emu_mma_bf16_m16n8k16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  EMU_QUIET_BEGIN();
  for (int r = 0; r < 4; ++r) g_mma_frag[w][l][r] = a[r];
  g_mma_frag[w][l][4] = b0; g_mma_frag[w][l][5] = b1;
  g_warp_bar[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int x = 0; x < 32; ++x) {
    const unsigned* f = g_mma_frag[w][x];
    int g = x / 4, t2 = 2 * (x % 4);
    for (int e = 0; e < 2; ++e) {
      A[g][t2 + e] = emu_bf16(f[0] >> (16 * e));
      A[g + 8][t2 + e] = emu_bf16(f[1] >> (16 * e));
      A[g][t2 + 8 + e] = emu_bf16(f[2] >> (16 * e));
      A[g + 8][t2 + 8 + e] = emu_bf16(f[3] >> (16 * e));
      B[t2 + e][g] = emu_bf16(f[4] >> (16 * e));
      B[t2 + 8 + e][g] = emu_bf16(f[5] >> (16 * e));
    }
  }
  int g = l / 4, t2 = 2 * (l % 4);
  for (int e = 0; e < 4; ++e) {
    int row = g + 8 * (e / 2), col = t2 + e % 2;
    float s = c[e];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    c[e] = s;
  }
  g_warp_bar[w]->arrive_and_wait();
  EMU_QUIET_END();
}
inline void __syncwarp() { g_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
// cp.async (16 bytes, global to shared): a thread's copies wait in its queue until its cp.async.wait_all, as on a
// GPU, where they land at some time before it; a tile read before the wait (and the barrier after it) holds the
// previous pair's values, or the NaN of fresh shared memory. Both addresses must be 16-byte aligned.
struct EmuCopy { void* dst; unsigned char bytes[16]; };
static thread_local std::vector<EmuCopy> g_cp_async;
inline void emu_cp_async16(void* dst, const void* src) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 || reinterpret_cast<std::uintptr_t>(src) % 16) std::abort();
  EmuCopy c; c.dst = dst; std::memcpy(c.bytes, src, 16); g_cp_async.push_back(c);
}
inline void emu_cp_async_wait_all() {
  for (const EmuCopy& c : g_cp_async) std::memcpy(c.dst, c.bytes, 16);
  g_cp_async.clear();
}
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 as a warp collective: lane l gives the address of row l % 8
// of matrix l / 8 (16-byte aligned: a misaligned row aborts, as it faults on a GPU); register m of lane l
// receives matrix m's (row l / 4, columns 2 (l % 4) + 0, 1), transposed: (rows 2 (l % 4) + 0, 1, column l / 4).
static const unsigned short* g_ldsm_rows[32][32];
inline void emu_ldmatrix_x4(unsigned (&r)[4], const unsigned short* p, bool trans) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (reinterpret_cast<std::uintptr_t>(p) % 16) std::abort();
  const unsigned short* rows[32];
  EMU_QUIET_BEGIN();
  g_ldsm_rows[w][l] = p; g_warp_bar[w]->arrive_and_wait();
  for (int x = 0; x < 32; ++x) rows[x] = g_ldsm_rows[w][x];
  EMU_QUIET_END();
  // the shared-memory reads themselves are checked: what another lane wrote needs a barrier before them
  int g = l / 4, t2 = 2 * (l % 4);
  for (int m = 0; m < 4; ++m) {
    unsigned lo, hi;
    if (trans) { lo = rows[8 * m + t2][g]; hi = rows[8 * m + t2 + 1][g]; }
    else { lo = rows[8 * m + g][t2]; hi = rows[8 * m + g][t2 + 1]; }
    r[m] = lo | (hi << 16);
  }
  EMU_QUIET_BEGIN();
  g_warp_bar[w]->arrive_and_wait();
  EMU_QUIET_END();
}
alignas(16) float4 g_smem[1 << 14];
// the dynamic shared memory of a launch: g_smem, or exactly what an emu_launch_sized asked for
static float4* g_smem_ptr = g_smem;
static size_t g_smem_bytes = sizeof(g_smem);
template <typename F> void emu_launch(int grid, int block, F f) {
  gridDim.x = grid; blockDim.x = block;
  for (int b = 0; b < grid; ++b) {
    blockIdx.x = b;
    // shared memory starts as garbage on a GPU: NaN here, so a read before a write shows in the results
    { unsigned* u = (unsigned*)g_smem_ptr; for (size_t i = 0; i < g_smem_bytes / 4; ++i) u[i] = 0x7fc00001u; }
    std::barrier<> bar(block); g_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (int w = 0; w < block / 32; ++w) { wb.emplace_back(new std::barrier<>(32)); g_warp_bar[w] = wb.back().get(); }
    std::vector<std::thread> ts;
    for (int t = 0; t < block; ++t) ts.emplace_back([t, &f] { threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
  }
}
// a launch whose dynamic shared memory is exactly ``bytes`` (rounded up to 16): under AddressSanitizer an access
// past it, an illegal address on a GPU, is reported
template <typename F> void emu_launch_sized(int grid, int block, size_t bytes, F f) {
  std::unique_ptr<float4[]> buf(new float4[(bytes + 15) / 16]);
  float4* old = g_smem_ptr; size_t old_bytes = g_smem_bytes;
  g_smem_ptr = buf.get(); g_smem_bytes = (bytes + 15) / 16 * 16;
  emu_launch(grid, block, f);
  g_smem_ptr = old; g_smem_bytes = old_bytes;
}
"""

# bytes of the emulated dynamic shared memory (g_smem above)
SHARED_BYTES = 16 * (1 << 14)


def host_source(filename: str, namespace: str, source: str | None = None) -> str:
    """The CUDA source ``filename`` (local headers inlined, explicit instantiations dropped), or ``source`` in its
    place, as host C++ inside ``namespace``, for the emulation layer."""
    src = cb.runtime_source(filename) if source is None else source.split(cb.EXPLICIT_INSTANTIATIONS)[0]
    # the fp16 conversions in host arithmetic (emu_f16_to_f32 / emu_f32_to_f16 above)
    src = re.sub(r'asm\("cvt\.f32\.f16.*?\);', "f = emu_f16_to_f32(x.bits);", src)
    src = re.sub(r'asm\("cvt\.rn\.f16\.f32.*?\);', "r.bits = emu_f32_to_f16(x);", src)
    src = re.sub(r"extern __shared__ float4 (\w+)\[\];", r"float4* \1 = g_smem_ptr;", src)
    src = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = (float*)g_smem_ptr;", src)
    src = src.replace("__shared__", "static").replace("nullptr", "(TOut*)0")
    return f"namespace {namespace} {{\n{src}\n}}"


def emulation_source(sources: Iterable[tuple], entry: str) -> str:
    """The emulation layer, each ``(filename, namespace)`` or ``(filename, namespace, source text)`` source as
    host C++, then the ``entry`` code."""
    return "\n".join([EMU_LAYER, *(host_source(*src) for src in sources), entry])


def missing_toolchain(reason: str) -> None:
    """Skip a CPU-side kernel check whose tool is missing, or fail where the toolchain is required
    (LOMAR_REQUIRE_TOOLCHAIN=1, as .ci/run sets it: CI has nvcc, cuda.bindings and g++)."""
    if os.environ.get("LOMAR_REQUIRE_TOOLCHAIN") == "1":
        pytest.fail(f"{reason} (LOMAR_REQUIRE_TOOLCHAIN=1: this check must run here)")
    pytest.skip(reason)


def build_library(source: str, directory: Path, name: str = "emu") -> ctypes.CDLL:
    """Compile ``source`` into a shared library in ``directory`` and load it (skips the calling test when
    there is no host C++ compiler with C++20 ``<barrier>``; a compile error fails it)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        missing_toolchain("no host C++ compiler for the kernel emulation")
    cpp, lib = directory / f"{name}.cpp", directory / f"lib{name}.so"
    cpp.write_text(source)
    base = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-o", str(lib), str(cpp), "-lpthread"]
    # misaligned vector loads and stores abort (they fault on a GPU, not on x86); without the sanitizer's
    # runtime library the build goes on without the check
    r = subprocess.run([*base, "-fsanitize=alignment", "-fno-sanitize-recover=all"], capture_output=True, text=True)
    if r.returncode != 0 and ("sanitize" in r.stderr or "ubsan" in r.stderr):
        r = subprocess.run(base, capture_output=True, text=True)
    if r.returncode != 0 and "barrier" in r.stderr:
        missing_toolchain("host compiler lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


SANITIZERS = {  # flags, and the line each report starts with
    "thread": (["-fsanitize=thread", "-DLOMAR_RACE_CHECK"], "WARNING: ThreadSanitizer: data race"),
    "address": (["-fsanitize=address,alignment", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
                "ERROR: AddressSanitizer"),
}


def build_sanitized(source: str, directory: Path, sanitizer: str, name: str = "checked") -> Path:
    """Compile ``source`` (an emulation with a ``main``) into an executable under a sanitizer. ``thread``: every
    emulated GPU thread is a host thread and each barrier (``__syncthreads``, ``__syncwarp``) an ``std::barrier``,
    while warp instructions order no memory (LOMAR_RACE_CHECK), so a missing barrier shows as a data race on the
    emulated shared memory. ``address``: an access past a launch's shared memory (``emu_launch_sized``) or past a
    buffer is reported. Skips (fails where the toolchain is required) without a C++20 compiler and the
    sanitizer's runtime."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        missing_toolchain("no host C++ compiler for the kernel emulation")
    cpp, exe = directory / f"{name}.cpp", directory / name
    cpp.write_text(source)
    flags = SANITIZERS[sanitizer][0]
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-g", *flags, "-o", str(exe), str(cpp), "-lpthread"],
                       capture_output=True, text=True)
    if r.returncode != 0 and any(w in r.stderr for w in ("tsan", "asan", "sanitize", "barrier")):
        missing_toolchain(f"no {sanitizer} sanitizer build for the kernel check: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def run_sanitized(exe: Path, sanitizer: str, *args) -> tuple[int, str, int]:
    """(exit status, output, sanitizer reports) of a :func:`build_sanitized` executable; a status of 66 means the
    sanitizer reported. Where the kernel's address-space layout does not suit the sanitizer, the run is repeated
    without address randomization."""
    opts = "halt_on_error=0 exitcode=66 report_signal_unsafe=0 history_size=2"
    env = dict(os.environ, TSAN_OPTIONS=opts, ASAN_OPTIONS="exitcode=66 detect_leaks=0",
               UBSAN_OPTIONS="halt_on_error=1 exitcode=66")
    cmd = [str(exe), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if "unexpected memory mapping" in r.stderr and shutil.which("setarch"):
        r = subprocess.run(["setarch", os.uname().machine, "-R", *cmd], capture_output=True, text=True, env=env,
                           timeout=600)
    if "unexpected memory mapping" in r.stderr or "FATAL: ThreadSanitizer" in r.stderr:
        missing_toolchain(f"the {sanitizer} sanitizer cannot run here: {r.stderr[-300:]}")
    out = r.stdout + r.stderr
    return r.returncode, out, out.count(SANITIZERS[sanitizer][1]) + out.count("runtime error:")


def nvcc_check(nvcc: str, source: str | Path, archs: Iterable[int]) -> list[str]:
    """The nvcc command that checks ``source``: PTX for each of ``archs``, the front end's and the host compiler's
    warnings as errors. ptxas's warnings are checked through NVRTC, whose log holds them."""
    cmd = [nvcc, "-std=c++17"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return [*cmd, "-c", str(source), "-o", "/dev/null", "-Werror", "all-warnings"]


def nvrtc_compile(source: str, filename: str, name_expressions, options, ptx: bool = False):
    """Compile ``source`` with NVRTC (cuda.bindings) and ``options``: (compiled, log, name expression -> lowered
    name, the PTX when ``ptx`` and the target is virtual (``compute_XX``), else None). Skips (fails where the
    toolchain is required) without cuda-python."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        missing_toolchain("cuda-python (cuda.bindings) is not installed")
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    assert err == ok, err
    try:
        for name in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
            assert err == ok, (name, err)
        opts = [o.encode() for o in options]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        # a fresh mutable buffer: NVRTC writes into it (a bytes object such as b" " * 1 is a shared,
        # immutable singleton that the write would corrupt for the whole interpreter)
        buf = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = bytes(buf).rstrip(b"\x00 ").decode(errors="replace")
        lowered, text = {}, None
        if status == ok:
            for name in name_expressions:
                err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
                assert err == ok, (name, err)
                lowered[name] = low
            if ptx:
                err, size = nvrtc.nvrtcGetPTXSize(prog)
                assert err == ok, err
                buf = bytearray(size)
                nvrtc.nvrtcGetPTX(prog, buf)
                text = bytes(buf).decode(errors="replace")
        return status == ok, log, lowered, text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def c_args(*xs):
    """ctypes arguments: tensors -> their data pointer, floats -> float, ("ll", x) -> long long, else int."""
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(ctypes.c_void_p(x.data_ptr()))
        elif isinstance(x, float):
            out.append(ctypes.c_float(x))
        elif isinstance(x, tuple) and x[0] == "ll":
            out.append(ctypes.c_longlong(x[1]))
        else:
            out.append(ctypes.c_int(x))
    return out
