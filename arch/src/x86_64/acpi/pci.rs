//! The PCI parts of the DSDT: the host bridge of segment 0 (`PCI0`) and the motherboard
//! resources device (`MRES`) that reserves the ECAM area the MCFG points at.
//!
//! `PCI0` decodes bus 0 only, the configuration ports, all I/O ports outside them, the 32-bit
//! MMIO window and the 64-bit MMIO window. Its `_PRT` routes INTA#-INTD# of slots 1-31 to GSIs
//! 16-23 as [`pci_intx_gsi`] computes; with a zero source the routing is to a global system
//! interrupt that is level triggered and active low, so the guest programs the IOAPIC pins that
//! way. Its `_OSC` hands the guest native control of PCIe hot plug, SHPC hot plug, PME, AER and
//! the PCIe capability structure. Its hotplug slot devices and methods come from the
//! `pci_hotplug` module.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Else, Equal,
    If, Local, Memory32Fixed, Method, Name, NotEqual, Or, Package, PackageBuilder, Path,
    ResourceTemplate, Return, Store, Uuid, IO, ZERO,
};
use acpi_tables::Aml;

use super::super::layout::{
    pci_intx_gsi, PCI_IO_CONFIG_PORT, PCI_MAX_SLOT, PCI_MMCONFIG_SIZE, PCI_MMCONFIG_START,
    PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use super::encoded::Serialized;
use super::pci_hotplug;

/// The configuration mechanism #1 uses eight ports (address and data registers).
const PCI_IO_CONFIG_PORTS: u8 = 8;
/// Highest I/O port.
const IO_PORT_MAX: u16 = 0xffff;
/// `_PRT` address of every function of a device: the device number in the high word.
const PRT_ALL_FUNCTIONS: u32 = 0xffff;
/// INTA# to INTD#.
const INTX_PINS: u8 = 4;

/// The PCI Firmware Specification's `_OSC` UUID for PCI and PCIe host bridges.
const PCI_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// The `_OSC` revision this method understands.
const PCI_OSC_REVISION: u8 = 1;
/// `_OSC` control field bits granted to the OS: PCIe native hot plug (0), SHPC native hot plug
/// (1), PCIe native PME (2), PCIe AER (3) and PCIe capability structure control (4).
const PCI_OSC_GRANTED: u8 = 0x1f;
/// `_OSC` status (first DWORD) bits.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;

/// `Device (PCI0)` for `\_SB_`, with the 64-bit MMIO window `mmio64` as `(start, size)`. The
/// caller checks that the window ends inside the 64-bit address space and is not empty.
pub(super) fn host_bridge(mmio64: (u64, u64)) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &ZERO);
    let seg = Name::new("_SEG".into(), &ZERO);
    let uid = Name::new("_UID".into(), &ZERO);
    let bbn = Name::new("_BBN".into(), &ZERO);
    let crs = host_bridge_resources(mmio64);
    let prt = routing_table();
    let osc = osc();
    let hotplug = Serialized(pci_hotplug::objects());
    let device = Device::new(
        "PCI0".into(),
        vec![
            &hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt, &osc, &hotplug,
        ],
    );
    let mut aml = Vec::new();
    device.to_aml_bytes(&mut aml);
    aml
}

/// `_CRS` of the host bridge: what it decodes for the devices behind it.
fn host_bridge_resources(mmio64: (u64, u64)) -> Name {
    let (mmio64_start, mmio64_size) = mmio64;
    let buses = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = IO::new(
        PCI_IO_CONFIG_PORT,
        PCI_IO_CONFIG_PORT,
        1,
        PCI_IO_CONFIG_PORTS,
    );
    let ports_below = AddressSpace::<u16>::new_io(0, PCI_IO_CONFIG_PORT - 1, None);
    let ports_above = AddressSpace::<u16>::new_io(
        PCI_IO_CONFIG_PORT + u16::from(PCI_IO_CONFIG_PORTS),
        IO_PORT_MAX,
        None,
    );
    // The 32-bit window lies below 4 GiB (asserted at compile time in `layout`): DWord values.
    let mmio32_start = PCI_MMIO32_START as u32;
    let mmio32_end = (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32;
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        mmio32_start,
        mmio32_end,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        mmio64_start,
        mmio64_start + (mmio64_size - 1),
        None,
    );
    Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &buses,
            &config_ports,
            &ports_below,
            &ports_above,
            &mmio32,
            &mmio64,
        ]),
    )
}

