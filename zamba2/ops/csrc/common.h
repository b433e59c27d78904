// What the CPU kernels share (cpu_decode.cpp, cpu_prefill.cpp, cpu_matmul.cpp): AVX2 loads and sums, the widest
// float vector of this build (Vec), a vectorised exp, SiLU, softplus, and a Mamba2 mixer's small parameters.
// Built by zamba2/ops/kernels.py, once per instruction set (AVX2, or AVX-512 where the CPU has it).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

namespace zamba2 {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 -> fp32 is the bf16 bits in the upper half
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A float vector of W lanes: loads widen bfloat16 and int8 to float32 exactly. The GEMV and the prefill's small
// GEMMs are written on Vec, the widest this build targets: 16 lanes with AVX-512, which doubles their
// multiply-adds per instruction where they are compute-bound (several decode rows, the scan's tiles).
struct Vec8 {
  static constexpr int W = 8;
  __m256 v;
  static Vec8 zero() { return {_mm256_setzero_ps()}; }
  static Vec8 set1(float a) { return {_mm256_set1_ps(a)}; }
  template <typename T>
  static Vec8 load(const T* p) { return {load8(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  float sum() const { return hsum(v); }
  friend Vec8 fma(Vec8 a, Vec8 b, Vec8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
};
#ifdef __AVX512F__
struct Vec16 {
  static constexpr int W = 16;
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16 load(const at::BFloat16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))};
  }
  static Vec16 load(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  friend Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};
using Vec = Vec16;
#else
using Vec = Vec8;
#endif

// sum_j a[j] b[j] and y += w x over n elements, 8 lanes at a time (the compiler keeps a float sum serial)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), load8(b + j), acc);
  float s = hsum(acc);
  for (; j < n; j++) s += a[j] * static_cast<float>(b[j]);
  return s;
}
template <typename T>
inline void axpy(float w, const T* x, float* y, int64_t n) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vw, load8(x + j), _mm256_loadu_ps(y + j)));
  for (; j < n; j++) y[j] += w * static_cast<float>(x[j]);
}

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }  // where torch stores a T

// exp(x) on 8 lanes (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n from the exponent bits;
// ~1 ulp). std::exp is a scalar libm call: the ~2,000 SiLUs of a layer step took 20 us through it.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

inline void silu_inplace(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
    _mm256_storeu_ps(v + i, _mm256_div_ps(x, d));
  }
  for (; i < n; i++) v[i] = silu(v[i]);
}

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }  // torch's threshold

// A Mamba2 mixer's small parameters, typed T (the model dtype), and its sizes.
template <typename T>
struct Mixer {
  const T *conv_w, *conv_b, *dt_bias, *A_log, *D, *norm_w;  // conv_w [conv_dim, 1, k]; conv_b may be null
  int64_t H, P, N, G, cd, kw, proj;                          // heads, head dim, state, groups, conv_dim, k, in_proj
  float dt_min, eps;
};

template <typename T>
inline Mixer<T> mixer(const torch::Tensor& ssm_state, const torch::Tensor& conv_w, const c10::optional<torch::Tensor>& conv_b,
               const torch::Tensor& dt_bias, const torch::Tensor& A_log, const torch::Tensor& D,
               const torch::Tensor& norm_w, int64_t groups, int64_t proj, double dt_min, double eps) {
  for (const auto* t : {&conv_w, &dt_bias, &A_log, &D, &norm_w})
    TORCH_CHECK(t->scalar_type() == c10::CppTypeToScalarType<T>::value && t->is_contiguous(),
                "mamba: parameters must be contiguous and of the model dtype");
  TORCH_CHECK(ssm_state.scalar_type() == torch::kFloat32 && ssm_state.is_contiguous() && ssm_state.dim() == 4,
              "mamba: ssm_state must be a contiguous float32 [b, h, p, n]");
  return {conv_w.data_ptr<T>(), conv_b.has_value() ? conv_b->data_ptr<T>() : nullptr, dt_bias.data_ptr<T>(),
          A_log.data_ptr<T>(), D.data_ptr<T>(), norm_w.data_ptr<T>(), ssm_state.size(1), ssm_state.size(2),
          ssm_state.size(3), groups, conv_w.size(0), conv_w.size(-1), proj, static_cast<float>(dt_min),
          static_cast<float>(eps)};
}

// Mamba2's gated RMSNorm of one token's y [H*P] in place, per group of d_inner / G channels:
// w * (y silu(z)) / rms(y silu(z)); z [H*P] float, scratch [d_inner / G] float.
template <typename T>
inline void gated_norm(const Mixer<T>& m, float* y, const float* z, float* scratch) {
  const int64_t gs = m.H * m.P / m.G;
  for (int64_t g = 0; g < m.G; g++, y += gs, z += gs) {
    std::copy(z, z + gs, scratch);
    silu_inplace(scratch, gs);
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < gs; j++) {
      y[j] *= scratch[j];
      ss += y[j] * y[j];
    }
    const float r = 1.0f / std::sqrt(ss / gs + m.eps);
    for (int64_t j = 0; j < gs; j++) y[j] = static_cast<float>(m.norm_w[g * gs + j]) * (y[j] * r);
  }
}

// Everything between in_proj and out_proj for a prompt piece (cpu_prefill.cpp)
torch::Tensor mamba_prefill(const torch::Tensor& zxbcdt, const torch::Tensor& conv_state, const torch::Tensor& ssm_state,
                            const torch::Tensor& conv_w, const c10::optional<torch::Tensor>& conv_b,
                            const torch::Tensor& dt_bias, const torch::Tensor& A_log, const torch::Tensor& D,
                            const torch::Tensor& norm_w, int64_t groups, double dt_min, double eps, int64_t chunk);

// x [M, K] @ w [N, K]^T for a prompt's rows, or a large batch's (cpu_matmul.cpp), into y [M, N]
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w);
void linear_rows(const torch::Tensor& x, const torch::Tensor& w, float* y);

}  // namespace zamba2
