//! How the guest reaches configuration space: mechanism #1 (ports 0xCF8..0xCFF) and ECAM (a memory window).
//!
//! Both are [`BusDevice`]s the VMM places on its port and MMIO buses. A configuration write that moves a BAR is
//! handed to the VMM's [`BarMover`] once every PCI lock is released; if the move fails the BAR is recorded as still
//! decoded at its old base, so a later guest write retries it.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::{BusDevice, PlatformEvents};

use crate::bar::PciBarRegionType;
use crate::bus::{PciAddress, PciBus};
use crate::configuration::{access_mask, CONFIGURATION_SPACE_SIZE};
use crate::device::lock_device;

/// First port of configuration mechanism #1 (the address register; the data port is at 0xCFC).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Number of ports mechanism #1 decodes (0xCF8..=0xCFF).
pub const PCI_CONFIG_IO_PORT_SIZE: u64 = 8;
/// Bytes of ECAM window per bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Offset of the data port from 0xCF8.
const DATA_PORT_OFFSET: u64 = 4;
/// CONFIG_ADDRESS bit 31: configuration cycles are enabled.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits the guest can set: enable, bus, device, function, register (bits 30:24 and 1:0 read 0).
const CONFIG_ADDRESS_WRITABLE: u32 = 0x80ff_fffc;

/// Moves a BAR's region on the VMM's MMIO or port bus after the guest reprograms it.
pub trait BarMover: Send + Sync {
    /// The region of `len` bytes at `old_base` now decodes at `new_base`. Errors are logged and the move is retried
    /// on the guest's next write to that BAR.
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        len: u64,
        region: PciBarRegionType,
    ) -> Result<(), String>;
}

/// What both access mechanisms share: the bus and the mover.
struct ConfigAccess {
    bus: Arc<Mutex<PciBus>>,
    mover: Arc<dyn BarMover>,
}

