//! Atrium's legacy and platform devices.
//!
//! Every device here is a plain state machine that knows its register offsets, never its address: the VMM places it
//! on a [`Bus`] (port I/O or MMIO) at a base address, and the bus hands it offsets relative to that base. Devices
//! raise interrupts through [`InterruptLine`] or [`MsiSender`] and ask for a VM power-off or reset through
//! [`PlatformEvents`]; nothing in this crate knows about KVM.
//!
//! Each device can report its guest-visible state as a `*State` value (kept apart from live handles such as writers
//! or callbacks) and be rebuilt or updated from one, so the VMM can carry state across a guest reboot or, later,
//! into a snapshot.

pub mod acpi;
pub mod bus;
pub mod cmos;
pub mod cpu_hotplug;
pub mod debug_console;
pub mod debug_exit;
pub mod fw_cfg;
pub mod ged;
pub mod hotplug;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod memory_hotplug;
pub mod pci_hotplug;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod port80;
pub mod port92;
pub mod serial;

mod host_time;

pub use bus::{Bus, BusDevice, BusError};
pub use cpu_hotplug::CpuHotplugController;
pub use fw_cfg::{FwCfg, FwCfgError, GuestMemoryAccess};
pub use ged::{Ged, GedEvent};
pub use interrupt::{InterruptLine, LevelSource, MsiMessage, MsiSender, SharedLevelLine};
pub use memory_hotplug::MemoryHotplugController;
pub use pci_hotplug::PciHotplugController;
pub use pic::{pic_bus_devices, pic_irq_line, Pic, PicOutput, PicState};
pub use pit::{pit_bus_devices, Pit, PitError, PitState};
pub use platform::PlatformEvents;
