// CPU kernels for decode (a few rows per step), built on first use by zamba2/kernels.py.
//
// gemv: y[r, n] = sum_k W[n, k] x[r, k] for a handful of rows r. Decode reads every weight once per token,
//   so this is a streaming read of W: both cores read their half of W's rows, each row once, while the
//   x rows stay in L1/L2. MKL's GEMV reached 12-18 GB/s on Zamba2's decode shapes where a plain 2-thread
//   read of the same memory reaches ~35 GB/s (bench/compare.py measures both). W may be bfloat16 (its
//   elements widen to float32 exactly, a 16-bit shift), int8 with a scale per row, or packed int4 with a
//   scale and offset per group, so bf16, int8 and int4 decode read a half, a quarter and about a seventh of
//   the bytes; float32 arithmetic, except int4's integer dot products against int8 activations (block4).
// mamba_step: everything a Mamba2 mixer does to one token between in_proj and out_proj (depthwise conv
//   over the cached window, SiLU, softplus(dt), the SSM state update and read-out, D skip, gated RMSNorm)
//   in one call instead of ~40 small torch ops (models whose projections are LoRA); mamba_layer adds the
//   layer's RMSNorm, both projections and the residual.
// shared_block: one token through a shared attention + MLP block (RoPE, the KV cache write, attention over
//   the valid slots, adapters, the GLU) and its hybrid layer's linear.
// Decoder: a whole model's decode step (embedding, mamba_layer and shared_block per layer, final norm, LM head)
//   as one call (zamba2/ops/decode.py). zamba2/model/zamba2.py's torch code is the reference these are tested against.
// rms_norm: RMSNorm of a few rows; torch's rms_norm costs ~20 us a call on a 512-vector.

#include "common.h"

using namespace zamba2;

namespace {

// NB weight rows against RT input rows: NB*RT independent accumulators, each W element loaded once. The rows
// two blocks ahead are prefetched, a line at a time, as these are read: with rows of 512 elements the hardware
// prefetcher alone restarted too often to keep the memory busy (without it, batch 8 ran 1.4x slower).
template <typename W, int NB, int RT>
inline void block(const W* w, int64_t K, const float* x, float* y, int64_t N) {
  Vec acc[NB][RT];
  for (int i = 0; i < NB; i++)
    for (int r = 0; r < RT; r++) acc[i][r] = Vec::zero();
  const int64_t KV = K - K % Vec::W, line = 64 / sizeof(W);
  for (int64_t k = 0; k < KV; k += Vec::W) {
    if (k % line == 0)
      for (int i = 0; i < NB; i++) _mm_prefetch(reinterpret_cast<const char*>(w + (i + 2 * NB) * K + k), _MM_HINT_T0);
    Vec xv[RT];
    for (int r = 0; r < RT; r++) xv[r] = Vec::load(x + r * K + k);
    for (int i = 0; i < NB; i++) {
      const Vec wv = Vec::load(w + i * K + k);
      for (int r = 0; r < RT; r++) acc[i][r] = fma(wv, xv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < NB; i++)
    for (int r = 0; r < RT; r++) {
      float s = acc[i][r].sum();
      for (int64_t k = KV; k < K; k++) s += static_cast<float>(w[i * K + k]) * x[r * K + k];
      y[r * N + i] = s;
    }
}

// Packed int4 (quant.Int4Linear) against int8 activations. A weight row is K/2 bytes in blocks of 32 weights, byte j
// of a block holding weight j in its low nibble and weight 16 + j in its high one; sm holds (scale s, offset m) per
// group of G weights, w = s q + m with q in 0..15. Each input row is quantized per group too, x = d p with p in
// -127..127 (Int8Groups), so a group's sum of q p is exact in int32: 32 multiply-adds in one or two instructions,
// where widening the nibbles to float took eight (at 34% of the read rate on the 2-core AMD EPYC, AVX2, `python
// bench/compare.py --preset 1.2b --int4 --skip-hf --decode-only`). Per group y += s d sum(q p) + m sum(x).
struct Int8Groups {
  std::vector<int8_t> p;       // [R, K]
  std::vector<float> d, sum;   // [R, K/G]: the scale, and the sum of x over the group (for the offsets)
};

Int8Groups quantize_groups(const float* x, int64_t R, int64_t K, int64_t G) {
  Int8Groups q{std::vector<int8_t>(R * K), std::vector<float>(R * K / G), std::vector<float>(R * K / G)};
  for (int64_t g = 0; g < R * K / G; g++) {
    const float* xg = x + g * G;
    float amax = 0.0f, sum = 0.0f;
    for (int64_t k = 0; k < G; k++) {
      amax = std::max(amax, std::abs(xg[k]));
      sum += xg[k];
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;  // as torch computes it (tests/infer/test_quant.py)
    for (int64_t k = 0; k < G; k++) q.p[g * G + k] = static_cast<int8_t>(std::nearbyint(xg[k] * inv));
    q.d[g] = amax / 127.0f;
    q.sum[g] = sum;
  }
  return q;
}

// 16 packed bytes -> the block's 32 nibbles in weight order: the low nibbles (weights 0..15), then the high ones
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
}

// acc (8 x int32) += 32 unsigned nibbles times 32 signed int8, four products to a lane. Without VNNI, pairs of
// products sum to int16 first: at most 2 x 15 x 127, far from saturating.
inline __m256i dot_add(__m256i acc, __m256i q, __m256i p) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(acc, q, p);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, p), _mm256_set1_epi16(1)));
#endif
}

