//! `\_SB_.MHPC`: the memory hotplug controller of the DSDT, with one memory device per hotplug
//! slot (see the `hotplug` module for the register protocol and the shared methods).
//!
//! ```text
//! Device (MHPC) {
//!     Name (_HID, EisaId ("PNP0A06"))
//!     Name (_UID, Zero)
//!     <controller: MLCK, MHPR, MSEL, MEN_, MINS, MRMV, MEJ0, MSTA, MEJT, MTFY, MSCN>
//!     Field (MHPR, DWordAcc, NoLock, WriteAsZeros) { MSEL, 32, MBAL, 32, MBAH, 32, MLNL, 32, MLNH, 32 }
//!     Method (MCRS, 1, Serialized) {
//!         Local2 = ResourceTemplate () { QWordMemory (...) }
//!         CreateQWordField (Local2, 14, MMIN)
//!         CreateQWordField (Local2, 22, MMAX)
//!         CreateQWordField (Local2, 38, MLEN)
//!         Acquire (MLCK, 0xFFFF)
//!         MSEL = Arg0
//!         MMIN = (MBAH << 32) | MBAL
//!         MLEN = (MLNH << 32) | MLNL
//!         Release (MLCK)
//!         If (MLEN == Zero) { MMAX = MMIN } Else { MMAX = MMIN + MLEN - 1 }
//!         Return (Local2)
//!     }
//!     Device (M000) {
//!         Name (_HID, EisaId ("PNP0C80"))
//!         Name (_UID, Zero)
//!         Method (_STA) { Return (MSTA (Zero)) }
//!         Method (_CRS) { Return (MCRS (Zero)) }
//!         Method (_EJ0, 1) { MEJT (Zero) }
//!     }
//!     ...
//! }
//! ```

use acpi_tables::aml::{
    Add, AddressSpace, AddressSpaceCacheable, Arg, CreateQWordField, Device, EISAName, Else, Equal,
    If, Local, MethodCall, Name, Or, Path, ResourceTemplate, Return, ShiftLeft, Store, Subtract,
    ONE, ZERO,
};

use super::super::layout::{MEMORY_HOTPLUG_SIZE, MEMORY_HOTPLUG_START};
use super::encoded::{encode, encode_all, method, serialized_method, Serialized};
use super::hotplug::SlotController;

/// `\_SB_.MHPC.MSCN`: the method the GED calls on a memory hotplug event.
pub(super) const SCAN_METHOD: &str = "\\_SB_.MHPC.MSCN";
/// Byte offset of the selected slot's status register.
const STATUS_OFFSET: usize = 20;
/// Byte offsets of the minimum, maximum and length in a QWord address space descriptor.
const QWORD_MIN_OFFSET: u8 = 14;
const QWORD_MAX_OFFSET: u8 = 22;
const QWORD_LEN_OFFSET: u8 = 38;
/// The high halves of base and length are shifted up by this many bits.
const HALF_BITS: u8 = 32;

/// The memory hotplug controller for `slots` slots (at most `hotplug::MAX_SLOTS`).
fn controller(slots: u32) -> SlotController {
    SlotController::new(
        'M',
        MEMORY_HOTPLUG_START,
        MEMORY_HOTPLUG_SIZE,
        STATUS_OFFSET,
        slots,
    )
}

/// `Device (MHPC)` for `\_SB_` with a memory device for each of the `slots` hotplug slots. The
/// caller keeps `slots` within `hotplug::MAX_SLOTS`.
pub(super) fn memory_hotplug(slots: u32) -> Vec<u8> {
    let controller = controller(slots);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A06"));
    let uid = Name::new("_UID".into(), &ZERO);
    let mut children = encode_all(&[&hid, &uid]);
    // Base low/high and length low/high follow the select register.
    let ranges = ["BAL", "BAH", "LNL", "LNH"].map(|tail| controller.field(tail, 32));
    children.extend(controller.objects(&ranges));
    children.extend(current_resources_method(&controller));
    for slot in 0..controller.slots() {
        children.extend(memory_device(&controller, slot));
    }
    encode(&Device::new("MHPC".into(), vec![&Serialized(children)]))
}

