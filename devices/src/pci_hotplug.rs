//! The PCI hotplug controller: which slots of bus 0 hold a device, and the up / down / eject handshake with the
//! guest.
//!
//! Every register is 32 bits wide with bit n standing for slot n; slots 1 to 31 can be hotplugged and bit 0 (the
//! host bridge) always reads as zero and is ignored on write. Offsets from [`PCI_HOTPLUG_MMIO_BASE`]; other sizes and
//! offsets read as zero and ignore writes:
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | [`PCI_HOTPLUG_UP`] (0) | read, clears | slots that came up since the last read |
//! | [`PCI_HOTPLUG_DOWN`] (4) | read, clears | slots the VMM asked to go down since the last read |
//! | [`PCI_HOTPLUG_EJECT`] (8) | write | the guest has released these slots: eject them |
//! | [`PCI_HOTPLUG_PRESENT`] (12) | read | slots that hold a device now |
//!
//! The VMM declares devices placed at boot with [`PciHotplugController::set_present`], hot-adds with
//! [`PciHotplugController::slot_added`] and asks for a removal with [`PciHotplugController::request_eject`], each
//! time followed by the GED's PCI hotplug event.
//!
//! Ejects: the guest may eject any present slot, also one the VMM did not ask for, as QEMU and Cloud Hypervisor
//! allow (an OS can power a slot off on its own, and has then let go of the device). An ejected slot stops being
//! present at once, the controller signals its eject eventfd, and the VMM collects the slot with
//! [`PciHotplugController::take_ejected`] and removes the device. Eject bits for empty slots and for slot 0 are
//! ignored.

use crate::bus::BusDevice;
use crate::hotplug::{dword, put_dword, EjectNotifier};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical base address of the PCI hotplug controller.
pub const PCI_HOTPLUG_MMIO_BASE: u64 = 0xfe00_2000;
/// Length of the PCI hotplug controller's register block.
pub const PCI_HOTPLUG_MMIO_LEN: u64 = 0x10;
/// Offset of the 32-bit slots-up register (read clears).
pub const PCI_HOTPLUG_UP: u64 = 0;
/// Offset of the 32-bit slots-down register (read clears).
pub const PCI_HOTPLUG_DOWN: u64 = 4;
/// Offset of the 32-bit eject register (write).
pub const PCI_HOTPLUG_EJECT: u64 = 8;
/// Offset of the 32-bit present-slots register (read).
pub const PCI_HOTPLUG_PRESENT: u64 = 12;
/// Slots on bus 0; slot 0 is the host bridge.
pub const PCI_HOTPLUG_SLOTS: u8 = 32;

/// The bits of the slots that can be hotplugged (1 to 31).
const HOTPLUG_SLOTS: u32 = !1;

/// Errors changing a slot from the VMM side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciHotplugError {
    /// The slot number is not on bus 0.
    #[error("PCI slot {0} does not exist; bus 0 has slots 0 to 31")]
    NoSuchSlot(u8),
    /// Slot 0 holds the host bridge.
    #[error("PCI slot 0 holds the host bridge and cannot be hotplugged; use slots 1 to 31")]
    HostBridge,
    /// The slot already holds a device.
    #[error("PCI slot {0} already holds a device; remove it first or choose a free slot")]
    AlreadyPresent(u8),
    /// The slot is empty.
    #[error("PCI slot {0} is empty; there is nothing to eject")]
    NotPresent(u8),
    /// The guest ejected the slot and the VMM has not collected it yet.
    #[error("PCI slot {0} was ejected by the guest and not yet collected; take the ejected slots and remove the device first")]
    EjectPending(u8),
}

/// The controller's guest-visible state, one bit per slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciHotplugState {
    /// Slots that came up and the guest has not read yet.
    pub up: u32,
    /// Slots asked to go down that the guest has not read yet.
    pub down: u32,
    /// Slots that hold a device.
    pub present: u32,
    /// Slots the guest ejected that the VMM has not collected yet.
    pub ejected: u32,
}

/// The PCI hotplug controller.
#[derive(Default)]
pub struct PciHotplugController {
    state: PciHotplugState,
    notifier: EjectNotifier,
}