/// `_PRT`: `Package { 0xSSSSFFFF, pin, Zero, gsi }` for every pin of every slot.
fn routing_table() -> Name {
    let mut table = PackageBuilder::new();
    for slot in 1..=PCI_MAX_SLOT {
        for pin in 0..INTX_PINS {
            // Every slot in 1..=31 and pin in 0..4 has a GSI.
            let Some(gsi) = pci_intx_gsi(slot, pin) else {
                continue;
            };
            let address = (u32::from(slot) << 16) | PRT_ALL_FUNCTIONS;
            table.add_element(&Package::new(vec![&address, &pin, &ZERO, &gsi]));
        }
    }
    Name::new("_PRT".into(), &table)
}

/// `_OSC (Arg0 UUID, Arg1 revision, Arg2 count, Arg3 capabilities buffer)`:
///
/// ```text
/// CreateDWordField (Arg3, 0, CDW1)
/// If (Arg0 == ToUUID (PCI_OSC_UUID)) {
///     CreateDWordField (Arg3, 8, CDW3)
///     Local0 = CDW3                       // what the OS asks for
///     CDW3 = Local0 & PCI_OSC_GRANTED     // what it gets
///     If (Arg1 != 1) { CDW1 |= OSC_UNRECOGNIZED_REVISION }
///     If (CDW3 != Local0) { CDW1 |= OSC_CAPABILITIES_MASKED }
/// } Else {
///     CDW1 |= OSC_UNRECOGNIZED_UUID
/// }
/// Return (Arg3)
/// ```
///
/// The support field (second DWORD) is left as the OS wrote it: every feature it declares is
/// fine with this platform.
fn osc() -> Serialized {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let requested = Local(0);

    let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &0u8);
    let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);
    let save_request = Store::new(&requested, &cdw3);
    let grant = And::new(&cdw3, &requested, &PCI_OSC_GRANTED);
    let other_revision = NotEqual::new(&Arg(1), &PCI_OSC_REVISION);
    let flag_revision = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let check_revision = If::new(&other_revision, vec![&flag_revision]);
    let masked = NotEqual::new(&cdw3, &requested);
    let flag_masked = Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let check_masked = If::new(&masked, vec![&flag_masked]);
    let uuid = Uuid::new(PCI_OSC_UUID);
    let is_pci = Equal::new(&Arg(0), &uuid);
    let pci = If::new(
        &is_pci,
        vec![
            &create_cdw3,
            &save_request,
            &grant,
            &check_revision,
            &check_masked,
        ],
    );
    let flag_uuid = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let other = Else::new(vec![&flag_uuid]);
    let ret = Return::new(&Arg(3));
    let method = Method::new(
        "_OSC".into(),
        4,
        false,
        vec![&create_cdw1, &pci, &other, &ret],
    );
    let mut aml = Vec::new();
    method.to_aml_bytes(&mut aml);
    Serialized(aml)
}