// NB weight rows against RT quantized input rows (p, d, sum at the tile's first row); streams the bytes as `block`
// streams float rows, the rows two blocks ahead prefetched.
template <int NB, int RT>
inline void block4(const uint8_t* w, const at::BFloat16* sm, int64_t K, int64_t G, const int8_t* p, const float* d,
                   const float* xsum, float* y, int64_t N) {
  const int64_t KB = K / 2, NG = K / G;
  __m256 out[NB][RT];
  float off[NB][RT] = {};
  for (int i = 0; i < NB; i++)
    for (int r = 0; r < RT; r++) out[i][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < NG; g++) {
    __m256i acc[NB][RT];
    for (int i = 0; i < NB; i++)
      for (int r = 0; r < RT; r++) acc[i][r] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (k % 128 == 0)  // a 64-byte line holds 128 weights
        for (int i = 0; i < NB; i++) _mm_prefetch(reinterpret_cast<const char*>(w + (i + 2 * NB) * KB + k / 2), _MM_HINT_T0);
      __m256i pv[RT];
      for (int r = 0; r < RT; r++) pv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * K + k));
      for (int i = 0; i < NB; i++) {
        const __m256i q = nibbles32(w + i * KB + k / 2);
        for (int r = 0; r < RT; r++) acc[i][r] = dot_add(acc[i][r], q, pv[r]);
      }
    }
    for (int i = 0; i < NB; i++) {
      const float s = static_cast<float>(sm[(i * NG + g) * 2]), m = static_cast<float>(sm[(i * NG + g) * 2 + 1]);
      for (int r = 0; r < RT; r++) {
        out[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][r]), _mm256_set1_ps(s * d[r * NG + g]), out[i][r]);
        off[i][r] += m * xsum[r * NG + g];
      }
    }
  }
  for (int i = 0; i < NB; i++)
    for (int r = 0; r < RT; r++) y[r * N + i] = hsum(out[i][r]) + off[i][r];
}

// Calls tile(rt, r) over all R input rows in tiles of rt = up to 4 rows, which re-read the weight rows the tile's
// kernel streams from L1/L2.
template <typename Tile>
inline void tiles(int64_t R, Tile tile) {
  for (int64_t r = 0; r < R;) {
    switch (std::min<int64_t>(R - r, 4)) {
      case 1: tile(std::integral_constant<int, 1>{}, r); r += 1; break;
      case 2: tile(std::integral_constant<int, 2>{}, r); r += 2; break;
      case 3: tile(std::integral_constant<int, 3>{}, r); r += 3; break;
      default: tile(std::integral_constant<int, 4>{}, r); r += 4; break;
    }
  }
}

// NB weight rows (read from memory once) against all R input rows
template <typename W, int NB>
inline void all_rows(const W* w, int64_t K, const float* x, float* y, int64_t R, int64_t N) {
  tiles(R, [&](auto rt, int64_t r) { block<W, NB, decltype(rt)::value>(w, K, x + r * K, y + r * N, N); });
}

template <int NB>
inline void all_rows4(const uint8_t* w, const at::BFloat16* sm, int64_t K, int64_t G, const Int8Groups& x, float* y,
                      int64_t R, int64_t N) {
  const int64_t NG = K / G;
  tiles(R, [&](auto rt, int64_t r) {
    block4<NB, decltype(rt)::value>(w, sm, K, G, x.p.data() + r * K, x.d.data() + r * NG, x.sum.data() + r * NG,
                                    y + r * N, N);
  });
}

template <typename W>
void gemv_impl(const W* w, const float* x, float* y, int64_t R, int64_t N, int64_t K) {
  // ~32 KB of weights per task at the least, so tiny layers do not pay for waking the other thread
  const int64_t grain = std::max<int64_t>(16, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (R == 1)  // 4 rows x 1: 4 accumulators
      for (; n + 4 <= n1; n += 4) all_rows<W, 4>(w + n * K, K, x, y + n, R, N);
    else  // 3 rows x up to 4: 12 accumulators + 3 weight registers, out of 16 (2 x 4 ran batch 8 1.1x slower)
      for (; n + 3 <= n1; n += 3) all_rows<W, 3>(w + n * K, K, x, y + n, R, N);
    for (; n < n1; n++) all_rows<W, 1>(w + n * K, K, x, y + n, R, N);
  });
}

