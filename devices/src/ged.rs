//! The Generic Event Device (GED, `ACPI0013`): one register of pending event bits and an interrupt.
//!
//! The VMM records an event with [`Ged::notify`], which sets the event's bit and pulses the GED interrupt (IOAPIC
//! pin [`GED_IRQ`], edge-triggered). The DSDT's `_EVT` method, or a guest that speaks the register directly, reads
//! the 32-bit register at offset [`GED_EVENTS`], which returns the pending bits and clears them, and then scans the
//! controller the bits name. Other accesses read as zero; writes are ignored.
//!
//! To hot-add something the VMM first updates the controller (e.g. `CpuHotplugController::insert`) and then calls
//! `notify` with the matching event, so the guest finds the change when it looks.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::hotplug::{dword, put_dword};
use crate::interrupt::InterruptLine;

/// Guest-physical base address of the GED register block.
pub const GED_MMIO_BASE: u64 = 0xfe00_0000;
/// Length of the GED register block.
pub const GED_MMIO_LEN: u64 = 0x10;
/// The IOAPIC pin the GED raises (edge-triggered, active high).
pub const GED_IRQ: u32 = 5;
/// Offset of the 32-bit pending-events register (read clears).
pub const GED_EVENTS: u64 = 0;

/// An event the GED reports to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GedEvent {
    /// A CPU was added or is asked to go: scan the CPU hotplug controller.
    CpuHotplug,
    /// A memory slot was filled or is asked to go: scan the memory hotplug controller.
    MemoryHotplug,
    /// A PCI slot came up or is asked to go down: scan the PCI hotplug controller.
    PciHotplug,
    /// The power button was pressed.
    PowerButton,
}

impl GedEvent {
    /// Every event, in bit order.
    pub const ALL: [GedEvent; 4] = [
        GedEvent::CpuHotplug,
        GedEvent::MemoryHotplug,
        GedEvent::PciHotplug,
        GedEvent::PowerButton,
    ];

    /// The event's bit in the pending-events register.
    pub const fn bit(self) -> u32 {
        match self {
            GedEvent::CpuHotplug => 1 << 0,
            GedEvent::MemoryHotplug => 1 << 1,
            GedEvent::PciHotplug => 1 << 2,
            GedEvent::PowerButton => 1 << 3,
        }
    }
}

/// Every bit an event can set.
const EVENT_BITS: u32 = 0xf;

/// Errors raising a GED event.
#[derive(Debug, thiserror::Error)]
pub enum GedError {
    /// The interrupt line failed; the event's bit stays pending.
    #[error(
        "could not raise the GED interrupt for {event:?}: {source}; the event stays pending until the next one \
         is raised"
    )]
    Interrupt {
        /// The event being raised.
        event: GedEvent,
        /// What the interrupt line reported.
        #[source]
        source: std::io::Error,
    },
}

/// The GED's guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GedState {
    /// Pending event bits (see [`GedEvent::bit`]).
    pub pending: u32,
}

/// The Generic Event Device.
pub struct Ged {
    state: GedState,
    irq: Arc<dyn InterruptLine>,
}

impl Ged {
    /// Creates a GED with nothing pending that interrupts the guest through `irq`.
    pub fn new(irq: Arc<dyn InterruptLine>) -> Self {
        Self::from_state(&GedState::default(), irq)
    }

    /// Rebuilds a GED from saved state, dropping bits no event sets. No interrupt is raised.
    pub fn from_state(state: &GedState, irq: Arc<dyn InterruptLine>) -> Self {
        Ged {
            state: GedState {
                pending: state.pending & EVENT_BITS,
            },
            irq,
        }
    }

    /// The current state.
    pub fn state(&self) -> GedState {
        self.state.clone()
    }

    /// Sets `event`'s bit and pulses the interrupt, once per call even when the bit was already pending.
    pub fn notify(&mut self, event: GedEvent) -> Result<(), GedError> {
        self.state.pending |= event.bit();
        self.irq
            .trigger()
            .map_err(|source| GedError::Interrupt { event, source })
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == GED_EVENTS && data.len() == 4 {
            put_dword(data, std::mem::take(&mut self.state.pending));
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "GED: ignoring a {}-byte write at offset {offset:#x} (value {:?})",
            data.len(),
            dword(data)
        );
    }
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotplug::TestRng;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Counts pulses; fails them when told to.
    #[derive(Default)]
    struct Line {
        triggers: AtomicUsize,
        levels: AtomicUsize,
        fail: AtomicBool,
    }

