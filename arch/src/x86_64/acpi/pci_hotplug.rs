//! The hotplug objects of the PCI host bridge `\_SB_.PCI0`: the PCI hotplug controller's
//! registers, one slot device per hot-pluggable slot of bus 0 and the `PCNT` method the GED
//! calls.
//!
//! ```text
//! OperationRegion (PHPR, SystemMemory, base, 0x10)
//! Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32, PSNT, 32 }
//! Method (PTFY, 2) { If (Arg0 & 0x02) { Notify (S01, Arg1) } ... }   // slots 1-31
//! Method (PCNT, 0, Serialized) {
//!     Local0 = PCIU                       // reading clears: read each register once
//!     Local1 = PCID
//!     PTFY (Local0, 1)                    // device check for the slots that came up
//!     PTFY (Local1, 3)                    // eject request for those asked to go down
//! }
//! Device (S01) { Name (_ADR, 0x00010000)  Name (_SUN, 1)  Method (_EJ0, 1) { B0EJ = 0x02 } }
//! ...
//! Device (S1F) { ... }
//! ```
//!
//! Bit n of every register stands for slot n; slot 0 is the host bridge and has no device.

use acpi_tables::aml::{
    And, Arg, Device, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Local, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path, Store, ZERO,
};
use acpi_tables::Aml;

use super::super::layout::{PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START, PCI_MAX_SLOT};
use super::encoded::{encode, encode_all, method, serialized_method, Serialized};
use super::hotplug::{NOTIFY_DEVICE_CHECK, NOTIFY_EJECT_REQUEST};

/// `\_SB_.PCI0.PCNT`: the method the GED calls on a PCI hotplug event.
pub(super) const SCAN_METHOD: &str = "\\_SB_.PCI0.PCNT";
/// Registers of 32 bits, one bit per slot.
const REGISTER_BITS: usize = 32;
/// The first slot that can hold a device (slot 0 is the host bridge).
const FIRST_SLOT: u8 = 1;

/// The region, fields, `PTFY` and `PCNT` methods and slot devices, to nest in `Device (PCI0)`.
pub(super) fn objects() -> Vec<u8> {
    let region = OpRegion::new(
        "PHPR".into(),
        OpRegionSpace::SystemMemory,
        &PCI_HOTPLUG_START,
        &PCI_HOTPLUG_SIZE,
    );
    let registers = ["PCIU", "PCID", "B0EJ", "PSNT"]
        .iter()
        .map(|name| {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(name.as_bytes());
            FieldEntry::Named(bytes, REGISTER_BITS)
        })
        .collect();
    let fields = Field::new(
        "PHPR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        registers,
    );
    let mut aml = encode_all(&[&region, &fields]);
    aml.extend(notify_method());
    aml.extend(scan_method());
    for slot in FIRST_SLOT..=PCI_MAX_SLOT {
        aml.extend(slot_device(slot));
    }
    aml
}

/// The name of the device of `slot`: `S`, two hexadecimal digits and the `_` padding of a
/// three-character name (`S1F` in ASL).
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// `Method (PTFY, 2)`: `Notify (S<n>, Arg1)` for every slot n whose bit is set in `Arg0`.
fn notify_method() -> Vec<u8> {
    let mut body = Vec::new();
    for slot in FIRST_SLOT..=PCI_MAX_SLOT {
        let device = Path::new(&slot_name(slot));
        let notify = Notify::new(&device, &Arg(1));
        let bit = 1u32 << slot;
        let is_set = And::new(&ZERO, &Arg(0), &bit);
        If::new(&is_set, vec![&notify]).to_aml_bytes(&mut body);
    }
    method("PTFY".into(), 2, &[&Serialized(body)])
}