void gemv_int4(const uint8_t* w, const at::BFloat16* sm, const float* x, float* y, int64_t R, int64_t N, int64_t K,
               int64_t G) {
  const Int8Groups xq = quantize_groups(x, R, K, G);
  const int64_t grain = std::max<int64_t>(16, 8192 / std::max<int64_t>(K, 1));  // as gemv_impl's
  const int64_t gb = 2 * (K / G);  // scale entries per row
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (R == 1)  // 4 rows x 1: 8 accumulators (4 per group, 4 across groups)
      for (; n + 4 <= n1; n += 4) all_rows4<4>(w + n * K / 2, sm + n * gb, K, G, xq, y + n, R, N);
    for (; n < n1; n++) all_rows4<1>(w + n * K / 2, sm + n * gb, K, G, xq, y + n, R, N);
  });
}

// A projection weight as the model holds it: [N, K] in the model dtype; or quantized (quant.QuantizedLinear, whose
// inputs and outputs are rounded to bfloat16: the rounding is kept here): int8 [N, K] with a scale per row, or
// packed int4 [N, K/2] uint8 with [N, K/G, 2] bfloat16 (scale, offset) per group of G.
using Weight = std::tuple<torch::Tensor, c10::optional<torch::Tensor>>;

inline int64_t in_features(const torch::Tensor& w) { return w.scalar_type() == torch::kUInt8 ? 2 * w.size(1) : w.size(1); }

void check(const Weight& wt, torch::ScalarType dtype) {
  const torch::Tensor& w = std::get<0>(wt);
  const bool int8 = w.scalar_type() == torch::kInt8, int4 = w.scalar_type() == torch::kUInt8;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weights must be contiguous matrices");
  TORCH_CHECK(int8 || int4 || w.scalar_type() == dtype, "weights must be int8, packed int4 or of the activations' dtype");
  TORCH_CHECK((int8 || int4) == std::get<1>(wt).has_value() && (!int8 || std::get<1>(wt)->numel() == w.size(0)),
              "int8 weights (and only they) need a scale per row");
  if (int4) {
    const torch::Tensor& s = *std::get<1>(wt);
    TORCH_CHECK(s.dim() == 3 && s.size(0) == w.size(0) && s.size(2) == 2 && s.scalar_type() == torch::kBFloat16 &&
                s.is_contiguous() && s.size(1) > 0 && 2 * w.size(1) % s.size(1) == 0 && 2 * w.size(1) / s.size(1) % 32 == 0,
                "packed int4 weights [N, K/2] need bfloat16 [N, K/G, 2] (scale, offset), G a multiple of 32");
  }
}

// y [R, N] = x [R, K] @ W.T, in float32
void matvec(const Weight& wt, const float* x, float* y, int64_t R) {
  const torch::Tensor& w = std::get<0>(wt);
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == torch::kFloat32 && R > 16) {  // many rows (batched decode): BLAS, W @ x^T (cpu_matmul.cpp)
    linear_rows(torch::from_blob(const_cast<float*>(x), {R, K}, torch::TensorOptions().dtype(torch::kFloat32)), w, y);
    return;
  }
  if (w.scalar_type() == torch::kFloat32) return gemv_impl(w.data_ptr<float>(), x, y, R, N, K);
  if (w.scalar_type() == torch::kBFloat16) return gemv_impl(w.data_ptr<at::BFloat16>(), x, y, R, N, K);
  const bool int8 = w.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 || w.scalar_type() == torch::kUInt8, "weights must be float32, bfloat16, int8 or packed int4");
  const int64_t Kx = in_features(w);
  std::vector<float> xb(x, x + R * Kx);
  for (float& v : xb) v = round_to<at::BFloat16>(v);
  torch::Tensor scale;  // int8: a scale per row, applied to the sums
  if (int8) {
    gemv_impl(w.data_ptr<int8_t>(), xb.data(), y, R, N, K);
    scale = std::get<1>(wt)->to(torch::kFloat32).contiguous();
  } else {
    const torch::Tensor& sm = *std::get<1>(wt);
    gemv_int4(w.data_ptr<uint8_t>(), sm.data_ptr<at::BFloat16>(), xb.data(), y, R, N, Kx, Kx / sm.size(1));
  }
  const float* sp = int8 ? scale.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < R; r++)
    for (int64_t n = 0; n < N; n++) y[r * N + n] = round_to<at::BFloat16>(sp ? y[r * N + n] * sp[n] : y[r * N + n]);
}