impl ConfigAccess {
    fn lock_bus(&self) -> MutexGuard<'_, PciBus> {
        // The bus holds only the slot table; it is consistent even if a holder panicked.
        self.bus
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads `data.len()` bytes at byte `offset` of `address`'s configuration space; all-ones for an absent function
    /// or an invalid access.
    fn read(&self, address: PciAddress, offset: u64, data: &mut [u8]) {
        let Some(byte_mask) = access_mask(offset % 4, data.len()) else {
            data.fill(0xff);
            return;
        };
        let function = self.lock_bus().function(address);
        let Some(function) = function else {
            data.fill(0xff);
            return;
        };
        let value = lock_device(&function).read_config_register((offset / 4) as usize) & byte_mask;
        let bytes = (value >> ((offset % 4) * 8)).to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    /// Writes `data` at byte `offset` of `address`'s configuration space and carries out any BAR moves.
    fn write(&self, address: PciAddress, offset: u64, data: &[u8]) {
        if access_mask(offset % 4, data.len()).is_none() {
            return;
        }
        let function = self.lock_bus().function(address);
        let Some(function) = function else {
            return;
        };
        let moves =
            lock_device(&function).write_config_register((offset / 4) as usize, offset % 4, data);
        for moved in moves {
            if let Err(err) =
                self.mover
                    .move_bar(moved.old_base, moved.new_base, moved.len, moved.region_type)
            {
                tracing::warn!(
                    %address,
                    bar = moved.bar,
                    old_base = moved.old_base,
                    new_base = moved.new_base,
                    %err,
                    "could not move a PCI BAR; it stays at its old base"
                );
                lock_device(&function)
                    .config_mut()
                    .revert_bar_reprogramming(&moved);
            }
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (dword accesses only) and CONFIG_DATA at 0xCFC..0xCFF.
///
/// Only the 256-byte standard space is reachable this way (the AMD extension putting register bits 11:8 in
/// CONFIG_ADDRESS bits 27:24 is not decoded); the extended space needs ECAM.
///
/// A byte written to 0xCF9 is the chipset's reset control register (as on PIIX and ICH chipsets, where firmware
/// resets the machine by writing 0x06 there): with [`PciConfigIo::with_reset_control`], a write with bit 2 (reset
/// CPU) set asks for a machine reset.
pub struct PciConfigIo {
    access: ConfigAccess,
    config_address: u32,
    reset: Option<Arc<dyn PlatformEvents>>,
}

/// Offset of the reset control register (port 0xCF9) in the range.
const RESET_CONTROL_OFFSET: u64 = 1;
/// Reset control bit 2: reset the CPU (bit 1, the reset type, only chooses how hard).
const RESET_CONTROL_RESET_CPU: u8 = 1 << 2;

impl PciConfigIo {
    /// The port device for `bus`, moving BARs through `mover`.
    pub fn new(bus: Arc<Mutex<PciBus>>, mover: Arc<dyn BarMover>) -> Self {
        Self {
            access: ConfigAccess { bus, mover },
            config_address: 0,
            reset: None,
        }
    }

    /// Makes byte writes to 0xCF9 reset the machine through `events` when they set the reset-CPU bit.
    pub fn with_reset_control(mut self, events: Arc<dyn PlatformEvents>) -> Self {
        self.reset = Some(events);
        self
    }

    /// The function and register byte offset CONFIG_ADDRESS selects, or `None` when configuration cycles are off.
    fn target(&self) -> Option<(PciAddress, u64)> {
        let address = self.config_address;
        if address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let function = PciAddress::new(
            (address >> 16) as u8,
            ((address >> 11) & 0x1f) as u8,
            ((address >> 8) & 0x7) as u8,
        )?;
        Some((function, u64::from(address & 0xfc)))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            DATA_PORT_OFFSET..PCI_CONFIG_IO_PORT_SIZE => match self.target() {
                Some((function, register)) => {
                    self.access
                        .read(function, register + (offset - DATA_PORT_OFFSET), data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut bytes = [0; 4];
                bytes.copy_from_slice(data);
                self.config_address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_WRITABLE;
            }
            DATA_PORT_OFFSET..PCI_CONFIG_IO_PORT_SIZE => {
                if let Some((function, register)) = self.target() {
                    self.access
                        .write(function, register + (offset - DATA_PORT_OFFSET), data);
                }
            }
            RESET_CONTROL_OFFSET if data.len() == 1 && data[0] & RESET_CONTROL_RESET_CPU != 0 => {
                if let Some(events) = &self.reset {
                    events.reset();
                }
            }
            // Other byte and word accesses to 0xCF8..0xCFB are not configuration cycles (firmware probes the
            // mechanism with them); drop them.
            _ => {}
        }
    }
}

/// ECAM (PCI Express enhanced configuration access): a memory window where offset
/// `bus << 20 | device << 15 | function << 12 | register` reaches a function's 4 KiB configuration space.
pub struct PciConfigMmio {
    access: ConfigAccess,
    window_size: u64,
}

impl PciConfigMmio {
    /// The ECAM device for `bus`, decoding buses 0 to `last_bus` (the window is `(last_bus + 1) MiB`; 255 gives the
    /// full 256 MiB), moving BARs through `mover`.
    pub fn new(bus: Arc<Mutex<PciBus>>, mover: Arc<dyn BarMover>, last_bus: u8) -> Self {
        Self {
            access: ConfigAccess { bus, mover },
            window_size: (u64::from(last_bus) + 1) * ECAM_BUS_SIZE,
        }
    }

    /// Size of the window to place on the MMIO bus.
    pub fn window_size(&self) -> u64 {
        self.window_size
    }

    /// The function and register byte offset at `offset` in the window.
    fn target(&self, offset: u64) -> Option<(PciAddress, u64)> {
        if offset >= self.window_size {
            return None;
        }
        let function = PciAddress::new(
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
        )?;
        Some((function, offset % CONFIGURATION_SPACE_SIZE as u64))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((function, register)) => self.access.read(function, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((function, register)) = self.target(offset) {
            self.access.write(function, register, data);
        }
    }
}

#[cfg(test)]
#[path = "access_tests.rs"]
mod tests;
