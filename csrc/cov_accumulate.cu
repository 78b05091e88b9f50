// cov_accumulate kernels: kk += KᵀK (upper-triangle tiles only), vk += VᵀK, ks += Σk, vs += Σv,
// n += kept rows, over the rows a mask keeps (masked rows are zero-filled in shared memory, never
// gathered into a copy).
//
// GEMM design (C[M, N] += Aᵀ B, reduction over the R rows):
//  * 16-bit inputs: 128x128 output tile per CTA, 256 threads = 8 warps in a 2 (M) x 4 (N) grid,
//    each warp 64x32 = 4x4 mma.sync m16n8k16 tiles with fp32 accumulators; the tensor-core partial
//    sums are promoted into plain fp32 sums every 64 rows (tensor-core accumulation truncates, which
//    would bias long same-sign sums such as the diagonal). The reduction runs over 32-row slabs;
//    A and B slabs ([32][128] each, rows padded by 16 bytes against bank conflicts) stream in
//    through a 4-stage cp.async pipeline; fragments come out with ldmatrix.trans (the slabs are
//    stored row = reduction index, which is the transposed operand layout for mma).
//  * fp32 inputs: same tiling and pipeline (3 stages, 16-row slabs), plain FMA on CUDA cores,
//    8x8 outputs per thread: exact fp32 products, fp32 accumulation.
//  * KᵀK launches only tiles (ti, tj) with ti <= tj; the diagonal tiles are computed whole.
//  * Both problems (kk and optionally vk) go in one launch: blockIdx.x below the kk tile count
//    is a kk tile, the rest are vk tiles.
//  * Each output tile belongs to exactly one CTA, so the epilogue does a plain C += acc.
//  * Column sums and the row count: colsum_partial_kernel / colsum_finish_kernel below, two passes
//    without floating-point atomics (bit-reproducible run to run).
#include "common.cuh"
#include "zu_fast_kernels.h"

namespace zu_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 128;  // BM == BN

struct DevProblem {
  const void* a;
  int64_t lda, m;
  const void* b;
  int64_t ldb, n;
  float* c;
  int64_t ldc;
  int tiles_m, tiles_n;
  int64_t ntiles;
  int upper;
  int a_vec, b_vec;
};

struct CovParams {
  DevProblem p0, p1;
  int nproblems;
  int64_t rows;
  const uint8_t* mask;
};

// Selects the problem and output tile of this CTA (field by field, so nothing goes to local memory).
struct TileJob {
  const void* a;
  int64_t lda, m;
  const void* b;
  int64_t ldb, n;
  float* c;
  int64_t ldc;
  int64_t m0, n0;
  bool a_vec, b_vec;
};

__device__ __forceinline__ TileJob pick_job(const CovParams& p) {
  int64_t t = blockIdx.x;
  const bool second = t >= p.p0.ntiles;
  if (second) t -= p.p0.ntiles;
  TileJob j;
  j.a = second ? p.p1.a : p.p0.a;
  j.lda = second ? p.p1.lda : p.p0.lda;
  j.m = second ? p.p1.m : p.p0.m;
  j.b = second ? p.p1.b : p.p0.b;
  j.ldb = second ? p.p1.ldb : p.p0.ldb;
  j.n = second ? p.p1.n : p.p0.n;
  j.c = second ? p.p1.c : p.p0.c;
  j.ldc = second ? p.p1.ldc : p.p0.ldc;
  j.a_vec = second ? p.p1.a_vec : p.p0.a_vec;
  j.b_vec = second ? p.p1.b_vec : p.p0.b_vec;
  const int upper = second ? p.p1.upper : p.p0.upper;
  const int tiles_n = second ? p.p1.tiles_n : p.p0.tiles_n;
  int64_t ti, tj;
  if (upper) {  // row ti of the upper triangle holds tiles_n - ti tiles
    ti = 0;
    while (t >= tiles_n - ti) {
      t -= tiles_n - ti;
      ++ti;
    }
    tj = ti + t;
  } else {
    ti = t / tiles_n;
    tj = t % tiles_n;
  }
  j.m0 = ti * kTile;
  j.n0 = tj * kTile;
  return j;
}

// ------------------------------------------------------------------ 16-bit, tensor cores
constexpr int kBK16 = 32;
constexpr int kStages16 = 4;
constexpr int kPromote = 2;  // slabs (of kBK16 rows) between promotions of the tensor-core partial sums
constexpr int kLd16 = kTile + 8;  // padded row (elements): 272 bytes, 16-byte aligned
constexpr int kSlab16 = kBK16 * kLd16;
constexpr size_t kSmem16 = size_t(2) * kStages16 * kSlab16 * sizeof(uint16_t);

