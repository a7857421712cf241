// A hand-fused CPU kernel for the dendrite cascade, for benchmarks/fused_probe.py only (the library does not use
// it): one pass over the activation-sized tensors in the forward, one in the backward with the gain reductions
// riding along, in ATen's vector types (AVX2 where the CPU has it). It answers a question of the speed tables:
// would a kernel fused by hand, rather than by inductor, bring the cascade's training step to its FLOP ideal?
//
// Canonical shapes (as the library's compiled kernel): a, s: [N, k, C, R]; y, out, g: [N, C, R]; v: [k, C];
// U: [k, k, C] with U[d][j] the cascade gain from dendrite j < d into dendrite d (zero elsewhere).
// Forward:  z_d = a_d + sum_{j<d} U[d][j] s_j,  s_d = sigmoid(z_d),  out = y + sum_d v_d s_d.
// Backward: dz_d = (g v_d + sum_{j>d} dz_j U[j][d]) s_d (1 - s_d);  dv_d = sum g s_d;  dU[d][j] = sum dz_d s_j.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <vector>

namespace {

using at::vec::Vectorized;
constexpr int64_t kMaxDendrites = 8;

// Gains are [*, C]: along a run of channels (R == 1) each lane has its own gain; along a run of positions of
// one channel (R > 1) the gain is one scalar.
template <typename T, bool kAlongChannels>
inline Vectorized<T> gain_n(const T* g, int64_t i, int64_t n) {
  if constexpr (kAlongChannels) {
    return Vectorized<T>::loadu(g + i, n);
  } else {
    return Vectorized<T>(g[0]);
  }
}

// W vectors from element i of one run (n elements when W == 1: the run's tail). a, s: dendrite d at + d * plane;
// v, U: at the run's first channel, rows C apart. W > 1 interleaves independent vectors: each dendrite's sigmoid waits
// on the one before, and one vector at a time leaves the core idle on that chain.
template <typename T, bool kAlong, int W>
inline void forward_body(int64_t k, int64_t plane, int64_t C, const T* a, const T* y, const T* v, const T* U, T* out,
                         T* s, int64_t i, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const V one(T(1));
  V sv[kMaxDendrites][W];
  V o[W];
  for (int w = 0; w < W; ++w) o[w] = W == 1 ? V::loadu(y + i, n) : V::loadu(y + i + w * S);
  for (int64_t d = 0; d < k; ++d) {
    V z[W];
    for (int w = 0; w < W; ++w) z[w] = W == 1 ? V::loadu(a + d * plane + i, n) : V::loadu(a + d * plane + i + w * S);
    for (int64_t j = 0; j < d; ++j)
      for (int w = 0; w < W; ++w) z[w] = at::vec::fmadd(gain_n<T, kAlong>(U + (d * k + j) * C, i + w * S, W == 1 ? n : S), sv[j][w], z[w]);
    for (int w = 0; w < W; ++w) z[w] = z[w].neg().exp();
    for (int w = 0; w < W; ++w) {
      sv[d][w] = one / (one + z[w]);
      if (W == 1) sv[d][w].store(s + d * plane + i, n); else sv[d][w].store(s + d * plane + i + w * S);
      o[w] = at::vec::fmadd(gain_n<T, kAlong>(v + d * C, i + w * S, W == 1 ? n : S), sv[d][w], o[w]);
    }
  }
  for (int w = 0; w < W; ++w) if (W == 1) o[w].store(out + i, n); else o[w].store(out + i + w * S);
}

template <typename T, bool kAlong>
void forward_run(int64_t k, int64_t L, int64_t plane, int64_t C, const T* a, const T* y, const T* v, const T* U,
                 T* out, T* s) {
  constexpr int64_t S = Vectorized<T>::size();
  constexpr int W = 4;
  int64_t i = 0;
  for (; i + W * S <= L; i += W * S) forward_body<T, kAlong, W>(k, plane, C, a, y, v, U, out, s, i, W * S);
  for (; i < L; i += S) forward_body<T, kAlong, 1>(k, plane, C, a, y, v, U, out, s, i, std::min<int64_t>(S, L - i));
}

template <typename T, bool kAlong, int W>
inline void backward_body(int64_t k, int64_t plane, int64_t C, const T* g, const T* s, const T* v, const T* U, T* ga,
                          T* acc, Vectorized<T>* sum_v, Vectorized<T>* sum_u, int64_t i, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const V one(T(1));
  auto ld = [&](const T* p, int w) { return W == 1 ? V::loadu(p + i, n) : V::loadu(p + i + w * S); };
  auto st = [&](const V& x, T* p, int w) { if (W == 1) x.store(p + i, n); else x.store(p + i + w * S); };
  auto gn = [&](const T* p, int w) { return gain_n<T, kAlong>(p, i + w * S, W == 1 ? n : S); };
  V gz[kMaxDendrites][W];
  V sv[kMaxDendrites][W];
  V G[W];
  for (int w = 0; w < W; ++w) G[w] = ld(g, w);
  for (int64_t d = 0; d < k; ++d)
    for (int w = 0; w < W; ++w) sv[d][w] = ld(s + d * plane, w);
  for (int64_t d = k - 1; d >= 0; --d) {
    for (int w = 0; w < W; ++w) {
      V t = G[w] * gn(v + d * C, w);
      for (int64_t j = d + 1; j < k; ++j) t = at::vec::fmadd(gz[j][w], gn(U + (j * k + d) * C, w), t);
      gz[d][w] = t * sv[d][w] * (one - sv[d][w]);
      st(gz[d][w], ga + d * plane, w);
    }
  }
  for (int w = 0; w < W; ++w) {
    if constexpr (kAlong) {
      for (int64_t d = 0; d < k; ++d) {
        T* p = acc + d * C;
        st(at::vec::fmadd(G[w], sv[d][w], ld(p, w)), p, w);
        for (int64_t j = 0; j < d; ++j) {
          T* q = acc + (k + d * k + j) * C;
          st(at::vec::fmadd(gz[d][w], sv[j][w], ld(q, w)), q, w);
        }
      }
    } else {
      // Partial loads leave the missing lanes zero, so the sums take only the run's elements.
      for (int64_t d = 0; d < k; ++d) {
        sum_v[d] = at::vec::fmadd(G[w], sv[d][w], sum_v[d]);
        for (int64_t j = 0; j < d; ++j) sum_u[d * k + j] = at::vec::fmadd(gz[d][w], sv[j][w], sum_u[d * k + j]);
      }
    }
  }
}

// acc: this thread's partial sums in T, [k + k*k, C] (grad_v rows, then grad_U rows), at this run's first channel.
template <typename T, bool kAlong>
void backward_run(int64_t k, int64_t L, int64_t plane, int64_t C, const T* g, const T* s, const T* v, const T* U,
                  T* ga, T* acc) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  constexpr int W = 2;
  V sum_v[kMaxDendrites];
  V sum_u[kMaxDendrites * kMaxDendrites];
  if constexpr (!kAlong) {
    for (int64_t d = 0; d < k; ++d) sum_v[d] = V(T(0));
    for (int64_t d = 0; d < k * k; ++d) sum_u[d] = V(T(0));
  }
  int64_t i = 0;
  for (; i + W * S <= L; i += W * S) backward_body<T, kAlong, W>(k, plane, C, g, s, v, U, ga, acc, sum_v, sum_u, i, W * S);
  for (; i < L; i += S)
    backward_body<T, kAlong, 1>(k, plane, C, g, s, v, U, ga, acc, sum_v, sum_u, i, std::min<int64_t>(S, L - i));
  if constexpr (!kAlong) {
    auto hsum = [](const V& x) { return at::vec::vec_reduce_all<T>([](V& p, V& q) { return p + q; }, x); };
    for (int64_t d = 0; d < k; ++d) {
      acc[d * C] += hsum(sum_v[d]);
      for (int64_t j = 0; j < d; ++j) acc[(k + d * k + j) * C] += hsum(sum_u[d * k + j]);
    }
  }
}

