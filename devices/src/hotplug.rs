//! What the ACPI hotplug controllers share: the status register of a selected CPU or memory slot, the eventfd that
//! tells the VMM the guest ejected something, and the exact-size register accesses of these blocks.
//!
//! The CPU and memory hotplug controllers give each CPU or slot the same 8-bit status register:
//!
//! | bit | read | write 1 |
//! |---|---|---|
//! | 0 ([`STATUS_ENABLED`]) | present and usable | ignored |
//! | 1 ([`STATUS_INSERTING`]) | the VMM added it and the guest has not acknowledged | clears the bit |
//! | 2 ([`STATUS_REMOVING`]) | the VMM asked for its removal and the guest has not acknowledged | clears the bit |
//! | 3 ([`STATUS_EJECT`]) | always 0 | the guest has let go of it: it stops being enabled and the VMM may remove it |
//!
//! A guest eject is reported to the VMM through an [`EventFd`] the VMM hands to each controller (it polls it in its
//! epoll loop, then calls the controller's `take_ejected`); a controller without one simply queues the ejects.

use vmm_sys_util::eventfd::EventFd;

/// Status bit 0: the CPU or memory slot is present and enabled.
pub const STATUS_ENABLED: u8 = 1 << 0;
/// Status bit 1: the VMM inserted it; the guest clears the bit by writing 1.
pub const STATUS_INSERTING: u8 = 1 << 1;
/// Status bit 2: the VMM asked for its removal; the guest clears the bit by writing 1.
pub const STATUS_REMOVING: u8 = 1 << 2;
/// Status bit 3, write only: the guest ejects it.
pub const STATUS_EJECT: u8 = 1 << 3;

/// The hotplug state of one CPU or memory slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStatus {
    /// Present and enabled.
    pub enabled: bool,
    /// Inserted by the VMM, not yet acknowledged by the guest.
    pub inserting: bool,
    /// Removal asked for by the VMM, not yet acknowledged by the guest.
    pub removing: bool,
    /// Ejected by the guest and not yet taken by the VMM; never together with `enabled`.
    pub ejected: bool,
}

impl SlotStatus {
    /// Enabled without pending events, as a CPU or slot that was there from boot.
    pub(crate) const PRESENT: SlotStatus = SlotStatus {
        enabled: true,
        inserting: false,
        removing: false,
        ejected: false,
    };

    /// Enabled with the inserting event raised.
    pub(crate) const INSERTED: SlotStatus = SlotStatus {
        enabled: true,
        inserting: true,
        removing: false,
        ejected: false,
    };

    /// The value the guest reads.
    pub(crate) fn register(self) -> u8 {
        let mut value = 0;
        if self.enabled {
            value |= STATUS_ENABLED;
        }
        if self.inserting {
            value |= STATUS_INSERTING;
        }
        if self.removing {
            value |= STATUS_REMOVING;
        }
        value
    }

    /// Applies a guest write of `value`; returns true when it ejected the CPU or slot. Only an enabled one that is
    /// `ejectable` can be ejected; other eject writes are ignored.
    pub(crate) fn guest_write(&mut self, value: u8, ejectable: bool) -> bool {
        if value & STATUS_INSERTING != 0 {
            self.inserting = false;
        }
        if value & STATUS_REMOVING != 0 {
            self.removing = false;
        }
        if value & STATUS_EJECT == 0 || !self.enabled || !ejectable {
            return false;
        }
        *self = SlotStatus {
            ejected: true,
            ..SlotStatus::default()
        };
        true
    }

    /// The status with combinations no controller produces removed: an ejected one is not enabled, and only an
    /// enabled one has pending events.
    pub(crate) fn sanitized(self) -> SlotStatus {
        if self.ejected {
            return SlotStatus {
                ejected: true,
                ..SlotStatus::default()
            };
        }
        if !self.enabled {
            return SlotStatus::default();
        }
        self
    }
}

/// Wakes the VMM when the guest ejects something.
#[derive(Debug, Default)]
pub(crate) struct EjectNotifier(Option<EventFd>);

impl EjectNotifier {
    /// Replaces the eventfd (or removes it with `None`).
    pub(crate) fn set(&mut self, event: Option<EventFd>) {
        self.0 = event;
    }

    /// Signals the eventfd, if there is one. The eject stays queued in the controller either way.
    pub(crate) fn notify(&self, device: &str) {
        if let Some(event) = &self.0 {
            if let Err(e) = event.write(1) {
                tracing::warn!("{device}: could not signal a guest eject to the VMM: {e}");
            }
        }
    }
}