template <typename T>
__global__ void __launch_bounds__(kThreads) cov_gemm_mma_kernel(const CovParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sB = sA + kStages16 * kSlab16;

  const TileJob job = pick_job(p);
  const uint16_t* A = static_cast<const uint16_t*>(job.a);
  const uint16_t* B = static_cast<const uint16_t*>(job.b);
  const int64_t R = p.rows;
  const int ktiles = static_cast<int>((R + kBK16 - 1) / kBK16);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp / 4;  // 0..1 -> 64 rows of the tile
  const int wn = warp % 4;  // 0..3 -> 32 cols of the tile

  // acc: the running sums (plain fp32 adds, round to nearest); part: what the tensor cores add up
  // over the last kPromote slabs. Tensor-core accumulation truncates (rounds toward zero) at each
  // step, which for thousands of rows of same-sign products (the diagonal of KᵀK) would build up a
  // bias of ~steps * 2^-24; promoting partial sums every few slabs keeps it at fp32 level.
  float acc[4][4][4];
  float part[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = part[i][j][e] = 0.f;

  auto load_stage = [&](int stage, int kt) {
    const int64_t r0 = int64_t(kt) * kBK16;
    load_tile<uint16_t, kBK16, kTile, kThreads>(sA + stage * kSlab16, kLd16, A, job.lda, r0, R, job.m0, job.m,
                                                p.mask, job.a_vec);
    load_tile<uint16_t, kBK16, kTile, kThreads>(sB + stage * kSlab16, kLd16, B, job.ldb, r0, R, job.n0, job.n,
                                                p.mask, job.b_vec);
  };

#pragma unroll
  for (int s = 0; s < kStages16 - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix lane roles: lanes 8q..8q+7 address the rows of 8x8 matrix q.
  const int lrow = lane & 7;
  const int lmat = lane >> 3;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages16 - 2>();
    __syncthreads();  // slab kt landed for every thread; slab kt-1 is no longer read by anyone
    {
      const int pf = kt + kStages16 - 1;
      if (pf < ktiles) load_stage(pf % kStages16, pf);
      cp_async_commit();
    }
    const uint16_t* a_s = sA + (kt % kStages16) * kSlab16;
    const uint16_t* b_s = sB + (kt % kStages16) * kSlab16;
#pragma unroll
    for (int kk = 0; kk < kBK16; kk += 16) {
      uint32_t bf[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrices: (k0-7, n), (k8-15, n), (k0-7, n+8), (k8-15, n+8)
        const int k = kk + (lmat & 1) * 8 + lrow;
        const int nn = wn * 32 + nj * 16 + (lmat >> 1) * 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, b_s + k * kLd16 + nn);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // matrices: (m0-7, k0-7), (m8-15, k0-7), (m0-7, k8-15), (m8-15, k8-15) = a0..a3
        const int k = kk + (lmat >> 1) * 8 + lrow;
        const int mm = wm * 64 + mi * 16 + (lmat & 1) * 8;
        uint32_t af[4];
        ldmatrix_x4_trans(af, a_s + k * kLd16 + mm);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Mma16816<T>::run(part[mi][ni], af, bf[ni][0], bf[ni][1]);
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

  // Epilogue: C += acc. Fragment (mi, ni): rows g and g+8, cols 2t and 2t+1.
  const int g = lane >> 2;
  const int t4 = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = job.m0 + wm * 64 + mi * 16 + g + half * 8;
      if (row >= job.m) continue;
      float* crow = job.c + row * job.ldc;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t col = job.n0 + wn * 32 + ni * 8 + 2 * t4;
        if (col < job.n) crow[col] += acc[mi][ni][half * 2];
        if (col + 1 < job.n) crow[col + 1] += acc[mi][ni][half * 2 + 1];
      }
    }
  }
}

// ------------------------------------------------------------------ fp32, CUDA cores
constexpr int kBK32 = 16;
constexpr int kStages32 = 3;
constexpr int kLd32 = kTile + 4;  // padded row (floats): 528 bytes, 16-byte aligned
constexpr int kSlab32 = kBK32 * kLd32;
constexpr size_t kSmem32 = size_t(2) * kStages32 * kSlab32 * sizeof(float);