torch::Tensor gemv(const torch::Tensor& weight, const torch::Tensor& x, const c10::optional<torch::Tensor>& scale) {
  // weight [N, K] float32, bfloat16, int8 with a scale per row, or packed int4 [N, K/2] with (scale, offset) per
  // group; x [R, K] float32 contiguous -> [R, N] float32
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "gemv: x must be [R, K] f32");
  const Weight wt{weight, scale};
  check(wt, weight.scalar_type());
  TORCH_CHECK(x.size(1) == in_features(weight), "gemv: x has ", x.size(1), " columns, weight has ", in_features(weight));
  torch::Tensor y = torch::empty({x.size(0), weight.size(0)}, x.options());
  matvec(wt, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0));
  return y;
}

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t R, int64_t D, float eps) {
  for (int64_t r = 0; r < R; r++, x += D, y += D) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; j++) ss += static_cast<float>(x[j]) * static_cast<float>(x[j]);
    const float inv = 1.0f / std::sqrt(ss / D + eps);
    for (int64_t j = 0; j < D; j++)  // normalised value cast to T, then scaled in T, as the torch code does
      y[j] = static_cast<T>(static_cast<float>(w[j]) * static_cast<float>(static_cast<T>(static_cast<float>(x[j]) * inv)));
  }
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  // x [R, D], weight [D], same dtype (float32 or bfloat16), contiguous -> [R, D]
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(1) &&
              x.scalar_type() == weight.scalar_type(), "rms_norm: x [R, D] and weight [D] of one dtype");
  torch::Tensor y = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32)
    rms_norm_impl(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), eps);
  else if (x.scalar_type() == torch::kBFloat16)
    rms_norm_impl(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                  x.size(0), x.size(1), eps);
  else
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return y;
}

// One token between in_proj and out_proj: zx [b, proj] float (z | xBC | dt) -> y [b, H*P] float. conv_state
// [b, cd, k-1] (T) and ssm [b, H, P, N] (float32) are updated in place; xc [b, cd] is scratch.
template <typename T>
void mixer_step(const Mixer<T>& m, int64_t Bsz, const float* zx, T* conv_state, float* ssm, float* xc, float* y) {
  const int64_t di = m.H * m.P, k1 = m.kw - 1;
  // 1. conv over [cached k-1 columns, new column], SiLU; the window slides by one
  at::parallel_for(0, Bsz * m.cd, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / m.cd, c = i % m.cd;
      T* win = conv_state + i * k1;
      const T xin = static_cast<T>(zx[b * m.proj + di + c]);
      const T* w = m.conv_w + c * m.kw;
      float acc = m.conv_b ? static_cast<float>(m.conv_b[c]) : 0.0f;
      for (int64_t j = 0; j < k1; j++) acc += static_cast<float>(w[j]) * static_cast<float>(win[j]);
      acc += static_cast<float>(w[k1]) * static_cast<float>(xin);
      for (int64_t j = 0; j + 1 < k1; j++) win[j] = win[j + 1];
      if (k1 > 0) win[k1 - 1] = xin;
      xc[i] = acc;
    }
    silu_inplace(xc + i0, i1 - i0);
    for (int64_t i = i0; i < i1; i++) xc[i] = round_to<T>(xc[i]);  // the conv output is stored as T in torch
  });
  // 2. per (row, head): state = exp(dt A) state + dt x B^T; y = state C + D x
  const int64_t hpg = m.H / m.G;
  at::parallel_for(0, Bsz * m.H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / m.H, h = i % m.H, g = h / hpg;
      const float dt = std::max(softplus(zx[b * m.proj + di + m.cd + h] + static_cast<float>(m.dt_bias[h])), m.dt_min);
      const float dA = std::exp(dt * -std::exp(static_cast<float>(m.A_log[h])));
      const float Dh = static_cast<float>(m.D[h]);
      const float* x = xc + b * m.cd + h * m.P;
      const float* Bv = xc + b * m.cd + di + g * m.N;
      const float* Cv = xc + b * m.cd + di + m.G * m.N + g * m.N;
      float* s = ssm + i * m.P * m.N;
      const int64_t N8 = m.N & ~int64_t(7);
      for (int64_t p = 0; p < m.P; p++, s += m.N) {  // one pass over the state: update and read-out together
        const float xdt = x[p] * dt;
        const __m256 vdA = _mm256_set1_ps(dA), vxdt = _mm256_set1_ps(xdt);
        __m256 acc8 = _mm256_setzero_ps();
        for (int64_t n = 0; n < N8; n += 8) {
          const __m256 sn = _mm256_fmadd_ps(_mm256_loadu_ps(s + n), vdA, _mm256_mul_ps(vxdt, _mm256_loadu_ps(Bv + n)));
          _mm256_storeu_ps(s + n, sn);
          acc8 = _mm256_fmadd_ps(sn, _mm256_loadu_ps(Cv + n), acc8);
        }
        float acc = hsum(acc8);
        for (int64_t n = N8; n < m.N; n++) {
          s[n] = s[n] * dA + xdt * Bv[n];
          acc += s[n] * Cv[n];
        }
        y[b * di + h * m.P + p] = acc + Dh * x[p];
      }
    }
  });
  // 3. gated RMSNorm; the scratch (x, B, C are used up) holds silu(z)
  for (int64_t b = 0; b < Bsz; b++) gated_norm(m, y + b * di, zx + b * m.proj, xc);
}

