//! A function's configuration space: the type-0 header, its BARs and the capability list.
//!
//! The space is 4 KiB (the PCI Express extended size) held as 1024 little-endian 32-bit registers. Each register has
//! a mask of the bits the guest may write and a mask of the bits a guest write of 1 clears (status bits); everything
//! else is read-only to the guest. Host bridges use the same type-0 layout (class 06/00): there are no type-1
//! (PCI-to-PCI bridge) headers.
//!
//! Guest accesses are validated: 1, 2 or 4 bytes, naturally aligned within a register inside the 4 KiB space. Reads
//! outside that are all-ones, writes outside it are dropped, and nothing here panics on guest input.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bar::{
    high_writable_mask, low_address_bits, low_register_value, low_writable_mask, BarReprogramming,
    PciBarConfiguration, PciBarRegion, PciBarRegionType, IO_SPACE_END, MAX_MEM32_BAR_SIZE,
    MIN_IO_BAR_SIZE, MIN_MEM_BAR_SIZE, NUM_BARS,
};
use crate::capability::{PciCapability, PciCapabilityId};

/// Size in bytes of a function's configuration space (PCI Express extended space).
pub const CONFIGURATION_SPACE_SIZE: usize = 4096;
/// Number of 32-bit registers in the configuration space.
pub const NUM_CONFIGURATION_REGISTERS: usize = CONFIGURATION_SPACE_SIZE / 4;
/// Size of the conventional PCI configuration space, where the capability list lives.
pub const STANDARD_SPACE_SIZE: usize = 256;

/// Register holding the vendor ID (low half) and device ID (high half).
pub const VENDOR_DEVICE_REG: usize = 0;
/// Register holding the command (low half) and status (high half) registers.
pub const COMMAND_STATUS_REG: usize = 1;
/// Register holding the revision ID and the class code.
pub const CLASS_REG: usize = 2;
/// Register holding cache line size, latency timer, header type and BIST.
pub const HEADER_TYPE_REG: usize = 3;
/// Register of BAR 0; BAR `n` is register `BAR0_REG + n`.
pub const BAR0_REG: usize = 4;
/// Register holding the subsystem vendor ID and subsystem ID.
pub const SUBSYSTEM_REG: usize = 11;
/// Register holding the capabilities pointer (low byte).
pub const CAPABILITY_POINTER_REG: usize = 13;
/// Register holding interrupt line, interrupt pin, min grant and max latency.
pub const INTERRUPT_REG: usize = 15;

/// COMMAND bit: the function decodes its I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// COMMAND bit: the function decodes its memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// COMMAND bit: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// COMMAND bit: the function may not assert INTx.
pub const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
/// STATUS bit: the function has a capability list.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// COMMAND bits the guest may change: I/O, memory, bus master, parity error response, SERR#, interrupt disable.
const COMMAND_WRITABLE_BITS: u32 = 0x0547;
/// STATUS bits that are write-1-to-clear: master data parity error, signalled/received target abort, received master
/// abort, signalled system error, detected parity error.
const STATUS_W1C_BITS: u32 = 0xf900;
/// Cache line size is read/write (Linux programs it); the latency timer is hardwired to 0 as on PCI Express.
const HEADER_TYPE_REG_WRITABLE_BITS: u32 = 0x0000_00ff;
/// Interrupt line is read/write scratch space for the guest.
const INTERRUPT_REG_WRITABLE_BITS: u32 = 0x0000_00ff;
/// Header type bit: the device implements more than one function.
const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;
/// The first capability goes right after the type-0 header.
pub const FIRST_CAPABILITY_OFFSET: usize = 0x40;
/// A capability list can hold at most this many entries (4-byte aligned, between 0x40 and 0x100).
const MAX_CAPABILITIES: usize = (STANDARD_SPACE_SIZE - FIRST_CAPABILITY_OFFSET) / 4;

