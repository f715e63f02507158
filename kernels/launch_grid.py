"""Launch grids whose molecules (or samples) may outnumber CUDA's grid limit.

CUDA caps grid axes 1 and 2 at 65535 programs; axis 0 takes up to 2^31 - 1. The kernels put the tiles of a
molecule on axis 0 and the molecules on axis 1, so that a molecule's tiles, which read the same keys, run
together; a batch of more than 65535 molecules (a bulk inference call on small molecules) would not launch.
Such a batch gets a flat grid instead: axis 0 runs over the tiles of every molecule, tiles fastest (the same
order), axis 1 is 1, and the kernel splits its program id (a division, which costs registers: only then).
"""
import triton
import triton.language as tl

MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes 1 and 2


def tiles_by_items(tiles: int, items: int, *rest: int) -> tuple[tuple[int, ...], bool]:
    """``(grid, flat)``: ``(tiles, items, *rest)``, or ``(tiles * items, 1, *rest)`` with ``flat`` True when
    ``items`` passes the limit; ``rest`` (at most one more axis, within the limit) stays in place."""
    if items <= MAX_GRID_AXIS:
        return (tiles, items, *rest), False
    return (tiles * items, 1, *rest), True


@triton.jit
def tile_and_item(tiles, FLAT_GRID: tl.constexpr):
    """``(tile, item)`` of this program on a :func:`tiles_by_items` grid (int32)."""
    if FLAT_GRID:
        program = tl.program_id(0)
        tile = program % tiles
        item = program // tiles
    else:
        tile = tl.program_id(0)
        item = tl.program_id(1)
    return tile, item
