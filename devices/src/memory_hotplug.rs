//! The memory hotplug controller: a fixed number of slots that each hold one hot-added guest-physical RAM range,
//! and the insert / remove / eject handshake with the guest.
//!
//! Registers (offsets from [`MEMORY_HOTPLUG_MMIO_BASE`]; other sizes and offsets read as zero and ignore writes):
//!
//! | offset | size | access | meaning |
//! |---|---|---|---|
//! | [`MEMORY_HOTPLUG_SELECT`] (0) | 32 | write | select a slot |
//! | [`MEMORY_HOTPLUG_BASE_LOW`] (4), [`MEMORY_HOTPLUG_BASE_HIGH`] (8) | 32 | read | the selected slot's base address |
//! | [`MEMORY_HOTPLUG_LEN_LOW`] (12), [`MEMORY_HOTPLUG_LEN_HIGH`] (16) | 32 | read | the selected slot's length |
//! | [`MEMORY_HOTPLUG_STATUS`] (20) | 8 | read/write | the selected slot's status (see [`crate::hotplug`]) |
//! | [`MEMORY_HOTPLUG_COUNT`] (24) | 32 | read | number of slots |
//!
//! Base and length read as zero unless the selected slot is enabled, and a selected slot at or above the count
//! reads as zero everywhere and ignores status writes.
//!
//! The VMM maps RAM and records it with [`MemoryHotplugController::insert`], or asks for a range to go with
//! [`MemoryHotplugController::request_removal`], then raises the GED's memory hotplug event. The guest acknowledges
//! the events, offlines the memory and ejects the slot; the slot stops being enabled at once, the controller
//! signals its eject eventfd, and the VMM collects the slot and its range with
//! [`MemoryHotplugController::take_ejected`] and unmaps it. The guest may eject any enabled slot, also one the VMM
//! did not ask for, as ACPI lets an OS eject a device on its own.

use crate::bus::BusDevice;
use crate::hotplug::{byte, dword, put_byte, put_dword, EjectNotifier, SlotStatus};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical base address of the memory hotplug controller.
pub const MEMORY_HOTPLUG_MMIO_BASE: u64 = 0xfe00_3000;
/// Length of the memory hotplug controller's register block.
pub const MEMORY_HOTPLUG_MMIO_LEN: u64 = 0x20;
/// Offset of the 32-bit slot selector (write).
pub const MEMORY_HOTPLUG_SELECT: u64 = 0;
/// Offset of the low 32 bits of the selected slot's base address (read).
pub const MEMORY_HOTPLUG_BASE_LOW: u64 = 4;
/// Offset of the high 32 bits of the selected slot's base address (read).
pub const MEMORY_HOTPLUG_BASE_HIGH: u64 = 8;
/// Offset of the low 32 bits of the selected slot's length (read).
pub const MEMORY_HOTPLUG_LEN_LOW: u64 = 12;
/// Offset of the high 32 bits of the selected slot's length (read).
pub const MEMORY_HOTPLUG_LEN_HIGH: u64 = 16;
/// Offset of the selected slot's 8-bit status register.
pub const MEMORY_HOTPLUG_STATUS: u64 = 20;
/// Offset of the 32-bit slot count (read).
pub const MEMORY_HOTPLUG_COUNT: u64 = 24;
/// The most slots a controller can have.
pub const MEMORY_HOTPLUG_MAX_SLOTS: u32 = 256;
/// Base and length of every range must be multiples of this (one page).
pub const MEMORY_HOTPLUG_ALIGN: u64 = 0x1000;

/// Errors setting up the controller or changing a slot from the VMM side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryHotplugError {
    /// Too many slots.
    #[error("the memory hotplug controller supports at most {MEMORY_HOTPLUG_MAX_SLOTS} slots, not {0}; use fewer slots")]
    TooManySlots(usize),
    /// The slot number is not below the slot count.
    #[error("memory slot {slot} does not exist: the controller's slots are below {slots}; configure more slots")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
        /// The number of slots.
        slots: u32,
    },
    /// The slot already holds memory.
    #[error("memory slot {0} already holds memory; remove it first or choose a free slot")]
    AlreadyEnabled(u32),
    /// The slot is empty.
    #[error("memory slot {0} holds no memory; there is nothing to remove")]
    NotEnabled(u32),
    /// The guest ejected the slot and the VMM has not collected it yet.
    #[error("memory slot {0} was ejected by the guest and not yet collected; take the ejected slots and unmap the memory first")]
    EjectPending(u32),
    /// The range is empty, not page aligned, or runs past the top of the address space.
    #[error("memory range {base:#x}+{len:#x} is invalid: it must be non-empty, 4 KiB aligned and within the 64-bit address space")]
    BadRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps the one in another slot.
    #[error("memory range {base:#x}+{len:#x} overlaps slot {other}'s {other_base:#x}+{other_len:#x}; choose a free range")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// The slot in the way.
        other: u32,
        /// Its base address.
        other_base: u64,
        /// Its length.
        other_len: u64,
    },
}

