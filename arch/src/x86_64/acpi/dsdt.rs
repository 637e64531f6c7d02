//! The DSDT: the AML namespace the guest's ACPI interpreter loads.
//!
//! It holds the `_S5_` sleep type the guest writes to the sleep control register to power off,
//! and in `\_SB_` the COM1 UART, so the guest finds its console through ACPI, the PCI host
//! bridge with its hotplug slots and its motherboard resources (the `pci` and `pci_hotplug`
//! modules), the power button and the Generic Event Device that signals it and hotplug (`ged`),
//! the processor container (`cpu_hotplug`) and the memory hotplug controller
//! (`memory_hotplug`).

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Name, Package, ResourceTemplate, Scope, IO, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::super::layout::{COM1_IRQ, COM1_PORT};
use super::{cpu_hotplug, ged, memory_hotplug, oem_table_id, pci, OEM_ID, OEM_REVISION};

/// DSDT revision 2 and later use 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// SLP_TYP for S5 (soft off); the guest writes `SLP_EN | SLP_TYP << 2` = 0x34.
const SLP_TYP_S5: u8 = 5;
/// COM1 occupies eight consecutive ports.
const COM1_PORTS: u8 = 8;

/// `Name (_S5_, Package () { 5, 0, 0, 0 })`: SLP_TYPa, SLP_TYPb and two reserved values.
fn s5() -> Vec<u8> {
    let mut aml = Vec::new();
    let values: [&dyn Aml; 4] = [&SLP_TYP_S5, &0u8, &0u8, &0u8];
    Name::new("_S5_".into(), &Package::new(values.to_vec())).to_aml_bytes(&mut aml);
    aml
}

/// `Device (COM1) { _HID "PNP0501", _UID 0, _CRS { IO 0x3f8/8, IRQ 4 } }` for `\_SB_`.
fn com1() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &ZERO);
    let ports = IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORTS);
    // Consumer, edge triggered, active high, exclusive: an ISA interrupt.
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ports, &irq]));
    let mut aml = Vec::new();
    Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut aml);
    aml
}

/// `Scope (\_SB_)` with COM1, the PCI host bridge, the motherboard resources, the power
/// button, the processors, the memory hotplug controller and, last, the GED that refers to
/// them.
fn system_bus(pci_mmio64: (u64, u64), max_cpus: u8, memory_slots: u32) -> Vec<u8> {
    let mut devices = com1();
    devices.extend_from_slice(&pci::host_bridge(pci_mmio64));
    devices.extend_from_slice(&pci::motherboard_resources());
    devices.extend_from_slice(&ged::power_button());
    devices.extend_from_slice(&cpu_hotplug::cpus(max_cpus));
    devices.extend_from_slice(&memory_hotplug::memory_hotplug(memory_slots));
    devices.extend_from_slice(&ged::ged());
    Scope::raw("\\_SB_".into(), devices)
}

/// The complete DSDT, header included, with the PCI 64-bit MMIO window `pci_mmio64` as
/// `(start, size)`, `max_cpus` possible CPUs and `memory_slots` memory hotplug slots. The caller
/// checks that the window is not empty and ends inside the 64-bit address space, and that
/// `memory_slots` is at most `hotplug::MAX_SLOTS`.
pub(super) fn dsdt(pci_mmio64: (u64, u64), max_cpus: u8, memory_slots: u32) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(b"DSDT"),
        OEM_REVISION,
    );
    table.append_slice(&s5());
    table.append_slice(&system_bus(pci_mmio64, max_cpus, memory_slots));
    table.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn s5_package_encoding() {
        // NameOp "_S5_" PackageOp len=7 count=4 BytePrefix 5 Zero Zero Zero
        assert_eq!(
            s5(),
            vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn com1_resources() {
        let aml = com1();
        assert!(aml.starts_with(&[0x5b, 0x82]), "a Device");
        assert!(contains(&aml, b"COM1"));
        // _HID: EISAID("PNP0501") = 0x0105d041 as a DWord constant.
        assert!(contains(
            &aml,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        ));
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8).
        assert!(contains(
            &aml,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        // Extended interrupt: consumer, edge, one interrupt, number 4.
        assert!(contains(
            &aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
        ));
    }

    #[test]
    fn one_system_bus_scope_with_every_device() {
        let aml = system_bus((4 << 30, 64 << 30), 3, 2);
        assert_eq!(aml[0], 0x10, "ScopeOp");
        assert_eq!(aml.windows(5).filter(|w| w == b"\\_SB_").count(), 1);
        let com1 = com1();
        let pci0 = pci::host_bridge((4 << 30, 64 << 30));
        let mres = pci::motherboard_resources();
        let pwrb = ged::power_button();
        let cpus = cpu_hotplug::cpus(3);
        let mhpc = memory_hotplug::memory_hotplug(2);
        let ged0 = ged::ged();
        let devices = [com1, pci0, mres, pwrb, cpus, mhpc, ged0].concat();
        assert!(aml.ends_with(&devices));
    }

    #[test]
    fn dsdt_header_and_checksum() {
        let t = dsdt((5 << 30, 64 << 30), 4, 1);
        assert_eq!(&t[0..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize,
            t.len()
        );
        assert_eq!(t[8], DSDT_REVISION);
        assert_eq!(&t[10..16], b"ATRIUM");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(contains(&t, b"_S5_"));
        assert!(contains(&t, b"PCI0"));
        assert!(contains(&t, b"MRES"));
        for name in [
            b"GED0", b"PWRB", b"CPUS", b"C003", b"MHPC", b"M000", b"S1F_",
        ] {
            assert!(contains(&t, name), "{}", String::from_utf8_lossy(name));
        }
        assert!(!contains(&t, b"C004"));
        assert!(!contains(&t, b"M001"));
    }
}
