//! A first-fit allocator for an address window (the 32-bit MMIO window, the 64-bit MMIO window, I/O ports).
//!
//! Allocations never overlap and never leave the window; freeing one (on hot-unplug) makes its range available
//! again. The VMM keeps one allocator per window and places BARs with it.

use std::collections::BTreeMap;

use thiserror::Error;

/// Errors creating an allocator or freeing from it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocatorError {
    /// A window of zero bytes.
    #[error("an address window must be at least one byte long")]
    EmptyWindow,
    /// The window runs past the end of the 64-bit address space.
    #[error("window {base:#x}+{size:#x} runs past the end of the address space; shrink it or move it down")]
    WindowOverflow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// `free` was given an address that is not the start of an allocation.
    #[error("no allocation starts at {0:#x}; free only addresses returned by allocate")]
    NotAllocated(u64),
}

/// Allocates aligned ranges inside `[base, last]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressAllocator {
    base: u64,
    /// Last address of the window (inclusive, so a window may end at `u64::MAX`).
    last: u64,
    /// Allocations by base, with their sizes.
    allocations: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// An allocator for the `size` bytes starting at `base`.
    pub fn new(base: u64, size: u64) -> Result<Self, AllocatorError> {
        if size == 0 {
            return Err(AllocatorError::EmptyWindow);
        }
        let last = base
            .checked_add(size - 1)
            .ok_or(AllocatorError::WindowOverflow { base, size })?;
        Ok(Self {
            base,
            last,
            allocations: BTreeMap::new(),
        })
    }

    /// First address of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Last address of the window.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Reserves `size` bytes at the lowest address aligned to `align` (a power of two) that is free, and returns it.
    /// `None` when no such range is left, or when `size` is 0 or `align` is not a power of two.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut candidate = align_up(self.base, align)?;
        for (&start, &len) in &self.allocations {
            let candidate_last = candidate.checked_add(size - 1)?;
            if candidate_last < start {
                break;
            }
            // An allocation that reaches the top of the address space leaves nothing after it.
            let end = start.checked_add(len)?;
            if end > candidate {
                candidate = align_up(end, align)?;
            }
        }
        self.reserve(candidate, size)
    }

    /// Reserves exactly `[base, base + size)` if it lies in the window and is free (e.g. to restore a saved layout).
    pub fn allocate_at(&mut self, base: u64, size: u64) -> Option<u64> {
        if size == 0 || base < self.base {
            return None;
        }
        let last = base.checked_add(size - 1)?;
        let overlaps_before = self
            .allocations
            .range(..=base)
            .next_back()
            .is_some_and(|(&start, &len)| start + (len - 1) >= base);
        let overlaps_after = self.allocations.range(base..=last).next().is_some();
        if overlaps_before || overlaps_after {
            return None;
        }
        self.reserve(base, size)
    }

    /// Records `[base, base + size)` as allocated if it ends inside the window (the caller checked it is free).
    fn reserve(&mut self, base: u64, size: u64) -> Option<u64> {
        let last = base.checked_add(size - 1)?;
        if last > self.last {
            return None;
        }
        self.allocations.insert(base, size);
        Some(base)
    }

    /// Releases the allocation starting at `base` and returns its size.
    pub fn free(&mut self, base: u64) -> Result<u64, AllocatorError> {
        self.allocations
            .remove(&base)
            .ok_or(AllocatorError::NotAllocated(base))
    }

    /// The allocations, as (base, size) in address order.
    pub fn allocations(&self) -> Vec<(u64, u64)> {
        self.allocations
            .iter()
            .map(|(&base, &size)| (base, size))
            .collect()
    }
}