template <typename T>
torch::Tensor mamba_step_t(const torch::Tensor& zxbcdt, const torch::Tensor& conv_state, const torch::Tensor& ssm_state,
                           const Mixer<T>& m) {
  const int64_t Bsz = zxbcdt.size(0);
  auto opts = zxbcdt.options().dtype(torch::kFloat32);
  torch::Tensor zx = zxbcdt.to(torch::kFloat32).contiguous();
  torch::Tensor xc = torch::empty({Bsz, m.cd}, opts);
  torch::Tensor y = torch::empty({Bsz, m.H * m.P}, opts);
  mixer_step(m, Bsz, zx.data_ptr<float>(), conv_state.data_ptr<T>(), ssm_state.data_ptr<float>(),
             xc.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// Everything of a Mamba layer for one token: residual + out_proj(mixer(in_proj(rmsnorm(x)))), x and residual
// [b, d] (T), rounding to T where the torch code stores a T (after in_proj, before and after out_proj). The
// residual is x itself except at hybrid layers, where x has the shared block's output added and the residual not.
template <typename T>
torch::Tensor mamba_layer_t(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& ln_w,
                            double ln_eps, const Weight& in_w, const Weight& out_w, const torch::Tensor& conv_state,
                            const torch::Tensor& ssm_state, const Mixer<T>& m) {
  const int64_t Bsz = x.size(0), d = x.size(1), di = m.H * m.P;
  auto opts = x.options().dtype(torch::kFloat32);
  torch::Tensor h = torch::empty_like(x);
  rms_norm_impl(x.data_ptr<T>(), ln_w.data_ptr<T>(), h.data_ptr<T>(), Bsz, d, static_cast<float>(ln_eps));
  torch::Tensor hf = h.to(torch::kFloat32);
  torch::Tensor zx = torch::empty({Bsz, m.proj}, opts);
  matvec(in_w, hf.data_ptr<float>(), zx.data_ptr<float>(), Bsz);
  float* zp = zx.data_ptr<float>();
  for (int64_t i = 0; i < Bsz * m.proj; i++) zp[i] = round_to<T>(zp[i]);
  torch::Tensor xc = torch::empty({Bsz, m.cd}, opts);
  torch::Tensor y = torch::empty({Bsz, di}, opts);
  float* yp = y.data_ptr<float>();
  mixer_step(m, Bsz, zp, conv_state.data_ptr<T>(), ssm_state.data_ptr<float>(), xc.data_ptr<float>(), yp);
  for (int64_t i = 0; i < Bsz * di; i++) yp[i] = round_to<T>(yp[i]);
  torch::Tensor o = torch::empty({Bsz, d}, opts);
  matvec(out_w, yp, o.data_ptr<float>(), Bsz);
  torch::Tensor out = torch::empty_like(x);
  const T* xp = residual.data_ptr<T>();
  const float* op = o.data_ptr<float>();
  T* outp = out.data_ptr<T>();
  for (int64_t i = 0; i < Bsz * d; i++) outp[i] = static_cast<T>(static_cast<float>(xp[i]) + round_to<T>(op[i]));
  return out;
}

torch::Tensor mamba_step(const torch::Tensor& zxbcdt, const torch::Tensor& conv_state, const torch::Tensor& ssm_state,
                         const torch::Tensor& conv_w, const c10::optional<torch::Tensor>& conv_b,
                         const torch::Tensor& dt_bias, const torch::Tensor& A_log, const torch::Tensor& D,
                         const torch::Tensor& norm_w, int64_t groups, double dt_min, double eps) {
  // zxbcdt [b, in_proj]; conv_state [b, conv_dim, k-1] and the parameters in the model dtype, ssm_state
  // [b, h, p, n] float32 (both states updated in place) -> y [b, d_inner] float32
  TORCH_CHECK(zxbcdt.dim() == 2 && conv_state.is_contiguous(), "mamba_step: zxbcdt [b, in_proj], contiguous states");
  if (conv_state.scalar_type() == torch::kFloat32)
    return mamba_step_t(zxbcdt, conv_state, ssm_state, mixer<float>(ssm_state, conv_w, conv_b, dt_bias, A_log, D,
                                                                    norm_w, groups, zxbcdt.size(1), dt_min, eps));
  TORCH_CHECK(conv_state.scalar_type() == torch::kBFloat16, "mamba_step: float32 or bfloat16");
  return mamba_step_t(zxbcdt, conv_state, ssm_state, mixer<at::BFloat16>(ssm_state, conv_w, conv_b, dt_bias, A_log,
                                                                         D, norm_w, groups, zxbcdt.size(1), dt_min, eps));
}

torch::Tensor mamba_layer(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& ln_w,
                          double ln_eps, const Weight& in_w, const Weight& out_w, const torch::Tensor& conv_state,
                          const torch::Tensor& ssm_state,
                          const torch::Tensor& conv_w, const c10::optional<torch::Tensor>& conv_b,
                          const torch::Tensor& dt_bias, const torch::Tensor& A_log, const torch::Tensor& D,
                          const torch::Tensor& norm_w, int64_t groups, double dt_min, double eps) {
  // residual and x [b, d], every weight and conv_state in x's dtype (float32 or bfloat16), contiguous -> [b, d]
  for (const auto* t : {&residual, &x, &ln_w, &conv_state})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous(), "mamba_layer: contiguous, x's dtype");
  check(in_w, x.scalar_type());
  check(out_w, x.scalar_type());
  const int64_t proj = std::get<0>(in_w).size(0);
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && in_features(std::get<0>(in_w)) == x.size(1) &&
              std::get<0>(out_w).size(0) == x.size(1), "mamba_layer: shapes");
  if (x.scalar_type() == torch::kFloat32)
    return mamba_layer_t(residual, x, ln_w, ln_eps, in_w, out_w, conv_state, ssm_state,
                         mixer<float>(ssm_state, conv_w, conv_b, dt_bias, A_log, D, norm_w, groups, proj,
                                      dt_min, eps));
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "mamba_layer: float32 or bfloat16");
  return mamba_layer_t(residual, x, ln_w, ln_eps, in_w, out_w, conv_state, ssm_state,
                       mixer<at::BFloat16>(ssm_state, conv_w, conv_b, dt_bias, A_log, D, norm_w, groups, proj,
                                           dt_min, eps));
}


