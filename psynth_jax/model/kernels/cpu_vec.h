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

}  // namespace psynth