/// `Device (MRES)` for `\_SB_`: motherboard resources (PNP0C02) holding the ECAM area, so the
/// guest accepts the MCFG's region as reserved by the firmware.
pub(super) fn motherboard_resources() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    // The ECAM area lies below 4 GiB (asserted at compile time in `layout`) and is 256 MiB long.
    let ecam = Memory32Fixed::new(true, PCI_MMCONFIG_START as u32, PCI_MMCONFIG_SIZE as u32);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ecam]));
    let mut aml = Vec::new();
    Device::new("MRES".into(), vec![&hid, &crs]).to_aml_bytes(&mut aml);
    aml
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// `Name (<name>, EISAID (...))` with the EISA ID's DWord value.
    fn eisa_name(name: &[u8; 4], id: u32) -> Vec<u8> {
        let mut v = vec![0x08];
        v.extend_from_slice(name);
        v.push(0x0c);
        v.extend_from_slice(&id.to_le_bytes());
        v
    }

    #[test]
    fn host_bridge_identity() {
        let aml = host_bridge((4 * GIB, 64 * GIB));
        assert_eq!(&aml[0..2], [0x5b, 0x82], "a Device");
        assert!(contains(&aml, b"PCI0"));
        // EISAID("PNP0A08") = 0x080ad041, EISAID("PNP0A03") = 0x030ad041.
        assert!(contains(&aml, &eisa_name(b"_HID", 0x080a_d041)));
        assert!(contains(&aml, &eisa_name(b"_CID", 0x030a_d041)));
        for name in [b"_ADR", b"_SEG", b"_UID", b"_BBN"] {
            let zero = [&[0x08][..], &name[..], &[0x00]].concat();
            assert!(contains(&aml, &zero), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn host_bridge_windows() {
        let aml = host_bridge((6 * GIB, 64 * GIB));
        // WordBusNumber: producer, min/max fixed, bus 0..=0, length 1.
        assert!(contains(
            &aml,
            &[0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        ));
        // IO (Decode16, 0xcf8, 0xcf8, 1, 8).
        assert!(contains(
            &aml,
            &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
        ));
        // WordIO 0x0000..=0x0cf7 (length 0x0cf8) and 0x0d00..=0xffff (length 0xf300).
        assert!(contains(
            &aml,
            &[0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0, 0, 0xf7, 0x0c, 0, 0, 0xf8, 0x0c]
        ));
        assert!(contains(
            &aml,
            &[0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0x00, 0x0d, 0xff, 0xff, 0, 0, 0x00, 0xf3]
        ));
        // DWordMemory, cacheable, read-write, 0xc0000000..=0xdfffffff.
        let mut dword = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x03];
        for v in [0u32, 0xc000_0000, 0xdfff_ffff, 0, 0x2000_0000] {
            dword.extend_from_slice(&v.to_le_bytes());
        }
        assert!(contains(&aml, &dword));
        // QWordMemory, cacheable, read-write, 6 GiB..70 GiB.
        let mut qword = vec![0x8a, 0x2b, 0x00, 0x00, 0x0c, 0x03];
        for v in [0u64, 6 * GIB, 70 * GIB - 1, 0, 64 * GIB] {
            qword.extend_from_slice(&v.to_le_bytes());
        }
        assert!(contains(&aml, &qword));
    }

    #[test]
    fn routing_table_entries() {
        let mut prt = Vec::new();
        routing_table().to_aml_bytes(&mut prt);
        assert_eq!(&prt[0..5], b"\x08_PRT");
        // NameOp "_PRT" PackageOp PkgLength (2 bytes for this size) NumElements.
        assert_eq!(prt[5], 0x12);
        assert_eq!(prt[6] >> 6, 1, "two-byte PkgLength");
        let pkg_len = usize::from(prt[6] & 0x0f) | (usize::from(prt[7]) << 4);
        assert_eq!(5 + 1 + pkg_len, prt.len());
        assert_eq!(prt[8], 31 * 4, "one entry per slot and pin");

        // Package (4) { 0x0001ffff, Zero (INTA), Zero, 0x11 }
        let slot1_inta = [
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x11,
        ];
        // Package (4) { 0x0007ffff, One (INTB), Zero, 0x10 }
        let slot7_intb = [
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x07, 0x00, 0x01, 0x00, 0x0a, 0x10,
        ];
        // Package (4) { 0x001fffff, 3 (INTD), Zero, 0x12 }
        let slot31_intd = [
            0x12, 0x0c, 0x04, 0x0c, 0xff, 0xff, 0x1f, 0x00, 0x0a, 0x03, 0x00, 0x0a, 0x12,
        ];
        assert!(contains(&prt, &slot1_inta));
        assert!(contains(&prt, &slot7_intb));
        assert!(contains(&prt, &slot31_intd));
        // Slot 0, the host bridge, has no entry.
        assert!(!contains(&prt, &[0x0c, 0xff, 0xff, 0x00, 0x00]));
    }

    #[test]
    fn osc_method() {
        let mut aml = Vec::new();
        osc().to_aml_bytes(&mut aml);
        assert_eq!(aml[0], 0x14, "MethodOp");
        assert!(
            contains(&aml, b"_OSC\x04"),
            "four arguments, not serialized"
        );
        // ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766") as its 16 buffer bytes.
        let uuid = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        assert!(contains(&aml, &uuid));
        // And (Local0, 0x1f, CDW3) and Return (Arg3).
        assert!(contains(
            &aml,
            &[0x7b, 0x60, 0x0a, 0x1f, b'C', b'D', b'W', b'3']
        ));
        assert!(aml.ends_with(&[0xa4, 0x6b]));
    }

    #[test]
    fn motherboard_resources_reserve_the_ecam_area() {
        let aml = motherboard_resources();
        assert!(contains(&aml, b"MRES"));
        // EISAID("PNP0C02") = 0x020cd041.
        assert!(contains(&aml, &eisa_name(b"_HID", 0x020c_d041)));
        // Memory32Fixed (ReadWrite, 0xe0000000, 0x10000000).
        assert!(contains(
            &aml,
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x10]
        ));
    }
}