/// The value of a 32-bit access, or `None` for any other size.
pub(crate) fn dword(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

/// The value of an 8-bit access, or `None` for any other size.
pub(crate) fn byte(data: &[u8]) -> Option<u8> {
    match data {
        [value] => Some(*value),
        _ => None,
    }
}

/// Fills a read with `value` if it is a 32-bit access, with zeros otherwise.
pub(crate) fn put_dword(data: &mut [u8], value: u32) {
    if data.len() == 4 {
        data.copy_from_slice(&value.to_le_bytes());
    } else {
        data.fill(0);
    }
}

/// Fills a read with `value` if it is an 8-bit access, with zeros otherwise.
pub(crate) fn put_byte(data: &mut [u8], value: u8) {
    match data {
        [only] => *only = value,
        _ => data.fill(0),
    }
}

/// A small deterministic generator for the random-access tests.
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        TestRng(seed | 1)
    }

    /// xorshift64*.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (`bound` > 0).
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// An offset near the register block most of the time, anywhere now and then.
    pub(crate) fn offset(&mut self, block_len: u64) -> u64 {
        match self.below(8) {
            0 => self.next(),
            1 => u64::MAX - self.below(8),
            _ => self.below(block_len + 8),
        }
    }

    /// An access of 0 to 8 bytes, mostly 1 or 4, with random contents.
    pub(crate) fn access(&mut self) -> Vec<u8> {
        let len = match self.below(4) {
            0 => 1,
            1 => 4,
            _ => self.below(9) as usize,
        };
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn register_reflects_the_flags_and_never_the_eject_bit() {
        let all = SlotStatus {
            enabled: true,
            inserting: true,
            removing: true,
            ejected: false,
        };
        assert_eq!(all.register(), 0x7);
        assert_eq!(SlotStatus::PRESENT.register(), STATUS_ENABLED);
        assert_eq!(
            SlotStatus::INSERTED.register(),
            STATUS_ENABLED | STATUS_INSERTING
        );
        let ejected = SlotStatus {
            ejected: true,
            ..SlotStatus::default()
        };
        assert_eq!(ejected.register(), 0);
    }

    #[test]
    fn guest_write_acknowledges_events_and_ejects() {
        let mut s = SlotStatus {
            enabled: true,
            inserting: true,
            removing: true,
            ejected: false,
        };
        // Writing the enabled bit does nothing; each event bit clears only itself.
        assert!(!s.guest_write(STATUS_ENABLED | STATUS_INSERTING, true));
        assert_eq!(s.register(), STATUS_ENABLED | STATUS_REMOVING);
        assert!(!s.guest_write(STATUS_REMOVING, true));
        assert_eq!(s, SlotStatus::PRESENT);
        // A non-ejectable one ignores the eject bit but still takes the acknowledgements.
        s.inserting = true;
        assert!(!s.guest_write(STATUS_EJECT | STATUS_INSERTING, false));
        assert_eq!(s, SlotStatus::PRESENT);
        assert!(s.guest_write(0xff, true));
        assert_eq!(
            s,
            SlotStatus {
                ejected: true,
                ..SlotStatus::default()
            }
        );
        // Ejecting again, or something never enabled, does nothing.
        assert!(!s.guest_write(STATUS_EJECT, true));
        let mut absent = SlotStatus::default();
        assert!(!absent.guest_write(STATUS_EJECT, true));
        assert_eq!(absent, SlotStatus::default());
    }

    #[test]
    fn sanitized_drops_impossible_combinations() {
        let odd = SlotStatus {
            enabled: true,
            inserting: true,
            removing: false,
            ejected: true,
        };
        assert_eq!(
            odd.sanitized(),
            SlotStatus {
                ejected: true,
                ..SlotStatus::default()
            }
        );
        let events_only = SlotStatus {
            inserting: true,
            removing: true,
            ..SlotStatus::default()
        };
        assert_eq!(events_only.sanitized(), SlotStatus::default());
        assert_eq!(SlotStatus::INSERTED.sanitized(), SlotStatus::INSERTED);
    }

    #[test]
    fn exact_size_accesses() {
        assert_eq!(dword(&[1, 2, 3, 4]), Some(0x0403_0201));
        assert_eq!(dword(&[1, 2]), None);
        assert_eq!(dword(&[]), None);
        assert_eq!(byte(&[7]), Some(7));
        assert_eq!(byte(&[7, 8]), None);
        let mut four = [0xffu8; 4];
        put_dword(&mut four, 0x1234_5678);
        assert_eq!(four, [0x78, 0x56, 0x34, 0x12]);
        let mut two = [0xffu8; 2];
        put_dword(&mut two, 1);
        assert_eq!(two, [0, 0]);
        put_byte(&mut two, 1);
        assert_eq!(two, [0, 0]);
        let mut one = [0u8; 1];
        put_byte(&mut one, 9);
        assert_eq!(one, [9]);
        put_dword(&mut one, 9);
        assert_eq!(one, [0]);
    }

    #[test]
    fn notifier_signals_its_eventfd() {
        let mut notifier = EjectNotifier::default();
        // Without an eventfd nothing happens.
        notifier.notify("test");
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        notifier.set(Some(event.try_clone().unwrap()));
        notifier.notify("test");
        notifier.notify("test");
        assert_eq!(event.read().unwrap(), 2);
        notifier.set(None);
        notifier.notify("test");
        assert!(event.read().is_err());
    }
}