// y [R, N] (T) = x [R, K] (T) @ w.T (+ the rank-r adapter up(down(x)), each product stored as T like torch).
template <typename T>
torch::Tensor project(const torch::Tensor& x, const Weight& w, const Weight* down, const Weight* up) {
  const int64_t R = x.size(0);
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  torch::Tensor y = torch::empty({R, std::get<0>(w).size(0)}, xf.options());
  matvec(w, xf.data_ptr<float>(), y.data_ptr<float>(), R);
  torch::Tensor out = y.to(x.scalar_type());
  if (down != nullptr) {
    torch::Tensor r = torch::empty({R, std::get<0>(*down).size(0)}, xf.options());
    matvec(*down, xf.data_ptr<float>(), r.data_ptr<float>(), R);
    torch::Tensor rf = r.to(x.scalar_type()).to(torch::kFloat32);
    torch::Tensor a = torch::empty({R, std::get<0>(*up).size(0)}, xf.options());
    matvec(*up, rf.data_ptr<float>(), a.data_ptr<float>(), R);
    out = out + a.to(x.scalar_type());
  }
  return out;
}

// erf to ~1.5e-7 (Abramowitz & Stegun 7.1.26) on 8 lanes, for the exact (erf) GELU
inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  return _mm256_or_ps(sign, _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f)));
}

// act(gate) * up over [R, 2I] = [gate | up] rows -> [R, I]; act 0: erf GELU, 1: SiLU, 2: tanh GELU
template <typename T>
torch::Tensor glu(const torch::Tensor& gu, int64_t act) {
  const int64_t R = gu.size(0), I = gu.size(1) / 2;
  torch::Tensor f = gu.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty({R, I}, f.options());
  for (int64_t r = 0; r < R; r++) {
    const float* g = f.data_ptr<float>() + r * 2 * I;
    float* o = out.data_ptr<float>() + r * I;
    int64_t i = 0;
    for (; act != 2 && i + 8 <= I; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 a = act == 0 ? _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x),
                                                _mm256_add_ps(_mm256_set1_ps(1.0f), erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)))))
                                : _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
      _mm256_storeu_ps(o + i, a);
    }
    for (; i < I; i++) {
      const float x = g[i];
      o[i] = act == 0 ? 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f))
           : act == 1 ? silu(x)
           : 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    }
    for (i = 0; i < I; i++) o[i] = round_to<T>(round_to<T>(o[i]) * g[I + i]);  // act(gate) in T, times up in T
  }
  return out.to(gu.scalar_type());
}

