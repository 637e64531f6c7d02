//! `\_SB_.CPUS`: the processor container of the DSDT, with one processor device per possible
//! CPU and the AML that drives the CPU hotplug controller (see the `hotplug` module for the
//! register protocol and the shared methods).
//!
//! ```text
//! Device (CPUS) {
//!     Name (_HID, "ACPI0010")
//!     Name (_CID, EisaId ("PNP0A05"))
//!     <controller: CLCK, CHPR, CSEL, CEN_, CINS, CRMV, CEJ0, CSTA, CEJT, CTFY, CSCN>
//!     Device (C000) {
//!         Name (_HID, "ACPI0007")
//!         Name (_UID, Zero)
//!         Method (_STA) { Return (CSTA (Zero)) }
//!         Method (_MAT) {
//!             If (CSTA (Zero) == 0x0F) { Return (<MADT Local APIC entry, enabled>) }
//!             Return (<MADT Local APIC entry, online capable>)
//!         }
//!         Method (_EJ0, 1) { CEJT (Zero) }
//!     }
//!     ...
//! }
//! ```
//!
//! The CPU's APIC ID is its processor UID and its controller slot, as in the MADT.

use acpi_tables::aml::{BufferData, Device, EISAName, Equal, If, MethodCall, Name, Return};

use super::super::layout::{CPU_HOTPLUG_SIZE, CPU_HOTPLUG_START};
use super::encoded::{encode, encode_all, method, Serialized};
use super::hotplug::{SlotController, STA_PRESENT};
use super::tables::local_apic;

/// `\_SB_.CPUS.CSCN`: the method the GED calls on a CPU hotplug event.
pub(super) const SCAN_METHOD: &str = "\\_SB_.CPUS.CSCN";
/// Byte offset of the selected CPU's status register.
const STATUS_OFFSET: usize = 4;

/// The CPU hotplug controller for `max_cpus` CPUs (APIC IDs `0..max_cpus`).
fn controller(max_cpus: u8) -> SlotController {
    SlotController::new(
        'C',
        CPU_HOTPLUG_START,
        CPU_HOTPLUG_SIZE,
        STATUS_OFFSET,
        u32::from(max_cpus),
    )
}

/// `Device (CPUS)` for `\_SB_` with a processor device for each of the `max_cpus` CPUs.
pub(super) fn cpus(max_cpus: u8) -> Vec<u8> {
    let controller = controller(max_cpus);
    let hid = Name::new("_HID".into(), &"ACPI0010");
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A05"));
    let mut children = encode_all(&[&hid, &cid]);
    children.extend(controller.objects(&[]));
    for id in 0..max_cpus {
        children.extend(processor(&controller, id));
    }
    encode(&Device::new("CPUS".into(), vec![&Serialized(children)]))
}

/// `Device (C<id>)`: processor `id` with its status, MADT entry and eject method.
fn processor(controller: &SlotController, id: u8) -> Vec<u8> {
    let slot = u32::from(id);
    let hid = Name::new("_HID".into(), &"ACPI0007");
    let uid = Name::new("_UID".into(), &id);
    let mut children = encode_all(&[&hid, &uid]);
    children.extend(controller.device_sta(slot));
    children.extend(mat(controller, id));
    children.extend(controller.device_ej0(slot));
    let name = controller.device_name(slot);
    encode(&Device::new(
        name.as_str().into(),
        vec![&Serialized(children)],
    ))
}

/// `_MAT`: the CPU's MADT Local APIC structure, enabled while the controller says the CPU is
/// present and online capable otherwise, exactly as the MADT lists boot and hot-pluggable CPUs.
fn mat(controller: &SlotController, id: u8) -> Vec<u8> {
    let status = MethodCall::new(controller.path("STA"), vec![&id]);
    let is_present = Equal::new(&status, &STA_PRESENT);
    let enabled = BufferData::new(local_apic(id, true));
    let online_capable = BufferData::new(local_apic(id, false));
    let return_enabled = Return::new(&enabled);
    let when_present = If::new(&is_present, vec![&return_enabled]);
    method(
        "_MAT".into(),
        0,
        &[&when_present, &Return::new(&online_capable)],
    )
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
    fn container_identity() {
        let aml = cpus(2);
        assert_eq!(&aml[0..2], [0x5b, 0x82], "a Device");
        assert!(contains(&aml, b"CPUS"));
        assert!(contains(&aml, b"\x08_HID\x0dACPI0010\x00"));
        // _CID: EISAID("PNP0A05") = 0x050ad041.
        assert!(contains(&aml, b"\x08_CID\x0c\x41\xd0\x0a\x05"));
        // The controller's register block: OperationRegion (CHPR, SystemMemory, base, 0x10).
        assert!(contains(
            &aml,
            b"\x5b\x80CHPR\x00\x0c\x00\x10\x00\xfe\x0a\x10"
        ));
    }

    #[test]
    fn one_processor_per_possible_cpu() {
        let aml = cpus(12);
        assert_eq!(count(&aml, b"\x08_HID\x0dACPI0007\x00"), 12);
        for id in 0..12u8 {
            let name = format!("C{id:03X}");
            assert!(contains(&aml, name.as_bytes()), "{name}");
        }
        assert!(!contains(&aml, b"C00C"));
        assert!(contains(&aml, b"\x08_UID\x0a\x0b"), "_UID 11");
        assert_eq!(count(&aml, b"_STA"), 12);
        assert_eq!(count(&aml, b"_MAT"), 12);
        assert_eq!(count(&aml, b"_EJ0"), 12);
    }

    #[test]
    fn mat_holds_both_madt_entries() {
        let aml = mat(&controller(8), 5);
        // MethodOp PkgLength "_MAT" flags 0, then If (LEqual (CSTA (5), 0x0F)).
        assert_eq!(aml[0], 0x14);
        assert!(contains(&aml, b"_MAT\x00\xa0"));
        assert!(contains(&aml, b"\x93CSTA\x0a\x05\x0a\x0f"));
        // Return (Buffer (8) { entry }) for both states.
        let enabled = [&b"\xa4\x11\x0b\x0a\x08"[..], &[0, 8, 5, 5, 1, 0, 0, 0]].concat();
        let capable = [&b"\xa4\x11\x0b\x0a\x08"[..], &[0, 8, 5, 5, 2, 0, 0, 0]].concat();
        assert!(contains(&aml, &enabled));
        assert!(aml.ends_with(&capable));
    }

    #[test]
    fn largest_container_is_bounded() {
        // 255 CPUs must leave room for the rest of the DSDT in the 128 KiB ACPI area.
        let len = cpus(255).len();
        assert!(len < 48 * 1024, "{len} bytes");
    }
}
