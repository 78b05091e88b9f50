// multiplicative_update_ kernels: out = round(W + E · W[:, chunk]) for one column chunk of W, E = D − I.
//
// In-place safety: the host code (bindings.cpp) walks W in column chunks; each chunk's result
// goes to a staging buffer of W's dtype (a few % of W, never an fp32 copy) and is copied back
// once the whole chunk is computed, because every output tile reads all d rows of its columns.
//
// The delta form. Every kernel computes the product with E = D − I and adds W at the end, in fp32
// (or fp64), before the one rounding: W + E·W instead of D·W. Tensor-core accumulation truncates
// (rounds toward zero after each k16 step); in D·W the truncated quantity is the output itself, so
// the error scales with W (the previous kernel: a median −3.2e-5 relative shrink and 0.4–0.9% of
// bf16 outputs rounded differently from the exact result at d = 8192), while in E·W it scales with
// the edit, which is small for real edits (E·W ≪ W). The caller passes E itself (form "delta",
// what a saved edit stores) or D (form "multiplier"; the kernels then subtract the identity on the
// fly, exactly for the diagonal entries of a near-identity D, without a d×d temporary).
//
// Kernels:
//  * update_delta_bf16_tc (W bf16, E/D fp32): tensor cores. E is split on the fly into two bf16
//    terms E = E_hi + E_lo (+ O(2^-17 |E|)); W is exactly bf16, so every product is exact in fp32.
//    The tensor-core partial sums are handed off to plain fp32 sums every 64 rows of the reduction
//    (two 32-deep slabs), bounding each truncating chain at 8 steps.
//    128x128 tile per CTA, 256 threads (2x4 warps of 64x32), 32-deep k slabs, 3-stage cp.async
//    pipeline; E slab stored fp32 [m][k] (A fragments read as float2), W slab stored as it lies
//    in memory: [k][n] for row-major W (ldmatrix.trans) or [n][k] for column-major W (ldmatrix).
//  * update_simt<T, Acc> (every other combination: fp16/fp32 W, or fp64 E/D): CUDA-core FMA in
//    Acc = E's precision (fp32 or fp64), 64x64 tile, 4x4 outputs per thread, 16-deep k slabs.
//  * One rounding to W's dtype in the epilogue: round-to-nearest, or stochastic rounding with a
//    stateless counter-based hash of (seed, element index), the same hash as the torch default
//    (zu_fast.ops.multiplicative_update.sr_random_bits).
#include "common.cuh"
#include "zu_fast_kernels.h"