// One decode token through a shared transformer block at a hybrid layer, and that layer's linear:
// x + linear(block(concat(x, emb))). Writes this token's rotated k and v at `slot` of the layer's KV cache and
// attends over slots [0, slot] where `valid`. ws: q, k, v, o, gate_up, down, linear weights; adapters: empty or
// (q_down, q_up, k_down, k_up, v_down, v_up, mlp_down, mlp_up), any pair of which may be None.
template <typename T>
torch::Tensor shared_block_t(const torch::Tensor& x, const torch::Tensor& emb, const std::vector<torch::Tensor>& norms,
                             double eps, const std::vector<Weight>& ws, const std::vector<c10::optional<Weight>>& ad,
                             const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc,
                             const torch::Tensor& vc, int64_t slot, const torch::Tensor& valid, int64_t heads,
                             double scale, int64_t act) {
  const int64_t Bsz = x.size(0), kvh = kc.size(1), hd = kc.size(3), L = slot + 1, rep = heads / kvh;
  auto adapter = [&](int64_t i) -> const Weight* { return ad.empty() || !ad[i].has_value() ? nullptr : &*ad[i]; };
  torch::Tensor hcat = torch::cat({x, emb}, 1).contiguous();
  torch::Tensor h = torch::empty_like(hcat);
  rms_norm_impl(hcat.data_ptr<T>(), norms[0].data_ptr<T>(), h.data_ptr<T>(), Bsz, hcat.size(1), static_cast<float>(eps));
  torch::Tensor q = project<T>(h, ws[0], adapter(0), adapter(1));
  torch::Tensor k = project<T>(h, ws[1], adapter(2), adapter(3));
  torch::Tensor v = project<T>(h, ws[2], adapter(4), adapter(5));

  // RoPE (rotate-half) in T, then k and v into the cache
  auto rope = [&](torch::Tensor& t, int64_t nh) {
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* d = t.data_ptr<T>();
    std::vector<float> row(hd);
    for (int64_t b = 0; b < Bsz; b++)
      for (int64_t i = 0; i < nh; i++) {
        T* r = d + (b * nh + i) * hd;
        for (int64_t j = 0; j < hd; j++) row[j] = static_cast<float>(r[j]);
        for (int64_t j = 0; j < hd; j++) {
          const float rot = j < hd / 2 ? -row[j + hd / 2] : row[j - hd / 2];
          const float c = static_cast<float>(cp[b * hd + j]), s = static_cast<float>(sp[b * hd + j]);
          r[j] = static_cast<T>(round_to<T>(row[j] * c) + round_to<T>(rot * s));
        }
      }
  };
  if (cos.defined()) {
    rope(q, heads);
    rope(k, kvh);
  }
  T* K = kc.data_ptr<T>();
  T* V = vc.data_ptr<T>();
  const int64_t s0 = kc.stride(0), s1 = kc.stride(1), s2 = kc.stride(2);
  for (int64_t b = 0; b < Bsz; b++)
    for (int64_t i = 0; i < kvh; i++) {
      std::copy(k.data_ptr<T>() + (b * kvh + i) * hd, k.data_ptr<T>() + (b * kvh + i + 1) * hd, K + b * s0 + i * s1 + slot * s2);
      std::copy(v.data_ptr<T>() + (b * kvh + i) * hd, v.data_ptr<T>() + (b * kvh + i + 1) * hd, V + b * s0 + i * s1 + slot * s2);
    }

  // attention of the one query over the valid slots, per (row, head); float inside, stored as T
  torch::Tensor att = torch::empty({Bsz, heads * hd}, x.options());
  const bool* ok = valid.data_ptr<bool>();
  const int64_t vs = valid.stride(0);
  at::parallel_for(0, Bsz * heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(L), qf(hd), o(hd);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / heads, hh = i % heads, g = hh / rep;
      const T* qr = q.data_ptr<T>() + (b * heads + hh) * hd;
      for (int64_t j = 0; j < hd; j++) qf[j] = static_cast<float>(qr[j]);
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; t++) {
        if (!ok[b * vs + t] && t != slot) { p[t] = -INFINITY; continue; }
        p[t] = dot(qf.data(), K + b * s0 + g * s1 + t * s2, hd) * static_cast<float>(scale);
        mx = std::max(mx, p[t]);
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < L; t++) sum += (p[t] = std::exp(p[t] - mx));
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t t = 0; t < L; t++) {
        if (p[t] == 0.0f) continue;
        axpy(p[t] / sum, V + b * s0 + g * s1 + t * s2, o.data(), hd);
      }
      T* ar = att.data_ptr<T>() + (b * heads + hh) * hd;
      for (int64_t j = 0; j < hd; j++) ar[j] = static_cast<T>(o[j]);
    }
  });

  torch::Tensor o = project<T>(att, ws[3], nullptr, nullptr);
  torch::Tensor g = torch::empty_like(o);
  rms_norm_impl(o.data_ptr<T>(), norms[1].data_ptr<T>(), g.data_ptr<T>(), Bsz, o.size(1), static_cast<float>(eps));
  torch::Tensor gu = project<T>(g, ws[4], adapter(6), adapter(7));
  torch::Tensor mlp = project<T>(glu<T>(gu, act), ws[5], nullptr, nullptr);
  return x + project<T>(mlp, ws[6], nullptr, nullptr);
}

torch::Tensor shared_block(const torch::Tensor& x, const torch::Tensor& emb, const std::vector<torch::Tensor>& norms,
                           double eps, const std::vector<Weight>& ws, const std::vector<c10::optional<Weight>>& adapters,
                           const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin,
                           const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t slot,
                           const torch::Tensor& valid, int64_t heads, double scale, int64_t act) {
  // x, emb [b, d]; norms (input [2d], pre-ff [d]); cos/sin [b, head_dim] or None (no RoPE); k/v_cache
  // [b, kv, capacity, head_dim] with unit stride last; valid [b, >= slot+1] bool; all of x's dtype -> [b, d]
  TORCH_CHECK(x.dim() == 2 && emb.sizes() == x.sizes() && norms.size() == 2 && ws.size() == 7 &&
              (adapters.empty() || adapters.size() == 8), "shared_block: arguments");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides() && slot < k_cache.size(2) &&
              valid.scalar_type() == torch::kBool && valid.stride(1) == 1 && valid.size(1) > slot,
              "shared_block: cache layout");
  for (const auto* t : {&x, &emb, &k_cache, &v_cache, &norms[0], &norms[1]})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "shared_block: activations, norms and cache of one dtype");
  TORCH_CHECK(norms[0].is_contiguous() && norms[1].is_contiguous(), "shared_block: contiguous norms");
  for (const auto& w : ws) check(w, x.scalar_type());
  for (const auto& w : adapters)
    if (w.has_value()) check(*w, x.scalar_type());
  const torch::Tensor c = cos.has_value() ? cos->contiguous() : torch::Tensor();
  const torch::Tensor s = sin.has_value() ? sin->contiguous() : torch::Tensor();
  if (x.scalar_type() == torch::kFloat32)
    return shared_block_t<float>(x.contiguous(), emb.contiguous(), norms, eps, ws, adapters, c, s, k_cache, v_cache,
                                 slot, valid, heads, scale, act);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "shared_block: float32 or bfloat16");
  return shared_block_t<at::BFloat16>(x.contiguous(), emb.contiguous(), norms, eps, ws, adapters, c, s, k_cache,
                                      v_cache, slot, valid, heads, scale, act);
}

