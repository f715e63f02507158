// pyblend._C: the CPU engine for data pipelines. numpy in, numpy out; no torch linkage; the GIL is released
// around the work and OpenMP runs over molecules.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "gaussian_basis.h"
#include "parallel.h"
#include "shortest_path.h"

namespace py = pybind11;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Start offsets of each molecule's atoms and pairs in the packed layout, checked against the array sizes.
struct PackedOffsets {
  std::vector<int64_t> atoms, pairs;
};

PackedOffsets packed_offsets(const Array<int32_t>& cu_seqlens, int64_t total, bool total_is_pairs) {
  require(cu_seqlens.ndim() == 1 && cu_seqlens.shape(0) >= 1,
          "cu_seqlens: expected shape (B+1,), got " + shape_of(cu_seqlens));
  const int32_t* cu = cu_seqlens.data();
  const int64_t batch = cu_seqlens.shape(0) - 1;
  PackedOffsets off{std::vector<int64_t>(batch + 1), std::vector<int64_t>(batch + 1)};
  require(cu[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got " + std::to_string(cu[0]));
  for (int64_t b = 0; b < batch; ++b) {
    require(cu[b + 1] >= cu[b], "cu_seqlens: expected non-decreasing values, got cu_seqlens[" +
                                    std::to_string(b + 1) + "] = " + std::to_string(cu[b + 1]) + " < " +
                                    std::to_string(cu[b]));
    const int64_t n = cu[b + 1] - cu[b];
    off.atoms[b + 1] = cu[b + 1];
    off.pairs[b + 1] = off.pairs[b] + n * n;
  }
  const int64_t expected = total_is_pairs ? off.pairs[batch] : off.atoms[batch];
  require(total == expected, std::string(total_is_pairs ? "pairs" : "atoms") + ": cu_seqlens describes " +
                                 std::to_string(expected) + " " + (total_is_pairs ? "pairs (sum of N_i^2)" : "atoms") +
                                 " but the input holds " + std::to_string(total));
  return off;
}

void check_mask(const std::optional<Array<bool>>& mask, int64_t batch, int64_t n) {
  if (mask) {
    require(mask->ndim() == 2 && mask->shape(0) == batch && mask->shape(1) == n,
            "mask: expected shape (" + std::to_string(batch) + ", " + std::to_string(n) + "), got " +
                shape_of(*mask));
  }
}

// Either a bool adjacency or an int32 bond-id matrix (routes need bond ids).
struct GraphInput {
  std::optional<Array<bool>> adjacency;
  std::optional<Array<int32_t>> bond_ids;
  const py::array& any() const {
    return adjacency ? static_cast<const py::array&>(*adjacency) : static_cast<const py::array&>(*bond_ids);
  }
};

GraphInput graph_input(const std::optional<Array<bool>>& adjacency, const std::optional<Array<int32_t>>& bond_ids,
                       int max_hops) {
  require(adjacency.has_value() != bond_ids.has_value(), "pass exactly one of adjacency and bond_ids");
  require(max_hops >= 0, "max_hops: expected >= 0, got " + std::to_string(max_hops));
  require(max_hops == 0 || bond_ids.has_value(), "routes (max_hops > 0) need bond_ids");
  return GraphInput{adjacency, bond_ids};
}

py::tuple shortest_path_padded(const std::optional<Array<bool>>& adjacency,
                               const std::optional<Array<int32_t>>& bond_ids,
                               const std::optional<Array<bool>>& mask, int max_hops) {
  const GraphInput g = graph_input(adjacency, bond_ids, max_hops);
  const py::array& a = g.any();
  require(a.ndim() == 3 && a.shape(1) == a.shape(2),
          "adjacency/bond_ids: expected shape (B, N, N), got " + shape_of(a));
  const int64_t batch = a.shape(0), n = a.shape(1);
  check_mask(mask, batch, n);
  Array<int32_t> distances({batch, n, n});
  std::optional<Array<int32_t>> routes;
  if (max_hops > 0) routes.emplace(std::vector<int64_t>{batch, n, n, static_cast<int64_t>(max_hops)});

  const bool* adj = g.adjacency ? g.adjacency->data() : nullptr;
  const int32_t* ids = g.bond_ids ? g.bond_ids->data() : nullptr;
  const bool* m = mask ? mask->data() : nullptr;
  int32_t* dist = distances.mutable_data();
  int32_t* rts = routes ? routes->mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    const int64_t chunk = pyblend::molecule_chunk(batch);
#pragma omp parallel for schedule(dynamic, chunk) if (pyblend::parallel_allowed())
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t at = b * n * n;
      pyblend::MoleculeBlock block{adj ? adj + at : nullptr, ids ? ids + at : nullptr, m ? m + b * n : nullptr,
                                   n, n, dist + at, rts ? rts + at * max_hops : nullptr};
      pyblend::molecule_shortest_paths(block, max_hops);
    }
  }
  return py::make_tuple(distances, routes ? py::object(*routes) : py::object(py::none()));
}

