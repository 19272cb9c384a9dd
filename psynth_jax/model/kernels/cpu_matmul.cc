// x @ w[layer] for stacked weights w [L, K, N], read in place (XLA FFI, CPU, float32); and the LM
// head x @ e.T for the tied embedding e [V, D], read in place.
//
// Why a kernel: inside the layer scan XLA:CPU copies each layer's weight matrices out of the
// stacked parameters (a dynamic-slice) before its dot reads them; at a decode step's few rows the
// copies cost more than the matmuls (docs/PERFORMANCE.md, issue #27). This kernel takes the whole
// stack and the layer index and reads that layer's [K, N] matrix once, where it lies.
//
// Inputs:  x [M, K], layer [] int32, then w_1 .. w_n [L, K, N_i].   Outputs: y_i [M, N_i] = x @ w_i[layer].
// Several weights in one call (a layer's q, k, v; its gate and up) share one hand-off to the
// threads: every product's work items go to them together (cpu_pool.h). Two schedules, by the number of rows:
// - a few rows (M <= kStreamRows: a decode step of one or two requests) are bound by reading w, so
//   w is read front to back: its K rows are cut into parts of about 64 contiguous rows (as many as a
//   multiple of the threads, where there are more parts than threads), which the threads
//   take as they come free; a part streams its rows four at a time into its
//   own [M, N] sum (in cache), and the parts' sums are added in part order.
// - more rows (a batched decode step, a prefill) are bound by the multiply-adds, so each output
//   tile of up to 6 rows x 64 columns is summed over all of K in registers (24 AVX-512 vectors,
//   the w panel's rows broadcast-multiplied by each row's x), the tiles of a panel of w reading it
//   from cache; work items are (48-row chunk, column panel).
// Either way every output is summed in a fixed order: the result is the same whichever thread took
// which item.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_pool.h"
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using psynth::kLanes;
using psynth::load;
using psynth::store;
using psynth::sum_lanes;
using psynth::v16;

constexpr int64_t kGroup = 4;  // rows of x per pass over a part's rows of w (their sums stay in L1)
constexpr int64_t kPart = 64;  // rows of w per part, about (measured: 16 and 128-288 were slower)
constexpr int64_t kStreamRows = 2;  // at most this many rows of x: the streaming schedule
constexpr int64_t kTileRows = 6;    // rows of x per register tile (6 x 4 vectors of sums)
constexpr int64_t kChunkRows = 48;  // rows of x per work item of the tiled schedule
constexpr int64_t kAhead = 16;      // rows of a panel of w prefetched ahead in the tiled schedule
constexpr int64_t kSpinRows = 32;   // at most this many rows of x (a decode step): our spinning helpers

psynth::Handoff handoff(int64_t rows) { return rows <= kSpinRows ? psynth::Handoff::kSpin : psynth::Handoff::kPool; }

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

// y[r, c0 : c0 + 16V] = x[r, :] @ w[:, c0 : c0 + 16V] for rows r < R of x: R x V vectors of sums
// in registers over all of K, each row of the panel loaded once and multiplied by every row's x.
template <int R, int V>
void tile(const float* x, int64_t k_n, const float* w, int64_t n, float* y, int64_t c0) {
  v16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v16{};
  const float* wk = w + c0;
  for (int64_t k = 0; k < k_n; ++k, wk += n) {
    // the panel's rows are n floats apart, a page or more on wide matrices, where the hardware
    // prefetchers do not follow: fetch the row kAhead rows on now
    if (k + kAhead < k_n)
      for (int v = 0; v < V; ++v) __builtin_prefetch(wk + kAhead * n + v * kLanes);
    v16 b[V];
    for (int v = 0; v < V; ++v) b[v] = load(wk + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * k_n + k];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(y + r * n + c0 + v * kLanes, acc[r][v]);
}

template <int R>
void tile_rows(int v_n, const float* x, int64_t k_n, const float* w, int64_t n, float* y, int64_t c0) {
  switch (v_n) {
    case 1: tile<R, 1>(x, k_n, w, n, y, c0); break;
    case 2: tile<R, 2>(x, k_n, w, n, y, c0); break;
    case 3: tile<R, 3>(x, k_n, w, n, y, c0); break;
    default: tile<R, 4>(x, k_n, w, n, y, c0); break;
  }
}

// Rows [r0, r1) of y, columns [c0, c0 + 16 v_n) (v_n <= 4 vectors), plus the columns [c_tail, n)
// that fill no vector when this is the last panel (c_tail < n).
void panel(const float* x, int64_t k_n, const float* w, int64_t n, float* y, int64_t r0, int64_t r1, int64_t c0,
           int v_n, int64_t c_tail) {
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const float* xr = x + r * k_n;
    float* yr = y + r * n;
    if (v_n > 0) {
      switch (std::min<int64_t>(kTileRows, r1 - r)) {
        case 1: tile_rows<1>(v_n, xr, k_n, w, n, yr, c0); break;
        case 2: tile_rows<2>(v_n, xr, k_n, w, n, yr, c0); break;
        case 3: tile_rows<3>(v_n, xr, k_n, w, n, yr, c0); break;
        case 4: tile_rows<4>(v_n, xr, k_n, w, n, yr, c0); break;
        case 5: tile_rows<5>(v_n, xr, k_n, w, n, yr, c0); break;
        default: tile_rows<6>(v_n, xr, k_n, w, n, yr, c0); break;
      }
    }
    for (int64_t i = r; i < std::min(r1, r + kTileRows); ++i)
      for (int64_t c = c_tail; c < n; ++c) {
        float s = 0.0f;
        for (int64_t k = 0; k < k_n; ++k) s += x[i * k_n + k] * w[k * n + c];
        y[i * n + c] = s;
      }
  }
}

