//! The AML side of a select-and-status hotplug controller, shared by the CPU (`\_SB_.CPUS`) and
//! memory (`\_SB_.MHPC`) hotplug devices of the DSDT.
//!
//! Both controllers work the same way (see the design notes): the guest writes a slot number to
//! the 32-bit select register at offset 0, then reads or writes the selected slot's status
//! byte, whose bits are enabled (0), inserting (1, cleared by writing 1), removing (2, cleared
//! by writing 1) and eject (3, write 1 once the guest has released the slot). A mutex keeps
//! selection and access together.
//!
//! Every name the controller defines starts with its prefix letter (`C` or `M`): with `C` the
//! objects are
//!
//! ```text
//! Mutex (CLCK, 0)
//! OperationRegion (CHPR, SystemMemory, base, size)
//! Field (CHPR, DWordAcc, NoLock, WriteAsZeros) { CSEL, 32, <extra fields> }
//! Field (CHPR, ByteAcc, NoLock, WriteAsZeros) { Offset (status), CEN_, 1, CINS, 1, CRMV, 1, CEJ0, 1 }
//! Method (CSTA, 1)  // _STA value of slot Arg0: 0x0F if enabled, else 0
//! Method (CEJT, 1)  // eject slot Arg0
//! Method (CTFY, 2)  // Notify (the device of slot Arg0, Arg1)
//! Method (CSCN, 0)  // notify every inserting (1) and removing (3) slot and clear its bit
//! ```
//!
//! The fields write zeros to the bits they do not cover, so writing one status bit never sets
//! or clears another.

use acpi_tables::aml::{
    Acquire, Add, Arg, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule,
    If, LessThan, Local, MethodCall, Mutex, Notify, OpRegion, OpRegionSpace, Path, Release, Return,
    Store, While, ONE, ZERO,
};
use acpi_tables::Aml;

use super::encoded::{encode_all, method, Serialized};

/// Notify value: re-check the device's presence (it was inserted).
pub(super) const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notify value: the platform asks the OS to release and eject the device.
pub(super) const NOTIFY_EJECT_REQUEST: u8 = 3;
/// `_STA` of an enabled slot: present, enabled, shown in the UI, functioning.
pub(super) const STA_PRESENT: u8 = 0x0f;

/// `Acquire` timeout meaning "wait for ever".
const WAIT_FOREVER: u16 = 0xffff;
/// Width of the select register.
const SELECT_BITS: usize = 32;
/// Most slots a controller can have: device names show the slot in three hexadecimal digits.
pub(super) const MAX_SLOTS: u32 = 0x1000;

/// One select-and-status controller, as the AML sees it.
pub(super) struct SlotController {
    /// First letter of every name the controller defines.
    prefix: char,
    /// Guest address and length of the register block.
    base: u64,
    size: u64,
    /// Byte offset of the status register.
    status_offset: usize,
    /// Number of slots, each with a device `<prefix><slot as three hex digits>`.
    slots: u32,
}

impl SlotController {
    /// A controller for `slots` slots (at most [`MAX_SLOTS`]) whose registers are at
    /// `base..base + size` with the status byte at `status_offset`.
    pub(super) fn new(
        prefix: char,
        base: u64,
        size: u64,
        status_offset: usize,
        slots: u32,
    ) -> Self {
        debug_assert!(prefix.is_ascii_uppercase() && slots <= MAX_SLOTS);
        SlotController {
            prefix,
            base,
            size,
            status_offset,
            slots,
        }
    }

    /// The name `<prefix><tail>`; `tail` has three characters.
    pub(super) fn path(&self, tail: &str) -> Path {
        Path::new(&format!("{}{tail}", self.prefix))
    }

    /// Name of the device of `slot`: the prefix and three hexadecimal digits, e.g. `C00A`.
    pub(super) fn device_name(&self, slot: u32) -> String {
        format!("{}{slot:03X}", self.prefix)
    }

    /// Number of slots.
    pub(super) fn slots(&self) -> u32 {
        self.slots
    }

    /// `Acquire (<prefix>LCK, 0xFFFF)`.
    pub(super) fn acquire(&self) -> Acquire {
        Acquire::new(self.path("LCK"), WAIT_FOREVER)
    }

    /// `Release (<prefix>LCK)`.
    pub(super) fn release(&self) -> Release {
        Release::new(self.path("LCK"))
    }