py::tuple shortest_path_packed(const std::optional<Array<bool>>& adjacency,
                               const std::optional<Array<int32_t>>& bond_ids, const Array<int32_t>& cu_seqlens,
                               int max_hops) {
  const GraphInput g = graph_input(adjacency, bond_ids, max_hops);
  const py::array& a = g.any();
  require(a.ndim() == 1, "adjacency/bond_ids: expected packed shape (P,), got " + shape_of(a));
  const int64_t total = a.shape(0);
  const PackedOffsets off = packed_offsets(cu_seqlens, total, true);
  const int64_t batch = static_cast<int64_t>(off.pairs.size()) - 1;

  Array<int32_t> distances({total});
  std::optional<Array<int32_t>> routes;
  if (max_hops > 0) routes.emplace(std::vector<int64_t>{total, static_cast<int64_t>(max_hops)});
  const bool* adj = g.adjacency ? g.adjacency->data() : nullptr;
  const int32_t* ids = g.bond_ids ? g.bond_ids->data() : nullptr;
  int32_t* dist = distances.mutable_data();
  int32_t* rts = routes ? routes->mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    const int64_t chunk = pyblend::molecule_chunk(batch);
#pragma omp parallel for schedule(dynamic, chunk) if (pyblend::parallel_allowed())
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t at = off.pairs[b];
      const int64_t n = off.atoms[b + 1] - off.atoms[b];
      pyblend::MoleculeBlock block{adj ? adj + at : nullptr, ids ? ids + at : nullptr, nullptr,
                                   n, n, dist + at, rts ? rts + at * max_hops : nullptr};
      pyblend::molecule_shortest_paths(block, max_hops);
    }
  }
  return py::make_tuple(distances, routes ? py::object(*routes) : py::object(py::none()));
}

template <typename T>
Array<T> pair_distances_padded(const Array<T>& pos, const std::optional<Array<bool>>& mask) {
  require(pos.ndim() == 3 && pos.shape(2) == 3, "pos: expected shape (B, N, 3), got " + shape_of(pos));
  const int64_t batch = pos.shape(0), n = pos.shape(1);
  check_mask(mask, batch, n);
  Array<T> out({batch, n, n});
  const T* p = pos.data();
  const bool* m = mask ? mask->data() : nullptr;
  T* d = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int64_t chunk = pyblend::molecule_chunk(batch);
#pragma omp parallel for schedule(dynamic, chunk) if (pyblend::parallel_allowed())
    for (int64_t b = 0; b < batch; ++b) {
      pyblend::molecule_pair_distances(p + b * n * 3, m ? m + b * n : nullptr, n, n, d + b * n * n);
    }
  }
  return out;
}

template <typename T>
Array<T> pair_distances_packed(const Array<T>& pos, const Array<int32_t>& cu_seqlens) {
  require(pos.ndim() == 2 && pos.shape(1) == 3, "pos: expected packed shape (T, 3), got " + shape_of(pos));
  const PackedOffsets off = packed_offsets(cu_seqlens, pos.shape(0), false);
  const int64_t batch = static_cast<int64_t>(off.atoms.size()) - 1;
  Array<T> out({off.pairs[batch]});
  const T* p = pos.data();
  T* d = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int64_t chunk = pyblend::molecule_chunk(batch);
#pragma omp parallel for schedule(dynamic, chunk) if (pyblend::parallel_allowed())
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = off.atoms[b + 1] - off.atoms[b];
      pyblend::molecule_pair_distances(p + off.atoms[b] * 3, static_cast<const bool*>(nullptr), n, n,
                                       d + off.pairs[b]);
    }
  }
  return out;
}

