// Host-side interface of the zu_fast CUDA kernels (plain C++: no torch types, so the .cu files
// compile with nvcc alone and bindings.cpp does all tensor checking with TORCH_CHECK).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace zu_fast {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- cov_accumulate --------------------------------------------------------------------------
// C[M, N] += A^T B summed over R rows (rows with mask byte 0 contribute nothing).
// A is [R, M], B is [R, N], both with unit column stride and row strides lda / ldb (elements).
// `upper`: C is square and only tiles on or above the diagonal are computed (A == B for KᵀK).
struct AtBProblem {
  const void* a = nullptr;
  int64_t lda = 0;
  int64_t m = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  int64_t n = 0;
  float* c = nullptr;  // fp32, unit column stride
  int64_t ldc = 0;
  bool upper = false;
};

// One launch for up to two problems that share rows, mask and element type (kk and vk).
// Returns the launch status (cudaGetLastError right after the launch).
cudaError_t launch_cov_gemm(const AtBProblem* problems, int nproblems, int64_t rows, const uint8_t* mask,
                            ElemType type, cudaStream_t stream);

// out[c] += Σ_r x[r, c] over kept rows (x [R, N], unit column stride, row stride ldx); out is
// fp32 or fp64 (out_type). If n_out is not null, *n_out (int64) += number of kept rows.
// Deterministic: each CTA sums a fixed slab of rows into `workspace` (colsum_workspace_elems(rows,
// cols) elements of out_type, no atomics on floats), then one pass adds the slabs in order.
int64_t colsum_workspace_elems(int64_t rows, int64_t cols);
cudaError_t launch_colsum(const void* x, int64_t ldx, int64_t rows, int64_t cols, const uint8_t* mask,
                          ElemType type, void* out, ElemType out_type, int64_t* n_out, void* workspace,
                          cudaStream_t stream);

// ---- multiplicative_update_ ------------------------------------------------------------------
// out[i, j] = round(W[i, j] + Σ_k E[i, k] W[k, j]) for one column chunk, E = D − I: d_mat [d, d]
// contiguous (fp32 or fp64) holds E (delta = true) or D (delta = false; the identity is subtracted
// on the fly). W [d, ncols] with strides (w_sr, w_sc) where w_sr == 1 or w_sc == 1, out [d, ncols]
// of W's type with strides (o_sr, o_sc). Stochastic rounding uses the random bits of element index
// i * d_in_total + (col_offset + j), so a result does not depend on the chunking.
struct UpdateChunk {
  const void* d_mat = nullptr;
  bool delta = false;
  ElemType d_type = ElemType::kFloat32;
  int64_t d = 0;
  const void* w = nullptr;
  int64_t w_sr = 0, w_sc = 0;
  void* out = nullptr;
  int64_t o_sr = 0, o_sc = 0;
  int64_t ncols = 0;
  ElemType w_type = ElemType::kBFloat16;
  bool stochastic = false;
  uint64_t seed = 0;
  int64_t col_offset = 0;
  int64_t d_in_total = 0;
};

cudaError_t launch_update_chunk(const UpdateChunk& args, cudaStream_t stream);

// Which kernel launch_update_chunk uses for these types (for tests and `zu-fast info`).
const char* update_kernel_name(ElemType w_type, ElemType d_type, bool w_kmajor);

}  // namespace zu_fast