/// Errors building a configuration space or restoring it from a saved state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigurationError {
    /// The vendor ID 0xffff means "no device".
    #[error("vendor ID 0xffff is reserved for absent devices; use a real vendor ID")]
    InvalidVendorId,
    /// BAR index past the end of the header.
    #[error(
        "BAR index {0} is out of range; a type-0 header has BARs 0 to 5 (a 64-bit BAR needs two)"
    )]
    BarIndexOutOfRange(usize),
    /// The BAR (or, for a 64-bit BAR, its high register) is taken.
    #[error("BAR {0} is already in use; pick a free BAR index")]
    BarInUse(usize),
    /// The size is not a power of two or is outside the limits for its type.
    #[error("BAR {index} size {size:#x} is invalid; use a power of two within the limits for its region type")]
    BarSizeInvalid {
        /// BAR index.
        index: usize,
        /// Requested size.
        size: u64,
    },
    /// The address is not aligned to the size.
    #[error("BAR {index} address {addr:#x} is not aligned to its size {size:#x}; align the address to the size")]
    BarAddressMisaligned {
        /// BAR index.
        index: usize,
        /// Requested address.
        addr: u64,
        /// Requested size.
        size: u64,
    },
    /// The region does not fit in the address space of its type.
    #[error("BAR {index} region {addr:#x}+{size:#x} does not fit its address space; allocate it from the right window")]
    BarAddressOutOfRange {
        /// BAR index.
        index: usize,
        /// Requested address.
        addr: u64,
        /// Requested size.
        size: u64,
    },
    /// Only memory BARs can be prefetchable.
    #[error("BAR {0} is an I/O BAR and cannot be prefetchable; clear the prefetchable flag")]
    PrefetchableIo(usize),
    /// The capability does not fit in the rest of the 256-byte standard space.
    #[error("capability of {needed} bytes does not fit in the {available} bytes left in the standard configuration space")]
    CapabilitySpaceFull {
        /// Bytes the capability needs (including ID and next pointer).
        needed: usize,
        /// Bytes left before offset 0x100.
        available: usize,
    },
    /// A saved state is inconsistent.
    #[error(
        "saved PCI configuration state is invalid: {0}; discard the state and rebuild the device"
    )]
    InvalidState(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ConfigurationError>;

/// Base class, subclass and programming interface of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciClassCode {
    /// Base class (byte 0x0b).
    pub base_class: u8,
    /// Subclass (byte 0x0a).
    pub subclass: u8,
    /// Programming interface (byte 0x09).
    pub prog_if: u8,
}

impl PciClassCode {
    /// Bridge device, host bridge.
    pub const HOST_BRIDGE: Self = Self::new(0x06, 0x00, 0x00);
    /// Unclassified "other" device (class 0xff).
    pub const OTHER: Self = Self::new(0xff, 0x00, 0x00);

    /// A class code from its three bytes.
    pub const fn new(base_class: u8, subclass: u8, prog_if: u8) -> Self {
        Self {
            base_class,
            subclass,
            prog_if,
        }
    }
}

/// The legacy interrupt pin a function uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciInterruptPin {
    /// INTA#.
    IntA = 1,
    /// INTB#.
    IntB = 2,
    /// INTC#.
    IntC = 3,
    /// INTD#.
    IntD = 4,
}

/// The read-only identity of a function, written into its header at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID (not 0xffff).
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Class code.
    pub class_code: PciClassCode,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Whether the device has functions other than 0 (header type bit 7).
    pub multi_function: bool,
    /// The legacy interrupt pin, or `None` when the function uses no INTx.
    pub interrupt_pin: Option<PciInterruptPin>,
}

/// What the configuration space knows of one BAR. Kept at the BAR's (low) index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BarInfo {
    size: u64,
    region_type: PciBarRegionType,
    prefetchable: bool,
    /// Where the VMM decodes the region now (may lag the register while the guest is mid-update or decoding is off).
    mapped_base: u64,
}

/// A function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    writable_bits: Vec<u32>,
    w1c_bits: Vec<u32>,
    bars: [Option<BarInfo>; NUM_BARS],
    /// Offset and length of the last capability in the chain.
    last_capability: Option<(usize, usize)>,
}