impl PciHotplugController {
    /// Creates a controller with every slot empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a controller from saved state, clearing bits no controller holds: slot 0, up or down events of
    /// empty slots, and ejects of present slots. Slots the state says were ejected stay queued for
    /// [`PciHotplugController::take_ejected`].
    pub fn from_state(state: &PciHotplugState) -> Self {
        let present = state.present & HOTPLUG_SLOTS;
        PciHotplugController {
            state: PciHotplugState {
                up: state.up & present,
                down: state.down & present,
                present,
                ejected: state.ejected & HOTPLUG_SLOTS & !present,
            },
            notifier: EjectNotifier::default(),
        }
    }

    /// The current state.
    pub fn state(&self) -> PciHotplugState {
        self.state.clone()
    }

    /// Sets the eventfd signalled each time the guest ejects slots (`None` to stop signalling). The VMM should
    /// create it non-blocking and poll it in its control loop.
    pub fn set_eject_notifier(&mut self, event: Option<EventFd>) {
        self.notifier.set(event);
    }

    /// Marks `slot` as holding a device, or as empty, without telling the guest: for devices placed before boot.
    /// Emptying a slot drops its pending up and down events.
    pub fn set_present(&mut self, slot: u8, present: bool) -> Result<(), PciHotplugError> {
        let bit = slot_bit(slot)?;
        if present {
            if self.state.ejected & bit != 0 {
                return Err(PciHotplugError::EjectPending(slot));
            }
            self.state.present |= bit;
        } else {
            self.state.present &= !bit;
            self.state.up &= !bit;
            self.state.down &= !bit;
        }
        Ok(())
    }

    /// Records a device hot-added at `slot`: it becomes present and its up bit is set. The VMM then notifies the
    /// GED.
    pub fn slot_added(&mut self, slot: u8) -> Result<(), PciHotplugError> {
        let bit = slot_bit(slot)?;
        if self.state.present & bit != 0 {
            return Err(PciHotplugError::AlreadyPresent(slot));
        }
        if self.state.ejected & bit != 0 {
            return Err(PciHotplugError::EjectPending(slot));
        }
        self.state.present |= bit;
        self.state.up |= bit;
        self.state.down &= !bit;
        Ok(())
    }

    /// Asks the guest to release the device at `slot` by setting its down bit; the VMM then notifies the GED and
    /// waits for the eject. Asking again sets the bit again.
    pub fn request_eject(&mut self, slot: u8) -> Result<(), PciHotplugError> {
        let bit = slot_bit(slot)?;
        if self.state.present & bit == 0 {
            return Err(PciHotplugError::NotPresent(slot));
        }
        self.state.down |= bit;
        Ok(())
    }

    /// The slots the guest ejected since the last call, in ascending order. They are empty; the VMM removes their
    /// devices, after which the slots can be used again.
    pub fn take_ejected(&mut self) -> Vec<u8> {
        slots_of(std::mem::take(&mut self.state.ejected))
    }

    /// The slots that hold a device, in ascending order.
    pub fn present_slots(&self) -> Vec<u8> {
        slots_of(self.state.present)
    }

    fn eject(&mut self, requested: u32) {
        let ejected = requested & self.state.present;
        let ignored = requested & !ejected;
        if ignored != 0 {
            tracing::debug!(
                "PCI hotplug: ignoring ejects of empty slots or slot 0 ({ignored:#010x})"
            );
        }
        if ejected == 0 {
            return;
        }
        self.state.present &= !ejected;
        self.state.up &= !ejected;
        self.state.down &= !ejected;
        self.state.ejected |= ejected;
        tracing::info!(
            "PCI hotplug: the guest ejected slots {:?}",
            slots_of(ejected)
        );
        self.notifier.notify("PCI hotplug");
    }
}

/// The register bit of a hotpluggable slot.
fn slot_bit(slot: u8) -> Result<u32, PciHotplugError> {
    match slot {
        0 => Err(PciHotplugError::HostBridge),
        s if s >= PCI_HOTPLUG_SLOTS => Err(PciHotplugError::NoSuchSlot(s)),
        s => Ok(1 << s),
    }
}

/// The slot numbers whose bits are set, ascending.
fn slots_of(bits: u32) -> Vec<u8> {
    (0..PCI_HOTPLUG_SLOTS)
        .filter(|slot| bits & (1 << slot) != 0)
        .collect()
}