    impl InterruptLine for Line {
        fn trigger(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("pin gone"));
            }
            self.triggers.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, _asserted: bool) -> std::io::Result<()> {
            self.levels.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn setup() -> (Ged, Arc<Line>) {
        let line = Arc::new(Line::default());
        (Ged::new(line.clone()), line)
    }

    fn read_events(ged: &mut Ged) -> u32 {
        let mut data = [0xffu8; 4];
        ged.read(GED_EVENTS, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn layout_matches_the_design() {
        assert_eq!(
            (GED_MMIO_BASE, GED_MMIO_LEN, GED_IRQ),
            (0xfe00_0000, 0x10, 5)
        );
        let bits: Vec<u32> = GedEvent::ALL.iter().map(|e| e.bit()).collect();
        assert_eq!(bits, [1, 2, 4, 8]);
        assert_eq!(bits.iter().fold(0, |a, b| a | b), EVENT_BITS);
    }

    #[test]
    fn each_notify_sets_its_bit_and_triggers_once() {
        let (mut ged, line) = setup();
        assert_eq!(read_events(&mut ged), 0);
        for (n, event) in GedEvent::ALL.into_iter().enumerate() {
            ged.notify(event).unwrap();
            assert_eq!(line.triggers.load(Ordering::SeqCst), n + 1);
            assert_eq!(ged.state().pending, event.bit());
            assert_eq!(read_events(&mut ged), event.bit());
        }
        // An edge device never holds the line.
        assert_eq!(line.levels.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn read_returns_and_clears_accumulated_events() {
        let (mut ged, line) = setup();
        ged.notify(GedEvent::PciHotplug).unwrap();
        ged.notify(GedEvent::PowerButton).unwrap();
        // The same event twice: one bit, two pulses.
        ged.notify(GedEvent::PciHotplug).unwrap();
        assert_eq!(line.triggers.load(Ordering::SeqCst), 3);
        assert_eq!(read_events(&mut ged), 0b1100);
        assert_eq!(read_events(&mut ged), 0);
    }

    #[test]
    fn other_sizes_and_offsets_neither_read_nor_clear() {
        let (mut ged, _line) = setup();
        ged.notify(GedEvent::CpuHotplug).unwrap();
        for (offset, len) in [
            (0, 1),
            (0, 2),
            (0, 8),
            (1, 4),
            (4, 4),
            (12, 4),
            (u64::MAX, 4),
        ] {
            let mut data = vec![0xffu8; len];
            ged.read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0), "{offset:#x}/{len}");
        }
        // Writes are ignored, including one trying to clear the register.
        ged.write(GED_EVENTS, &0u32.to_le_bytes());
        ged.write(GED_EVENTS, &[0]);
        assert_eq!(ged.state().pending, GedEvent::CpuHotplug.bit());
        assert_eq!(read_events(&mut ged), 1);
    }

    #[test]
    fn failed_interrupt_is_reported_and_the_event_stays_pending() {
        let (mut ged, line) = setup();
        line.fail.store(true, Ordering::SeqCst);
        let err = ged.notify(GedEvent::MemoryHotplug).unwrap_err();
        assert!(err.to_string().contains("MemoryHotplug"), "{err}");
        assert_eq!(ged.state().pending, GedEvent::MemoryHotplug.bit());
        line.fail.store(false, Ordering::SeqCst);
        ged.notify(GedEvent::CpuHotplug).unwrap();
        assert_eq!(read_events(&mut ged), 0b11);
    }

    #[test]
    fn state_round_trip_drops_unknown_bits_without_interrupting() {
        let (mut ged, line) = setup();
        ged.notify(GedEvent::PowerButton).unwrap();
        let state = ged.state();
        let mut restored = Ged::from_state(&state, line.clone());
        assert_eq!(restored.state(), state);
        assert_eq!(line.triggers.load(Ordering::SeqCst), 1);
        assert_eq!(read_events(&mut restored), 8);

        let odd = GedState { pending: u32::MAX };
        assert_eq!(Ged::from_state(&odd, line).state().pending, EVENT_BITS);
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut ged, line) = setup();
        let mut rng = TestRng::new(0x6ed);
        let mut notified = 0;
        for _ in 0..20_000 {
            let offset = rng.offset(GED_MMIO_LEN);
            let mut data = rng.access();
            match rng.below(4) {
                0 => {
                    ged.read(offset, &mut data);
                    if (offset, data.len()) != (GED_EVENTS, 4) {
                        assert!(data.iter().all(|b| *b == 0));
                    }
                }
                1 => {
                    ged.notify(GedEvent::ALL[rng.below(4) as usize]).unwrap();
                    notified += 1;
                }
                _ => ged.write(offset, &data),
            }
            assert_eq!(ged.state().pending & !EVENT_BITS, 0);
        }
        assert_eq!(line.triggers.load(Ordering::SeqCst), notified);
    }
}