/// A slot and the guest-physical range it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// The slot number.
    pub slot: u32,
    /// Guest-physical base address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One slot's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySlotState {
    /// Guest-physical base address (0 when the slot is empty).
    pub base: u64,
    /// Length in bytes (0 when the slot is empty).
    pub len: u64,
    /// Hotplug status.
    pub status: SlotStatus,
}

impl MemorySlotState {
    /// Whether the slot's range is in use: enabled, or ejected and not yet collected.
    fn occupied(&self) -> bool {
        self.status.enabled || self.status.ejected
    }
}

/// The controller's guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryHotplugState {
    /// The slot the selector register holds (may be out of range).
    pub selected: u32,
    /// Every slot.
    pub slots: Vec<MemorySlotState>,
}

/// The memory hotplug controller.
pub struct MemoryHotplugController {
    state: MemoryHotplugState,
    notifier: EjectNotifier,
}

impl MemoryHotplugController {
    /// Creates a controller with `slots` empty slots.
    pub fn new(slots: u32) -> Result<Self, MemoryHotplugError> {
        if slots > MEMORY_HOTPLUG_MAX_SLOTS {
            return Err(MemoryHotplugError::TooManySlots(slots as usize));
        }
        Ok(MemoryHotplugController {
            state: MemoryHotplugState {
                selected: 0,
                slots: vec![MemorySlotState::default(); slots as usize],
            },
            notifier: EjectNotifier::default(),
        })
    }

    /// Rebuilds a controller from saved state. Status combinations no controller produces are cleared and empty
    /// slots lose their range; a range that is invalid or overlaps another slot's is an error. Slots the state says
    /// were ejected stay queued for [`MemoryHotplugController::take_ejected`].
    pub fn from_state(state: &MemoryHotplugState) -> Result<Self, MemoryHotplugError> {
        if state.slots.len() > MEMORY_HOTPLUG_MAX_SLOTS as usize {
            return Err(MemoryHotplugError::TooManySlots(state.slots.len()));
        }
        let mut controller = MemoryHotplugController {
            state: MemoryHotplugState {
                selected: state.selected,
                slots: vec![MemorySlotState::default(); state.slots.len()],
            },
            notifier: EjectNotifier::default(),
        };
        for (slot, saved) in (0u32..).zip(&state.slots) {
            let status = saved.status.sanitized();
            if !status.enabled && !status.ejected {
                continue;
            }
            controller.check_range(saved.base, saved.len)?;
            controller.state.slots[slot as usize] = MemorySlotState {
                base: saved.base,
                len: saved.len,
                status,
            };
        }
        Ok(controller)
    }

    /// The current state.
    pub fn state(&self) -> MemoryHotplugState {
        self.state.clone()
    }

    /// Sets the eventfd signalled each time the guest ejects a slot (`None` to stop signalling). The VMM should
    /// create it non-blocking and poll it in its control loop.
    pub fn set_eject_notifier(&mut self, event: Option<EventFd>) {
        self.notifier.set(event);
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        // At most MEMORY_HOTPLUG_MAX_SLOTS entries, checked on construction.
        self.state.slots.len() as u32
    }

    /// Records RAM the VMM has mapped at `base..base + len` in `slot` and raises the slot's inserting event; the VMM
    /// then notifies the GED. The range must be page aligned and must not overlap another slot's.
    pub fn insert(&mut self, slot: u32, base: u64, len: u64) -> Result<(), MemoryHotplugError> {
        let current = self.slot(slot)?;
        if current.status.enabled {
            return Err(MemoryHotplugError::AlreadyEnabled(slot));
        }
        if current.status.ejected {
            return Err(MemoryHotplugError::EjectPending(slot));
        }
        self.check_range(base, len)?;
        self.state.slots[slot as usize] = MemorySlotState {
            base,
            len,
            status: SlotStatus::INSERTED,
        };
        Ok(())
    }

