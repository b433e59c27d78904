// Prefill on the CPU: everything a Mamba2 mixer does to a prompt piece between in_proj and out_proj (conv +
// SiLU, softplus(dt), the chunked SSD scan, D skip, gated RMSNorm) in one call. zamba2.model.ssd.ssd_chunked and the
// mixer's torch code are the reference it is tested against.
//
// The torch form computes every chunk at once (its [heads, chunks, ...] temporaries of tens of MB pass through
// memory) and ran the scan at ~23 GFLOP/s on the 2-core AVX2 machine, 15% of a 1.2B prefill. Here each head
// runs its chunks in order with its state in L1/L2, as transposed [N, P]:
//   Y     = (CB o decay o dt) X_c + exp(cum) C_c S       (inside the chunk, and the state entering it)
//   S_out = exp(cum_last) S + B_c^T (X_c o exp(cum_last - cum) dt)
// three small matmuls per chunk and head, on a tile of 4 rows x 2 vectors (16 or 32 columns, common.h).

#include "common.h"

namespace zamba2 {
namespace {

// C [M, N] (+)= A [M, K] @ B [K, N]: A read through strides (it may be a transpose), B and C row-major with
// leading dimensions ldb, ldc; N a multiple of 8. RM rows x NV vectors of columns per tile.
template <typename V, int RM, int NV>
inline void tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  V c[RM][NV];
  for (int r = 0; r < RM; r++)
    for (int v = 0; v < NV; v++) c[r][v] = accumulate ? V::load(C + r * ldc + V::W * v) : V::zero();
  for (int64_t k = 0; k < K; k++) {
    V b[NV];
    for (int v = 0; v < NV; v++) b[v] = V::load(B + k * ldb + V::W * v);
    for (int r = 0; r < RM; r++) {
      const V a = V::set1(A[r * ars + k * acs]);
      for (int v = 0; v < NV; v++) c[r][v] = fma(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < RM; r++)
    for (int v = 0; v < NV; v++) c[r][v].store(C + r * ldc + V::W * v);
}

template <int RM>
inline void row_tiles(int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 2 * Vec::W <= N; j += 2 * Vec::W) tile<Vec, RM, 2>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
  for (; j + Vec::W <= N; j += Vec::W) tile<Vec, RM, 1>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
  for (; j + 8 <= N; j += 8) tile<Vec8, RM, 1>(K, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) row_tiles<4>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: row_tiles<3>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 2: row_tiles<2>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 1: row_tiles<1>(N, K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
  }
}

inline void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
  for (; i < n; i++) v[i] = std::exp(v[i]);
}

// One sequence of L tokens. zx [L, proj] float (z | xBC | dt); conv_state [cd, k-1] (T) and ssm [H, P, N]
// (float32) are read and updated; xc [L, cd] and dt [L, H] are scratch; y [L, H*P] float out.
template <typename T>
void prefill(const Mixer<T>& m, int64_t L, int64_t Q, const float* zx, T* conv_state, float* ssm, float* xc,
             float* dt, float* y) {
  const int64_t di = m.H * m.P, cd = m.cd, k1 = m.kw - 1, G = m.G, N = m.N, P = m.P, hpg = m.H / m.G;
  // 1. depthwise causal conv over [cached k-1 rows, the L new rows] + SiLU, vectorised over channels
  std::vector<float> wt(m.kw * cd), bias(cd, 0.0f);  // weights as [tap, channel]
  for (int64_t c = 0; c < cd; c++) {
    for (int64_t j = 0; j < m.kw; j++) wt[j * cd + c] = static_cast<float>(m.conv_w[c * m.kw + j]);
    if (m.conv_b) bias[c] = static_cast<float>(m.conv_b[c]);
  }
  at::parallel_for(0, L, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      float* out = xc + t * cd;
      std::copy(bias.begin(), bias.end(), out);
      for (int64_t j = 0; j < m.kw; j++) {  // tap j reads row t - k1 + j
        const int64_t src = t - k1 + j;
        const float* w = wt.data() + j * cd;
        if (src >= 0) {
          const float* in = zx + src * m.proj + di;
          int64_t c = 0;
          for (; c + 8 <= cd; c += 8)
            _mm256_storeu_ps(out + c, _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(in + c),
                                                      _mm256_loadu_ps(out + c)));
          for (; c < cd; c++) out[c] += w[c] * in[c];
        } else {  // before the piece: the cached rows
          for (int64_t c = 0; c < cd; c++) out[c] += w[c] * static_cast<float>(conv_state[c * k1 + k1 + src]);
        }
      }
      silu_inplace(out, cd);
      for (int64_t c = 0; c < cd; c++) out[c] = round_to<T>(out[c]);  // the conv output is stored as T in torch
      for (int64_t h = 0; h < m.H; h++)  // softplus(dt + bias), clamped at dt_min as the torch code does
        dt[t * m.H + h] = std::max(softplus(zx[t * m.proj + di + cd + h] + static_cast<float>(m.dt_bias[h])), m.dt_min);
    }
  });
  // the cache keeps the last k-1 raw rows
  std::vector<T> window(cd * k1);
  for (int64_t c = 0; c < cd; c++)
    for (int64_t j = 0; j < k1; j++) {
      const int64_t src = L - k1 + j;
      window[c * k1 + j] = src >= 0 ? static_cast<T>(zx[src * m.proj + di + c]) : conv_state[c * k1 + k1 + src];
    }
  std::copy(window.begin(), window.end(), conv_state);

  // 2. C_i . B_j of every chunk, once per group: cb [G, chunks, Q, Q] (lower triangle)
  const int64_t nc = (L + Q - 1) / Q;
  std::vector<float> cb(G * nc * Q * Q);
  at::parallel_for(0, G * nc, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t g = i / nc, t0 = (i % nc) * Q, q = std::min(Q, L - t0);
      for (int64_t a = 0; a < q; a++)
        for (int64_t b = 0; b <= a; b++)
          cb[(i * Q + a) * Q + b] = dot(xc + (t0 + a) * cd + di + G * N + g * N, xc + (t0 + b) * cd + di + g * N, N);
    }
  });

  // 3. per head, chunk after chunk
  at::parallel_for(0, m.H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> S(N * P), M(Q * Q), Cs(Q * N), Xw(Q * P), Yc(Q * P), cum(Q);
    for (int64_t h = h0; h < h1; h++) {
      const int64_t g = h / hpg;
      const float A = -std::exp(static_cast<float>(m.A_log[h])), Dh = static_cast<float>(m.D[h]);
      float* state = ssm + h * P * N;
      for (int64_t p = 0; p < P; p++)
        for (int64_t n = 0; n < N; n++) S[n * P + p] = state[p * N + n];
      for (int64_t c = 0; c < nc; c++) {
        const int64_t t0 = c * Q, q = std::min(Q, L - t0);
        const float* X = xc + t0 * cd + h * P;                 // [q, P], rows cd apart
        const float* Bm = xc + t0 * cd + di + g * N;            // [q, N]
        const float* Cm = xc + t0 * cd + di + G * N + g * N;    // [q, N]
        float run = 0.0f;
        for (int64_t i = 0; i < q; i++) cum[i] = run += dt[(t0 + i) * m.H + h] * A;  // log-decay to i, inclusive
        // M[i, j] = C_i.B_j exp(cum_i - cum_j) dt_j for j <= i
        const float* cbc = cb.data() + (g * nc + c) * Q * Q;
        for (int64_t i = 0; i < q; i++) {
          float* row = M.data() + i * q;
          for (int64_t j = 0; j <= i; j++) row[j] = cum[i] - cum[j];
          exp_inplace(row, i + 1);
          for (int64_t j = 0; j <= i; j++) row[j] *= cbc[i * Q + j] * dt[(t0 + j) * m.H + h];
          std::fill(row + i + 1, row + q, 0.0f);
        }
        gemm(q, P, q, M.data(), q, 1, X, cd, Yc.data(), P, false);
        // the state entering the chunk, read at each position: exp(cum_i) C_i S
        for (int64_t i = 0; i < q; i++) {
          const float e = std::exp(cum[i]);
          for (int64_t n = 0; n < N; n++) Cs[i * N + n] = e * Cm[i * cd + n];
        }
        gemm(q, P, N, Cs.data(), N, 1, S.data(), P, Yc.data(), P, true);
        for (int64_t i = 0; i < q; i++)
          for (int64_t p = 0; p < P; p++) y[(t0 + i) * di + h * P + p] = Yc[i * P + p] + Dh * X[i * cd + p];
        // the state leaving the chunk
        const float last = cum[q - 1];
        for (int64_t j = 0; j < q; j++) {
          const float w = std::exp(last - cum[j]) * dt[(t0 + j) * m.H + h];
          for (int64_t p = 0; p < P; p++) Xw[j * P + p] = w * X[j * cd + p];
        }
        const float carry = std::exp(last);
        for (float& v : S) v *= carry;
        gemm(N, P, q, Bm, 1, cd, Xw.data(), P, S.data(), P, true);  // S += B_c^T Xw
      }
      for (int64_t p = 0; p < P; p++)
        for (int64_t n = 0; n < N; n++) state[p * N + n] = S[n * P + p];
    }
  });

  // 4. gated RMSNorm, per token
  at::parallel_for(0, L, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(di / G);
    for (int64_t t = t0; t < t1; t++) gated_norm(m, y + t * di, zx + t * m.proj, scratch.data());
  });
}

