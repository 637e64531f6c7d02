//! The Generic Event Device `\_SB_.GED0` and the power button `\_SB_.PWRB` of the DSDT.
//!
//! A hardware-reduced ACPI platform has no GPE blocks: the VMM signals hotplug and the power
//! button by setting a bit in the GED's event register and raising the GED interrupt; the OS
//! then runs `_EVT`, which reads (and so clears) the register and dispatches every set bit.
//!
//! ```text
//! Device (GED0) {
//!     Name (_HID, "ACPI0013")
//!     Name (_UID, Zero)
//!     Name (_CRS, ResourceTemplate () {
//!         Memory32Fixed (ReadWrite, base, 0x10)
//!         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 }
//!     })
//!     OperationRegion (GEDR, SystemMemory, base, 0x10)
//!     Field (GEDR, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
//!     Method (_EVT, 1, NotSerialized) {
//!         Local0 = GDAT
//!         If (Local0 & 1) { \_SB_.CPUS.CSCN () }
//!         If (Local0 & 2) { \_SB_.MHPC.MSCN () }
//!         If (Local0 & 4) { \_SB_.PCI0.PCNT () }
//!         If (Local0 & 8) { Notify (\_SB_.PWRB, 0x80) }
//!     }
//! }
//! Device (PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, Zero) }
//! ```

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Memory32Fixed, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path,
    ResourceTemplate, Store, ZERO,
};
use acpi_tables::Aml;

use super::super::layout::{GED_IRQ, GED_SIZE, GED_START};
use super::encoded::{encode, method, Serialized};
use super::{cpu_hotplug, memory_hotplug, pci_hotplug};

/// GED event bits, as the design notes number them.
const EVENT_CPU_HOTPLUG: u8 = 1 << 0;
const EVENT_MEMORY_HOTPLUG: u8 = 1 << 1;
const EVENT_PCI_HOTPLUG: u8 = 1 << 2;
const EVENT_POWER_BUTTON: u8 = 1 << 3;
/// Notify value of a power button device: the button was pressed.
const NOTIFY_POWER_BUTTON_PRESSED: u8 = 0x80;
/// The power button device.
const POWER_BUTTON: &str = "\\_SB_.PWRB";

/// `Device (GED0)` for `\_SB_`.
pub(super) fn ged() -> Vec<u8> {
    // The GED block lies below 4 GiB (asserted at compile time in `layout`).
    let registers = Memory32Fixed::new(true, GED_START as u32, GED_SIZE as u32);
    // Consumer, edge triggered, active high, exclusive.
    let interrupt = Interrupt::new(true, true, false, false, GED_IRQ);
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &ZERO);
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&registers, &interrupt]),
    );
    let region = OpRegion::new(
        "GEDR".into(),
        OpRegionSpace::SystemMemory,
        &GED_START,
        &GED_SIZE,
    );
    let field = Field::new(
        "GEDR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let evt = Serialized(event_method());
    encode(&Device::new(
        "GED0".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

/// `Method (_EVT, 1)`: reads the pending events once and handles each.
fn event_method() -> Vec<u8> {
    let events = Local(0);
    let register = Path::new("GDAT");
    let read = Store::new(&events, &register);
    let mut body = encode(&read);
    for (bit, scan) in [
        (EVENT_CPU_HOTPLUG, cpu_hotplug::SCAN_METHOD),
        (EVENT_MEMORY_HOTPLUG, memory_hotplug::SCAN_METHOD),
        (EVENT_PCI_HOTPLUG, pci_hotplug::SCAN_METHOD),
    ] {
        let call = MethodCall::new(scan.into(), vec![]);
        body.extend(if_event(&events, bit, &call));
    }
    let button = Path::new(POWER_BUTTON);
    let pressed = Notify::new(&button, &NOTIFY_POWER_BUTTON_PRESSED);
    body.extend(if_event(&events, EVENT_POWER_BUTTON, &pressed));
    method("_EVT".into(), 1, &[&Serialized(body)])
}

/// `If (events & bit) { action }`, encoded.
fn if_event(events: &Local, bit: u8, action: &dyn Aml) -> Vec<u8> {
    let set = And::new(&ZERO, events, &bit);
    encode(&If::new(&set, vec![action]))
}

/// `Device (PWRB)` for `\_SB_`: the power button (control-method, as hardware-reduced ACPI has
/// no fixed power button), notified through the GED.
pub(super) fn power_button() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &ZERO);
    encode(&Device::new("PWRB".into(), vec![&hid, &uid]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn ged_identity_and_resources() {
        let aml = ged();
        assert_eq!(&aml[0..2], [0x5b, 0x82], "a Device");
        assert!(contains(&aml, b"GED0"));
        assert!(contains(&aml, b"\x08_HID\x0dACPI0013\x00"));
        assert!(contains(&aml, b"\x08_UID\x00"));
        // Memory32Fixed (ReadWrite, 0xfe000000, 0x10).
        assert!(contains(
            &aml,
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xfe, 0x10, 0x00, 0x00, 0x00]
        ));
        // Extended interrupt: consumer, edge, active high, exclusive, one interrupt, number 5.
        assert!(contains(
            &aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00]
        ));
        // OperationRegion (GEDR, SystemMemory, 0xfe000000, 0x10) and its DWord field.
        assert!(contains(
            &aml,
            b"\x5b\x80GEDR\x00\x0c\x00\x00\x00\xfe\x0a\x10"
        ));
        assert!(contains(&aml, b"GEDR\x43GDAT\x20"));
    }

    #[test]
    fn event_method_dispatches_every_bit() {
        let aml = event_method();
        assert!(contains(&aml, b"_EVT\x01"), "one argument, not serialized");
        // Local0 = GDAT, read once.
        assert!(contains(&aml, b"\x70GDAT\x60"));
        assert_eq!(aml.windows(4).filter(|w| w == b"GDAT").count(), 1);
        // If (And (Local0, bit, Zero)) { \_SB_.X.Y }: a root path of three segments.
        for (bit, path) in [
            (&[0x01][..], &b"CPUSCSCN"[..]),
            (&[0x0a, 0x02], b"MHPCMSCN"),
            (&[0x0a, 0x04], b"PCI0PCNT"),
        ] {
            let call = [
                &[0x7b, 0x60][..],
                bit,
                &[0x00, b'\\', 0x2f, 3],
                b"_SB_",
                path,
            ]
            .concat();
            assert!(contains(&aml, &call), "bit {bit:?}");
        }
        // If (And (Local0, 8, Zero)) { Notify (\_SB_.PWRB, 0x80) }.
        assert!(aml.ends_with(b"\x7b\x60\x0a\x08\x00\x86\\\x2e_SB_PWRB\x0a\x80"));
    }

    #[test]
    fn power_button_identity() {
        let aml = power_button();
        assert!(contains(&aml, b"PWRB"));
        // EISAID("PNP0C0C") = 0x0c0cd041.
        assert!(contains(&aml, b"\x08_HID\x0c\x41\xd0\x0c\x0c"));
        assert!(aml.ends_with(b"\x08_UID\x00"));
    }
}