template <typename T>
Array<T> gaussian_basis(const Array<T>& distances, const Array<int64_t>& types, const Array<T>& means,
                        const Array<T>& stds, const Array<T>& mul, const Array<T>& bias) {
  require(distances.ndim() == 1, "distances: expected shape (M,), got " + shape_of(distances));
  const int64_t pairs = distances.shape(0);
  require(types.ndim() == 2 && types.shape(0) == pairs,
          "pair_types: expected shape (" + std::to_string(pairs) + ", t), got " + shape_of(types));
  require(means.ndim() == 1 && stds.ndim() == 1 && means.shape(0) == stds.shape(0),
          "means/stds: expected two (K,) arrays, got " + shape_of(means) + " and " + shape_of(stds));
  require(mul.ndim() == 1 && bias.ndim() == 1 && mul.shape(0) == bias.shape(0),
          "mul/bias: expected two (num_types,) arrays, got " + shape_of(mul) + " and " + shape_of(bias));
  const int64_t kernels = means.shape(0);
  Array<T> out({pairs, kernels});
  int64_t bad = -1;
  {
    py::gil_scoped_release release;
    bad = pyblend::gaussian_basis<T>(distances.data(), types.data(), pairs, types.shape(1), means.data(),
                                     stds.data(), kernels, mul.data(), bias.data(), mul.shape(0),
                                     out.mutable_data());
  }
  if (bad >= 0) {
    throw py::index_error("pair_types: pair " + std::to_string(bad) + " has a type outside [0, " +
                          std::to_string(mul.shape(0)) + ")");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  pyblend::watch_forks();
  m.doc() = "pyblend's CPU engine: shortest paths, routes, pair distances and Gaussian-basis features.";
  m.def("shortest_path_padded", &shortest_path_padded, py::arg("adjacency"), py::arg("bond_ids"),
        py::arg("mask"), py::arg("max_hops"),
        "(adjacency bool (B,N,N) | None, bond_ids int32 (B,N,N) | None, mask bool (B,N) | None, max_hops) -> "
        "(distances int32 (B,N,N), routes int32 (B,N,N,max_hops) | None)");
  m.def("shortest_path_packed", &shortest_path_packed, py::arg("adjacency"), py::arg("bond_ids"),
        py::arg("cu_seqlens"), py::arg("max_hops"),
        "(adjacency bool (P,) | None, bond_ids int32 (P,) | None, cu_seqlens int32 (B+1,), max_hops) -> "
        "(distances int32 (P,), routes int32 (P,max_hops) | None)");
  // The float arguments of the float/double overloads take no conversion: pybind11 tries the float overload
  // first, and once any argument needs converting (a strided mask, say) it would have cast float64 to float32.
  // Callers pass C-contiguous arrays of one float dtype (pyblend.ops checks it).
  m.def("pair_distances_padded", &pair_distances_padded<float>, py::arg("pos").noconvert(), py::arg("mask"));
  m.def("pair_distances_padded", &pair_distances_padded<double>, py::arg("pos").noconvert(), py::arg("mask"));
  m.def("pair_distances_packed", &pair_distances_packed<float>, py::arg("pos").noconvert(), py::arg("cu_seqlens"));
  m.def("pair_distances_packed", &pair_distances_packed<double>, py::arg("pos").noconvert(),
        py::arg("cu_seqlens"));
  m.def("gaussian_basis", &gaussian_basis<float>, py::arg("distances").noconvert(), py::arg("pair_types"),
        py::arg("means").noconvert(), py::arg("stds").noconvert(), py::arg("mul").noconvert(),
        py::arg("bias").noconvert());
  m.def("gaussian_basis", &gaussian_basis<double>, py::arg("distances").noconvert(), py::arg("pair_types"),
        py::arg("means").noconvert(), py::arg("stds").noconvert(), py::arg("mul").noconvert(),
        py::arg("bias").noconvert());
  m.def("num_threads", &pyblend::num_threads,
        "OpenMP threads the engine uses (1 without OpenMP, and in a forked child)");
}