template <typename T>
torch::Tensor prefill_t(const torch::Tensor& zx, const torch::Tensor& conv_state, const torch::Tensor& ssm_state,
                        const Mixer<T>& m, int64_t chunk) {
  const int64_t Bsz = zx.size(0), L = zx.size(1), di = m.H * m.P;
  auto opts = zx.options().dtype(torch::kFloat32);
  torch::Tensor xc = torch::empty({L, m.cd}, opts), dt = torch::empty({L, m.H}, opts);
  torch::Tensor y = torch::empty({Bsz, L, di}, opts);
  for (int64_t b = 0; b < Bsz; b++)
    prefill(m, L, chunk, zx.data_ptr<float>() + b * L * m.proj, conv_state.data_ptr<T>() + b * m.cd * (m.kw - 1),
            ssm_state.data_ptr<float>() + b * m.H * m.P * m.N, xc.data_ptr<float>(), dt.data_ptr<float>(),
            y.data_ptr<float>() + b * L * di);
  return y.to(c10::CppTypeToScalarType<T>::value);
}

}  // namespace

torch::Tensor mamba_prefill(const torch::Tensor& zxbcdt, const torch::Tensor& conv_state, const torch::Tensor& ssm_state,
                            const torch::Tensor& conv_w, const c10::optional<torch::Tensor>& conv_b,
                            const torch::Tensor& dt_bias, const torch::Tensor& A_log, const torch::Tensor& D,
                            const torch::Tensor& norm_w, int64_t groups, double dt_min, double eps, int64_t chunk) {
  // zxbcdt [b, l, in_proj] in the model dtype; conv_state [b, conv_dim, k-1] (model dtype) and ssm_state
  // [b, h, p, n] float32, both updated in place -> y [b, l, d_inner] in the model dtype, ready for out_proj
  TORCH_CHECK(zxbcdt.dim() == 3 && conv_state.is_contiguous() && conv_state.scalar_type() == zxbcdt.scalar_type() &&
              chunk > 0, "mamba_prefill: zxbcdt [b, l, in_proj], a contiguous conv_state of its dtype");
  TORCH_CHECK(ssm_state.size(2) % 8 == 0, "mamba_prefill: the head dim must be a multiple of 8");
  const torch::Tensor zx = zxbcdt.to(torch::kFloat32).contiguous();
  if (zxbcdt.scalar_type() == torch::kFloat32)
    return prefill_t(zx, conv_state, ssm_state, mixer<float>(ssm_state, conv_w, conv_b, dt_bias, A_log, D, norm_w,
                                                             groups, zx.size(2), dt_min, eps), chunk);
  TORCH_CHECK(zxbcdt.scalar_type() == torch::kBFloat16, "mamba_prefill: float32 or bfloat16");
  return prefill_t(zx, conv_state, ssm_state, mixer<at::BFloat16>(ssm_state, conv_w, conv_b, dt_bias, A_log, D,
                                                                  norm_w, groups, zx.size(2), dt_min, eps), chunk);
}

}  // namespace zamba2