namespace zu_fast {
namespace {

constexpr int kThreads = 256;

struct UpdParams {
  const void* dm;  // E (or D, sub_eye = 1) [d, d], contiguous
  int64_t d;
  const void* w;  // W chunk [d, ncols]
  int64_t w_sr, w_sc;
  void* out;
  int64_t o_sr, o_sc;
  int64_t ncols;
  int stochastic;
  int sub_eye;  // 1: dm holds D, use E = D − I
  uint64_t seed;
  int64_t col_offset, d_in_total;
  int d_vec, w_vec;
};

template <typename T, typename Acc>
__device__ __forceinline__ void store_out(const UpdParams& p, int64_t i, int64_t j, Acc v) {
  T* o = static_cast<T*>(p.out) + i * p.o_sr + j * p.o_sc;
  uint32_t rnd = 0;
  if (p.stochastic) rnd = random_u32(p.seed, static_cast<uint64_t>(i * p.d_in_total + p.col_offset + j));
  Store<T>::run(o, v, p.stochastic != 0, rnd);
}

// W[i, j] of the chunk, in Acc precision (exact: bf16/fp16/fp32 values are exact in fp32).
template <typename T, typename Acc>
__device__ __forceinline__ Acc w_at(const UpdParams& p, int64_t i, int64_t j) {
  return static_cast<Acc>(to_float<T>(static_cast<const T*>(p.w)[i * p.w_sr + j * p.w_sc]));
}

// ------------------------------------------------------------------ bf16 W, fp32 E: tensor cores
constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3;
constexpr int kPromote = 2;               // slabs (of kBK rows of the reduction) per tensor-core chain
constexpr int kLdA = kBK + 8;             // fp32 E slab row [m][k]: 160 bytes (conflict-free float2 reads)
constexpr int kLdBrow = kBN + 8;          // bf16 W slab [k][n]: 272 bytes
constexpr int kLdBcol = kBK + 8;          // bf16 W slab [n][k]: 80 bytes
constexpr int kSlabA = kBM * kLdA;        // floats
constexpr int kSlabB = (kBK * kLdBrow > kBN * kLdBcol) ? kBK * kLdBrow : kBN * kLdBcol;  // uint16
constexpr size_t kSmemTc = size_t(kStages) * (kSlabA * sizeof(float) + kSlabB * sizeof(uint16_t));

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

// x = hi + lo (+ O(2^-17 |x|)), each part a bf16.
__device__ __forceinline__ void split2(float x, float& hi, float& lo) {
  hi = __bfloat162float(__float2bfloat16_rn(x));
  lo = x - hi;  // exact; rounded to bf16 when packed
}

template <bool W_KMAJOR>
__global__ void __launch_bounds__(kThreads) update_delta_bf16_tc_kernel(const UpdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sA = reinterpret_cast<float*>(smem_raw);
  uint16_t* sB = reinterpret_cast<uint16_t*>(sA + kStages * kSlabA);

  const float* Em = static_cast<const float*>(p.dm);
  const uint16_t* W = static_cast<const uint16_t*>(p.w);
  const int64_t d = p.d;
  const int64_t m0 = int64_t(blockIdx.y) * kBM;  // rows of the result (rows of E)
  const int64_t n0 = int64_t(blockIdx.x) * kBN;  // columns of the chunk
  const int ktiles = static_cast<int>((d + kBK - 1) / kBK);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp / 4;
  const int wn = warp % 4;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int lrow = lane & 7;
  const int lmat = lane >> 3;

  // acc: round-to-nearest fp32 sums of the tensor-core partial sums `part`, handed off every
  // kPromote slabs (see the file comment).
  float acc[4][4][4];
  float part[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = part[i][j][e] = 0.f;

  auto load_stage = [&](int stage, int kt) {
    const int64_t k0 = int64_t(kt) * kBK;
    // E rows m0.., columns k0..: [kBM][kBK] fp32
    load_tile<float, kBM, kBK, kThreads>(sA + stage * kSlabA, kLdA, Em, d, m0, d, k0, d, nullptr, p.d_vec);
    if (W_KMAJOR) {  // W[k, n] at k + n * w_sc: rows n, contiguous k
      load_tile<uint16_t, kBN, kBK, kThreads>(sB + stage * kSlabB, kLdBcol, W, p.w_sc, n0, p.ncols, k0, d, nullptr,
                                              p.w_vec);
    } else {  // W[k, n] at k * w_sr + n: rows k, contiguous n
      load_tile<uint16_t, kBK, kBN, kThreads>(sB + stage * kSlabB, kLdBrow, W, p.w_sr, k0, d, n0, p.ncols, nullptr,
                                              p.w_vec);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  // Fragment element e of a0..a3 sits at (row g + kRowOff[e], col 2*t4 + kColOff[e]) of the 16x16 tile.
  constexpr int kRowOff[8] = {0, 0, 8, 8, 0, 0, 8, 8};
  constexpr int kColOff[8] = {0, 1, 0, 1, 8, 9, 8, 9};

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int pf = kt + kStages - 1;
      if (pf < ktiles) load_stage(pf % kStages, pf);
      cp_async_commit();
    }
    const float* a_s = sA + (kt % kStages) * kSlabA;
    const uint16_t* b_s = sB + (kt % kStages) * kSlabB;
    const int64_t k0 = int64_t(kt) * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t bf[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        if (W_KMAJOR) {
          // stored [n][k]; matrices (n0-7, k0-7), (n0-7, k8-15), (n8-15, k0-7), (n8-15, k8-15)
          const int nn = wn * 32 + nj * 16 + (lmat >> 1) * 8 + lrow;
          const int k = kk + (lmat & 1) * 8;
          ldmatrix_x4(r, b_s + nn * kLdBcol + k);
        } else {
          // stored [k][n]; matrices (k0-7, n), (k8-15, n), (k0-7, n+8), (k8-15, n+8), transposed
          const int k = kk + (lmat & 1) * 8 + lrow;
          const int nn = wn * 32 + nj * 16 + (lmat >> 1) * 8;
          ldmatrix_x4_trans(r, b_s + k * kLdBrow + nn);
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int mr = wm * 64 + mi * 16 + g;
        // a0: (g, 2t..2t+1), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..)
        const float2 x0 = *reinterpret_cast<const float2*>(a_s + mr * kLdA + kk + 2 * t4);
        const float2 x1 = *reinterpret_cast<const float2*>(a_s + (mr + 8) * kLdA + kk + 2 * t4);
        const float2 x2 = *reinterpret_cast<const float2*>(a_s + mr * kLdA + kk + 8 + 2 * t4);
        const float2 x3 = *reinterpret_cast<const float2*>(a_s + (mr + 8) * kLdA + kk + 8 + 2 * t4);
        float xs[8] = {x0.x, x0.y, x1.x, x1.y, x2.x, x2.y, x3.x, x3.y};
        if (p.sub_eye) {  // D given: E = D − I (exact for a diagonal entry in [0.5, 2])
          const int64_t diag = (m0 + mr) - (k0 + kk + 2 * t4);  // row − col of element 0
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (diag + kRowOff[e] - kColOff[e] == 0) xs[e] -= 1.0f;
        }
        float h[8], lo[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) split2(xs[e], h[e], lo[e]);
        uint32_t ah[4], al[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          ah[q] = pack_bf16(h[2 * q], h[2 * q + 1]);
          al[q] = pack_bf16(lo[2 * q], lo[2 * q + 1]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {  // small term first
          Mma16816<__nv_bfloat16>::run(part[mi][ni], al, bf[ni][0], bf[ni][1]);
          Mma16816<__nv_bfloat16>::run(part[mi][ni], ah, bf[ni][0], bf[ni][1]);
        }
      }
    }
    if ((kt + 1) % kPromote == 0 || kt + 1 == ktiles) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            acc[i][j][e] += part[i][j][e];
            part[i][j][e] = 0.f;
          }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = m0 + wm * 64 + mi * 16 + g + half * 8;
      if (i >= d) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t j = n0 + wn * 32 + ni * 8 + 2 * t4;
        if (j < p.ncols)
          store_out<__nv_bfloat16, float>(p, i, j, w_at<__nv_bfloat16, float>(p, i, j) + acc[mi][ni][half * 2]);
        if (j + 1 < p.ncols)
          store_out<__nv_bfloat16, float>(p, i, j + 1,
                                          w_at<__nv_bfloat16, float>(p, i, j + 1) + acc[mi][ni][half * 2 + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------ any W, fp32/fp64 E: CUDA cores
constexpr int kSB = 64;  // BM == BN
constexpr int kSK = 16;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) update_simt_kernel(const UpdParams p) {
  __shared__ Acc sA[kSK][kSB + 1];  // E slab, transposed: sA[k][m]
  __shared__ Acc sB[kSK][kSB + 1];  // W slab: sB[k][n]
  const Acc* Em = static_cast<const Acc*>(p.dm);
  const T* W = static_cast<const T*>(p.w);
  const int64_t d = p.d;
  const int64_t m0 = int64_t(blockIdx.y) * kSB;
  const int64_t n0 = int64_t(blockIdx.x) * kSB;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const bool w_kfast = p.w_sr == 1;  // consecutive threads walk W along k when that is contiguous

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  for (int64_t k0 = 0; k0 < d; k0 += kSK) {
#pragma unroll
    for (int q = 0; q < (kSB * kSK) / kThreads; ++q) {
      const int e = q * kThreads + static_cast<int>(threadIdx.x);
      {  // E[m0 + m, k0 + k], consecutive threads along k (contiguous)
        const int k = e % kSK, m = e / kSK;
        const int64_t gi = m0 + m, gk = k0 + k;
        Acc x = (gi < d && gk < d) ? Em[gi * d + gk] : Acc(0);
        if (p.sub_eye && gi == gk) x -= Acc(1);
        sA[k][m] = x;
      }
      {  // W[k0 + k, n0 + n]
        const int k = w_kfast ? e % kSK : e / kSB;
        const int n = w_kfast ? e / kSK : e % kSB;
        const int64_t gk = k0 + k, gn = n0 + n;
        sB[k][n] = (gk < d && gn < p.ncols) ? static_cast<Acc>(to_float<T>(W[gk * p.w_sr + gn * p.w_sc])) : Acc(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSK; ++k) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gi = m0 + ty + 16 * i;
    if (gi >= d) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gj = n0 + tx + 16 * j;
      if (gj < p.ncols) store_out<T, Acc>(p, gi, gj, w_at<T, Acc>(p, gi, gj) + acc[i][j]);
    }
  }
}

template <typename T, typename Acc>
cudaError_t launch_simt(const UpdParams& p, cudaStream_t stream) {
  const int64_t gx = (p.ncols + kSB - 1) / kSB;
  const int64_t gy = (p.d + kSB - 1) / kSB;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidValue;
  update_simt_kernel<T, Acc><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <bool W_KMAJOR>
cudaError_t launch_tc(const UpdParams& p, cudaStream_t stream) {
  const int64_t gx = (p.ncols + kBN - 1) / kBN;
  const int64_t gy = (p.d + kBM - 1) / kBM;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidValue;
  cudaError_t e = cudaFuncSetAttribute(update_delta_bf16_tc_kernel<W_KMAJOR>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemTc));
  if (e != cudaSuccess) return e;
  update_delta_bf16_tc_kernel<W_KMAJOR>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, kSmemTc, stream>>>(p);
  return cudaGetLastError();
}

bool aligned16(const void* ptr, int64_t stride_elems, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elems * static_cast<int64_t>(elem)) % 16 == 0;
}

}  // namespace

const char* update_kernel_name(ElemType w_type, ElemType d_type, bool w_kmajor) {
  if (w_type == ElemType::kBFloat16 && d_type == ElemType::kFloat32)
    return w_kmajor ? "update_delta_bf16_tc<kmajor>" : "update_delta_bf16_tc<rowmajor>";
  return d_type == ElemType::kFloat64 ? "update_simt<fp64>" : "update_simt<fp32>";
}

cudaError_t launch_update_chunk(const UpdateChunk& a, cudaStream_t stream) {
  if (a.d <= 0 || a.ncols <= 0) return cudaSuccess;
  if (a.w_sr != 1 && a.w_sc != 1) return cudaErrorInvalidValue;
  UpdParams p{};
  p.dm = a.d_mat;
  p.d = a.d;
  p.w = a.w;
  p.w_sr = a.w_sr;
  p.w_sc = a.w_sc;
  p.out = a.out;
  p.o_sr = a.o_sr;
  p.o_sc = a.o_sc;
  p.ncols = a.ncols;
  p.stochastic = a.stochastic ? 1 : 0;
  p.sub_eye = a.delta ? 0 : 1;
  p.seed = sr_stream_seed(a.seed);
  p.col_offset = a.col_offset;
  p.d_in_total = a.d_in_total;
  // k-major when the k (row) dimension is contiguous and the column one is not (d_in == 1 is both).
  const bool w_kmajor = a.w_sr == 1 && !(a.w_sc == 1 && a.d == 1);
  if (a.w_type == ElemType::kBFloat16 && a.d_type == ElemType::kFloat32) {
    p.d_vec = aligned16(a.d_mat, a.d, sizeof(float)) ? 1 : 0;
    p.w_vec = aligned16(a.w, w_kmajor ? a.w_sc : a.w_sr, sizeof(uint16_t)) ? 1 : 0;
    return w_kmajor ? launch_tc<true>(p, stream) : launch_tc<false>(p, stream);
  }
  const bool f64 = a.d_type == ElemType::kFloat64;
  if (!f64 && a.d_type != ElemType::kFloat32) return cudaErrorInvalidValue;
  switch (a.w_type) {
    case ElemType::kBFloat16:
      return f64 ? launch_simt<__nv_bfloat16, double>(p, stream) : launch_simt<__nv_bfloat16, float>(p, stream);
    case ElemType::kFloat16:
      return f64 ? launch_simt<__half, double>(p, stream) : launch_simt<__half, float>(p, stream);
    case ElemType::kFloat32:
      return f64 ? launch_simt<float, double>(p, stream) : launch_simt<float, float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace zu_fast
