// Blocked weights [B, K, 32] (engine/native.py `pack_blocks`: per block of 32 output channels the 32 weights of
// input k adjacent) to the fp32 matrix [K, B * 32] a prefill's x @ w reads, converted and re-laid out in one
// parallel pass (engine/native.py `blocks_to_columns`). Prefill of the int8 and 16-bit formats widens every
// weight per call; as a torch copy of a permuted view this pass ran at ~12 GB/s on one thread and barely
// faster on two (27% of a 130M fp16 prefill at 2 threads), here each thread converts whole rows.
//
// Weights: int8, fp16 or bf16; the result is exact (every such value is an fp32 value).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>

namespace {

constexpr int64_t kBlock = 32;

inline void widen32(const int8_t* src, float* dst) {
  for (int i = 0; i < kBlock; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)))));
}

inline void widen32(const uint16_t* src, float* dst, bool bf16) {
  for (int i = 0; i < kBlock; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                   : _mm256_cvtph_ps(h));
  }
}

at::Tensor blocks_to_columns(const at::Tensor& blocks) {
  const auto dtype = blocks.scalar_type();
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kBlock && blocks.is_contiguous() && blocks.is_cpu() &&
                  (dtype == at::kChar || dtype == at::kHalf || dtype == at::kBFloat16),
              "blocks_to_columns: blocks must be contiguous int8, float16 or bfloat16 CPU blocks [B, K, 32]");
  const int64_t B = blocks.size(0), K = blocks.size(1), N = B * kBlock;
  at::Tensor out = at::empty({K, N}, blocks.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const void* bp = blocks.data_ptr();
  // rows of the result per task: each row is B pieces of 32, one from every block
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* row = op + k * N;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t at = (b * K + k) * kBlock;
        if (dtype == at::kChar) widen32(static_cast<const int8_t*>(bp) + at, row + b * kBlock);
        else widen32(static_cast<const uint16_t*>(bp) + at, row + b * kBlock, dtype == at::kBFloat16);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("blocks_to_columns(Tensor blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("blocks_to_columns", &blocks_to_columns);
}
