// x @ w[layer] for a stacked weight w [L, K, N], read in place (XLA FFI, CPU, float32).
//
// Why a kernel: inside the layer scan XLA:CPU copies each layer's weight matrices out of the
// stacked parameters (a dynamic-slice) before its dot reads them; at a decode step's few rows the
// copies cost more than the matmuls (docs/PERFORMANCE.md, issue #27). This kernel takes the whole
// stack and the layer index and reads that layer's [K, N] matrix once, where it lies.
//
// Inputs:  x [M, K], w [L, K, N], layer [] int32.   Output: y [M, N] = x @ w[layer].
// A decode step is bound by reading w, so w is read front to back: its K rows are cut into parts
// of 64 contiguous rows, which the threads of XLA's intra-op pool take as they come free; a part
// streams its rows four at a time into its own [M, N] sum (in cache), and the parts' sums are
// added in part order: the result is the same whichever thread took which part.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2 ones)

constexpr int64_t kLanes = 16;
constexpr int64_t kGroup = 4;  // rows of x per pass over a part's rows of w (their sums stay in L1)
constexpr int64_t kPart = 64;  // rows of w per part (measured: 16 and 128-288 were slower)

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// sum[r, :] += x[r, i] * w[i, :] for rows r < R of x and rows i in [i0, i1) of w, four rows of w
// per sweep of the columns.
template <int R>
void stream(const float* x, int64_t k_n, const float* w, int64_t n, float* sum, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const float* w0 = w + i * n;
    float xs[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) xs[r][j] = x[r * k_n + i + j];
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes) {
      const v16 a = load(w0 + c), b = load(w0 + n + c), d = load(w0 + 2 * n + c), e = load(w0 + 3 * n + c);
      for (int r = 0; r < R; ++r) {
        float* s = sum + r * n + c;
        store(s, load(s) + xs[r][0] * a + xs[r][1] * b + xs[r][2] * d + xs[r][3] * e);
      }
    }
    for (; c < n; ++c)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) sum[r * n + c] += xs[r][j] * w0[j * n + c];
  }
  for (; i < i1; ++i)
    for (int r = 0; r < R; ++r) {
      const float xi = x[r * k_n + i];
      for (int64_t c = 0; c < n; ++c) sum[r * n + c] += xi * w[i * n + c];
    }
}

// One part: rows [i0, i1) of w times every row of x, into `sum` [M, N] (zeroed here).
void part(const float* x, int64_t m_n, int64_t k_n, const float* w, int64_t n, float* sum, int64_t i0, int64_t i1) {
  std::fill(sum, sum + m_n * n, 0.0f);
  for (int64_t r0 = 0; r0 < m_n; r0 += kGroup) {
    const float* xr = x + r0 * k_n;
    float* sr = sum + r0 * n;
    switch (std::min<int64_t>(kGroup, m_n - r0)) {
      case 1: stream<1>(xr, k_n, w, n, sr, i0, i1); break;
      case 2: stream<2>(xr, k_n, w, n, sr, i0, i1); break;
      case 3: stream<3>(xr, k_n, w, n, sr, i0, i1); break;
      default: stream<4>(xr, k_n, w, n, sr, i0, i1); break;
    }
  }
}

ffi::Error StackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3) return ffi::Error::InvalidArgument("x must be [M,K] and w [L,K,N]");
  const int64_t m_n = xd[0], k_n = xd[1], n = wd[2];
  if (wd[1] != k_n) return ffi::Error::InvalidArgument("x [M,K] does not match w [L,K,N]");
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= wd[0]) return ffi::Error::InvalidArgument("layer index out of range");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data() + li * k_n * n;
  float* yp = y->typed_data();
  if (m_n == 0 || n == 0) return ffi::Error::Success();
  if (k_n == 0) {  // an empty sum
    std::fill(yp, yp + m_n * n, 0.0f);
    return ffi::Error::Success();
  }

  const int64_t parts = (k_n + kPart - 1) / kPart;
  thread_local std::vector<float> spare;  // parts 1.. sum here (part 0 into y): reused, never freed per call
  spare.resize(std::max<size_t>(spare.size(), (parts - 1) * m_n * n));
  float* sums = spare.data();

  psynth::run_items(pool, parts, [=](int64_t item) {
    const int64_t i0 = item * kPart, i1 = std::min(k_n, i0 + kPart);
    part(xp, m_n, k_n, wp, n, item == 0 ? yp : sums + (item - 1) * m_n * n, i0, i1);
  });
  for (int64_t p = 1; p < parts; ++p) {  // in part order: the same sum whoever computed each part
    const float* s = sums + (p - 1) * m_n * n;
    for (int64_t j = 0; j < m_n * n; ++j) yp[j] += s[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsynthStackedMatmul, StackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w stack
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y