// One product y [M, N] = x [M, K] @ w [K, N] as work items: the streaming schedule's parts of w
// (M <= kStreamRows; part 0 sums into y, part p > 0 into sums[p - 1], added in part order by
// `finish`) or the tiled schedule's (row chunk, column panel) pairs, panels 4 vectors wide or
// narrower where that leaves fewer than 8 per chunk (k/v projections: N = 192).
struct Job {
  const float* x;
  int64_t m_n, k_n;
  const float* w;
  int64_t n;
  float* y;
  float* sums = nullptr;
  bool streamed = false;
  int v_w = 4;
  int64_t part_rows = 0, vectors = 0, panels = 0, items = 0;

  // threads: how many take the items (the streamed parts are cut to a multiple of it)
  Job(const float* x_, int64_t m, int64_t k, const float* w_, int64_t n_, float* y_, int64_t threads)
      : x(x_), m_n(m), k_n(k), w(w_), n(n_), y(y_) {
    if (m_n == 0 || n == 0) return;
    if (k_n == 0) {  // an empty sum
      std::fill(y, y + m_n * n, 0.0f);
      return;
    }
    streamed = m_n <= kStreamRows;
    if (streamed) {
      // about kPart rows per part, the parts a multiple of the threads: at K = 576 on 2 threads
      // nine parts of 64 rows left one thread a fifth part while the other idled (8 of 72 instead)
      int64_t parts = (k_n + kPart - 1) / kPart;
      if (parts > threads) parts = parts / threads * threads;
      part_rows = ((k_n + parts - 1) / parts + 3) / 4 * 4;
      items = (k_n + part_rows - 1) / part_rows;
      return;
    }
    vectors = n / kLanes;
    while (v_w > 1 && vectors < 8 * v_w) v_w /= 2;
    panels = std::max<int64_t>(1, (vectors + v_w - 1) / v_w);
    items = panels * ((m_n + kChunkRows - 1) / kChunkRows);
  }

  int64_t spare_floats() const { return streamed ? (items - 1) * m_n * n : 0; }

  void run(int64_t item) const {
    if (streamed) {
      const int64_t i0 = item * part_rows, i1 = std::min(k_n, i0 + part_rows);
      part(x, m_n, k_n, w, n, item == 0 ? y : sums + (item - 1) * m_n * n, i0, i1);
      return;
    }
    const int64_t chunk = item / panels, p = item % panels;
    const int64_t r0 = chunk * kChunkRows, r1 = std::min(m_n, r0 + kChunkRows);
    const int v_n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(v_w, vectors - p * v_w)));
    const int64_t c_tail = p == panels - 1 ? vectors * kLanes : n;  // the last panel also does the tail
    panel(x, k_n, w, n, y, r0, r1, p * v_w * kLanes, v_n, c_tail);
  }

  void finish() const {
    if (!streamed) return;
    for (int64_t p = 1; p < items; ++p) {  // in part order: the same sum whoever computed each part
      const float* s = sums + (p - 1) * m_n * n;
      for (int64_t j = 0; j < m_n * n; ++j) y[j] += s[j];
    }
  }
};

// Every job's items over the threads in one go (several products of one input share the threads'
// hand-off), then each job's streamed parts added in order.
void run_jobs(xla::ffi::ThreadPool& pool, std::vector<Job>& jobs) {
  thread_local std::vector<float> spare;  // the streamed parts' sums: reused, never freed per call
  size_t floats = 0;
  for (const Job& j : jobs) floats += j.spare_floats();
  spare.resize(std::max(spare.size(), floats));
  std::vector<int64_t> first(jobs.size() + 1, 0);
  float* next = spare.data();
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i].sums = next;
    next += jobs[i].spare_floats();
    first[i + 1] = first[i] + jobs[i].items;
  }
  const Job* jp = jobs.data();
  const int64_t* fp = first.data();
  const int64_t count = static_cast<int64_t>(jobs.size());
  psynth::run_items(pool, first.back(), [=](int64_t item) {
    const int64_t i = std::upper_bound(fp, fp + count + 1, item) - fp - 1;
    jp[i].run(item - fp[i]);
  }, handoff(jobs.empty() ? 0 : jobs[0].m_n));
  for (const Job& j : jobs) j.finish();
}

