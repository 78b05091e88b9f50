// Python bindings of the zu_fast CUDA kernels (module zu_fast._C when prebuilt by setup.py, or a
// JIT build by zu_fast.ops.cuda_backend). All tensor validation lives here; the kernels in the
// .cu files take raw pointers and strides.
#include <ATen/core/Tensor.h>
#include <ATen/ops/count_nonzero.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/python.h>  // pybind11 + the Tensor / optional casters (lighter than torch/extension.h)

#include <algorithm>
#include <string>
#include <optional>

#include "zu_fast_kernels.h"

namespace {

using at::Tensor;
using zu_fast::ElemType;

ElemType elem_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kHalf:
      return ElemType::kFloat16;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kDouble:
      return ElemType::kFloat64;
    default:
      TORCH_CHECK(false, "zu_fast CUDA: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "zu_fast CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == dev, "zu_fast CUDA: ", name, " is on ", t.device(), ", expected ", dev);
}

// Unit stride along the last dimension (a dimension of size 1 has any stride).
bool unit_last(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? t.size(-1) : t.stride(0); }

// kk += KᵀK (upper tiles), ks += Σk, n += kept rows [, vk += VᵀK, vs += Σv]. keys [R, F], values
// [R, d] (2-D views with unit column stride), mask [R] bool/uint8 contiguous or None.
void cov_accumulate(Tensor kk, Tensor ks, Tensor n, const Tensor& keys, const std::optional<Tensor>& mask,
                    const std::optional<Tensor>& values, const std::optional<Tensor>& vk,
                    const std::optional<Tensor>& vs) {
  const at::Device dev = keys.device();
  check_cuda(keys, "keys", dev);
  check_cuda(kk, "kk", dev);
  check_cuda(ks, "ks", dev);
  check_cuda(n, "n", dev);
  TORCH_CHECK(keys.dim() == 2 && unit_last(keys), "zu_fast CUDA: keys must be 2-D with unit column stride");
  const int64_t R = keys.size(0);
  const int64_t F = keys.size(1);
  const ElemType kt = elem_type(keys);
  TORCH_CHECK(kt != ElemType::kFloat64, "zu_fast CUDA: keys must be fp32/fp16/bf16");
  TORCH_CHECK(kk.scalar_type() == at::kFloat && kk.dim() == 2 && kk.size(0) == F && kk.size(1) == F && unit_last(kk),
              "zu_fast CUDA: kk must be fp32 [F, F] with unit column stride");
  TORCH_CHECK((ks.scalar_type() == at::kFloat || ks.scalar_type() == at::kDouble) && ks.dim() == 1 &&
                  ks.size(0) == F && ks.is_contiguous(),
              "zu_fast CUDA: ks must be contiguous fp32/fp64 [F]");
  TORCH_CHECK(n.scalar_type() == at::kLong && n.dim() == 0, "zu_fast CUDA: n must be a 0-d int64 tensor");
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    const Tensor& m = *mask;
    check_cuda(m, "mask", dev);
    TORCH_CHECK((m.scalar_type() == at::kBool || m.scalar_type() == at::kByte) && m.dim() == 1 && m.size(0) == R &&
                    m.is_contiguous(),
                "zu_fast CUDA: mask must be a contiguous bool/uint8 vector of length rows");
    mask_ptr = static_cast<const uint8_t*>(m.data_ptr());
  }
  const bool with_values = values.has_value();
  int64_t dv = 0;
  if (with_values) {
    TORCH_CHECK(vk.has_value() && vs.has_value(), "zu_fast CUDA: values given without vk and vs");
    const Tensor& v = *values;
    check_cuda(v, "values", dev);
    check_cuda(*vk, "vk", dev);
    check_cuda(*vs, "vs", dev);
    TORCH_CHECK(v.dim() == 2 && v.size(0) == R && unit_last(v), "zu_fast CUDA: values must be [rows, d], unit column stride");
    TORCH_CHECK(v.scalar_type() == keys.scalar_type(), "zu_fast CUDA: values and keys must share a dtype");
    dv = v.size(1);
    TORCH_CHECK(vk->scalar_type() == at::kFloat && vk->dim() == 2 && vk->size(0) == dv && vk->size(1) == F &&
                    unit_last(*vk),
                "zu_fast CUDA: vk must be fp32 [d, F] with unit column stride");
    TORCH_CHECK((vs->scalar_type() == at::kFloat || vs->scalar_type() == at::kDouble) && vs->dim() == 1 &&
                    vs->size(0) == dv && vs->is_contiguous(),
                "zu_fast CUDA: vs must be contiguous fp32/fp64 [d]");
  }
  if (R == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  // Scratch for the deterministic column sums (a few MB: one partial sum per 512-row slab and column).
  auto colsum = [&](const Tensor& x, int64_t cols, const Tensor& out, int64_t* n_out) {
    Tensor ws = at::empty({std::max<int64_t>(1, zu_fast::colsum_workspace_elems(R, cols))}, out.options());
    C10_CUDA_CHECK(zu_fast::launch_colsum(x.data_ptr(), row_stride(x), R, cols, mask_ptr, kt, out.data_ptr(),
                                          elem_type(out), n_out, ws.data_ptr(), stream));
  };

  if (F > 0) {
    zu_fast::AtBProblem probs[2];
    probs[0].a = keys.data_ptr();
    probs[0].lda = row_stride(keys);
    probs[0].m = F;
    probs[0].b = keys.data_ptr();
    probs[0].ldb = row_stride(keys);
    probs[0].n = F;
    probs[0].c = kk.data_ptr<float>();
    probs[0].ldc = row_stride(kk);
    probs[0].upper = true;
    int nprob = 1;
    if (with_values && dv > 0) {
      probs[1].a = values->data_ptr();
      probs[1].lda = row_stride(*values);
      probs[1].m = dv;
      probs[1].b = keys.data_ptr();
      probs[1].ldb = row_stride(keys);
      probs[1].n = F;
      probs[1].c = vk->data_ptr<float>();
      probs[1].ldc = row_stride(*vk);
      probs[1].upper = false;
      nprob = 2;
    }
    C10_CUDA_CHECK(zu_fast::launch_cov_gemm(probs, nprob, R, mask_ptr, kt, stream));
    colsum(keys, F, ks, n.data_ptr<int64_t>());
  }
  // With no key columns the kept rows are counted by the values' column sums, or directly.
  int64_t* n_by_values = F > 0 ? nullptr : n.data_ptr<int64_t>();
  if (with_values && dv > 0) {
    colsum(*values, dv, *vs, n_by_values);
  } else if (F == 0) {
    if (mask.has_value()) {
      n.add_(at::count_nonzero(*mask));
    } else {
      n.add_(R);
    }
  }
}

