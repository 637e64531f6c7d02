//! Base address registers: what a device asks for, what the guest sees, and how a guest move is reported.
//!
//! A BAR is described by a [`PciBarConfiguration`] when a device is built; [`PciConfiguration`] turns it into the
//! register bits the guest reads and the writable-bit masks that make the size probe work (the guest writes all ones
//! and reads back the size mask). When the guest moves a BAR, the configuration reports a [`BarReprogramming`] so
//! the VMM can move the device's region on its MMIO or port bus.
//!
//! [`PciConfiguration`]: crate::PciConfiguration

use serde::{Deserialize, Serialize};

/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Low bits of a memory BAR that are not address bits (type and prefetchable flags).
pub(crate) const MEM_BAR_FLAG_BITS: u32 = 0xf;
/// Low bits of an I/O BAR that are not address bits.
pub(crate) const IO_BAR_FLAG_BITS: u32 = 0x3;
/// Bit 0 of a BAR: set for an I/O BAR.
pub(crate) const BAR_IO_SPACE: u32 = 0x1;
/// Bits 2:1 of a memory BAR = 0b10: the BAR is 64 bits wide and uses the next register for the high half.
pub(crate) const BAR_MEM_64BIT: u32 = 0x4;
/// Bit 3 of a memory BAR: the region is prefetchable.
pub(crate) const BAR_MEM_PREFETCHABLE: u32 = 0x8;

/// Smallest memory BAR the PCI specification allows (the four flag bits make 16 bytes the minimum).
pub const MIN_MEM_BAR_SIZE: u64 = 16;
/// Smallest I/O BAR the PCI specification allows.
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Largest 32-bit memory BAR (bit 31 must remain an address bit).
pub const MAX_MEM32_BAR_SIZE: u64 = 1 << 31;
/// End of the x86 I/O port space: an I/O BAR must lie entirely below it.
pub const IO_SPACE_END: u64 = 1 << 16;

/// The address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PciBarRegionType {
    /// A memory BAR below 4 GiB (one register).
    Memory32BitRegion,
    /// A memory BAR anywhere in the 64-bit space (two consecutive registers).
    Memory64BitRegion,
    /// An I/O port BAR.
    IoRegion,
}

impl PciBarRegionType {
    /// Whether this BAR occupies two registers.
    pub fn is_64bit(self) -> bool {
        self == Self::Memory64BitRegion
    }

    /// Whether this BAR decodes memory (as opposed to I/O ports).
    pub fn is_memory(self) -> bool {
        self != Self::IoRegion
    }
}

/// A BAR a device asks for: its index, type, size, initial guest address and prefetchable flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarConfiguration {
    /// BAR index, 0..=5 (a 64-bit BAR also uses `index + 1`).
    pub index: usize,
    /// Guest address the VMM placed the region at; must be aligned to `size`.
    pub addr: u64,
    /// Region size in bytes; a power of two.
    pub size: u64,
    /// Address space the region decodes.
    pub region_type: PciBarRegionType,
    /// Whether the memory region is prefetchable (no read side effects); must be false for I/O BARs.
    pub prefetchable: bool,
}

impl PciBarConfiguration {
    /// A 32-bit memory BAR.
    pub fn memory32(index: usize, addr: u64, size: u64) -> Self {
        Self {
            index,
            addr,
            size,
            region_type: PciBarRegionType::Memory32BitRegion,
            prefetchable: false,
        }
    }

    /// A 64-bit memory BAR (uses registers `index` and `index + 1`).
    pub fn memory64(index: usize, addr: u64, size: u64) -> Self {
        Self {
            index,
            addr,
            size,
            region_type: PciBarRegionType::Memory64BitRegion,
            prefetchable: false,
        }
    }

    /// An I/O port BAR.
    pub fn io(index: usize, addr: u64, size: u64) -> Self {
        Self {
            index,
            addr,
            size,
            region_type: PciBarRegionType::IoRegion,
            prefetchable: false,
        }
    }

    /// The same BAR, marked prefetchable.
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }
}

