#include "shortest_path.h"

#include <algorithm>
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
  const int64_t width = b.n;
  const int64_t stride = b.stride;
  const bool routes_wanted = b.routes != nullptr && max_hops > 0;

  // A padded batch is as wide as its largest molecule, so most blocks end in a run of padding. Atoms past the
  // last real one are on no path: the search below works on the first `n` atoms only (holes in the mask before
  // the last real atom stay inside and are skipped by is_real), and the padding past them is answered here with
  // bulk fills. Same output as searching the full width, at the cost of the molecule's own size.
  int64_t n = width;
  if (b.mask != nullptr) {
    while (n > 0 && !b.mask[n - 1]) --n;
  }
  const int64_t hops = routes_wanted ? max_hops : 0;
  for (int64_t i = 0; i < width; ++i) {
    const int64_t from = i < n ? n : 0;  // rows of real-range atoms: only their padded columns
    std::fill(b.distances + i * stride + from, b.distances + i * stride + width, -1);
    if (routes_wanted) {
      std::fill(b.routes + (i * stride + from) * hops, b.routes + (i * stride + width) * hops, -1);
    }
  }

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
  if (!routes_wanted) return;

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
      int32_t* route = b.routes + (i * stride + j) * hops;
      // Hops past the path's end are -1; so is the whole route of an unreachable or masked pair (length -1).
      const int64_t length = b.distances[i * stride + j];
      const int64_t walked = length <= 0 ? 0 : (length < max_hops ? length : max_hops);
      int64_t u = i;
      for (int64_t k = 0; k < walked; ++k) {
        const int64_t v = next_hop[u * n + j];
        route[k] = b.bond_ids[u * stride + v];
        u = v;
      }
      std::fill(route + walked, route + hops, -1);
    }
  }
}

}  // namespace pyblend