// The whole decode step of a model in one call: embedding lookup, every layer (with the shared-block visit before
// a hybrid layer), final norm and LM head, so that no Python runs between layers (it cost ~0.1 ms a layer). It
// holds the very tensors the model holds, so in-place changes to them (training steps, load_state_dict, .to()
// through .data) are seen; zamba2/decode.py builds a new one when a module or parameter is replaced.
// A Mamba layer: input norm weight and eps, in_proj, out_proj, then mamba_layer's mixer arguments (conv weight,
// conv bias, dt_bias, A_log, D, gated-norm weight, groups, dt_min, eps).
using MambaArgs = std::tuple<torch::Tensor, double, Weight, Weight, torch::Tensor, c10::optional<torch::Tensor>,
                             torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double, double>;
// A shared-block visit: shared_block's arguments that stay the same from token to token (norms, eps, weights,
// adapters, heads, scale, act).
using VisitArgs = std::tuple<std::vector<torch::Tensor>, double, std::vector<Weight>,
                             std::vector<c10::optional<Weight>>, int64_t, double, int64_t>;

struct Decoder {
  torch::Tensor embed;                             // [vocab, d]
  std::vector<MambaArgs> layers;
  std::vector<c10::optional<VisitArgs>> visits;   // per layer
  torch::Tensor final_norm;
  double final_eps;
  Weight head;                                     // [vocab, d]: the embedding when tied

  // ids [b] -> logits [b, vocab] in the model dtype. cos/sin [b, head_dim] or None; the cache as HybridCache
  // holds it (conv and ssm per layer, keys and values per hybrid layer), the new token's KV slot and validity.
  torch::Tensor step(const torch::Tensor& ids, const c10::optional<torch::Tensor>& cos,
                     const c10::optional<torch::Tensor>& sin, int64_t slot, const torch::Tensor& valid,
                     const std::vector<torch::Tensor>& conv, const std::vector<torch::Tensor>& ssm,
                     const std::map<int64_t, torch::Tensor>& keys, const std::map<int64_t, torch::Tensor>& values) const {
    TORCH_CHECK(conv.size() == layers.size() && ssm.size() == layers.size(), "decoder: a cache for another model");
    const torch::Tensor emb = embed.index_select(0, ids);  // [b, d]
    torch::Tensor x = emb;
    for (size_t i = 0; i < layers.size(); i++) {
      torch::Tensor u = x;  // the Mamba layer's input; its residual stays x
      if (visits[i].has_value()) {
        const auto& [norms, eps, ws, ad, heads, scale, act] = *visits[i];
        TORCH_CHECK(keys.count(i) && values.count(i), "decoder: no KV cache for hybrid layer ", i);
        u = shared_block(x, emb, norms, eps, ws, ad, cos, sin, keys.at(i), values.at(i), slot, valid, heads, scale,
                         act);
      }
      const auto& [ln_w, ln_eps, in_w, out_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, groups, dt_min, eps] =
          layers[i];
      x = mamba_layer(x, u, ln_w, ln_eps, in_w, out_w, conv[i], ssm[i], conv_w, conv_b, dt_bias, A_log, D, norm_w,
                      groups, dt_min, eps);
    }
    const torch::Tensor h = rms_norm(x, final_norm, final_eps).to(torch::kFloat32);
    return gemv(std::get<0>(head), h, std::get<1>(head)).to(x.scalar_type());
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ W.T for a few rows of x (decode)", py::arg("weight"), py::arg("x"),
        py::arg("scale") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows (decode)");
  m.def("mamba_step", &mamba_step, "one Mamba2 decode step between in_proj and out_proj");
  m.def("linear_rows", py::overload_cast<const torch::Tensor&, const torch::Tensor&>(&linear_rows),
        "x @ W.T for many rows (prefill), through W @ x.T");
  m.def("mamba_prefill", &mamba_prefill, "a Mamba2 mixer between in_proj and out_proj over a prompt piece");
  py::class_<Decoder>(m, "Decoder", "a whole model's decode step, one call per token")
      .def(py::init<torch::Tensor, std::vector<MambaArgs>, std::vector<c10::optional<VisitArgs>>, torch::Tensor,
                    double, Weight>())
      .def("step", &Decoder::step);
}