void check(const at::Tensor& a, const at::Tensor& v, const at::Tensor& U) {
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous() && a.device().is_cpu(), "fused_cascade: a must be [N, k, C, R], contiguous, CPU");
  TORCH_CHECK(a.size(1) >= 1 && a.size(1) <= kMaxDendrites, "fused_cascade: 1 to 8 dendrites");
  TORCH_CHECK(v.is_contiguous() && U.is_contiguous(), "fused_cascade: gains must be contiguous");
}

std::vector<at::Tensor> cascade_forward(const at::Tensor& a, const at::Tensor& y, const at::Tensor& v, const at::Tensor& U) {
  check(a, v, U);
  const int64_t N = a.size(0), k = a.size(1), C = a.size(2), R = a.size(3);
  auto s = at::empty_like(a);
  auto out = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cascade_forward", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>(),
                   *pU = U.data_ptr<scalar_t>();
    scalar_t *ps = s.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>();
    const int64_t plane = C * R;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (R == 1) {
          forward_run<scalar_t, true>(k, C, plane, C, pa + n * k * plane, py + n * plane, pv, pU, po + n * plane, ps + n * k * plane);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            forward_run<scalar_t, false>(k, R, plane, C, pa + n * k * plane + c * R, py + n * plane + c * R, pv + c, pU + c,
                                         po + n * plane + c * R, ps + n * k * plane + c * R);
          }
        }
      }
    });
  });
  return {out, s};
}