__global__ void __launch_bounds__(kThreads) cov_gemm_f32_kernel(const CovParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sA = reinterpret_cast<float*>(smem_raw);
  float* sB = sA + kStages32 * kSlab32;

  const TileJob job = pick_job(p);
  const float* A = static_cast<const float*>(job.a);
  const float* B = static_cast<const float*>(job.b);
  const int64_t R = p.rows;
  const int ktiles = static_cast<int>((R + kBK32 - 1) / kBK32);

  const int tx = threadIdx.x % 16;  // columns tx*4 .. +3 and 64 + tx*4 .. +3
  const int ty = threadIdx.x / 16;  // rows    ty*4 .. +3 and 64 + ty*4 .. +3

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  auto load_stage = [&](int stage, int kt) {
    const int64_t r0 = int64_t(kt) * kBK32;
    load_tile<float, kBK32, kTile, kThreads>(sA + stage * kSlab32, kLd32, A, job.lda, r0, R, job.m0, job.m,
                                             p.mask, job.a_vec);
    load_tile<float, kBK32, kTile, kThreads>(sB + stage * kSlab32, kLd32, B, job.ldb, r0, R, job.n0, job.n,
                                             p.mask, job.b_vec);
  };

#pragma unroll
  for (int s = 0; s < kStages32 - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages32 - 2>();
    __syncthreads();
    {
      const int pf = kt + kStages32 - 1;
      if (pf < ktiles) load_stage(pf % kStages32, pf);
      cp_async_commit();
    }
    const float* a_s = sA + (kt % kStages32) * kSlab32;
    const float* b_s = sB + (kt % kStages32) * kSlab32;
#pragma unroll 4
    for (int k = 0; k < kBK32; ++k) {
      const float4 a_lo = *reinterpret_cast<const float4*>(a_s + k * kLd32 + ty * 4);
      const float4 a_hi = *reinterpret_cast<const float4*>(a_s + k * kLd32 + 64 + ty * 4);
      const float4 b_lo = *reinterpret_cast<const float4*>(b_s + k * kLd32 + tx * 4);
      const float4 b_hi = *reinterpret_cast<const float4*>(b_s + k * kLd32 + 64 + tx * 4);
      const float a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
      const float b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = job.m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    if (row >= job.m) continue;
    float* crow = job.c + row * job.ldc;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = job.n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
      if (col < job.n) crow[col] += acc[i][j];
    }
  }
}

// ------------------------------------------------------------------ column sums and row count
// Two passes, no floating-point atomics, so the sums are bit-reproducible run to run: CTA (x, y)
// sums rows [y·rows_per_cta, (y+1)·rows_per_cta) of columns x·256.. into partial[y][col]; then one
// thread per column adds the gy partials in order to out. The row count uses integer atomics
// (exact, so order does not matter).
constexpr int kSumThreads = 256;
constexpr int kSumRows = 512;      // rows per CTA (more only past kMaxSlabs slabs)
constexpr int64_t kMaxSlabs = 1024;  // partial sums per column at most

int64_t slab_rows(int64_t rows) {
  int64_t per = kSumRows;
  if ((rows + per - 1) / per > kMaxSlabs) per = (rows + kMaxSlabs - 1) / kMaxSlabs;
  return per;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kSumThreads)
    colsum_partial_kernel(const T* __restrict__ x, int64_t ldx, int64_t rows, int64_t cols, int64_t rows_per_cta,
                          const uint8_t* __restrict__ mask, Acc* __restrict__ partial, int64_t* __restrict__ n_out) {
  const int64_t col = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_cta;
  const int64_t r1 = (r0 + rows_per_cta < rows) ? r0 + rows_per_cta : rows;
  if (col < cols) {
    Acc s = Acc(0);
    for (int64_t r = r0; r < r1; ++r) {
      if (mask == nullptr || mask[r] != 0) s += static_cast<Acc>(to_float<T>(x[r * ldx + col]));
    }
    partial[int64_t(blockIdx.y) * cols + col] = s;
  }
  if (n_out != nullptr && blockIdx.x == 0) {
    unsigned long long cnt = 0;
    for (int64_t r = r0 + threadIdx.x; r < r1; r += kSumThreads) cnt += (mask == nullptr || mask[r] != 0) ? 1ull : 0ull;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) cnt += __shfl_down_sync(0xffffffffu, cnt, off);
    if ((threadIdx.x & 31) == 0 && cnt != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(n_out), cnt);  // n >= 0: two's complement add
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kSumThreads)
    colsum_finish_kernel(const Acc* __restrict__ partial, int64_t slabs, int64_t cols, Acc* __restrict__ out) {
  const int64_t col = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  if (col >= cols) return;
  Acc s = Acc(0);
  for (int64_t y = 0; y < slabs; ++y) s += partial[y * cols + col];
  out[col] += s;
}

template <typename T, typename Acc>
cudaError_t colsum_dispatch(const void* x, int64_t ldx, int64_t rows, int64_t cols, const uint8_t* mask, void* out,
                            int64_t* n_out, void* workspace, cudaStream_t stream) {
  const int64_t rows_per_cta = slab_rows(rows);
  const int64_t gy = (rows + rows_per_cta - 1) / rows_per_cta;
  const int64_t gx = (cols + kSumThreads - 1) / kSumThreads;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidValue;
  Acc* partial = static_cast<Acc*>(workspace);
  colsum_partial_kernel<T, Acc><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kSumThreads, 0, stream>>>(
      static_cast<const T*>(x), ldx, rows, cols, rows_per_cta, mask, partial, n_out);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  colsum_finish_kernel<Acc><<<static_cast<unsigned>(gx), kSumThreads, 0, stream>>>(partial, gy, cols,
                                                                                 static_cast<Acc*>(out));
  return cudaGetLastError();
}

