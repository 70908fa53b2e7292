// The `*_gemv_group` ops' common part (int8_gemv.cpp, half_gemv.cpp, int4_gemv.cpp): the weights of a group
// that reads one input (q, k, v; gate, up), each held in blocks of 32 output channels, run as one range of
// blocks in one parallel loop, their outputs side by side in one [M, sum n] matrix; x and y fp32, or both bf16
// (a model loaded in bf16: x widened once, each output rounded once, as torch's conversions would, without
// two more torch ops per call).

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "widen.h"

namespace omg {

inline void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous() && x.is_cpu(),
              op, ": x must be a contiguous fp32 or bf16 CPU matrix [M, K]");
}

// x's rows as fp32: its own data, or a bf16 x widened once into `held`.
inline const float* float_rows(const at::Tensor& x, std::vector<float>& held) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  held.resize(x.numel());
  widen_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), held.data(), x.numel());
  return held.data();
}

// y [M, cols] in x's dtype; `store` writes `width` fp32 sums at element `at` (bf16: rounded to nearest even).
struct Output {
  at::Tensor y;
  void* base;
  bool bf16;
  Output(const at::Tensor& x, int64_t M, int64_t cols)
      : y(at::empty({M, cols}, x.options())), base(y.data_ptr()), bf16(x.scalar_type() == at::kBFloat16) {}
  void store(int64_t at, const float* sums, int64_t width) const {
    if (bf16) narrow_bf16(sums, static_cast<uint16_t*>(base) + at, width);
    else std::memcpy(static_cast<float*>(base) + at, sums, width * sizeof(float));
  }
};

struct GroupLayout {
  std::vector<int64_t> first_block, first_col;  // weight i: blocks [first_block[i], first_block[i + 1]), same for columns

  GroupLayout(at::TensorList w, at::IntArrayRef n) : first_block(w.size() + 1, 0), first_col(w.size() + 1, 0) {
    for (size_t i = 0; i < w.size(); ++i) {
      first_block[i + 1] = first_block[i] + w[i].size(0);
      first_col[i + 1] = first_col[i] + n[i];
    }
  }
  int64_t cols() const { return first_col.back(); }

  // fn(i, local block, its first output column within weight i, width <= block) for every block of every
  // weight, in parallel tasks of at least `grain` blocks.
  template <class Fn>
  void for_each_block(at::IntArrayRef n, int64_t block, int64_t grain, const Fn& fn) const {
    at::parallel_for(0, first_block.back(), grain, [&](int64_t begin, int64_t end) {
      size_t i = 0;
      for (int64_t b = begin; b < end; ++b) {
        while (b >= first_block[i + 1]) ++i;  // the weight this block belongs to
        const int64_t local = b - first_block[i], n0 = local * block;
        fn(i, local, n0, std::min(block, n[i] - n0));
      }
    });
  }
};

}  // namespace omg