    /// Asks the guest to let go of the memory in `slot` by raising its removing event; the VMM then notifies the
    /// GED. Asking again raises the event again.
    pub fn request_removal(&mut self, slot: u32) -> Result<(), MemoryHotplugError> {
        if !self.slot(slot)?.status.enabled {
            return Err(MemoryHotplugError::NotEnabled(slot));
        }
        self.state.slots[slot as usize].status.removing = true;
        Ok(())
    }

    /// The slots the guest ejected since the last call with the ranges they held, in ascending slot order. The
    /// slots are empty again; the VMM unmaps the ranges.
    pub fn take_ejected(&mut self) -> Vec<MemorySlot> {
        let mut ejected = Vec::new();
        for (slot, state) in (0u32..).zip(self.state.slots.iter_mut()) {
            if state.status.ejected {
                ejected.push(MemorySlot {
                    slot,
                    base: state.base,
                    len: state.len,
                });
                *state = MemorySlotState::default();
            }
        }
        ejected
    }

    /// The enabled slots with their ranges, in ascending slot order.
    pub fn enabled(&self) -> Vec<MemorySlot> {
        (0u32..)
            .zip(&self.state.slots)
            .filter(|(_, s)| s.status.enabled)
            .map(|(slot, s)| MemorySlot {
                slot,
                base: s.base,
                len: s.len,
            })
            .collect()
    }

    fn slot(&self, slot: u32) -> Result<&MemorySlotState, MemoryHotplugError> {
        self.state
            .slots
            .get(slot as usize)
            .ok_or(MemoryHotplugError::NoSuchSlot {
                slot,
                slots: self.slots(),
            })
    }

    /// Checks that `base..base + len` is a valid range clear of every occupied slot.
    fn check_range(&self, base: u64, len: u64) -> Result<(), MemoryHotplugError> {
        let bad = MemoryHotplugError::BadRange { base, len };
        if len == 0
            || !base.is_multiple_of(MEMORY_HOTPLUG_ALIGN)
            || !len.is_multiple_of(MEMORY_HOTPLUG_ALIGN)
        {
            return Err(bad);
        }
        let last = base.checked_add(len - 1).ok_or(bad)?;
        for (other, s) in (0u32..).zip(&self.state.slots) {
            // Occupied ranges were checked when they were stored: non-empty and not wrapping.
            if s.occupied()
                && base <= s.base.saturating_add(s.len.saturating_sub(1))
                && s.base <= last
            {
                return Err(MemoryHotplugError::Overlap {
                    base,
                    len,
                    other,
                    other_base: s.base,
                    other_len: s.len,
                });
            }
        }
        Ok(())
    }

    /// The selected slot, if it exists and is enabled.
    fn selected_enabled(&self) -> Option<&MemorySlotState> {
        self.state
            .slots
            .get(self.state.selected as usize)
            .filter(|s| s.status.enabled)
    }

    fn write_status(&mut self, value: u8) {
        let slot = self.state.selected;
        let Some(state) = self.state.slots.get_mut(slot as usize) else {
            tracing::debug!(
                "memory hotplug: ignoring a status write for slot {slot}, which does not exist"
            );
            return;
        };
        if state.status.guest_write(value, true) {
            tracing::info!(
                "memory hotplug: the guest ejected slot {slot} ({:#x}+{:#x})",
                state.base,
                state.len
            );
            self.notifier.notify("memory hotplug");
        }
    }
}

