// All-pairs unweighted shortest paths for batches of small graphs (molecules), with optional routes.
#pragma once
#include <cstdint>

namespace pyblend {

// One molecule's block inside a batch. The block is `n` x `n` pairs stored row-major with row stride `stride`
// (padded layout: stride = N, the batch's padded size; packed layout: stride = n).
struct MoleculeBlock {
  const bool* adjacency;     // [n * stride]; edge u -> v where adjacency[u * stride + v]; null when bond_ids given
  const int32_t* bond_ids;   // [n * stride]; bond id of u -> v, -1 for no bond; null for distances only
  const bool* mask;          // [n] True = real atom; null means every atom is real
  int64_t n;
  int64_t stride;
  int32_t* distances;        // [n * stride] out
  int32_t* routes;           // [n * stride * max_hops] out; null for distances only
};

// Distances: 0 on the diagonal of real atoms, -1 for unreachable pairs and for any pair touching a masked atom.
// Routes: route[i, j, k] is the bond id of hop k of one shortest path i -> j, -1 past its end (and for
// unreachable or masked pairs). Ties are broken by taking, at every step, the smallest-index next atom that
// is still on a shortest path to j: the route is the lexicographically smallest atom sequence.
void molecule_shortest_paths(const MoleculeBlock& block, int max_hops);

}  // namespace pyblend
