// The `*_gemv_group` ops' common part (int8_gemv.cpp, half_gemv.cpp, int4_gemv.cpp): the weights of a group
// that reads one input (q, k, v; gate, up), each held in blocks of 32 output channels, run as one range of
// blocks in one parallel loop, their outputs side by side in one [M, sum n] matrix.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace omg {

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
