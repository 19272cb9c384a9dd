// Decode attention over one layer of a stacked KV cache, read in place (XLA FFI, CPU, float32).
//
// Why a kernel: inside the layer scan XLA:CPU copies each layer's [B, S, Hkv, D] keys and values
// out of the stacked [L, B, S, Hkv, D] cache (a dynamic-slice) before its matmuls read them, and
// those copies cost as much as the attention itself (docs/PERFORMANCE.md, issue #27). This kernel
// takes the whole stack and the layer index and streams each row's visible slots once.
//
// Inputs:  q [B, Hq, D] (already scaled), k, v [L, N, S, Hkv, D], layer [] int32,
//          limit [B] int32 (slots [0, limit) are looked at), visible [B, W] bool, W <= S.
//          B <= N: query row b reads cache row b (a step over a state's first B slots reads
//          their rows where they lie), and only slots below W (the visible width) are read.
// Outputs: acc [B, Hq, D] = sum_s exp(q.k_s - m) v_s, m [B, Hq] (the running max; -1e30 where a
//          row sees no key), l [B, Hq] = sum_s exp(q.k_s - m). The caller merges these softmax
//          statistics with the chunk's own key (psynth_jax/model/kernels/cpu.py).
// Work items are (row, chunk of 256 slots) pairs spread over the kernels' threads (cpu_pool.h): a chunk
// is read once for every head (a row's [S, Hkv, D] slots are contiguous; one item per key head
// read a third of each cache line it brought in, at SmolLM2's 3 key heads), and a lone row with
// a long cache still gives every thread work. Each chunk's statistics go to their own buffer and
// are merged in chunk order, so the result does not depend on which thread took which chunk.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_pool.h"
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kFloor = -1e30f;  // flash.py's FLOOR: the max of a row that sees nothing

inline int32_t to_int(float n) { return static_cast<int32_t>(n); }
inline psynth::v16i to_int(psynth::v16 n) { return __builtin_convertvector(n, psynth::v16i); }

// exp(x) for x <= 0, on a float or lane by lane on 16 (vectorisable either way): 2^(x log2 e)
// split into 2^n * 2^f, f in [-0.5, 0.5], with a degree-6 polynomial for 2^f (relative error
// < 2e-7); x below -87 gives 0.
template <class T>
inline T exp_nonpositive(T x) {
  const T lo = T{} - 87.0f;
  x = x < lo ? lo : x;
  const T t = x * 1.44269504088896341f;
  const T n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23), vectorisable
  const T f = t - n;
  T p = T{} + 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184413e-3f;
  p = p * f + 5.5503406e-2f;
  p = p * f + 2.4022652e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const auto bits = (to_int(n) + 127) << 23;
  T scale;
  static_assert(sizeof bits == sizeof scale);
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t b, s, hq, hkv, d, g, vis_s;
};

constexpr int64_t kChunk = 256;  // slots per work item
constexpr int64_t kAheadSlots = 4;  // prefetch distance in slots, past the slot (values) or next block (keys) in use

// Slots [s0, s1) of one row, every head: softmax statistics of the chunk into acc [Hq, D],
// m [Hq], l [Hq]. k, v point at the row's slot 0; vis at the row's mask.
void attend_chunk(const Shape& sh, const float* q, const float* k, const float* v, const bool* vis, int64_t s0,
                  int64_t s1, float* acc, float* m, float* l, std::vector<float>& scores) {
  const int64_t n = s1 - s0, d_n = sh.d, hq_n = sh.hq, stride = sh.hkv * sh.d;
  scores.assign(hq_n * n, kFloor);
  for (int64_t h = 0; h < hq_n; ++h) m[h] = kFloor;
  for (int64_t s = s0; s < s1; ++s) {
    if (!vis[s]) continue;
    const float* ks = k + s * stride;
    for (int64_t h = 0; h < hq_n; ++h) {
      const float* qh = q + h * d_n;
      const float* kh = ks + (h / sh.g) * d_n;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d_n; ++i) dot += qh[i] * kh[i];
      scores[h * n + (s - s0)] = dot;
      m[h] = std::max(m[h], dot);
    }
  }
  bool any = false;
  for (int64_t h = 0; h < hq_n; ++h) {
    float* sc = scores.data() + h * n;
    float total = 0.0f;
    if (m[h] > kFloor) {
      any = true;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        float p = vis[s0 + j] ? exp_nonpositive(sc[j] - m[h]) : 0.0f;
        sc[j] = p;
        total += p;
      }
    }
    l[h] = total;
  }
  std::fill(acc, acc + hq_n * d_n, 0.0f);
  if (!any) return;
  for (int64_t s = s0; s < s1; ++s) {
    if (!vis[s]) continue;
    const float* vs = v + s * stride;
    for (int64_t h = 0; h < hq_n; ++h) {
      const float p = scores[h * n + (s - s0)];
      const float* vh = vs + (h / sh.g) * d_n;
      float* out = acc + h * d_n;
#pragma omp simd
      for (int64_t i = 0; i < d_n; ++i) out[i] += p * vh[i];
    }
  }
}