/// Saved guest-visible state of a [`PciConfiguration`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    registers: Vec<u32>,
    writable_bits: Vec<u32>,
    w1c_bits: Vec<u32>,
    bars: Vec<Option<BarInfo>>,
    last_capability: Option<(usize, usize)>,
}

/// Splits a guest access into (value, byte mask) within its register; `None` when the access is not 1, 2 or 4 bytes
/// naturally aligned inside one register.
pub(crate) fn access_mask(offset: u64, len: usize) -> Option<u32> {
    if !matches!(len, 1 | 2 | 4) || offset >= 4 || !offset.is_multiple_of(len as u64) {
        return None;
    }
    let bits = if len == 4 {
        u32::MAX
    } else {
        (1u32 << (len * 8)) - 1
    };
    Some(bits << (offset * 8))
}

/// The COMMAND bit that turns decoding of this region type on.
fn decode_bit(region_type: PciBarRegionType) -> u16 {
    if region_type.is_memory() {
        COMMAND_MEMORY_SPACE
    } else {
        COMMAND_IO_SPACE
    }
}

impl PciConfiguration {
    /// A configuration space with this identity, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Result<Self> {
        if header.vendor_id == 0xffff {
            return Err(ConfigurationError::InvalidVendorId);
        }
        Ok(Self::from_valid_header(header))
    }

    /// Builds the space for a header already known to be valid.
    pub(crate) fn from_valid_header(header: &PciHeader) -> Self {
        let mut config = Self {
            registers: vec![0; NUM_CONFIGURATION_REGISTERS],
            writable_bits: vec![0; NUM_CONFIGURATION_REGISTERS],
            w1c_bits: vec![0; NUM_CONFIGURATION_REGISTERS],
            bars: [None; NUM_BARS],
            last_capability: None,
        };
        config.registers[VENDOR_DEVICE_REG] =
            u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        config.set_header_masks();
        let class = header.class_code;
        config.registers[CLASS_REG] = u32::from_le_bytes([
            header.revision_id,
            class.prog_if,
            class.subclass,
            class.base_class,
        ]);
        let header_type = if header.multi_function {
            HEADER_TYPE_MULTI_FUNCTION
        } else {
            0
        };
        config.registers[HEADER_TYPE_REG] = u32::from(header_type) << 16;
        config.registers[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        let pin = header.interrupt_pin.map_or(0, |pin| pin as u32);
        config.registers[INTERRUPT_REG] = pin << 8;
        config
    }

    /// Sets the guest-writable and write-1-to-clear masks of the 64-byte header, BARs aside (they follow the BARs'
    /// sizes); everything else in the header is read-only.
    fn set_header_masks(&mut self) {
        for reg in 0..FIRST_CAPABILITY_OFFSET / 4 {
            if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
                continue;
            }
            self.writable_bits[reg] = match reg {
                COMMAND_STATUS_REG => COMMAND_WRITABLE_BITS,
                HEADER_TYPE_REG => HEADER_TYPE_REG_WRITABLE_BITS,
                INTERRUPT_REG => INTERRUPT_REG_WRITABLE_BITS,
                _ => 0,
            };
            self.w1c_bits[reg] = if reg == COMMAND_STATUS_REG {
                STATUS_W1C_BITS << 16
            } else {
                0
            };
        }
    }

    /// The register at index `reg` (offset `reg * 4`), or all-ones past the end of the space.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Applies a guest write of `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`, honouring the
    /// writable and write-1-to-clear masks. Returns the BARs the write moved, which the VMM must remap; invalid
    /// accesses are dropped.
    ///
    /// A BAR moves while its decoding is enabled in COMMAND once its new base is complete (for a 64-bit BAR, when the
    /// high half is written), or when COMMAND turns its decoding on. A BAR whose writable bits are all set is taken
    /// to be mid size-probe, so a BAR cannot be moved to the very top of its address space.
    pub fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogramming> {
        let Some(byte_mask) = access_mask(offset, data.len()) else {
            tracing::debug!(
                reg,
                offset,
                len = data.len(),
                "dropping misaligned PCI configuration write"
            );
            return Vec::new();
        };
        if reg >= NUM_CONFIGURATION_REGISTERS {
            tracing::debug!(
                reg,
                "dropping PCI configuration write past the configuration space"
            );
            return Vec::new();
        }
        let mut value = 0u32;
        for (i, byte) in data.iter().enumerate() {
            value |= u32::from(*byte) << ((offset as usize + i) * 8);
        }
        let old_command = self.command();
        self.write_masked(reg, value, byte_mask);
        self.reprogrammed_bars(reg, old_command)
    }

    fn write_masked(&mut self, reg: usize, value: u32, byte_mask: u32) {
        let writable = self.writable_bits[reg] & byte_mask;
        let w1c = self.w1c_bits[reg] & byte_mask;
        let old = self.registers[reg];
        self.registers[reg] = ((old & !writable) | (value & writable)) & !(value & w1c);
    }

    /// The vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.registers[VENDOR_DEVICE_REG] as u16
    }

    /// The device ID.
    pub fn device_id(&self) -> u16 {
        (self.registers[VENDOR_DEVICE_REG] >> 16) as u16
    }

    /// The class code.
    pub fn class_code(&self) -> PciClassCode {
        let [_, prog_if, subclass, base_class] = self.registers[CLASS_REG].to_le_bytes();
        PciClassCode::new(base_class, subclass, prog_if)
    }

    /// The header type byte (0, or 0x80 for a multi-function device).
    pub fn header_type(&self) -> u8 {
        (self.registers[HEADER_TYPE_REG] >> 16) as u8
    }

    /// The COMMAND register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_STATUS_REG] as u16
    }

    /// The STATUS register.
    pub fn status(&self) -> u16 {
        (self.registers[COMMAND_STATUS_REG] >> 16) as u16
    }

    /// The interrupt line the guest wrote (the IRQ it routed INTx to).
    pub fn interrupt_line(&self) -> u8 {
        self.registers[INTERRUPT_REG] as u8
    }

    /// The interrupt pin byte (0 = none, 1..=4 = INTA#..INTD#).
    pub fn interrupt_pin(&self) -> u8 {
        (self.registers[INTERRUPT_REG] >> 8) as u8
    }

    /// Sets the interrupt line, as firmware would before the guest runs.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.registers[INTERRUPT_REG] = (self.registers[INTERRUPT_REG] & !0xff) | u32::from(line);
    }

    /// Adds a BAR at the address the VMM allocated for it. The guest can then size and move it.
    pub fn add_pci_bar(&mut self, bar: &PciBarConfiguration) -> Result<()> {
        let index = bar.index;
        let is_64bit = bar.region_type.is_64bit();
        let last_index = if is_64bit {
            index.checked_add(1)
        } else {
            Some(index)
        };
        if last_index.is_none_or(|last| last >= NUM_BARS) {
            return Err(ConfigurationError::BarIndexOutOfRange(index));
        }
        if self.bar_register_owner(index).is_some()
            || (is_64bit && self.bar_register_owner(index + 1).is_some())
        {
            return Err(ConfigurationError::BarInUse(index));
        }
        let (min_size, max_size, space_end) = match bar.region_type {
            PciBarRegionType::IoRegion => (MIN_IO_BAR_SIZE, IO_SPACE_END, IO_SPACE_END),
            PciBarRegionType::Memory32BitRegion => (MIN_MEM_BAR_SIZE, MAX_MEM32_BAR_SIZE, 1 << 32),
            PciBarRegionType::Memory64BitRegion => (MIN_MEM_BAR_SIZE, 1 << 63, u64::MAX),
        };
        let size = bar.size;
        if !size.is_power_of_two() || size < min_size || size > max_size {
            return Err(ConfigurationError::BarSizeInvalid { index, size });
        }
        if !bar.addr.is_multiple_of(size) {
            return Err(ConfigurationError::BarAddressMisaligned {
                index,
                addr: bar.addr,
                size,
            });
        }
        if bar.addr.checked_add(size).is_none_or(|end| end > space_end) {
            return Err(ConfigurationError::BarAddressOutOfRange {
                index,
                addr: bar.addr,
                size,
            });
        }
        if bar.prefetchable && !bar.region_type.is_memory() {
            return Err(ConfigurationError::PrefetchableIo(index));
        }
        let reg = BAR0_REG + index;
        self.registers[reg] = low_register_value(bar);
        self.writable_bits[reg] = low_writable_mask(bar.region_type, size);
        if is_64bit {
            self.registers[reg + 1] = (bar.addr >> 32) as u32;
            self.writable_bits[reg + 1] = high_writable_mask(size);
        }
        self.bars[index] = Some(BarInfo {
            size,
            region_type: bar.region_type,
            prefetchable: bar.prefetchable,
            mapped_base: bar.addr,
        });
        Ok(())
    }

    /// The index of the BAR using BAR register `index` (itself, or the BAR below for a 64-bit high half).
    fn bar_register_owner(&self, index: usize) -> Option<usize> {
        if self.bars.get(index).copied().flatten().is_some() {
            return Some(index);
        }
        let below = index.checked_sub(1)?;
        match self.bars.get(below).copied().flatten() {
            Some(info) if info.region_type.is_64bit() => Some(below),
            _ => None,
        }
    }

    /// Where BAR `index` is decoded now, or `None` if there is no such BAR.
    pub fn bar_region(&self, index: usize) -> Option<PciBarRegion> {
        let info = self.bars.get(index).copied().flatten()?;
        Some(PciBarRegion {
            index,
            base: info.mapped_base,
            len: info.size,
            region_type: info.region_type,
            prefetchable: info.prefetchable,
        })
    }

    /// All BARs, as currently decoded.
    pub fn bar_regions(&self) -> Vec<PciBarRegion> {
        (0..NUM_BARS)
            .filter_map(|index| self.bar_region(index))
            .collect()
    }

    /// The address the guest has programmed into BAR `index` and whether the register holds a size probe (all
    /// writable bits set) rather than an address.
    fn programmed_address(&self, index: usize, info: &BarInfo) -> (u64, bool) {
        let reg = BAR0_REG + index;
        let low = self.registers[reg];
        let low_mask = low_writable_mask(info.region_type, info.size);
        let mut probe = low_mask != 0 && low & low_mask == low_mask;
        let mut addr = u64::from(low_address_bits(info.region_type, low));
        if info.region_type.is_64bit() {
            let high = self.registers[reg + 1];
            let high_mask = high_writable_mask(info.size);
            probe |= high_mask != 0 && high & high_mask == high_mask;
            addr |= u64::from(high) << 32;
        }
        (addr, probe)
    }

    fn decoding_enabled(&self, region_type: PciBarRegionType) -> bool {
        self.command() & decode_bit(region_type) != 0
    }

    /// After a write to `reg`, the BARs whose decoded address must change.
    ///
    /// A BAR moves only while its decoding is enabled in COMMAND and once its new base is complete: after a write to
    /// a 32-bit or I/O BAR, after the high half of a 64-bit BAR (guests write the low half first), or when COMMAND
    /// turns decoding on. A register holding the size-probe pattern is never taken for an address.
    fn reprogrammed_bars(&mut self, reg: usize, old_command: u16) -> Vec<BarReprogramming> {
        if reg == COMMAND_STATUS_REG {
            let turned_on = !old_command & self.command();
            let mut moved = Vec::new();
            for index in 0..NUM_BARS {
                if self.bars[index]
                    .is_some_and(|info| turned_on & decode_bit(info.region_type) != 0)
                {
                    moved.extend(self.move_bar_if_changed(index));
                }
            }
            return moved;
        }
        let Some(bar_reg) = reg
            .checked_sub(BAR0_REG)
            .filter(|&bar_reg| bar_reg < NUM_BARS)
        else {
            return Vec::new();
        };
        let Some(index) = self.bar_register_owner(bar_reg) else {
            return Vec::new();
        };
        let is_low_half_of_64bit =
            self.bars[index].is_some_and(|info| info.region_type.is_64bit()) && index == bar_reg;
        if is_low_half_of_64bit {
            return Vec::new();
        }
        self.move_bar_if_changed(index).into_iter().collect()
    }

    fn move_bar_if_changed(&mut self, index: usize) -> Option<BarReprogramming> {
        let info = self.bars[index]?;
        if !self.decoding_enabled(info.region_type) {
            return None;
        }
        let (new_base, probe) = self.programmed_address(index, &info);
        if probe || new_base == info.mapped_base {
            return None;
        }
        let space_end = match info.region_type {
            PciBarRegionType::IoRegion => IO_SPACE_END,
            _ => u64::MAX,
        };
        if new_base
            .checked_add(info.size)
            .is_none_or(|end| end > space_end)
        {
            tracing::warn!(
                index,
                new_base,
                size = info.size,
                "guest programmed a BAR outside its address space; not moving it"
            );
            return None;
        }
        self.bars[index] = Some(BarInfo {
            mapped_base: new_base,
            ..info
        });
        Some(BarReprogramming {
            bar: index,
            old_base: info.mapped_base,
            new_base,
            len: info.size,
            region_type: info.region_type,
        })
    }

    /// Undoes the bookkeeping of a move the VMM could not carry out, so the BAR is known to be decoded at its old
    /// base again (a later guest write retries the move).
    pub fn revert_bar_reprogramming(&mut self, moved: &BarReprogramming) {
        if let Some(Some(info)) = self.bars.get_mut(moved.bar) {
            if info.mapped_base == moved.new_base {
                info.mapped_base = moved.old_base;
            }
        }
    }

    /// Links a capability into the list and returns its offset in the configuration space.
    ///
    /// Capabilities are placed one after another from offset 0x40, each 4-byte aligned, and must end within the
    /// 256-byte standard space. The next pointers only ever point forward, so the chain cannot loop.
    pub fn add_capability(&mut self, capability: &dyn PciCapability) -> Result<usize> {
        let body = capability.body();
        let needed = body.len().saturating_add(2);
        let offset = match self.last_capability {
            None => FIRST_CAPABILITY_OFFSET,
            Some((last, len)) => (last + len).next_multiple_of(4),
        };
        let available = STANDARD_SPACE_SIZE.saturating_sub(offset);
        if needed > available {
            return Err(ConfigurationError::CapabilitySpaceFull { needed, available });
        }
        self.set_byte(offset, capability.id().0);
        self.set_byte(offset + 1, 0);
        for (i, byte) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *byte);
        }
        for (i, mask) in capability
            .writable_bits()
            .iter()
            .take(body.len())
            .enumerate()
        {
            self.set_writable_byte(offset + 2 + i, *mask);
        }
        match self.last_capability {
            Some((last, _)) => self.set_byte(last + 1, offset as u8),
            None => self.set_byte(CAPABILITY_POINTER_REG * 4, offset as u8),
        }
        self.registers[COMMAND_STATUS_REG] |= u32::from(STATUS_CAPABILITIES_LIST) << 16;
        self.last_capability = Some((offset, needed));
        Ok(offset)
    }

    /// The capabilities in list order, as (ID, offset). The walk is bounded and only follows forward pointers.
    pub fn capabilities(&self) -> Vec<(PciCapabilityId, usize)> {
        let mut list = Vec::new();
        if self.status() & STATUS_CAPABILITIES_LIST == 0 {
            return list;
        }
        let mut offset = usize::from(self.byte(CAPABILITY_POINTER_REG * 4) & !0x3);
        let mut previous = 0;
        while offset >= FIRST_CAPABILITY_OFFSET
            && offset > previous
            && list.len() < MAX_CAPABILITIES
        {
            list.push((PciCapabilityId(self.byte(offset)), offset));
            previous = offset;
            offset = usize::from(self.byte(offset + 1) & !0x3);
        }
        list
    }

    /// The offset of the first capability with this ID.
    pub fn find_capability(&self, id: PciCapabilityId) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find_map(|(cap_id, offset)| (cap_id == id).then_some(offset))
    }

    /// The byte at `offset` (all-ones past the end of the space).
    pub fn byte(&self, offset: usize) -> u8 {
        (self.read_reg(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        if let Some(reg) = self.registers.get_mut(offset / 4) {
            let shift = (offset % 4) * 8;
            *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
        }
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        if let Some(reg) = self.writable_bits.get_mut(offset / 4) {
            let shift = (offset % 4) * 8;
            *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
        }
    }

    /// The guest-visible state, for carrying across a reboot or into a snapshot.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            registers: self.registers.clone(),
            writable_bits: self.writable_bits.clone(),
            w1c_bits: self.w1c_bits.clone(),
            bars: self.bars.to_vec(),
            last_capability: self.last_capability,
        }
    }

    /// Rebuilds a configuration space from a saved state, after checking it is consistent.
    pub fn from_state(state: &PciConfigurationState) -> Result<Self> {
        let invalid = ConfigurationError::InvalidState;
        if state.registers.len() != NUM_CONFIGURATION_REGISTERS
            || state.writable_bits.len() != NUM_CONFIGURATION_REGISTERS
            || state.w1c_bits.len() != NUM_CONFIGURATION_REGISTERS
        {
            return Err(invalid("register arrays must have 1024 entries"));
        }
        if state.bars.len() != NUM_BARS {
            return Err(invalid("there must be 6 BAR entries"));
        }
        if state.registers[VENDOR_DEVICE_REG] as u16 == 0xffff {
            return Err(invalid("vendor ID is 0xffff"));
        }
        if let Some((offset, len)) = state.last_capability {
            if offset < FIRST_CAPABILITY_OFFSET
                || offset % 4 != 0
                || offset.saturating_add(len) > STANDARD_SPACE_SIZE
            {
                return Err(invalid("last capability lies outside the standard space"));
            }
        }
        let mut config = Self {
            registers: state.registers.clone(),
            writable_bits: state.writable_bits.clone(),
            w1c_bits: state.w1c_bits.clone(),
            bars: [None; NUM_BARS],
            last_capability: state.last_capability,
        };
        // The header's masks are fixed by the specification, not by the saved state.
        config.set_header_masks();
        // Re-add each BAR through the same checks as at creation, then put back the guest's register values and the
        // base the VMM decodes at.
        for (index, info) in state.bars.iter().enumerate() {
            let Some(info) = info else { continue };
            let (low, high) = (
                config.registers[BAR0_REG + index],
                config.registers.get(BAR0_REG + index + 1).copied(),
            );
            let bar = PciBarConfiguration {
                index,
                addr: info.mapped_base,
                size: info.size,
                region_type: info.region_type,
                prefetchable: info.prefetchable,
            };
            config
                .add_pci_bar(&bar)
                .map_err(|_| invalid("a BAR is out of range, overlapping or malformed"))?;
            let flag_bits =
                low_register_value(&bar) & !low_writable_mask(info.region_type, info.size);
            config.registers[BAR0_REG + index] =
                (low & low_writable_mask(info.region_type, info.size)) | flag_bits;
            if let (true, Some(high)) = (info.region_type.is_64bit(), high) {
                config.registers[BAR0_REG + index + 1] = high & high_writable_mask(info.size);
            }
        }
        for (index, reg) in (BAR0_REG..BAR0_REG + NUM_BARS).enumerate() {
            if config.bar_register_owner(index).is_none() {
                config.registers[reg] = 0;
                config.writable_bits[reg] = 0;
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
#[path = "configuration_tests.rs"]
mod tests;