std::vector<at::Tensor> cascade_backward(const at::Tensor& g, const at::Tensor& s, const at::Tensor& v, const at::Tensor& U) {
  check(s, v, U);
  TORCH_CHECK(g.is_contiguous(), "fused_cascade: the output gradient must be contiguous");
  const int64_t N = s.size(0), k = s.size(1), C = s.size(2), R = s.size(3);
  auto ga = at::empty_like(s);
  const int64_t rows = k + k * k;
  const int nthreads = at::get_num_threads();
  std::vector<double> total(static_cast<size_t>(nthreads) * rows * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "cascade_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>(),
                   *pU = U.data_ptr<scalar_t>();
    scalar_t* pga = ga.data_ptr<scalar_t>();
    const int64_t plane = C * R;
    // Rows' partial sums gather in T for a few rows, then in double: the sums keep the accuracy of a pairwise sum
    // over the batch while the inner loop stays in T's vectors.
    const int64_t flush = 16;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      double* tot = total.data() + static_cast<size_t>(at::get_thread_num()) * rows * C;
      std::vector<scalar_t> part(rows * C, scalar_t(0));
      auto drain = [&] {
        for (int64_t e = 0; e < rows * C; ++e) { tot[e] += part[e]; part[e] = scalar_t(0); }
      };
      for (int64_t n = begin; n < end; ++n) {
        if (R == 1) {
          backward_run<scalar_t, true>(k, C, plane, C, pg + n * plane, ps + n * k * plane, pv, pU, pga + n * k * plane, part.data());
        } else {
          for (int64_t c = 0; c < C; ++c) {
            backward_run<scalar_t, false>(k, R, plane, C, pg + n * plane + c * R, ps + n * k * plane + c * R, pv + c, pU + c,
                                          pga + n * k * plane + c * R, part.data() + c);
          }
        }
        if ((n - begin + 1) % flush == 0) drain();
      }
      drain();
    });
  });
  auto sums = at::zeros({rows, C}, at::kDouble);
  double* psum = sums.data_ptr<double>();
  for (int t = 0; t < nthreads; ++t)
    for (int64_t e = 0; e < rows * C; ++e) psum[e] += total[static_cast<size_t>(t) * rows * C + e];
  sums = sums.to(s.scalar_type());
  return {ga, sums.narrow(0, 0, k), sums.narrow(0, k, k * k).view({k, k, C})};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &cascade_forward);
  m.def("backward", &cascade_backward);
}