using psynth::load;
using psynth::store;
using psynth::v16;
using psynth::sum_lanes;
using psynth::v16i;


// The products of H query heads (q: DV vectors each, d apart) with `count` <= 16 slots of their key
// head (k: slot 0's key head, slots `stride` apart), each summed over its DV vectors but not across
// lanes: part [H, 16 slots, 16 lanes], zeros for slots beyond `count`.
template <int DV, int H>
void score_block(const float* q, int64_t d, const float* k, int64_t stride, int64_t count, float* part) {
  v16 qv[H][DV];
  for (int hh = 0; hh < H; ++hh)
    for (int b = 0; b < DV; ++b) qv[hh][b] = load(q + hh * d + 16 * b);
  for (int64_t j = 0; j < 16; ++j) {
    if (j >= count) {
      for (int hh = 0; hh < H; ++hh) store(part + (hh * 16 + j) * 16, v16{});
      continue;
    }
    v16 kv[DV];
    for (int b = 0; b < DV; ++b) kv[b] = load(k + j * stride + 16 * b);
    for (int hh = 0; hh < H; ++hh) {
      v16 t = qv[hh][0] * kv[0];
      for (int b = 1; b < DV; ++b) t += qv[hh][b] * kv[b];
      store(part + (hh * 16 + j) * 16, t);
    }
  }
}

// out[h] = sum_j p[h, j] v[j] for H query heads of one key head over a chunk's n slots: H x DV
// sums in registers, each slot's values loaded once for all H. vh: the key head's values at the
// chunk's slot 0 (slots `stride` apart); p: H rows of scores n16 apart; fetch: prefetch whole
// slots (vc: slot 0) kAheadSlots ahead.
template <int DV, int H>
void weigh_values(const float* vc, const float* vh, int64_t stride, int64_t n, int64_t n16, int64_t d,
                  const bool* vis, const float* p, float* out, bool fetch) {
  v16 o[H][DV];
  for (int hh = 0; hh < H; ++hh)
    for (int b = 0; b < DV; ++b) o[hh][b] = v16{};
  for (int64_t j = 0; j < n; ++j) {
    if (fetch && j + kAheadSlots < n)
      for (int64_t c = 0; c < stride; c += 16) __builtin_prefetch(vc + (j + kAheadSlots) * stride + c);
    if (!vis[j]) continue;  // its value may be anything (a slot never written)
    v16 vv[DV];
    for (int b = 0; b < DV; ++b) vv[b] = load(vh + j * stride + 16 * b);
    for (int hh = 0; hh < H; ++hh) {
      const float w = p[hh * n16 + j];
      for (int b = 0; b < DV; ++b) o[hh][b] += w * vv[b];
    }
  }
  for (int hh = 0; hh < H; ++hh)
    for (int b = 0; b < DV; ++b) store(out + hh * d + 16 * b, o[hh][b]);
}

