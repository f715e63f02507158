#include "shortest_path.h"

#include <cstddef>
#include <vector>

namespace pyblend {

namespace {

bool is_edge(const MoleculeBlock& b, int64_t u, int64_t v) {
  const int64_t at = u * b.stride + v;
  return b.bond_ids ? b.bond_ids[at] >= 0 : b.adjacency[at];
}

bool is_real(const MoleculeBlock& b, int64_t i) { return b.mask == nullptr || b.mask[i]; }

}  // namespace

void molecule_shortest_paths(const MoleculeBlock& b, int max_hops) {
  const int64_t n = b.n;
  const int64_t stride = b.stride;

  // Neighbour lists in ascending atom order (the route tie-break relies on this order). Self loops and
  // edges to masked atoms are ignored.
  std::vector<int64_t> neighbour_start(n + 1, 0);
  std::vector<int32_t> neighbours;
  neighbours.reserve(4 * n);
  for (int64_t u = 0; u < n; ++u) {
    if (is_real(b, u)) {
      for (int64_t v = 0; v < n; ++v) {
        if (v != u && is_real(b, v) && is_edge(b, u, v)) neighbours.push_back(static_cast<int32_t>(v));
      }
    }
    neighbour_start[u + 1] = static_cast<int64_t>(neighbours.size());
  }

  // Breadth-first search from every real source, written straight into the output rows.
  std::vector<int32_t> queue(n);
  for (int64_t s = 0; s < n; ++s) {
    int32_t* dist = b.distances + s * stride;
    for (int64_t j = 0; j < n; ++j) dist[j] = -1;
    if (!is_real(b, s)) continue;
    dist[s] = 0;
    int64_t head = 0, tail = 0;
    queue[tail++] = static_cast<int32_t>(s);
    while (head < tail) {
      const int32_t u = queue[head++];
      for (int64_t e = neighbour_start[u]; e < neighbour_start[u + 1]; ++e) {
        const int32_t v = neighbours[e];
        if (dist[v] < 0) {
          dist[v] = dist[u] + 1;
          queue[tail++] = v;
        }
      }
    }
  }
  if (b.routes == nullptr || max_hops <= 0) return;

  // next_hop[u, j]: the smallest neighbour v of u with d(v, j) = d(u, j) - 1.
  std::vector<int32_t> next_hop(static_cast<size_t>(n * n), -1);
  for (int64_t u = 0; u < n; ++u) {
    const int32_t* du = b.distances + u * stride;
    for (int64_t j = 0; j < n; ++j) {
      if (du[j] <= 0) continue;
      for (int64_t e = neighbour_start[u]; e < neighbour_start[u + 1]; ++e) {
        const int32_t v = neighbours[e];
        if (b.distances[v * stride + j] == du[j] - 1) {
          next_hop[u * n + j] = v;
          break;
        }
      }
    }
  }

  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      int32_t* route = b.routes + (i * stride + j) * max_hops;
      const int32_t length = b.distances[i * stride + j];
      int64_t u = i;
      for (int k = 0; k < max_hops; ++k) {
        if (k >= length) {
          route[k] = -1;
          continue;
        }
        const int64_t v = next_hop[u * n + j];
        route[k] = b.bond_ids[u * stride + v];
        u = v;
      }
    }
  }
}

}  // namespace pyblend
