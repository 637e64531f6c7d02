//! Where guest RAM lives: the RAM regions the VMM maps and the e820 map the guest is told about.

use vm_memory::GuestAddress;

use super::layout::{EBDA_START, HIGH_RAM_START, MEM_32BIT_GAP_START, RAM_64BIT_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Guest RAM regions for `size` bytes, split around the 32-bit MMIO gap.
///
/// Up to 3 GiB sit at address 0; the rest starts at 4 GiB. A zero size gives no region.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let high = size - low;
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), to_usize(low)));
    }
    if high > 0 {
        regions.push((GuestAddress(RAM_64BIT_START), to_usize(high)));
    }
    regions
}

/// The e820 map for a guest with `ram_size` bytes of RAM laid out by [`arch_memory_regions`].
///
/// RAM below the EBDA, the EBDA and legacy area reserved up to 1 MiB, RAM from 1 MiB to the MMIO
/// gap, and RAM above 4 GiB for whatever exceeds the gap. Empty ranges are left out.
pub fn e820_table(ram_size: u64) -> Vec<E820Entry> {
    let mut table = Vec::with_capacity(4);
    let mut push = |addr: u64, end: u64, kind: u32| {
        if end > addr {
            table.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    let low_end = ram_size.min(MEM_32BIT_GAP_START);
    push(0, low_end.min(EBDA_START), E820_RAM);
    push(EBDA_START, HIGH_RAM_START, E820_RESERVED);
    push(HIGH_RAM_START, low_end, E820_RAM);
    let high = ram_size - low_end;
    push(
        RAM_64BIT_START,
        RAM_64BIT_START.saturating_add(high),
        E820_RAM,
    );
    table
}

// usize is 64 bits wide on x86_64, so this conversion never truncates.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    const RESERVED: E820Entry = E820Entry {
        addr: 0x9fc00,
        size: 0x10_0000 - 0x9fc00,
        kind: E820_RESERVED,
    };

    #[test]
    fn regions_below_the_gap_are_one_range() {
        for size in [16 * MIB, 128 * MIB, 3 * GIB] {
            assert_eq!(
                arch_memory_regions(size),
                vec![(GuestAddress(0), size as usize)],
                "size {size:#x}"
            );
        }
    }

    #[test]
    fn regions_above_the_gap_continue_at_4g() {
        assert_eq!(
            arch_memory_regions(3 * GIB + GIB / 2),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (GIB / 2) as usize)
            ]
        );
        assert_eq!(
            arch_memory_regions(8 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (5 * GIB) as usize)
            ]
        );
    }

    #[test]
    fn no_region_for_no_memory() {
        assert!(arch_memory_regions(0).is_empty());
    }

    #[test]
    fn e820_small_guests() {
        assert_eq!(
            e820_table(16 * MIB),
            vec![ram(0, 0x9fc00), RESERVED, ram(MIB, 15 * MIB)]
        );
        assert_eq!(
            e820_table(128 * MIB),
            vec![ram(0, 0x9fc00), RESERVED, ram(MIB, 127 * MIB)]
        );
    }

    #[test]
    fn e820_exactly_3g_has_no_high_ram() {
        assert_eq!(
            e820_table(3 * GIB),
            vec![ram(0, 0x9fc00), RESERVED, ram(MIB, 3 * GIB - MIB)]
        );
    }

    #[test]
    fn e820_above_the_gap() {
        assert_eq!(
            e820_table(3 * GIB + GIB / 2),
            vec![
                ram(0, 0x9fc00),
                RESERVED,
                ram(MIB, 3 * GIB - MIB),
                ram(4 * GIB, GIB / 2)
            ]
        );
        assert_eq!(
            e820_table(8 * GIB),
            vec![
                ram(0, 0x9fc00),
                RESERVED,
                ram(MIB, 3 * GIB - MIB),
                ram(4 * GIB, 5 * GIB)
            ]
        );
    }

    #[test]
    fn e820_ram_matches_the_mapped_regions() {
        for size in [16 * MIB, 128 * MIB, 3 * GIB, 3 * GIB + GIB / 2, 8 * GIB] {
            let regions = arch_memory_regions(size);
            for entry in e820_table(size).iter().filter(|e| e.kind == E820_RAM) {
                let covered = regions.iter().any(|(start, len)| {
                    entry.addr >= start.0 && entry.addr + entry.size <= start.0 + *len as u64
                });
                assert!(covered, "{entry:?} is not backed for size {size:#x}");
            }
            let total: u64 = e820_table(size)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(total, size - (0x10_0000 - 0x9fc00));
        }
    }

    #[test]
    fn e820_tiny_guest_has_no_empty_ranges() {
        let table = e820_table(0x8000);
        assert_eq!(table, vec![ram(0, 0x8000), RESERVED]);
    }
}
