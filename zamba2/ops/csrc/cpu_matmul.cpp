// Prefill matmuls on the CPU: y [M, N] = x [M, K] @ w [N, K]^T, the product of nn.Linear, for many rows.
//
// torch's F.linear asks BLAS for the product as laid out in memory, C^T = W X^T (m = N, n = M in BLAS terms).
// On the 2-core AVX2 machine MKL ran the other orientation, W @ X^T with m = M, 5-20% faster at M = 512 on
// every Zamba2-1.2B projection wider than its adapters (in_proj 157 -> 176 GFLOP/s, the shared MLP's gate_up
// 136 -> 167) but leaves the result transposed, [N, M]. torch's copy back to [M, N] cost most of that gain;
// an 8x8 AVX2 tile transpose costs ~2% of the matmul.

#include "common.h"

namespace zamba2 {
namespace {

// dst[c * ld_dst + r] = src[r * ld_src + c] for an 8x8 tile (r, c < 8)
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs: (0,1), (2,3), ...
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then 64-bit pairs across two interleaved pairs
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {  // then the 128-bit halves of rows i and i + 4
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// dst [cols, rows] = src [rows, cols]^T, in 32x32 blocks (4 KB of each side stays in L1)
void transpose(const float* src, float* dst, int64_t rows, int64_t cols) {
  constexpr int64_t B = 32;
  at::parallel_for(0, (cols + B - 1) / B, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t cb = c0 * B; cb < std::min(c1 * B, cols); cb += B)
      for (int64_t rb = 0; rb < rows; rb += B) {
        const int64_t ce = std::min(cb + B, cols), re = std::min(rb + B, rows);
        int64_t c = cb;
        for (; c + 8 <= ce; c += 8) {
          int64_t r = rb;
          for (; r + 8 <= re; r += 8) transpose8x8(src + r * cols + c, cols, dst + c * rows + r, rows);
          for (; r < re; r++)
            for (int64_t j = c; j < c + 8; j++) dst[j * rows + r] = src[r * cols + j];
        }
        for (; c < ce; c++)
          for (int64_t r = rb; r < re; r++) dst[c * rows + r] = src[r * cols + c];
      }
  });
}

}  // namespace

void linear_rows(const torch::Tensor& x, const torch::Tensor& w, float* y) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == torch::kFloat32 &&
              w.scalar_type() == torch::kFloat32, "linear_rows: float32 x [M, K] and w [N, K]");
  const torch::Tensor yt = at::mm(w, x.t()).contiguous();  // [N, M]
  transpose(yt.data_ptr<float>(), y, yt.size(0), yt.size(1));
}

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w) {
  torch::Tensor y = torch::empty({x.size(0), w.size(0)}, x.options());
  linear_rows(x, w, y.data_ptr<float>());
  return y;
}

}  // namespace zamba2
