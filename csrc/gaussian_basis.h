// Pair distances and Gaussian-basis features (MoleBlend eq. 6-7, Uni-Mol / Transformer-M GaussianLayer) for
// CPU data pipelines. Forward only; the autograd path is pyblend.reference.gaussian_basis.
#pragma once
#include <cstdint>

namespace pyblend {

// distances[i * stride + j] = |pos[i] - pos[j]| for real i, j; 0 where either atom is masked.
template <typename T>
void molecule_pair_distances(const T* pos, const bool* mask, int64_t n, int64_t stride, T* distances);

// out[m, k] = exp(-0.5 ((x_m - mu_k) / s_k)^2) / (sqrt(2 pi) s_k), with s_k = |stds[k]| + 0.01 and
// x_m = sum_t mul[types[m, t]] * d_m + sum_t bias[types[m, t]].
// Returns the index m of the first pair whose type is outside [0, num_types), or -1 when all are valid
// (nothing is written past that check's failure being reported: the caller raises).
template <typename T>
int64_t gaussian_basis(const T* distances, const int64_t* types, int64_t num_pairs, int64_t types_per_pair,
                       const T* means, const T* stds, int64_t num_kernels, const T* mul, const T* bias,
                       int64_t num_types, T* out);

}  // namespace pyblend
