//! x86_64 boot and platform setup.
//!
//! | module | what it produces |
//! |---|---|
//! | [`layout`] | the fixed guest-physical memory map and port numbers |
//! | `e820` | guest RAM regions and the e820 memory map |
//! | `boot` | the Linux zero page or the PVH start info, and initramfs placement |
//! | [`regs`] | entry registers, GDT/IDT, boot page tables, FPU, MSRs, LAPIC LINT pins |
//! | [`cpuid`] | per-vCPU CPUID adjustments (APIC IDs, topology) |
//! | [`mptable`] | the Intel MultiProcessor table |
//! | [`acpi`] | RSDP, XSDT, FADT, MADT, DSDT (PCI host bridge, hotplug, power button) and MCFG |

pub mod acpi;
mod boot;
pub mod cpuid;
mod e820;
pub mod layout;
pub mod mptable;
pub mod regs;

pub use boot::{configure_system, initramfs_load_addr, BootProtocol, BootSetup, Error};
pub use e820::{arch_memory_regions, e820_table, E820Entry, E820_RAM, E820_RESERVED};