impl BusDevice for PciHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            PCI_HOTPLUG_UP => std::mem::take(&mut self.state.up),
            PCI_HOTPLUG_DOWN => std::mem::take(&mut self.state.down),
            PCI_HOTPLUG_PRESENT => self.state.present,
            _ => 0,
        };
        put_dword(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, dword(data)) {
            (PCI_HOTPLUG_EJECT, Some(slots)) => self.eject(slots),
            _ => tracing::debug!(
                "PCI hotplug: ignoring a {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for PciHotplugController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHotplugController")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotplug::TestRng;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn read32(c: &mut PciHotplugController, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn eject(c: &mut PciHotplugController, slots: u32) {
        c.write(PCI_HOTPLUG_EJECT, &slots.to_le_bytes());
    }

    fn with_eventfd() -> (PciHotplugController, EventFd) {
        let mut c = PciHotplugController::new();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        c.set_eject_notifier(Some(event.try_clone().unwrap()));
        (c, event)
    }

    #[test]
    fn layout_matches_the_design() {
        assert_eq!(
            (PCI_HOTPLUG_MMIO_BASE, PCI_HOTPLUG_MMIO_LEN),
            (0xfe00_2000, 0x10)
        );
    }

    #[test]
    fn slot_bounds_and_host_bridge() {
        let mut c = PciHotplugController::new();
        assert_eq!(c.slot_added(0), Err(PciHotplugError::HostBridge));
        assert_eq!(c.request_eject(0), Err(PciHotplugError::HostBridge));
        assert_eq!(c.set_present(0, true), Err(PciHotplugError::HostBridge));
        for slot in [32, 255] {
            assert_eq!(c.slot_added(slot), Err(PciHotplugError::NoSuchSlot(slot)));
            assert_eq!(
                c.request_eject(slot),
                Err(PciHotplugError::NoSuchSlot(slot))
            );
            assert_eq!(
                c.set_present(slot, false),
                Err(PciHotplugError::NoSuchSlot(slot))
            );
        }
        c.slot_added(31).unwrap();
        c.slot_added(1).unwrap();
        assert_eq!(read32(&mut c, PCI_HOTPLUG_PRESENT), 0x8000_0002);
        // The guest cannot eject the host bridge.
        eject(&mut c, 1);
        assert!(c.take_ejected().is_empty());
    }

    #[test]
    fn up_register_reads_and_clears() {
        let mut c = PciHotplugController::new();
        c.set_present(2, true).unwrap();
        assert_eq!(
            read32(&mut c, PCI_HOTPLUG_UP),
            0,
            "boot devices raise no event"
        );
        c.slot_added(3).unwrap();
        c.slot_added(5).unwrap();
        assert_eq!(c.slot_added(5), Err(PciHotplugError::AlreadyPresent(5)));
        assert_eq!(c.slot_added(2), Err(PciHotplugError::AlreadyPresent(2)));
        assert_eq!(read32(&mut c, PCI_HOTPLUG_UP), 0b10_1000);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_UP), 0);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_PRESENT), 0b10_1100);
        // Present reads do not clear.
        assert_eq!(read32(&mut c, PCI_HOTPLUG_PRESENT), 0b10_1100);
        assert_eq!(c.present_slots(), [2, 3, 5]);
    }

    #[test]
    fn requested_eject_flow() {
        let (mut c, event) = with_eventfd();
        c.slot_added(4).unwrap();
        assert_eq!(c.request_eject(6), Err(PciHotplugError::NotPresent(6)));
        c.request_eject(4).unwrap();
        assert_eq!(read32(&mut c, PCI_HOTPLUG_DOWN), 1 << 4);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_DOWN), 0);
        eject(&mut c, 1 << 4);
        assert_eq!(event.read().unwrap(), 1);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_PRESENT), 0);
        // The up bit the guest never read went with the device.
        assert_eq!(read32(&mut c, PCI_HOTPLUG_UP), 0);
        assert_eq!(c.slot_added(4), Err(PciHotplugError::EjectPending(4)));
        assert_eq!(
            c.set_present(4, true),
            Err(PciHotplugError::EjectPending(4))
        );
        assert_eq!(c.take_ejected(), [4]);
        assert!(c.take_ejected().is_empty());
        c.slot_added(4).unwrap();
    }

    #[test]
    fn guest_may_eject_any_present_slot() {
        let (mut c, event) = with_eventfd();
        c.set_present(7, true).unwrap();
        c.slot_added(9).unwrap();
        // One write ejects several; empty slots and slot 0 in it are ignored.
        eject(&mut c, (1 << 7) | (1 << 9) | (1 << 12) | 1);
        assert_eq!(event.read().unwrap(), 1);
        assert_eq!(c.take_ejected(), [7, 9]);
        // Nothing present: no signal.
        eject(&mut c, u32::MAX);
        assert!(event.read().is_err());
        assert!(c.take_ejected().is_empty());
    }

    #[test]
    fn set_present_false_drops_events() {
        let mut c = PciHotplugController::new();
        c.slot_added(8).unwrap();
        c.request_eject(8).unwrap();
        c.set_present(8, false).unwrap();
        assert_eq!(c.state(), PciHotplugState::default());
        assert!(c.take_ejected().is_empty());
    }

    #[test]
    fn wrong_access_sizes_are_ignored() {
        let mut c = PciHotplugController::new();
        c.slot_added(1).unwrap();
        c.request_eject(1).unwrap();
        for offset in [PCI_HOTPLUG_UP, PCI_HOTPLUG_DOWN, PCI_HOTPLUG_PRESENT] {
            for len in [1, 2, 8] {
                let mut data = vec![0xffu8; len];
                c.read(offset, &mut data);
                assert!(data.iter().all(|b| *b == 0), "{offset}/{len}");
            }
        }
        // Narrow reads did not clear the events; unaligned and write-only offsets read zero.
        assert_eq!(read32(&mut c, 1), 0);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_EJECT), 0);
        assert_eq!(c.state().up, 2);
        c.write(PCI_HOTPLUG_EJECT, &[2]);
        c.write(PCI_HOTPLUG_EJECT, &[2, 0]);
        c.write(PCI_HOTPLUG_EJECT + 1, &2u32.to_le_bytes());
        c.write(PCI_HOTPLUG_PRESENT, &0u32.to_le_bytes());
        c.write(PCI_HOTPLUG_UP, &0u32.to_le_bytes());
        assert_eq!(c.present_slots(), [1]);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_UP), 2);
        assert_eq!(read32(&mut c, PCI_HOTPLUG_DOWN), 2);
    }

    #[test]
    fn state_round_trip() {
        let mut c = PciHotplugController::new();
        c.slot_added(3).unwrap();
        c.set_present(4, true).unwrap();
        c.request_eject(4).unwrap();
        c.slot_added(5).unwrap();
        eject(&mut c, 1 << 5);
        let state = c.state();
        let mut restored = PciHotplugController::from_state(&state);
        assert_eq!(restored.state(), state);
        assert_eq!(restored.take_ejected(), [5]);

        let odd = PciHotplugState {
            up: u32::MAX,
            down: 1 << 6,
            present: 0b1001,
            ejected: 0b1_1001,
        };
        assert_eq!(
            PciHotplugController::from_state(&odd).state(),
            PciHotplugState {
                up: 0b1000,
                down: 0,
                present: 0b1000,
                ejected: 0b1_0000,
            }
        );
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut c, event) = with_eventfd();
        let mut rng = TestRng::new(0x9c1);
        for _ in 0..20_000 {
            let offset = rng.offset(PCI_HOTPLUG_MMIO_LEN);
            let mut data = rng.access();
            let slot = rng.below(40) as u8;
            match rng.below(7) {
                0 => c.read(offset, &mut data),
                1 => c.write(offset, &data),
                2 => eject(&mut c, rng.next() as u32),
                3 => {
                    let _ = c.slot_added(slot);
                }
                4 => {
                    let _ = c.request_eject(slot);
                }
                5 => {
                    let _ = c.set_present(slot, rng.below(2) == 0);
                }
                _ => {
                    for gone in c.take_ejected() {
                        assert!((1..32).contains(&gone));
                    }
                }
            }
            let s = c.state();
            assert_eq!(PciHotplugController::from_state(&s).state(), s);
        }
        let _ = event.read();
    }
}
