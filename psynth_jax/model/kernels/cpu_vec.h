// 16-float vectors for the CPU kernels (cpu_decode.cc, cpu_matmul.cc), as GCC/Clang vector
// extensions: one AVX-512 register (two AVX2 ones), whichever the build's -march=native gives.

#pragma once

#include <cstdint>
#include <cstring>

namespace psynth {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));  // lane indices for __builtin_shuffle

constexpr int64_t kLanes = 16;

// Unaligned load and store (memcpy compiles to one vector move).
inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Lane j of the result = the sum of x[j]'s 16 lanes: sixteen horizontal sums at once, by four
// rounds that each add the two halves of every group of lanes while interleaving two vectors.
inline v16 sum_lanes(v16 x[16]) {
  const v16i half_lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i quarter_lo = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const v16i pair_lo = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const v16i even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  v16 y[8], z[4], w[2];
  for (int t = 0; t < 8; ++t)
    y[t] = __builtin_shuffle(x[2 * t], x[2 * t + 1], half_lo) + __builtin_shuffle(x[2 * t], x[2 * t + 1], half_lo + 8);
  for (int u = 0; u < 4; ++u)
    z[u] = __builtin_shuffle(y[2 * u], y[2 * u + 1], quarter_lo) + __builtin_shuffle(y[2 * u], y[2 * u + 1], quarter_lo + 4);
  for (int i = 0; i < 2; ++i)
    w[i] = __builtin_shuffle(z[2 * i], z[2 * i + 1], pair_lo) + __builtin_shuffle(z[2 * i], z[2 * i + 1], pair_lo + 2);
  return __builtin_shuffle(w[0], w[1], even) + __builtin_shuffle(w[0], w[1], even + 1);
}

}  // namespace psynth
