#include "gaussian_basis.h"
#include "parallel.h"

#include <cmath>
#include <vector>

namespace pyblend {

template <typename T>
void molecule_pair_distances(const T* pos, const bool* mask, int64_t n, int64_t stride, T* distances) {
  for (int64_t i = 0; i < n; ++i) {
    const bool real_i = mask == nullptr || mask[i];
    for (int64_t j = 0; j < n; ++j) {
      const bool real = real_i && (mask == nullptr || mask[j]);
      T d = 0;
      if (real) {
        const T dx = pos[3 * i] - pos[3 * j];
        const T dy = pos[3 * i + 1] - pos[3 * j + 1];
        const T dz = pos[3 * i + 2] - pos[3 * j + 2];
        d = std::sqrt(dx * dx + dy * dy + dz * dz);
      }
      distances[i * stride + j] = d;
    }
  }
}

template <typename T>
int64_t gaussian_basis(const T* distances, const int64_t* types, int64_t num_pairs, int64_t types_per_pair,
                       const T* means, const T* stds, int64_t num_kernels, const T* mul, const T* bias,
                       int64_t num_types, T* out) {
  for (int64_t m = 0; m < num_pairs * types_per_pair; ++m) {
    if (types[m] < 0 || types[m] >= num_types) return m / types_per_pair;
  }
  // Per-kernel constants hoisted out of the pair loop: 1/s and 1/(sqrt(2 pi) s).
  std::vector<T> inv_std(num_kernels), scale(num_kernels);
  const T inv_sqrt_2pi = static_cast<T>(0.39894228040143267794);
  for (int64_t k = 0; k < num_kernels; ++k) {
    const T s = std::abs(stds[k]) + static_cast<T>(0.01);
    inv_std[k] = T(1) / s;
    scale[k] = inv_sqrt_2pi / s;
  }
#pragma omp parallel for schedule(static) if (pyblend::parallel_allowed())
  for (int64_t m = 0; m < num_pairs; ++m) {
    T a = 0, c = 0;
    for (int64_t t = 0; t < types_per_pair; ++t) {
      const int64_t type = types[m * types_per_pair + t];
      a += mul[type];
      c += bias[type];
    }
    const T x = a * distances[m] + c;
    T* row = out + m * num_kernels;
    for (int64_t k = 0; k < num_kernels; ++k) {
      const T z = (x - means[k]) * inv_std[k];
      row[k] = std::exp(T(-0.5) * z * z) * scale[k];
    }
  }
  return -1;
}

template void molecule_pair_distances<float>(const float*, const bool*, int64_t, int64_t, float*);
template void molecule_pair_distances<double>(const double*, const bool*, int64_t, int64_t, double*);
template int64_t gaussian_basis<float>(const float*, const int64_t*, int64_t, int64_t, const float*,
                                       const float*, int64_t, const float*, const float*, int64_t, float*);
template int64_t gaussian_basis<double>(const double*, const int64_t*, int64_t, int64_t, const double*,
                                        const double*, int64_t, const double*, const double*, int64_t,
                                        double*);

}  // namespace pyblend
