// Decode attention over one layer of a stacked KV cache, read in place (XLA FFI, CPU, float32).
//
// Why a kernel: inside the layer scan XLA:CPU copies each layer's [B, S, Hkv, D] keys and values
// out of the stacked [L, B, S, Hkv, D] cache (a dynamic-slice) before its matmuls read them, and
// those copies cost as much as the attention itself (docs/PERFORMANCE.md, issue #27). This kernel
// takes the whole stack and the layer index and streams each row's visible slots once.
//
// Inputs:  q [B, Hq, D] (already scaled), k, v [L, B, S, Hkv, D], layer [] int32,
//          limit [B] int32 (slots [0, limit) are looked at), visible [B, S] bool.
// Outputs: acc [B, Hq, D] = sum_s exp(q.k_s - m) v_s, m [B, Hq] (the running max; -1e30 where a
//          row sees no key), l [B, Hq] = sum_s exp(q.k_s - m). The caller merges these softmax
//          statistics with the chunk's own key (psynth_jax/model/kernels/cpu.py).
// Work items are (row, key head) pairs spread over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kFloor = -1e30f;  // flash.py's FLOOR: the max of a row that sees nothing

// exp(x) for x <= 0, vectorisable: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error < 2e-7); x below -87 gives 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  float t = x * 1.44269504088896341f;
  float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23), vectorisable
  float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184413e-3f;
  p = p * f + 5.5503406e-2f;
  p = p * f + 2.4022652e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t b, s, hq, hkv, d, g;
};

// One (row, key head) pair: its G query heads over the row's visible slots.
void attend_item(const Shape& sh, const float* q, const float* k, const float* v, int64_t limit, const bool* vis,
                 float* acc, float* m_out, float* l_out, std::vector<float>& scores) {
  const int64_t g_n = sh.g, d_n = sh.d, stride = sh.hkv * sh.d;
  scores.assign(g_n * limit, kFloor);
  float m[16];
  for (int64_t g = 0; g < g_n; ++g) m[g] = kFloor;
  for (int64_t s = 0; s < limit; ++s) {
    if (!vis[s]) continue;
    const float* ks = k + s * stride;
    for (int64_t g = 0; g < g_n; ++g) {
      const float* qg = q + g * d_n;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d_n; ++i) dot += qg[i] * ks[i];
      scores[g * limit + s] = dot;
      m[g] = std::max(m[g], dot);
    }
  }
  for (int64_t g = 0; g < g_n; ++g) {
    float* sc = scores.data() + g * limit;
    float total = 0.0f;
    if (m[g] > kFloor) {
#pragma omp simd reduction(+ : total)
      for (int64_t s = 0; s < limit; ++s) {
        float p = vis[s] ? exp_nonpositive(sc[s] - m[g]) : 0.0f;
        sc[s] = p;
        total += p;
      }
    }
    float* out = acc + g * d_n;
    std::fill(out, out + d_n, 0.0f);
    m_out[g] = m[g];
    l_out[g] = total;
  }
  bool any = false;
  for (int64_t g = 0; g < g_n; ++g) any = any || m[g] > kFloor;
  if (!any) return;
  for (int64_t s = 0; s < limit; ++s) {
    if (!vis[s]) continue;
    const float* vs = v + s * stride;
    for (int64_t g = 0; g < g_n; ++g) {
      float p = scores[g * limit + s];
      float* out = acc + g * d_n;
#pragma omp simd
      for (int64_t i = 0; i < d_n; ++i) out[i] += p * vs[i];
    }
  }
}

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t items = 0;
  std::mutex mu;
  std::condition_variable cv;
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> limit,
                           ffi::Buffer<ffi::PRED> visible, ffi::ResultBuffer<ffi::F32> acc,
                           ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 5) return ffi::Error::InvalidArgument("q must be [B,Hq,D], k/v [L,B,S,Hkv,D]");
  Shape sh{kd[1], kd[2], qd[1], kd[3], kd[4], qd[1] / kd[3]};
  if (qd[0] != sh.b || qd[2] != sh.d || sh.hq % sh.hkv != 0 || sh.g > 16)
    return ffi::Error::InvalidArgument("q [B,Hq,D] does not match the cache [L,B,S,Hkv,D] (or Hq/Hkv > 16)");
  const int64_t num_layers = kd[0];
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= num_layers) return ffi::Error::InvalidArgument("layer index out of range");
  const int64_t layer_size = sh.b * sh.s * sh.hkv * sh.d;
  const float* kp = k.typed_data() + li * layer_size;
  const float* vp = v.typed_data() + li * layer_size;
  const float* qp = q.typed_data();
  const int32_t* lim = limit.typed_data();
  const bool* vis = visible.typed_data();
  float* ap = acc->typed_data();
  float* mp = m->typed_data();
  float* lp = l->typed_data();

  auto work = std::make_shared<Work>();
  work->items = sh.b * sh.hkv;
  auto run = [=]() {
    std::vector<float> scores;
    int64_t mine = 0;
    for (int64_t item; (item = work->next.fetch_add(1)) < work->items; ++mine) {
      const int64_t row = item / sh.hkv, h = item % sh.hkv;
      const int64_t n = std::clamp<int64_t>(lim[row], 0, sh.s);
      const int64_t head0 = h * sh.g;
      attend_item(sh, qp + (row * sh.hq + head0) * sh.d, kp + row * sh.s * sh.hkv * sh.d + h * sh.d,
                  vp + row * sh.s * sh.hkv * sh.d + h * sh.d, n, vis + row * sh.s,
                  ap + (row * sh.hq + head0) * sh.d, mp + row * sh.hq + head0, lp + row * sh.hq + head0, scores);
    }
    if (mine > 0 && work->done.fetch_add(mine) + mine == work->items) {
      std::lock_guard<std::mutex> lock(work->mu);
      work->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run] { run(); });
  run();  // this thread takes items too; helpers that start late find none left
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->items; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsynthDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k stack
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v stack
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // limit
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // visible
                                  .Ret<ffi::Buffer<ffi::F32>>()   // acc
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>()); // l
