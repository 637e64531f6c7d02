//! PS/2 system control port A (0x92 on a PC): the "fast A20" gate and the fast reset line.
//!
//! Bit 0 (fast reset): writing 1 resets the machine through [`PlatformEvents::reset`]. The bit then reads as 0 again,
//! as it would after the reset, so every write of 1 asks for a reset (firmware writes `inb(0x92) | 1`). Bit 1 (A20
//! gate) reads back what was written, but has no effect: address line 20 is always enabled in a KVM guest, so
//! firmware that turns it on finds it on and nothing can turn it off. The other bits (the password lock and the
//! disk activity lights on a real PS/2) read back what was written.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::platform::PlatformEvents;

/// Length of the port's range.
pub const PORT92_RANGE_LEN: u64 = 1;

const FAST_RESET: u8 = 0x01;
const A20_ENABLED: u8 = 0x02;

/// The port's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port92State {
    /// The last value written, without the reset bit.
    pub value: u8,
}

impl Default for Port92State {
    fn default() -> Self {
        // A20 is on (it always is).
        Port92State { value: A20_ENABLED }
    }
}

/// System control port A.
pub struct Port92 {
    state: Port92State,
    events: Arc<dyn PlatformEvents>,
}

impl Port92 {
    /// Creates the port (A20 reported enabled); resets go to `events`.
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self::from_state(&Port92State::default(), events)
    }

    /// Rebuilds the port from saved state.
    pub fn from_state(state: &Port92State, events: Arc<dyn PlatformEvents>) -> Self {
        Port92 {
            state: Port92State {
                value: state.value & !FAST_RESET,
            },
            events,
        }
    }

    /// The current state.
    pub fn state(&self) -> Port92State {
        self.state.clone()
    }

    /// Whether the guest last wrote the A20 gate bit set.
    pub fn a20_gate(&self) -> bool {
        self.state.value & A20_ENABLED != 0
    }
}

impl BusDevice for Port92 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (0, [byte]) => *byte = self.state.value,
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            tracing::debug!(
                "port 0x92: ignoring a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        if value & A20_ENABLED == 0 {
            tracing::debug!("port 0x92: the guest disabled A20; it stays enabled in a KVM guest");
        }
        self.state.value = value & !FAST_RESET;
        if value & FAST_RESET != 0 {
            tracing::info!("port 0x92: fast reset, resetting the VM");
            self.events.reset();
        }
    }
}

impl std::fmt::Debug for Port92 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port92")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Events {
        resets: AtomicUsize,
        other: AtomicUsize,
    }

    impl PlatformEvents for Events {
        fn power_off(&self) {
            self.other.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn debug_exit(&self, _code: u8) {
            self.other.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn inb(port: &mut Port92) -> u8 {
        let mut b = [0xa5u8];
        port.read(0, &mut b);
        b[0]
    }

    #[test]
    fn a20_reads_back() {
        let events = Arc::new(Events::default());
        let mut port = Port92::new(events.clone());
        assert_eq!(inb(&mut port), 0x02);
        assert!(port.a20_gate());
        port.write(0, &[0x00]);
        assert_eq!(inb(&mut port), 0x00);
        assert!(!port.a20_gate());
        // The usual "fast A20" enable.
        let value = inb(&mut port) | 0x02;
        port.write(0, &[value]);
        assert_eq!(inb(&mut port), 0x02);
        port.write(0, &[0xc2]);
        assert_eq!(inb(&mut port), 0xc2);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
        assert_eq!(events.other.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn writing_bit0_resets() {
        let events = Arc::new(Events::default());
        let mut port = Port92::new(events.clone());
        let value = inb(&mut port) | 0x01;
        port.write(0, &[value]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 1);
        // The bit springs back, A20 is kept.
        assert_eq!(inb(&mut port), 0x02);
        // So the next reset request works the same way.
        let value = inb(&mut port) | 0x01;
        port.write(0, &[value]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 2);
        port.write(0, &[0x02]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let events = Arc::new(Events::default());
        let mut port = Port92::new(events.clone());
        port.write(0, &[0x01, 0x01]);
        port.write(1, &[0x01]);
        port.write(0, &[]);
        let mut w = [0xffu8; 2];
        port.read(0, &mut w);
        assert_eq!(w, [0, 0]);
        assert_eq!(events.resets.load(Ordering::SeqCst), 0);
        assert_eq!(inb(&mut port), 0x02);
    }

    #[test]
    fn state_round_trip() {
        let events = Arc::new(Events::default());
        let mut port = Port92::new(events.clone());
        port.write(0, &[0x80]);
        let state = port.state();
        assert_eq!(state, Port92State { value: 0x80 });
        let restored = Port92::from_state(&state, events.clone());
        assert_eq!(restored.state(), state);
        let odd = Port92::from_state(&Port92State { value: 0xff }, events);
        assert_eq!(odd.state().value, 0xfe);
    }
}