// `attend_chunk` for a head size of 16 * DV. Keys: per block of 16 slots (12 KiB at SmolLM2's
// shape, in L1 once read), each key head's vectors are multiplied by those of its query heads, q
// kept in registers (up to kHeads heads at a time); a slot's products with one head, summed over
// its DV vectors, are one vector of `part`, and each head's 16 vectors are summed across lanes
// together (`sum_lanes`). Softmax: 16 slots per vector. Values: per key head, its query heads'
// weighted sums in registers over the chunk's slots; the first pass prefetches whole slots, so the
// later ones read them from cache. Blocks of keys and slots of values are prefetched kAheadSlots
// ahead: without it a row's chunks ran at 17 GB/s of keys and values instead of 19-20 (2-core VM).
template <int DV>
void attend_chunk_vec(const Shape& sh, const float* q, const float* k, const float* v, const bool* vis, int64_t s0,
                      int64_t s1, float* acc, float* m, float* l, std::vector<float>& scores) {
  const int64_t n = s1 - s0, n16 = (n + 15) / 16 * 16, stride = sh.hkv * sh.d;
  scores.resize(sh.hq * n16 + sh.hq * 16 * 16);
  float* part = scores.data() + sh.hq * n16;  // [Hq, 16 slots, 16 lanes]
  constexpr int64_t kHeads = 16 / DV;  // query heads whose q (DV registers each) stay in registers
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - j0);
    const float* kb = k + (s0 + j0) * stride;  // the block's 16 slots
    if (j0 + 16 + kAheadSlots <= n)
      for (int64_t c = 0; c < 16 * stride; c += 16) __builtin_prefetch(kb + (16 + kAheadSlots) * stride + c);
    for (int64_t kh = 0; kh < sh.hkv; ++kh)
      for (int64_t h0 = kh * sh.g; h0 < (kh + 1) * sh.g; h0 += kHeads) {
        const int64_t heads = std::min<int64_t>(kHeads, (kh + 1) * sh.g - h0);
        const float* kh_at = kb + kh * sh.d;
        switch (heads) {
          case 1: score_block<DV, 1>(q + h0 * sh.d, sh.d, kh_at, stride, count, part + h0 * 256); break;
          case 2: score_block<DV, 2>(q + h0 * sh.d, sh.d, kh_at, stride, count, part + h0 * 256); break;
          case 3: score_block<DV, 3>(q + h0 * sh.d, sh.d, kh_at, stride, count, part + h0 * 256); break;
          default: score_block<DV, 4>(q + h0 * sh.d, sh.d, kh_at, stride, count, part + h0 * 256); break;
        }
      }
    for (int64_t h = 0; h < sh.hq; ++h) {
      v16 x[16];
      for (int j = 0; j < 16; ++j) x[j] = load(part + (h * 16 + j) * 16);
      store(scores.data() + h * n16 + j0, sum_lanes(x));
    }
  }
  // which lanes of each block of 16 slots are visible (none beyond the chunk)
  v16i seen[kChunk / 16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    alignas(64) int32_t lanes[16];
    for (int64_t j = 0; j < 16; ++j) lanes[j] = j0 + j < n && vis[s0 + j0 + j] ? -1 : 0;
    std::memcpy(&seen[j0 / 16], lanes, sizeof lanes);
  }
  const v16 floor_v = v16{} + kFloor, zero = v16{};
  bool any = false;
  for (int64_t h = 0; h < sh.hq; ++h) {
    float* sc = scores.data() + h * n16;
    v16 top_v = floor_v;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const v16 x = seen[j0 / 16] ? load(sc + j0) : floor_v;
      top_v = x > top_v ? x : top_v;
    }
    float top = kFloor;
    for (int i = 0; i < 16; ++i) top = std::max(top, top_v[i]);
    m[h] = top;
    v16 total = zero;
    if (top > kFloor) {
      any = true;
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const v16 p = seen[j0 / 16] ? exp_nonpositive(load(sc + j0) - top) : zero;
        store(sc + j0, p);
        total += p;
      }
    }
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += total[i];
    l[h] = sum;
  }
  std::fill(acc, acc + sh.hq * sh.d, 0.0f);
  if (!any) return;
  // the weighted values: per key head, its query heads up to kHeads at a time with their sums
  // in registers; the first pass fetches whole slots ahead, so the others read them from cache
  const float* vc = v + s0 * stride;
  for (int64_t kh = 0; kh < sh.hkv; ++kh)
    for (int64_t h0 = kh * sh.g; h0 < (kh + 1) * sh.g; h0 += kHeads) {
      const int64_t heads = std::min<int64_t>(kHeads, (kh + 1) * sh.g - h0);
      const bool fetch = h0 == 0;
      const float* sc = scores.data() + h0 * n16;
      float* out = acc + h0 * sh.d;
      const float* vh = vc + kh * sh.d;
      switch (heads) {
        case 1: weigh_values<DV, 1>(vc, vh, stride, n, n16, sh.d, vis + s0, sc, out, fetch); break;
        case 2: weigh_values<DV, 2>(vc, vh, stride, n, n16, sh.d, vis + s0, sc, out, fetch); break;
        case 3: weigh_values<DV, 3>(vc, vh, stride, n, n16, sh.d, vis + s0, sc, out, fetch); break;
        default: weigh_values<DV, 4>(vc, vh, stride, n, n16, sh.d, vis + s0, sc, out, fetch); break;
      }
    }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> limit,
                           ffi::Buffer<ffi::PRED> visible, ffi::ResultBuffer<ffi::F32> acc,
                           ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = visible.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || vd.size() != 2)
    return ffi::Error::InvalidArgument("q must be [B,Hq,D], k/v [L,B,S,Hkv,D], visible [B,S]");
  Shape sh{qd[0], kd[2], qd[1], kd[3], kd[4], qd[1] / kd[3], vd[1]};
  if (sh.b > kd[1] || qd[2] != sh.d || sh.hq % sh.hkv != 0 || vd[0] != sh.b || sh.vis_s > sh.s)
    return ffi::Error::InvalidArgument("q [B,Hq,D] or visible [B,W] does not match the cache [L,N,S,Hkv,D] "
                                       "(B <= N, W <= S)");
  const int64_t num_layers = kd[0];
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= num_layers) return ffi::Error::InvalidArgument("layer index out of range");
  const int64_t layer_size = kd[1] * sh.s * sh.hkv * sh.d;
  const float* kp = k.typed_data() + li * layer_size;
  const float* vp = v.typed_data() + li * layer_size;
  const float* qp = q.typed_data();
  const int32_t* lim = limit.typed_data();
  const bool* vis = visible.typed_data();
  float* ap = acc->typed_data();
  float* mp = m->typed_data();
  float* lp = l->typed_data();

  // items: each row's chunks of [0, limit), rows in order; first[r] = row r's first item
  std::vector<int64_t> first(sh.b + 1, 0), ends(sh.b);
  for (int64_t r = 0; r < sh.b; ++r) {
    ends[r] = std::clamp<int64_t>(lim[r], 0, sh.vis_s);
    first[r + 1] = first[r] + (ends[r] + kChunk - 1) / kChunk;
  }
  const int64_t items = first[sh.b], per_item = sh.hq * (sh.d + 2);
  thread_local std::vector<float> spare;  // each item's acc [Hq, D], m [Hq], l [Hq]; reused across calls
  spare.resize(std::max<size_t>(spare.size(), items * per_item));
  float* stats = spare.data();
  const int64_t* fp = first.data();
  const int64_t* ep = ends.data();

  psynth::run_items(pool, items, [=](int64_t item) {
    thread_local std::vector<float> scores;  // this thread's [Hq, chunk] scores, reused
    const int64_t row = std::upper_bound(fp, fp + sh.b + 1, item) - fp - 1;
    const int64_t s0 = (item - fp[row]) * kChunk, s1 = std::min(ep[row], s0 + kChunk);
    float* st = stats + item * per_item;
    const int64_t base = row * sh.s * sh.hkv * sh.d;
    const float* qr = qp + row * sh.hq * sh.d;
    const bool* vr = vis + row * sh.vis_s;
    float *a = st, *mm = st + sh.hq * sh.d, *ll = st + sh.hq * (sh.d + 1);
    if (sh.d == 64)
      attend_chunk_vec<4>(sh, qr, kp + base, vp + base, vr, s0, s1, a, mm, ll, scores);
    else if (sh.d == 128)
      attend_chunk_vec<8>(sh, qr, kp + base, vp + base, vr, s0, s1, a, mm, ll, scores);
    else
      attend_chunk(sh, qr, kp + base, vp + base, vr, s0, s1, a, mm, ll, scores);
  }, psynth::Handoff::kSpin);
  // merge each row's chunks in chunk order: max over chunks, sums rescaled to it
  for (int64_t r = 0; r < sh.b; ++r) {
    for (int64_t h = 0; h < sh.hq; ++h) {
      float top = kFloor;
      for (int64_t it = fp[r]; it < fp[r + 1]; ++it) top = std::max(top, stats[it * per_item + sh.hq * sh.d + h]);
      float* out = ap + (r * sh.hq + h) * sh.d;
      std::fill(out, out + sh.d, 0.0f);
      float total = 0.0f;
      if (top > kFloor) {
        for (int64_t it = fp[r]; it < fp[r + 1]; ++it) {
          const float* st = stats + it * per_item;
          const float mc = st[sh.hq * sh.d + h];
          if (mc <= kFloor) continue;
          const float w = exp_nonpositive(mc - top);
          total += w * st[sh.hq * (sh.d + 1) + h];
          const float* a = st + h * sh.d;
#pragma omp simd
          for (int64_t i = 0; i < sh.d; ++i) out[i] += w * a[i];
        }
      }
      mp[r * sh.hq + h] = top;
      lp[r * sh.hq + h] = total;
    }
  }
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