// y[r, v] = x[r, :] . e[v, :] for rows r < R of x and rows v0 .. v0 + 3 of e below v_end: R x 4
// vectors of products over D, each vector of e multiplied by every row's x, then summed across
// lanes (all R x 4 at once). y's rows are v_n long.
template <int R>
void dots(const float* x, int64_t d_n, const float* e, int64_t v_n, int64_t v_end, float* y, int64_t v0) {
  const int64_t vecs = d_n / kLanes * kLanes;
  const int rows_e = static_cast<int>(std::min<int64_t>(4, v_end - v0));
  const float* ev[4];
  for (int j = 0; j < 4; ++j) ev[j] = e + (v0 + std::min(j, rows_e - 1)) * d_n;  // a short block repeats its last row
  v16 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = v16{};
  for (int64_t d = 0; d < vecs; d += kLanes) {
    const v16 b0 = load(ev[0] + d), b1 = load(ev[1] + d), b2 = load(ev[2] + d), b3 = load(ev[3] + d);
    for (int r = 0; r < R; ++r) {
      const v16 a = load(x + r * d_n + d);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
      acc[r][2] += a * b2;
      acc[r][3] += a * b3;
    }
  }
  v16 x16[16];  // the R x 4 sums, padded to 16, summed across lanes together: lane 4 r + j
  for (int i = 0; i < 16; ++i) x16[i] = i / 4 < R ? acc[i / 4][i % 4] : v16{};
  const v16 sums = sum_lanes(x16);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < rows_e; ++j) {
      float s = sums[4 * r + j];
      for (int64_t d = vecs; d < d_n; ++d) s += x[r * d_n + d] * ev[j][d];
      y[r * v_n + v0 + j] = s;
    }
}

// x @ w_i[layer] for each stacked weight w_i [L, K, N_i] given (the projections that read one
// input: q, k, v; gate, up), in one call.
ffi::Error StackedMatmuls(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                          ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M,K]");
  if (ws.size() != ys.size() || ws.size() == 0)
    return ffi::Error::InvalidArgument("one output per stacked weight, at least one");
  const int64_t m_n = xd[0], k_n = xd[1];
  const int32_t li = layer.typed_data()[0];
  std::vector<Job> jobs;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("weights and outputs must be float32");
    auto wd = w->dimensions();
    if (wd.size() != 3 || wd[1] != k_n) return ffi::Error::InvalidArgument("x [M,K] does not match a w [L,K,N]");
    if (li < 0 || li >= wd[0]) return ffi::Error::InvalidArgument("layer index out of range");
    const int64_t n = wd[2];
    jobs.emplace_back(x.typed_data(), m_n, k_n, w->typed_data() + li * k_n * n, n, (*y)->typed_data(),
                      std::max<int64_t>(pool.num_threads(), 1));
  }
  run_jobs(pool, jobs);
  return ffi::Error::Success();
}

constexpr int64_t kRowsBlock = 256;  // rows of e per work item

// x @ e.T for e [V, D] read in place (the tied embedding as the LM head): work items are blocks
// of 256 rows of e; within one, every group of 4 rows of x takes the block four rows of e at a time.
ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> e,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto ed = e.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || xd[1] != ed[1]) return ffi::Error::InvalidArgument("x must be [M,D] and e [V,D]");
  const int64_t m_n = xd[0], d_n = xd[1], v_n = ed[0];
  const float* xp = x.typed_data();
  const float* ep = e.typed_data();
  float* yp = y->typed_data();
  const int64_t blocks = (v_n + kRowsBlock - 1) / kRowsBlock;
  psynth::run_items(pool, m_n == 0 ? 0 : blocks, [=](int64_t item) {
    const int64_t b0 = item * kRowsBlock, b1 = std::min(v_n, b0 + kRowsBlock);
    for (int64_t r0 = 0; r0 < m_n; r0 += kGroup)
      for (int64_t v0 = b0; v0 < b1; v0 += 4) {
        const float* xr = xp + r0 * d_n;
        float* yr = yp + r0 * v_n;
        switch (std::min<int64_t>(kGroup, m_n - r0)) {  // the last group of e's rows may be short
          case 1: dots<1>(xr, d_n, ep, v_n, b1, yr, v0); break;
          case 2: dots<2>(xr, d_n, ep, v_n, b1, yr, v0); break;
          case 3: dots<3>(xr, d_n, ep, v_n, b1, yr, v0); break;
          default: dots<4>(xr, d_n, ep, v_n, b1, yr, v0); break;
        }
      }
  }, handoff(m_n));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsynthStackedMatmuls, StackedMatmuls,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .RemainingArgs()               // w stacks [L, K, N_i]
                                  .RemainingRets());             // y_i [M, N_i]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsynthRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // e [V, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [M, V]
