//! Estimates of heap bytes for `MEMORY USAGE`: what the allocator really hands out
//! (jemalloc's size classes) and what a `BTreeMap` entry costs with its node.

/// Bytes jemalloc hands out for a request of `size`: 8, then multiples of 16 up to
/// 128, then four classes per doubling (160, 192, 224, 256, 320, ...).
pub fn allocation(size: usize) -> usize {
    match size {
        0 => 0,
        1..=8 => 8,
        9..=128 => size.next_multiple_of(16),
        _ => {
            let ceil_log2 = usize::BITS - (size - 1).leading_zeros();
            size.next_multiple_of(1 << (ceil_log2 - 3))
        }
    }
}

/// Entries a B-tree leaf holds at most (`std`'s `CAPACITY`, 2 * B - 1 with B = 6).
const LEAF_CAPACITY: usize = 11;
/// Entries a leaf holds on average: a full leaf splits in halves, so keys arriving in
/// order (expiries, ids with a counter) leave leaves of 6, keys in random order ~8.
const LEAF_FILL: usize = 7;

/// Bytes one entry of a `BTreeMap<K, V>` (or `BTreeSet<K>`, with `V = ()`) costs: its
/// share of a leaf node (keys, values, parent pointer and lengths, rounded by the
/// allocator) and of the internal nodes above it (an edge per leaf).
pub fn btree_entry<K, V>() -> usize {
    let leaf = LEAF_CAPACITY * (size_of::<K>() + size_of::<V>()) + 16;
    let internal = leaf + (LEAF_CAPACITY + 1) * size_of::<usize>();
    (allocation(leaf) + allocation(internal) / LEAF_FILL).div_ceil(LEAF_FILL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_round_up_to_jemalloc_size_classes() {
        let classes = [(1, 8), (8, 8), (9, 16), (17, 32), (128, 128), (129, 160)];
        for (size, class) in classes {
            assert_eq!(allocation(size), class, "{size}");
        }
        for (size, class) in [(188, 192), (364, 384), (628, 640), (804, 896), (1025, 1280)] {
            assert_eq!(allocation(size), class, "{size}");
        }
    }
}