/// `value` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_validation() {
        assert_eq!(
            AddressAllocator::new(0, 0),
            Err(AllocatorError::EmptyWindow)
        );
        assert_eq!(
            AddressAllocator::new(u64::MAX, 2),
            Err(AllocatorError::WindowOverflow {
                base: u64::MAX,
                size: 2
            })
        );
        let window = AddressAllocator::new(1 << 40, u64::MAX - (1 << 40) + 1).unwrap();
        assert_eq!((window.base(), window.last()), (1 << 40, u64::MAX));
    }

    #[test]
    fn first_fit_with_alignment() {
        let mut mmio = AddressAllocator::new(0xc000_0000, 0x1000_0000).unwrap();
        assert_eq!(mmio.allocate(0x100, 0x100), Some(0xc000_0000));
        assert_eq!(mmio.allocate(0x1000, 0x1000), Some(0xc000_1000));
        assert_eq!(mmio.allocate(0x10, 0x10), Some(0xc000_0100));
        assert_eq!(mmio.allocate(0x10_0000, 0x10_0000), Some(0xc010_0000));
        for (base, size) in mmio.allocations() {
            assert_eq!(base % size.next_power_of_two(), 0);
        }
    }

    #[test]
    fn unaligned_window_base() {
        let mut io = AddressAllocator::new(0x1001, 0x1000).unwrap();
        assert_eq!(io.allocate(0x20, 0x20), Some(0x1020));
        assert_eq!(io.allocate(0x1, 0x1), Some(0x1001));
        // A request aligned past the end of the window fails.
        assert_eq!(io.allocate(0x1000, 0x1000), None);
    }

    #[test]
    fn invalid_requests() {
        let mut window = AddressAllocator::new(0, 0x1000).unwrap();
        assert_eq!(window.allocate(0, 1), None);
        assert_eq!(window.allocate(0x10, 0), None);
        assert_eq!(window.allocate(0x10, 3), None);
        assert_eq!(window.allocate(0x1001, 1), None);
        assert_eq!(window.allocate(u64::MAX, 1), None);
        assert_eq!(window.allocate_at(0xfff, 2), None);
        assert_eq!(window.allocate_at(u64::MAX, 2), None);
        assert_eq!(window.allocate_at(0, 0), None);
        assert!(window.allocations().is_empty());
        assert_eq!(window.free(0), Err(AllocatorError::NotAllocated(0)));
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut io = AddressAllocator::new(0xc000, 0x100).unwrap();
        let blocks: Vec<u64> = (0..8).map(|_| io.allocate(0x20, 0x20).unwrap()).collect();
        assert_eq!(
            blocks,
            (0..8).map(|i| 0xc000 + i * 0x20).collect::<Vec<_>>()
        );
        assert_eq!(io.allocate(1, 1), None);
        assert_eq!(io.free(0xc060), Ok(0x20));
        assert_eq!(io.free(0xc060), Err(AllocatorError::NotAllocated(0xc060)));
        assert_eq!(io.free(0xc061), Err(AllocatorError::NotAllocated(0xc061)));
        assert_eq!(io.allocate(0x20, 0x20), Some(0xc060));
        assert_eq!(io.allocate(1, 1), None);
    }

    #[test]
    fn fragmentation() {
        let mut mmio = AddressAllocator::new(0, 0x4000).unwrap();
        for i in 0..4 {
            assert_eq!(mmio.allocate(0x1000, 0x1000), Some(i * 0x1000));
        }
        mmio.free(0x1000).unwrap();
        mmio.free(0x3000).unwrap();
        // 8 KiB free in total, but not contiguous.
        assert_eq!(mmio.allocate(0x2000, 0x1000), None);
        mmio.free(0x2000).unwrap();
        assert_eq!(mmio.allocate(0x2000, 0x2000), Some(0x2000));
        assert_eq!(mmio.allocate(0x1000, 0x1000), Some(0x1000));
        assert_eq!(mmio.allocate(1, 1), None);
    }

    #[test]
    fn small_holes_are_filled_first() {
        let mut mmio = AddressAllocator::new(0, 0x10000).unwrap();
        assert_eq!(mmio.allocate(0x10, 0x10), Some(0));
        assert_eq!(mmio.allocate(0x1000, 0x1000), Some(0x1000));
        assert_eq!(mmio.allocate(0x100, 0x100), Some(0x100));
        assert_eq!(mmio.allocate(0x800, 0x800), Some(0x800));
        assert_eq!(mmio.allocate(0x800, 0x800), Some(0x2000));
    }

    #[test]
    fn allocate_at_respects_neighbours() {
        let mut mmio = AddressAllocator::new(0x1000, 0x1000).unwrap();
        assert_eq!(mmio.allocate_at(0x1400, 0x100), Some(0x1400));
        assert_eq!(mmio.allocate_at(0x1300, 0x101), None);
        assert_eq!(mmio.allocate_at(0x14ff, 0x10), None);
        assert_eq!(mmio.allocate_at(0x1450, 0x10), None);
        assert_eq!(mmio.allocate_at(0x1300, 0x100), Some(0x1300));
        assert_eq!(mmio.allocate_at(0x1500, 0x100), Some(0x1500));
        assert_eq!(mmio.allocate_at(0x0fff, 0x1), None);
        assert_eq!(mmio.allocate_at(0x1fff, 0x2), None);
        assert_eq!(mmio.allocate_at(0x1fff, 0x1), Some(0x1fff));
        assert_eq!(mmio.allocate(0x200, 0x100), Some(0x1000));
        assert_eq!(mmio.allocate(0x200, 0x100), Some(0x1600));
    }

    #[test]
    fn window_ending_at_top_of_address_space() {
        let base = u64::MAX - 0xfff;
        let mut high = AddressAllocator::new(base, 0x1000).unwrap();
        assert_eq!(high.allocate(0x800, 0x800), Some(base));
        assert_eq!(high.allocate(0x800, 0x800), Some(base + 0x800));
        assert_eq!(high.allocate(1, 1), None);
        high.free(base + 0x800).unwrap();
        assert_eq!(high.allocate(0x800, 0x1000), None);
        assert_eq!(high.allocate(0x10, 0x10), Some(base + 0x800));
    }

    #[test]
    fn random_allocations_never_overlap() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut window = AddressAllocator::new(0x10_0000, 0x10_0000).unwrap();
        let mut live = Vec::new();
        for _ in 0..2000 {
            if next() % 3 == 0 && !live.is_empty() {
                let base = live.swap_remove((next() % live.len() as u64) as usize);
                window.free(base).unwrap();
            } else {
                let size = 1 + next() % 0x4000;
                let align = 1 << (next() % 14);
                if let Some(base) = window.allocate(size, align) {
                    assert_eq!(base % align, 0);
                    live.push(base);
                }
            }
            let allocations = window.allocations();
            for pair in allocations.windows(2) {
                assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?} overlap");
            }
            if let (Some(first), Some(last)) = (allocations.first(), allocations.last()) {
                assert!(first.0 >= window.base() && last.0 + last.1 - 1 <= window.last());
            }
        }
    }
}
