// Shared device helpers for the zu_fast CUDA kernels: cp.async, ldmatrix, mma.sync wrappers,
// a bounds- and mask-aware global->shared tile loader, and rounding (nearest / stochastic).
//
// Everything here needs sm_80 or newer (cp.async, ldmatrix, bf16 mma.sync); the same code is
// compiled for sm_80 and sm_90a. Plain CUDA only: no torch headers, so nvcc builds it quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace zu_fast {

// ---------------------------------------------------------------------------------------------
// Asynchronous copies (cp.async, sm_80+)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg). Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// ldmatrix / mma.sync (m16n8k16, fp32 accumulators)
// ---------------------------------------------------------------------------------------------
// Four 8x8 b16 matrices; lanes 8*q .. 8*q+7 give the row addresses of matrix q, register q of
// every lane receives its part of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// Same, each 8x8 matrix transposed on the way (lane gets elements (2*(lane%4)+{0,1}, lane/4)).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// c += a * b for one 16x8x16 tile; a: 4 regs (row-major 16x16), b: 2 regs (col-major 16x8).
template <typename T>
struct Mma16816;

template <>
struct Mma16816<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma16816<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------
// Tile loader: global [rows, cols] (cols contiguous, rows `gld` elements apart) -> shared memory
// [ROWS][sld] starting at (row0, col0). Elements outside [nrows, ncols], and whole rows whose mask
// byte is 0, are written as zeros. `vec_ok` says every row start is 16-byte aligned (base pointer
// and gld * sizeof(E) both multiples of 16): then full 16-byte chunks go through cp.async and only
// the ragged right edge is copied element by element; otherwise every chunk is copied element by
// element (slow but correct for any stride). E is the raw storage type (uint16_t or float/double).
// The caller commits the cp.async group and waits / __syncthreads before reading.
// ---------------------------------------------------------------------------------------------
template <typename E, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void load_tile(E* __restrict__ smem, int sld, const E* __restrict__ g, int64_t gld,
                                          int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                                          const uint8_t* __restrict__ mask, bool vec_ok) {
  constexpr int EPC = 16 / static_cast<int>(sizeof(E));  // elements per 16-byte chunk
  static_assert(COLS % EPC == 0, "tile width must be a whole number of 16-byte chunks");
  constexpr int CPR = COLS / EPC;  // chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  static_assert(CHUNKS % NTHREADS == 0, "chunks must divide evenly among the threads");
#pragma unroll
  for (int it = 0; it < CHUNKS / NTHREADS; ++it) {
    const int c = it * NTHREADS + static_cast<int>(threadIdx.x);
    const int r = c / CPR;
    const int cc = (c % CPR) * EPC;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + cc;
    E* dst = smem + r * sld + cc;
    const bool row_ok = gr < nrows && (mask == nullptr || mask[gr] != 0);
    if (row_ok && vec_ok && gc + EPC <= ncols) {
      cp_async16(dst, g + gr * gld + gc);
    } else if (!row_ok || gc >= ncols) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else {
      const E* src = g + gr * gld;
#pragma unroll
      for (int e = 0; e < EPC; ++e) dst[e] = (gc + e < ncols) ? src[gc + e] : E(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Counter-based random bits: splitmix64 finaliser of (seed, index). Stateless, so the result for
// an element does not depend on the tiling, the chunking or the launch configuration.
// ---------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The stream seed of a user seed (the user seed is mixed once, so seeds 0, 1, 2 ... give unrelated
// streams), and 32 random bits for element `index` of that stream. The torch default implements the
// same hash (zu_fast/ops/multiplicative_update.py: sr_random_bits); tests compare them bit for bit.
__host__ __device__ __forceinline__ uint64_t sr_stream_seed(uint64_t seed) { return mix64(seed ^ 0x5A17F00DULL); }

__device__ __forceinline__ uint32_t random_u32(uint64_t seed, uint64_t index) {
  return static_cast<uint32_t>(mix64(seed + (index + 1ull) * 0x9E3779B97F4A7C15ull) >> 32);
}

// ---------------------------------------------------------------------------------------------
// Rounding of an fp32/fp64 result to the storage type, once.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Store;

template <>
struct Store<float> {
  static __device__ __forceinline__ void run(float* p, float v, bool, uint32_t) { *p = v; }
  static __device__ __forceinline__ void run(float* p, double v, bool, uint32_t) { *p = static_cast<float>(v); }
};

// bf16: stochastic rounding adds 16 uniform random bits below the kept mantissa and truncates,
// i.e. rounds the magnitude up with probability equal to the dropped fraction (unbiased).
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float v, uint32_t rnd) {
  const uint32_t bits = __float_as_uint(v);
  const uint32_t up = (bits + (rnd & 0xFFFFu)) & 0xFFFF0000u;
  const float r = __uint_as_float(up);
  if (!isfinite(v) || !isfinite(r)) return __float2bfloat16_rn(v);
  __nv_bfloat16_raw raw;
  raw.x = static_cast<unsigned short>(up >> 16);
  return __nv_bfloat16(raw);
}

template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ void run(__nv_bfloat16* p, float v, bool sr, uint32_t rnd) {
    *p = sr ? bf16_stochastic(v, rnd) : __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void run(__nv_bfloat16* p, double v, bool sr, uint32_t rnd) {
    *p = sr ? bf16_stochastic(static_cast<float>(v), rnd) : __double2bfloat16(v);
  }
};

// fp16: round |v| toward zero, then step one ulp up with probability (|v| - lo) / ulp; sign last.
__device__ __forceinline__ __half f16_stochastic(float v, uint32_t rnd) {
  const float a = fabsf(v);
  if (!isfinite(v) || a >= 65504.0f) return __float2half_rn(v);
  __half_raw lo = static_cast<__half_raw>(__float2half_rz(a));
  const float lof = __half2float(__half(lo));
  if (lof != a) {
    __half_raw hi = lo;
    hi.x = static_cast<unsigned short>(lo.x + 1u);  // next magnitude up (a < 65504: stays finite)
    const float gap = __half2float(__half(hi)) - lof;
    const float p = (a - lof) / gap;
    const float u = static_cast<float>(rnd >> 8) * (1.0f / 16777216.0f);  // uniform in [0, 1)
    if (u < p) lo = hi;
  }
  if (signbit(v)) lo.x = static_cast<unsigned short>(lo.x | 0x8000u);
  return __half(lo);
}

template <>
struct Store<__half> {
  static __device__ __forceinline__ void run(__half* p, float v, bool sr, uint32_t rnd) {
    *p = sr ? f16_stochastic(v, rnd) : __float2half_rn(v);
  }
  static __device__ __forceinline__ void run(__half* p, double v, bool sr, uint32_t rnd) {
    *p = sr ? f16_stochastic(static_cast<float>(v), rnd) : __double2half(v);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

}  // namespace zu_fast