    /// The mutex, the register region, its fields (`extra_fields` follow the select register
    /// in the 32-bit field list) and the `STA`, `EJT`, `TFY` and `SCN` methods, to put in the
    /// controller's device before the slot devices.
    pub(super) fn objects(&self, extra_fields: &[FieldEntry]) -> Vec<u8> {
        let mutex = Mutex::new(self.path("LCK"), 0);
        let region = OpRegion::new(
            self.path("HPR"),
            OpRegionSpace::SystemMemory,
            &self.base,
            &self.size,
        );
        let mut dword_fields = vec![self.field("SEL", SELECT_BITS)];
        dword_fields.extend_from_slice(extra_fields);
        let dwords = Field::new(
            self.path("HPR"),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            dword_fields,
        );
        let status = Field::new(
            self.path("HPR"),
            FieldAccessType::Byte,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Reserved(self.status_offset * 8),
                self.field("EN_", 1),
                self.field("INS", 1),
                self.field("RMV", 1),
                self.field("EJ0", 1),
            ],
        );
        let mut aml = encode_all(&[&mutex, &region, &dwords, &status]);
        aml.extend(self.status_method());
        aml.extend(self.eject_method());
        aml.extend(self.notify_method());
        aml.extend(self.scan_method());
        aml
    }

    /// `FieldEntry` `<prefix><tail>` of `bits` bits.
    pub(super) fn field(&self, tail: &str, bits: usize) -> FieldEntry {
        let mut name = [0u8; 4];
        let full = format!("{}{tail}", self.prefix);
        name.copy_from_slice(full.as_bytes());
        FieldEntry::Named(name, bits)
    }

    /// `Method (_STA) { Return (<prefix>STA (slot)) }` for the device of `slot`.
    pub(super) fn device_sta(&self, slot: u32) -> Vec<u8> {
        let status = MethodCall::new(self.path("STA"), vec![&slot]);
        method("_STA".into(), 0, &[&Return::new(&status)])
    }

    /// `Method (_EJ0, 1) { <prefix>EJT (slot) }` for the device of `slot`.
    pub(super) fn device_ej0(&self, slot: u32) -> Vec<u8> {
        let eject = MethodCall::new(self.path("EJT"), vec![&slot]);
        method("_EJ0".into(), 1, &[&eject])
    }

    /// `Method (<prefix>STA, 1)`: select slot `Arg0` and return 0x0F if it is enabled, else 0.
    fn status_method(&self) -> Vec<u8> {
        let sel = self.path("SEL");
        let enabled = self.path("EN_");
        let result = Local(0);
        let select = Store::new(&sel, &Arg(0));
        let absent = Store::new(&result, &ZERO);
        let is_enabled = Equal::new(&enabled, &ONE);
        let present = Store::new(&result, &STA_PRESENT);
        let check = If::new(&is_enabled, vec![&present]);
        let body: [&dyn Aml; 6] = [
            &self.acquire(),
            &select,
            &absent,
            &check,
            &self.release(),
            &Return::new(&result),
        ];
        method(self.path("STA"), 1, &body)
    }

    /// `Method (<prefix>EJT, 1)`: select slot `Arg0` and set its eject bit.
    fn eject_method(&self) -> Vec<u8> {
        let sel = self.path("SEL");
        let eject = self.path("EJ0");
        let select = Store::new(&sel, &Arg(0));
        let request = Store::new(&eject, &ONE);
        let body: [&dyn Aml; 4] = [&self.acquire(), &select, &request, &self.release()];
        method(self.path("EJT"), 1, &body)
    }

    /// `Method (<prefix>TFY, 2)`: `If (Arg0 == n) { Notify (<device n>, Arg1) }` for every slot
    /// (Notify needs the device's name, so the slot number is matched one by one).
    fn notify_method(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for slot in 0..self.slots {
            let device = Path::new(&self.device_name(slot));
            let notify = Notify::new(&device, &Arg(1));
            let is_slot = Equal::new(&Arg(0), &slot);
            If::new(&is_slot, vec![&notify]).to_aml_bytes(&mut body);
        }
        method(self.path("TFY"), 2, &[&Serialized(body)])
    }

    /// `Method (<prefix>SCN)`: for every slot, select it; if inserting, notify device check and
    /// clear the bit; if removing, notify eject request and clear the bit.
    fn scan_method(&self) -> Vec<u8> {
        let sel = self.path("SEL");
        let inserting = self.path("INS");
        let removing = self.path("RMV");
        let slot = Local(0);
        let first = Store::new(&slot, &ZERO);
        let more = LessThan::new(&slot, &self.slots);
        let select = Store::new(&sel, &slot);

        let is_inserting = Equal::new(&inserting, &ONE);
        let notify_insert = MethodCall::new(self.path("TFY"), vec![&slot, &NOTIFY_DEVICE_CHECK]);
        let clear_insert = Store::new(&inserting, &ONE);
        let on_insert = If::new(&is_inserting, vec![&notify_insert, &clear_insert]);

        let is_removing = Equal::new(&removing, &ONE);
        let notify_remove = MethodCall::new(self.path("TFY"), vec![&slot, &NOTIFY_EJECT_REQUEST]);
        let clear_remove = Store::new(&removing, &ONE);
        let on_remove = If::new(&is_removing, vec![&notify_remove, &clear_remove]);

        let next = Add::new(&slot, &slot, &ONE);
        let each = While::new(&more, vec![&select, &on_insert, &on_remove, &next]);
        let body: [&dyn Aml; 4] = [&self.acquire(), &first, &each, &self.release()];
        method(self.path("SCN"), 0, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn controller(slots: u32) -> SlotController {
        SlotController::new('X', 0xfe00_5000, 0x10, 6, slots)
    }

    #[test]
    fn names_carry_the_prefix() {
        let c = controller(3);
        assert_eq!(encode_all(&[&c.path("SEL")]), b"XSEL");
        assert_eq!(c.device_name(0), "X000");
        assert_eq!(c.device_name(0xabc), "XABC");
        assert_eq!(c.field("EN_", 1), FieldEntry::Named(*b"XEN_", 1));
    }

    #[test]
    fn registers_and_fields() {
        let extra = [FieldEntry::Named(*b"XDAT", 32)];
        let aml = controller(3).objects(&extra);
        // Mutex (XLCK, 0), then OperationRegion (XHPR, SystemMemory, 0xfe005000, 0x10).
        assert!(aml.starts_with(b"\x5b\x01XLCK\x00\x5b\x80XHPR\x00\x0c\x00\x50\x00\xfe\x0a\x10"));
        // Field (XHPR, DWordAcc, NoLock, WriteAsZeros) { XSEL, 32, XDAT, 32 }.
        assert!(contains(&aml, b"XHPR\x43XSEL\x20XDAT\x20"));
        // Field (XHPR, ByteAcc, NoLock, WriteAsZeros) { Offset (6), XEN_ 1, XINS 1, XRMV 1, XEJ0 1 }.
        assert!(contains(
            &aml,
            b"XHPR\x41\x00\x30XEN_\x01XINS\x01XRMV\x01XEJ0\x01"
        ));
        for method in [&b"XSTA\x01"[..], b"XEJT\x01", b"XTFY\x02", b"XSCN\x00"] {
            assert!(
                contains(&aml, method),
                "{}",
                String::from_utf8_lossy(method)
            );
        }
    }

    #[test]
    fn status_method_reads_under_the_lock() {
        let aml = controller(1).status_method();
        let body = [
            &b"\x5b\x23XLCK\xff\xff"[..],            // Acquire (XLCK, 0xFFFF)
            b"\x70\x68XSEL",                         // XSEL = Arg0
            b"\x70\x00\x60",                         // Local0 = Zero
            b"\xa0\x0b\x93XEN_\x01\x70\x0a\x0f\x60", // If (XEN_ == One) { Local0 = 0x0F }
            b"\x5b\x27XLCK",                         // Release (XLCK)
            b"\xa4\x60",                             // Return (Local0)
        ]
        .concat();
        assert!(aml.ends_with(&body));
    }

    #[test]
    fn eject_method_sets_only_the_eject_bit() {
        let aml = controller(1).eject_method();
        assert!(aml.ends_with(b"\x70\x68XSEL\x70\x01XEJ0\x5b\x27XLCK"));
    }

    #[test]
    fn notify_method_matches_every_slot() {
        let aml = controller(3).notify_method();
        // If (Arg0 == n) { Notify (X00n, Arg1) } for n = 0, 1, 2.
        for (n, constant) in [(0u8, &[0x00][..]), (1, &[0x01]), (2, &[0x0a, 0x02])] {
            let test = [&[0x93, 0x68][..], constant, b"\x86X00", &[b'0' + n, 0x69]].concat();
            assert!(contains(&aml, &test), "slot {n}");
        }
        assert!(!contains(&aml, b"X003"));
    }

    #[test]
    fn scan_loops_over_the_slots() {
        let aml = controller(5).scan_method();
        // While (Local0 < 5) { XSEL = Local0 ... Local0 += One }.
        assert!(contains(&aml, b"\x95\x60\x0a\x05\x70\x60XSEL"));
        // If (XINS == One) { XTFY (Local0, One)  XINS = One }.
        assert!(contains(&aml, b"\x93XINS\x01XTFY\x60\x01\x70\x01XINS"));
        // If (XRMV == One) { XTFY (Local0, 3)  XRMV = One }.
        assert!(contains(&aml, b"\x93XRMV\x01XTFY\x60\x0a\x03\x70\x01XRMV"));
        assert!(contains(&aml, b"\x72\x60\x01\x60"));
        assert!(aml.ends_with(b"\x5b\x27XLCK"));
    }
}
