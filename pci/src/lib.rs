//! Atrium's PCI layer: configuration space, BARs, MSI-X, the configuration access mechanisms and address allocation.
//!
//! - [`PciConfiguration`] is one function's 4 KiB configuration space: the type-0 header, BARs with the size probe,
//!   and the capability list. Guest writes that move a BAR come back as [`BarReprogramming`] values.
//! - [`MsixCapability`] and [`MsixConfig`] implement MSI-X: the capability, the vector table and the pending-bit
//!   array, delivering through the VMM's [`MsiDelivery`].
//! - [`PciDevice`] is what every function implements; [`PciBarBusDevice`] puts one of its BARs on a device bus.
//! - [`PciBus`] is bus 0 with a host bridge at 00.0; [`PciConfigIo`] (ports 0xCF8..0xCFF) and [`PciConfigMmio`]
//!   (ECAM) give the guest access to it and hand BAR moves to the VMM's [`BarMover`].
//! - [`AddressAllocator`] hands out BAR addresses from the MMIO and I/O windows.
//!
//! Nothing here knows about KVM or the VMM: the VMM implements [`MsiDelivery`] and [`BarMover`] and places the bus
//! devices. Every guest-reachable path validates its input; bad accesses read all-ones or are dropped.

mod access;
mod allocator;
mod bar;
mod bus;
mod capability;
mod configuration;
mod device;
mod msix;

#[cfg(test)]
mod hostile_tests;

pub use access::{
    BarMover, PciConfigIo, PciConfigMmio, ECAM_BUS_SIZE, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_SIZE,
};
pub use allocator::{AddressAllocator, AllocatorError};
pub use bar::{
    BarReprogramming, PciBarConfiguration, PciBarRegion, PciBarRegionType, IO_SPACE_END,
    MAX_MEM32_BAR_SIZE, MIN_IO_BAR_SIZE, MIN_MEM_BAR_SIZE, NUM_BARS,
};
pub use bus::{
    PciAddress, PciBus, PciBusError, PciHostBridge, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_SLOT,
    HOST_BRIDGE_VENDOR_ID, NUM_DEVICE_SLOTS, NUM_FUNCTIONS,
};
pub use capability::{PciCapability, PciCapabilityId};
pub use configuration::{
    ConfigurationError, PciClassCode, PciConfiguration, PciConfigurationState, PciHeader,
    PciInterruptPin, BAR0_REG, CAPABILITY_POINTER_REG, CLASS_REG, COMMAND_BUS_MASTER,
    COMMAND_INTERRUPT_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, COMMAND_STATUS_REG,
    CONFIGURATION_SPACE_SIZE, FIRST_CAPABILITY_OFFSET, HEADER_TYPE_REG, INTERRUPT_REG,
    NUM_CONFIGURATION_REGISTERS, STANDARD_SPACE_SIZE, STATUS_CAPABILITIES_LIST, SUBSYSTEM_REG,
    VENDOR_DEVICE_REG,
};
pub use device::{PciBarBusDevice, PciDevice, PciDeviceHandle};
pub use msix::{
    split_bir_offset, MsiDelivery, MsixCapability, MsixConfig, MsixConfigState, MsixError,
    MsixTableEntry, MsixTrigger, MAX_MSIX_VECTORS, MSIX_ENABLE, MSIX_FUNCTION_MASK,
    MSIX_TABLE_ENTRY_SIZE,
};