/// A BAR as currently mapped: where the VMM should decode it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBarRegion {
    /// BAR index (the low register for a 64-bit BAR).
    pub index: usize,
    /// Guest address of the region.
    pub base: u64,
    /// Region size in bytes.
    pub len: u64,
    /// Address space the region decodes.
    pub region_type: PciBarRegionType,
    /// Whether the memory region is prefetchable.
    pub prefetchable: bool,
}

/// The guest moved a BAR: the VMM must move the region from `old_base` to `new_base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogramming {
    /// Index of the BAR that moved.
    pub bar: usize,
    /// Where the region was decoded until now.
    pub old_base: u64,
    /// Where the guest programmed it.
    pub new_base: u64,
    /// Region size in bytes.
    pub len: u64,
    /// Address space of the region.
    pub region_type: PciBarRegionType,
}

/// Register value of a BAR's low register for this configuration (address bits and flag bits).
pub(crate) fn low_register_value(config: &PciBarConfiguration) -> u32 {
    match config.region_type {
        PciBarRegionType::IoRegion => (config.addr as u32 & !IO_BAR_FLAG_BITS) | BAR_IO_SPACE,
        PciBarRegionType::Memory32BitRegion | PciBarRegionType::Memory64BitRegion => {
            let mut value = config.addr as u32 & !MEM_BAR_FLAG_BITS;
            if config.region_type.is_64bit() {
                value |= BAR_MEM_64BIT;
            }
            if config.prefetchable {
                value |= BAR_MEM_PREFETCHABLE;
            }
            value
        }
    }
}

/// Writable bits of a BAR's low register: the address bits at and above the size.
pub(crate) fn low_writable_mask(region_type: PciBarRegionType, size: u64) -> u32 {
    let flags = match region_type {
        PciBarRegionType::IoRegion => IO_BAR_FLAG_BITS,
        _ => MEM_BAR_FLAG_BITS,
    };
    (!(size.wrapping_sub(1)) as u32) & !flags
}

/// Writable bits of a 64-bit BAR's high register.
pub(crate) fn high_writable_mask(size: u64) -> u32 {
    (!(size.wrapping_sub(1)) >> 32) as u32
}

/// Address bits of a BAR's low register value.
pub(crate) fn low_address_bits(region_type: PciBarRegionType, value: u32) -> u32 {
    match region_type {
        PciBarRegionType::IoRegion => value & !IO_BAR_FLAG_BITS,
        _ => value & !MEM_BAR_FLAG_BITS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_values_carry_type_bits() {
        let bar = PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000);
        assert_eq!(low_register_value(&bar), 0xc000_0000);
        let bar = PciBarConfiguration::memory64(0, 0x1_2000_0000, 0x1000).prefetchable();
        assert_eq!(low_register_value(&bar), 0x2000_000c);
        let bar = PciBarConfiguration::io(0, 0xc000, 0x20);
        assert_eq!(low_register_value(&bar), 0xc001);
    }

    #[test]
    fn writable_masks_follow_size() {
        assert_eq!(
            low_writable_mask(PciBarRegionType::Memory32BitRegion, 0x1000),
            0xffff_f000
        );
        assert_eq!(
            low_writable_mask(PciBarRegionType::IoRegion, 0x20),
            0xffff_ffe0
        );
        assert_eq!(
            low_writable_mask(PciBarRegionType::IoRegion, 4),
            0xffff_fffc
        );
        assert_eq!(
            low_writable_mask(PciBarRegionType::Memory64BitRegion, 1 << 33),
            0
        );
        assert_eq!(high_writable_mask(1 << 33), 0xffff_fffe);
        assert_eq!(high_writable_mask(0x1000), 0xffff_ffff);
    }

    #[test]
    fn region_type_predicates() {
        assert!(PciBarRegionType::Memory64BitRegion.is_64bit());
        assert!(!PciBarRegionType::Memory32BitRegion.is_64bit());
        assert!(PciBarRegionType::Memory32BitRegion.is_memory());
        assert!(!PciBarRegionType::IoRegion.is_memory());
    }
}