/// `Method (MCRS, 1, Serialized)`: a QWordMemory resource template holding the base and length
/// of slot `Arg0`.
fn current_resources_method(controller: &SlotController) -> Vec<u8> {
    let template = Local(2);
    let min = Path::new("MMIN");
    let max = Path::new("MMAX");
    let len = Path::new("MLEN");
    // A placeholder range, every number of which is overwritten below.
    let range = AddressSpace::<u64>::new_memory(AddressSpaceCacheable::Cacheable, true, 0, 0, None);
    let placeholder = ResourceTemplate::new(vec![&range]);
    let copy = Store::new(&template, &placeholder);
    let create_min = CreateQWordField::new(&min, &template, &QWORD_MIN_OFFSET);
    let create_max = CreateQWordField::new(&max, &template, &QWORD_MAX_OFFSET);
    let create_len = CreateQWordField::new(&len, &template, &QWORD_LEN_OFFSET);

    let [sel, base_low, base_high, length_low, length_high] =
        ["SEL", "BAL", "BAH", "LNL", "LNH"].map(|tail| controller.path(tail));
    let select = Store::new(&sel, &Arg(0));
    let high = Local(0);
    let shift_base = ShiftLeft::new(&high, &base_high, &HALF_BITS);
    let base = Or::new(&min, &high, &base_low);
    let shift_length = ShiftLeft::new(&high, &length_high, &HALF_BITS);
    let length = Or::new(&len, &high, &length_low);

    // An empty range stays empty rather than wrapping below its base.
    let empty = Equal::new(&len, &ZERO);
    let max_is_min = Store::new(&max, &min);
    let if_empty = If::new(&empty, vec![&max_is_min]);
    let end = Local(1);
    let past_end = Add::new(&end, &min, &len);
    let last = Subtract::new(&max, &end, &ONE);
    let otherwise = Else::new(vec![&past_end, &last]);

    serialized_method(
        controller.path("CRS"),
        1,
        &[
            &copy,
            &create_min,
            &create_max,
            &create_len,
            &controller.acquire(),
            &select,
            &shift_base,
            &base,
            &shift_length,
            &length,
            &controller.release(),
            &if_empty,
            &otherwise,
            &Return::new(&template),
        ],
    )
}

/// `Device (M<slot>)`: the memory device of hotplug slot `slot`.
fn memory_device(controller: &SlotController, slot: u32) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C80"));
    let uid = Name::new("_UID".into(), &slot);
    let resources = MethodCall::new(controller.path("CRS"), vec![&slot]);
    let crs = method("_CRS".into(), 0, &[&Return::new(&resources)]);
    let mut children = encode_all(&[&hid, &uid]);
    children.extend(controller.device_sta(slot));
    children.extend(crs);
    children.extend(controller.device_ej0(slot));
    let name = controller.device_name(slot);
    encode(&Device::new(
        name.as_str().into(),
        vec![&Serialized(children)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn controller_identity_and_registers() {
        let aml = memory_hotplug(2);
        assert_eq!(&aml[0..2], [0x5b, 0x82], "a Device");
        assert!(contains(&aml, b"MHPC"));
        // EISAID("PNP0A06") = 0x060ad041.
        assert!(contains(&aml, b"\x08_HID\x0c\x41\xd0\x0a\x06"));
        // OperationRegion (MHPR, SystemMemory, 0xfe003000, 0x20).
        assert!(contains(
            &aml,
            b"\x5b\x80MHPR\x00\x0c\x00\x30\x00\xfe\x0a\x20"
        ));
        // The DWord field: select, base low/high, length low/high.
        assert!(contains(
            &aml,
            b"MHPR\x43MSEL\x20MBAL\x20MBAH\x20MLNL\x20MLNH\x20"
        ));
        // The status byte at offset 20: 160 reserved bits, then the four status bits.
        assert!(contains(
            &aml,
            b"MHPR\x41\x00\x40\x0aMEN_\x01MINS\x01MRMV\x01MEJ0\x01"
        ));
    }

    #[test]
    fn one_memory_device_per_slot() {
        let aml = memory_hotplug(20);
        // EISAID("PNP0C80") = 0x800cd041.
        assert_eq!(count(&aml, b"\x08_HID\x0c\x41\xd0\x0c\x80"), 20);
        assert!(contains(&aml, b"M000"));
        assert!(contains(&aml, b"M013"));
        assert!(!contains(&aml, b"M014"));
        assert_eq!(count(&aml, b"_STA"), 20);
        assert_eq!(count(&aml, b"_CRS"), 20);
        assert_eq!(count(&aml, b"_EJ0"), 20);
        // Method (_CRS) { Return (MCRS (0x13)) }.
        assert!(contains(&aml, b"_CRS\x00\xa4MCRS\x0a\x13"));
    }

    #[test]
    fn no_slots_still_has_the_scan_method() {
        let aml = memory_hotplug(0);
        assert!(contains(&aml, b"MSCN"));
        assert!(!contains(&aml, b"PNP0C80"));
        assert_eq!(count(&aml, b"\x08_HID"), 1);
    }

    #[test]
    fn resource_template_is_patched_at_the_qword_fields() {
        let aml = current_resources_method(&controller(1));
        assert!(contains(&aml, b"MCRS\x09"), "one argument, serialized");
        // Store (Buffer (0x30) { QWordMemory descriptor, end tag }, Local2).
        assert!(contains(
            &aml,
            b"\x70\x11\x33\x0a\x30\x8a\x2b\x00\x00\x0c\x03"
        ));
        // CreateQWordField (Local2, 14, MMIN) and the others.
        assert!(contains(&aml, b"\x8f\x62\x0a\x0eMMIN"));
        assert!(contains(&aml, b"\x8f\x62\x0a\x16MMAX"));
        assert!(contains(&aml, b"\x8f\x62\x0a\x26MLEN"));
        assert!(aml.ends_with(b"\xa4\x62"));
    }
}