impl BusDevice for MemoryHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == MEMORY_HOTPLUG_STATUS {
            let status = self
                .state
                .slots
                .get(self.state.selected as usize)
                .map_or(0, |s| s.status.register());
            put_byte(data, status);
            return;
        }
        let range = self.selected_enabled().map_or((0, 0), |s| (s.base, s.len));
        // Truncation picks the requested half.
        let value = match offset {
            MEMORY_HOTPLUG_BASE_LOW => range.0 as u32,
            MEMORY_HOTPLUG_BASE_HIGH => (range.0 >> 32) as u32,
            MEMORY_HOTPLUG_LEN_LOW => range.1 as u32,
            MEMORY_HOTPLUG_LEN_HIGH => (range.1 >> 32) as u32,
            MEMORY_HOTPLUG_COUNT => self.slots(),
            _ => 0,
        };
        put_dword(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, dword(data), byte(data)) {
            (MEMORY_HOTPLUG_SELECT, Some(slot), _) => self.state.selected = slot,
            (MEMORY_HOTPLUG_STATUS, _, Some(value)) => self.write_status(value),
            _ => tracing::debug!(
                "memory hotplug: ignoring a {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for MemoryHotplugController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHotplugController")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotplug::{
        TestRng, STATUS_EJECT, STATUS_ENABLED, STATUS_INSERTING, STATUS_REMOVING,
    };
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const GIB: u64 = 1 << 30;

    fn select(c: &mut MemoryHotplugController, slot: u32) {
        c.write(MEMORY_HOTPLUG_SELECT, &slot.to_le_bytes());
    }

    fn read32(c: &mut MemoryHotplugController, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn status(c: &mut MemoryHotplugController, slot: u32) -> u8 {
        select(c, slot);
        let mut b = [0xffu8];
        c.read(MEMORY_HOTPLUG_STATUS, &mut b);
        b[0]
    }

    fn write_status(c: &mut MemoryHotplugController, slot: u32, value: u8) {
        select(c, slot);
        c.write(MEMORY_HOTPLUG_STATUS, &[value]);
    }

    /// Base and length of `slot` as the guest reads them.
    fn range(c: &mut MemoryHotplugController, slot: u32) -> (u64, u64) {
        select(c, slot);
        let wide = |c: &mut MemoryHotplugController, low, high| {
            u64::from(read32(c, low)) | (u64::from(read32(c, high)) << 32)
        };
        (
            wide(c, MEMORY_HOTPLUG_BASE_LOW, MEMORY_HOTPLUG_BASE_HIGH),
            wide(c, MEMORY_HOTPLUG_LEN_LOW, MEMORY_HOTPLUG_LEN_HIGH),
        )
    }

    fn with_eventfd(slots: u32) -> (MemoryHotplugController, EventFd) {
        let mut c = MemoryHotplugController::new(slots).unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        c.set_eject_notifier(Some(event.try_clone().unwrap()));
        (c, event)
    }

    #[test]
    fn layout_matches_the_design() {
        assert_eq!(
            (MEMORY_HOTPLUG_MMIO_BASE, MEMORY_HOTPLUG_MMIO_LEN),
            (0xfe00_3000, 0x20)
        );
        const { assert!(MEMORY_HOTPLUG_COUNT + 4 <= MEMORY_HOTPLUG_MMIO_LEN) };
    }

    #[test]
    fn construction_and_count_register() {
        assert_eq!(
            MemoryHotplugController::new(257).unwrap_err(),
            MemoryHotplugError::TooManySlots(257)
        );
        let mut c = MemoryHotplugController::new(0).unwrap();
        assert_eq!(read32(&mut c, MEMORY_HOTPLUG_COUNT), 0);
        assert_eq!(status(&mut c, 0), 0);
        let mut c = MemoryHotplugController::new(8).unwrap();
        assert_eq!(read32(&mut c, MEMORY_HOTPLUG_COUNT), 8);
        assert_eq!(c.slots(), 8);
        assert!(c.enabled().is_empty());
    }

    #[test]
    fn insert_exposes_the_range_above_4_gib() {
        let (mut c, event) = with_eventfd(4);
        let base = 0x1_2345_6000 + 4 * GIB;
        let len = 0x2_0000_1000;
        c.insert(1, base, len).unwrap();
        assert_eq!(range(&mut c, 1), (base, len));
        assert_eq!(read32(&mut c, MEMORY_HOTPLUG_BASE_HIGH), 0x2);
        assert_eq!(read32(&mut c, MEMORY_HOTPLUG_BASE_LOW), 0x2345_6000);
        assert_eq!(status(&mut c, 1), STATUS_ENABLED | STATUS_INSERTING);
        write_status(&mut c, 1, STATUS_INSERTING);
        assert_eq!(status(&mut c, 1), STATUS_ENABLED);
        // Empty slots show no range.
        assert_eq!(range(&mut c, 0), (0, 0));
        assert_eq!(status(&mut c, 0), 0);
        assert_eq!(c.enabled(), [MemorySlot { slot: 1, base, len }]);
        assert!(event.read().is_err());
    }

    #[test]
    fn insert_validates_slot_and_range() {
        let mut c = MemoryHotplugController::new(3).unwrap();
        assert_eq!(
            c.insert(3, 4 * GIB, GIB),
            Err(MemoryHotplugError::NoSuchSlot { slot: 3, slots: 3 })
        );
        for (base, len) in [
            (4 * GIB, 0),
            (4 * GIB + 1, GIB),
            (4 * GIB, GIB + 0x800),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(
                c.insert(0, base, len),
                Err(MemoryHotplugError::BadRange { base, len }),
                "{base:#x}+{len:#x}"
            );
        }
        // A range that ends exactly at the top of the address space is fine.
        c.insert(2, u64::MAX - 0xfff, 0x1000).unwrap();
        c.insert(0, 4 * GIB, GIB).unwrap();
        assert_eq!(
            c.insert(0, 8 * GIB, GIB),
            Err(MemoryHotplugError::AlreadyEnabled(0))
        );
        let err = c.insert(1, 5 * GIB - 0x1000, 0x2000).unwrap_err();
        assert_eq!(
            err,
            MemoryHotplugError::Overlap {
                base: 5 * GIB - 0x1000,
                len: 0x2000,
                other: 0,
                other_base: 4 * GIB,
                other_len: GIB,
            }
        );
        assert!(err.to_string().contains("slot 0"), "{err}");
        // Adjacent ranges are fine.
        c.insert(1, 5 * GIB, GIB).unwrap();
    }

    #[test]
    fn removal_request_and_eject_flow() {
        let (mut c, event) = with_eventfd(2);
        c.insert(0, 4 * GIB, GIB).unwrap();
        assert_eq!(c.request_removal(1), Err(MemoryHotplugError::NotEnabled(1)));
        assert_eq!(
            c.request_removal(2),
            Err(MemoryHotplugError::NoSuchSlot { slot: 2, slots: 2 })
        );
        c.request_removal(0).unwrap();
        assert_eq!(
            status(&mut c, 0),
            STATUS_ENABLED | STATUS_INSERTING | STATUS_REMOVING
        );
        write_status(&mut c, 0, STATUS_INSERTING | STATUS_REMOVING);
        assert_eq!(status(&mut c, 0), STATUS_ENABLED);
        write_status(&mut c, 0, STATUS_EJECT);
        assert_eq!(event.read().unwrap(), 1);
        // Gone for the guest at once, range included.
        assert_eq!(status(&mut c, 0), 0);
        assert_eq!(range(&mut c, 0), (0, 0));
        assert!(c.enabled().is_empty());
        // Until the VMM collects it, the slot and its range stay reserved.
        assert_eq!(
            c.insert(0, 8 * GIB, GIB),
            Err(MemoryHotplugError::EjectPending(0))
        );
        assert!(matches!(
            c.insert(1, 4 * GIB, GIB),
            Err(MemoryHotplugError::Overlap { other: 0, .. })
        ));
        assert_eq!(
            c.take_ejected(),
            [MemorySlot {
                slot: 0,
                base: 4 * GIB,
                len: GIB
            }]
        );
        assert!(c.take_ejected().is_empty());
        c.insert(1, 4 * GIB, GIB).unwrap();
    }

    #[test]
    fn guest_may_eject_unrequested_slots_only_when_enabled() {
        let (mut c, event) = with_eventfd(3);
        write_status(&mut c, 0, STATUS_EJECT);
        write_status(&mut c, 9, STATUS_EJECT);
        assert!(event.read().is_err());
        c.insert(2, 4 * GIB, GIB).unwrap();
        write_status(&mut c, 2, STATUS_EJECT);
        write_status(&mut c, 2, STATUS_EJECT);
        assert_eq!(event.read().unwrap(), 1);
        assert_eq!(c.take_ejected().len(), 1);
    }

    #[test]
    fn selector_and_access_sizes() {
        let mut c = MemoryHotplugController::new(2).unwrap();
        c.insert(1, 4 * GIB, GIB).unwrap();
        select(&mut c, 1);
        // Narrow selector writes do not select.
        c.write(MEMORY_HOTPLUG_SELECT, &[0]);
        c.write(MEMORY_HOTPLUG_SELECT, &[0, 0]);
        assert_eq!(c.state().selected, 1);
        // A 32-bit status write is not an eject.
        c.write(
            MEMORY_HOTPLUG_STATUS,
            &u32::from(STATUS_EJECT).to_le_bytes(),
        );
        assert_eq!(c.enabled().len(), 1);
        for (offset, len) in [
            (MEMORY_HOTPLUG_BASE_HIGH, 1),
            (MEMORY_HOTPLUG_BASE_HIGH, 8),
            (MEMORY_HOTPLUG_LEN_LOW, 2),
            (MEMORY_HOTPLUG_STATUS, 4),
            (MEMORY_HOTPLUG_COUNT, 1),
            (MEMORY_HOTPLUG_SELECT, 4),
            (MEMORY_HOTPLUG_BASE_HIGH + 1, 4),
            (28, 4),
        ] {
            let mut data = vec![0xffu8; len];
            c.read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0), "{offset}/{len}");
        }
        // Read-only registers ignore writes.
        c.write(MEMORY_HOTPLUG_BASE_LOW, &0u32.to_le_bytes());
        c.write(MEMORY_HOTPLUG_COUNT, &0u32.to_le_bytes());
        assert_eq!(range(&mut c, 1), (4 * GIB, GIB));
        assert_eq!(read32(&mut c, MEMORY_HOTPLUG_COUNT), 2);
        // Out-of-range selections read zero and ignore status writes.
        for slot in [2, u32::MAX] {
            assert_eq!(range(&mut c, slot), (0, 0));
            assert_eq!(status(&mut c, slot), 0);
            write_status(&mut c, slot, 0xff);
        }
        assert_eq!(c.enabled().len(), 1);
    }

    #[test]
    fn state_round_trip() {
        let mut c = MemoryHotplugController::new(4).unwrap();
        c.insert(0, 4 * GIB, GIB).unwrap();
        c.insert(3, 6 * GIB, GIB).unwrap();
        c.request_removal(0).unwrap();
        write_status(&mut c, 3, STATUS_EJECT);
        let state = c.state();
        let mut restored = MemoryHotplugController::from_state(&state).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.take_ejected().len(), 1);
        assert_eq!(range(&mut restored, 0), (4 * GIB, GIB));

        // Empty slots lose their ranges; impossible flags are cleared.
        let mut odd = state.clone();
        odd.slots[1] = MemorySlotState {
            base: 0x1234,
            len: 1,
            status: SlotStatus {
                removing: true,
                ..SlotStatus::default()
            },
        };
        let cleaned = MemoryHotplugController::from_state(&odd).unwrap().state();
        assert_eq!(cleaned.slots[1], MemorySlotState::default());

        let mut overlapping = state.clone();
        overlapping.slots[2] = MemorySlotState {
            base: 4 * GIB,
            len: 0x1000,
            status: SlotStatus::PRESENT,
        };
        assert!(matches!(
            MemoryHotplugController::from_state(&overlapping),
            Err(MemoryHotplugError::Overlap { other: 0, .. })
        ));
        let mut bad = state.clone();
        bad.slots[2] = MemorySlotState {
            base: 0,
            len: 0,
            status: SlotStatus::PRESENT,
        };
        assert_eq!(
            MemoryHotplugController::from_state(&bad).unwrap_err(),
            MemoryHotplugError::BadRange { base: 0, len: 0 }
        );
        let huge = MemoryHotplugState {
            selected: 0,
            slots: vec![MemorySlotState::default(); 300],
        };
        assert_eq!(
            MemoryHotplugController::from_state(&huge).unwrap_err(),
            MemoryHotplugError::TooManySlots(300)
        );
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut c, event) = with_eventfd(6);
        let mut rng = TestRng::new(0x3e3);
        for _ in 0..20_000 {
            let offset = rng.offset(MEMORY_HOTPLUG_MMIO_LEN);
            let mut data = rng.access();
            let slot = rng.below(8) as u32;
            match rng.below(6) {
                0 => c.read(offset, &mut data),
                1 => c.write(offset, &data),
                2 => write_status(&mut c, slot, rng.next() as u8),
                3 => {
                    let base = rng.below(16) * GIB / 2 + rng.below(2);
                    let len = rng.below(3) * GIB / 2;
                    let _ = c.insert(slot, base, len);
                }
                4 => {
                    let _ = c.request_removal(slot);
                }
                _ => {
                    for gone in c.take_ejected() {
                        assert!(gone.slot < 6 && gone.len > 0);
                    }
                }
            }
            // Whatever happened, the state is one a controller can be rebuilt from unchanged.
            let state = c.state();
            let rebuilt = MemoryHotplugController::from_state(&state).unwrap();
            assert_eq!(rebuilt.state(), state);
        }
        let _ = event.read();
    }
}