DevProblem to_dev(const AtBProblem& q, size_t elem, int* err) {
  DevProblem d{};
  d.a = q.a;
  d.lda = q.lda;
  d.m = q.m;
  d.b = q.b;
  d.ldb = q.ldb;
  d.n = q.n;
  d.c = q.c;
  d.ldc = q.ldc;
  d.tiles_m = static_cast<int>((q.m + kTile - 1) / kTile);
  d.tiles_n = static_cast<int>((q.n + kTile - 1) / kTile);
  d.upper = q.upper ? 1 : 0;
  if (q.upper) {
    if (q.m != q.n) *err = 1;
    d.ntiles = int64_t(d.tiles_n) * (d.tiles_n + 1) / 2;
  } else {
    d.ntiles = int64_t(d.tiles_m) * d.tiles_n;
  }
  auto aligned = [elem](const void* p, int64_t ld) {
    return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld * static_cast<int64_t>(elem)) % 16 == 0);
  };
  d.a_vec = aligned(q.a, q.lda) ? 1 : 0;
  d.b_vec = aligned(q.b, q.ldb) ? 1 : 0;
  return d;
}

}  // namespace

cudaError_t launch_cov_gemm(const AtBProblem* problems, int nproblems, int64_t rows, const uint8_t* mask,
                            ElemType type, cudaStream_t stream) {
  if (nproblems < 1 || nproblems > 2 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const size_t elem = (type == ElemType::kFloat32) ? 4 : 2;
  if (type == ElemType::kFloat64) return cudaErrorInvalidValue;
  int err = 0;
  CovParams p{};
  p.p0 = to_dev(problems[0], elem, &err);
  p.p1 = nproblems > 1 ? to_dev(problems[1], elem, &err) : DevProblem{};
  if (nproblems == 1) p.p1.ntiles = 0;
  if (err) return cudaErrorInvalidValue;
  p.nproblems = nproblems;
  p.rows = rows;
  p.mask = mask;
  const int64_t total = p.p0.ntiles + p.p1.ntiles;
  if (total == 0) return cudaSuccess;
  if (total > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(total));
  cudaError_t e = cudaSuccess;
  switch (type) {
    case ElemType::kBFloat16:
      e = cudaFuncSetAttribute(cov_gemm_mma_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kSmem16));
      if (e != cudaSuccess) return e;
      cov_gemm_mma_kernel<__nv_bfloat16><<<grid, kThreads, kSmem16, stream>>>(p);
      break;
    case ElemType::kFloat16:
      e = cudaFuncSetAttribute(cov_gemm_mma_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kSmem16));
      if (e != cudaSuccess) return e;
      cov_gemm_mma_kernel<__half><<<grid, kThreads, kSmem16, stream>>>(p);
      break;
    case ElemType::kFloat32:
      e = cudaFuncSetAttribute(cov_gemm_f32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kSmem32));
      if (e != cudaSuccess) return e;
      cov_gemm_f32_kernel<<<grid, kThreads, kSmem32, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int64_t colsum_workspace_elems(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  const int64_t per = slab_rows(rows);
  return ((rows + per - 1) / per) * cols;
}

cudaError_t launch_colsum(const void* x, int64_t ldx, int64_t rows, int64_t cols, const uint8_t* mask,
                          ElemType type, void* out, ElemType out_type, int64_t* n_out, void* workspace,
                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const bool f64 = out_type == ElemType::kFloat64;
  if (!f64 && out_type != ElemType::kFloat32) return cudaErrorInvalidValue;
  switch (type) {
    case ElemType::kBFloat16:
      return f64 ? colsum_dispatch<__nv_bfloat16, double>(x, ldx, rows, cols, mask, out, n_out, workspace, stream)
                 : colsum_dispatch<__nv_bfloat16, float>(x, ldx, rows, cols, mask, out, n_out, workspace, stream);
    case ElemType::kFloat16:
      return f64 ? colsum_dispatch<__half, double>(x, ldx, rows, cols, mask, out, n_out, workspace, stream)
                 : colsum_dispatch<__half, float>(x, ldx, rows, cols, mask, out, n_out, workspace, stream);
    case ElemType::kFloat32:
      return f64 ? colsum_dispatch<float, double>(x, ldx, rows, cols, mask, out, n_out, workspace, stream)
                 : colsum_dispatch<float, float>(x, ldx, rows, cols, mask, out, n_out, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace zu_fast