// W ← W + E W in place (delta: `D` holds E = D − I; else it holds D and the kernels use D − I), in
// column chunks of `chunk_cols` through a staging buffer of W's dtype.
void multiplicative_update(Tensor W, const Tensor& D, int64_t chunk_cols, bool stochastic, int64_t seed,
                           bool delta) {
  const at::Device dev = W.device();
  check_cuda(W, "W", dev);
  check_cuda(D, "D", dev);
  TORCH_CHECK(W.dim() == 2 && D.dim() == 2, "zu_fast CUDA: W and D must be 2-D");
  const int64_t d = W.size(0);
  const int64_t d_in = W.size(1);
  TORCH_CHECK(D.size(0) == d && D.size(1) == d, "zu_fast CUDA: D must be [d, d] with d = W.shape[0]");
  TORCH_CHECK(D.is_contiguous(), "zu_fast CUDA: D must be contiguous");
  const ElemType dt = elem_type(D);
  TORCH_CHECK(dt == ElemType::kFloat32 || dt == ElemType::kFloat64, "zu_fast CUDA: D must be fp32 or fp64");
  const ElemType wt = elem_type(W);
  TORCH_CHECK(wt != ElemType::kFloat64, "zu_fast CUDA: W must be fp32/fp16/bf16");
  if (d == 0 || d_in == 0) return;
  const int64_t sr = d > 1 ? W.stride(0) : 1;
  const int64_t sc = d_in > 1 ? W.stride(1) : 1;
  TORCH_CHECK(sr == 1 || sc == 1, "zu_fast CUDA: W must have a unit stride in one dimension");
  TORCH_CHECK(chunk_cols > 0, "zu_fast CUDA: chunk_cols must be positive");
  const int64_t C = std::min(chunk_cols, d_in);
  const bool kmajor = (sr == 1) && !(sc == 1);

  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  // Staging buffer laid out like W so that the copy back is a plain strided copy.
  Tensor buf = kmajor ? at::empty({C, d}, W.options()).t() : at::empty({d, C}, W.options());

  for (int64_t j0 = 0; j0 < d_in; j0 += C) {
    const int64_t c = std::min(C, d_in - j0);
    Tensor wc = W.narrow(1, j0, c);
    Tensor bc = buf.narrow(1, 0, c);
    zu_fast::UpdateChunk a;
    a.d_mat = D.data_ptr();
    a.delta = delta;
    a.d_type = dt;
    a.d = d;
    a.w = wc.data_ptr();
    a.w_sr = sr;
    a.w_sc = sc;
    a.out = bc.data_ptr();
    a.o_sr = bc.stride(0);
    a.o_sc = bc.stride(1);
    a.ncols = c;
    a.w_type = wt;
    a.stochastic = stochastic && wt != ElemType::kFloat32;
    a.seed = static_cast<uint64_t>(seed);
    a.col_offset = j0;
    a.d_in_total = d_in;
    C10_CUDA_CHECK(zu_fast::launch_update_chunk(a, stream));
    wc.copy_(bc);
  }
}

std::string update_kernel(const Tensor& W, const Tensor& D) {
  const bool kmajor = W.dim() == 2 && W.size(0) > 1 && W.stride(0) == 1 && !(W.size(1) > 1 && W.stride(1) == 1);
  return zu_fast::update_kernel_name(elem_type(W), elem_type(D), kmajor);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zu_fast CUDA kernels: cov_accumulate, multiplicative_update_";
  m.def("cov_accumulate", &cov_accumulate, "kk += KᵀK (upper tiles), ks += Σk, n += rows [, vk += VᵀK, vs += Σv]",
        py::arg("kk"), py::arg("ks"), py::arg("n"), py::arg("keys"), py::arg("mask") = py::none(),
        py::arg("values") = py::none(), py::arg("vk") = py::none(), py::arg("vs") = py::none());
  m.def("multiplicative_update_", &multiplicative_update,
        "W ← W + (D − I) W in place (column chunks, one rounding); delta=True: the matrix given is D − I",
        py::arg("W"), py::arg("D"), py::arg("chunk_cols"), py::arg("stochastic") = false, py::arg("seed") = 0,
        py::arg("delta") = false);
  m.def("update_kernel", &update_kernel, "name of the kernel multiplicative_update_ uses for W, D");
}