/// `Method (PCNT, 0, Serialized)`: reads the slots that came up and those asked to go down
/// (each read clears its register, so once) and notifies them.
fn scan_method() -> Vec<u8> {
    let up = Local(0);
    let down = Local(1);
    let (slots_up, slots_down) = (Path::new("PCIU"), Path::new("PCID"));
    let read_up = Store::new(&up, &slots_up);
    let read_down = Store::new(&down, &slots_down);
    let notify_up = MethodCall::new("PTFY".into(), vec![&up, &NOTIFY_DEVICE_CHECK]);
    let notify_down = MethodCall::new("PTFY".into(), vec![&down, &NOTIFY_EJECT_REQUEST]);
    serialized_method(
        "PCNT".into(),
        0,
        &[&read_up, &read_down, &notify_up, &notify_down],
    )
}

/// `Device (S<slot>)`: the slot's address on bus 0, its user-visible number and eject method.
fn slot_device(slot: u8) -> Vec<u8> {
    // Device `slot`, function 0.
    let address = u32::from(slot) << 16;
    let adr = Name::new("_ADR".into(), &address);
    let sun = Name::new("_SUN".into(), &slot);
    let bit = 1u32 << slot;
    let register = Path::new("B0EJ");
    let eject = Store::new(&register, &bit);
    let ej0 = method("_EJ0".into(), 1, &[&eject]);
    let children: [&dyn Aml; 3] = [&adr, &sun, &Serialized(ej0)];
    encode(&Device::new(
        slot_name(slot).as_str().into(),
        children.to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn registers_of_the_controller() {
        let aml = objects();
        // OperationRegion (PHPR, SystemMemory, 0xfe002000, 0x10).
        assert!(aml.starts_with(b"\x5b\x80PHPR\x00\x0c\x00\x20\x00\xfe\x0a\x10"));
        // Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU 32, PCID 32, B0EJ 32, PSNT 32 }.
        assert!(contains(&aml, b"PHPR\x43PCIU\x20PCID\x20B0EJ\x20PSNT\x20"));
    }

    #[test]
    fn one_device_per_slot() {
        let aml = objects();
        for slot in 1..=31u8 {
            let name = slot_name(slot);
            assert!(contains(&aml, name.as_bytes()), "{name}");
        }
        assert!(!contains(&aml, b"S00_"), "no device for the host bridge");
        assert!(!contains(&aml, b"S20_"));
    }

    #[test]
    fn slot_device_contents() {
        let aml = slot_device(0x1e);
        assert_eq!(&aml[0..2], [0x5b, 0x82]);
        assert!(contains(&aml, b"S1E_"));
        assert!(contains(&aml, b"\x08_ADR\x0c\x00\x00\x1e\x00"));
        assert!(contains(&aml, b"\x08_SUN\x0a\x1e"));
        // Method (_EJ0, 1) { Store (0x40000000, B0EJ) }.
        assert!(aml.ends_with(b"_EJ0\x01\x70\x0c\x00\x00\x00\x40B0EJ"));
    }

    #[test]
    fn scan_reads_each_register_once() {
        let aml = scan_method();
        assert!(contains(&aml, b"PCNT\x08"), "no arguments, serialized");
        assert_eq!(aml.windows(4).filter(|w| w == b"PCIU").count(), 1);
        assert_eq!(aml.windows(4).filter(|w| w == b"PCID").count(), 1);
        // PTFY (Local0, One) and PTFY (Local1, 3).
        assert!(contains(&aml, b"PTFY\x60\x01"));
        assert!(aml.ends_with(b"PTFY\x61\x0a\x03"));
    }

    #[test]
    fn notify_tests_each_slot_bit() {
        let aml = notify_method();
        // If (And (Arg0, 0x02, Zero)) { Notify (S01, Arg1) }
        assert!(contains(&aml, b"\xa0\x0c\x7b\x68\x0a\x02\x00\x86S01_\x69"));
        // If (And (Arg0, 0x80000000, Zero)) { Notify (S1F, Arg1) }
        assert!(aml.ends_with(b"\x7b\x68\x0c\x00\x00\x00\x80\x00\x86S1F_\x69"));
    }
}
