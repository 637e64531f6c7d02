//! How devices signal interrupts: a wired line (an IOAPIC pin), possibly shared by several devices as PCI INTx
//! lines are, or a message-signalled interrupt.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// An interrupt input line (e.g. an IOAPIC pin) a device can pulse or hold.
pub trait InterruptLine: Send + Sync {
    /// Edge: sends one pulse (assert, then deassert).
    fn trigger(&self) -> std::io::Result<()>;
    /// Level-triggered devices: holds the line asserted (`true`) or releases it (`false`).
    fn set_level(&self, asserted: bool) -> std::io::Result<()>;
}

/// The address and data of a message-signalled interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// The message address (0xfee..... for the local APICs).
    pub address: u64,
    /// The message data.
    pub data: u32,
}

/// Sends a message-signalled interrupt (the VMM implements it with `KVM_SIGNAL_MSI`).
pub trait MsiSender: Send + Sync {
    /// Delivers the MSI with this address and data to the local APICs.
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()>;

    /// Told when the message an interrupt source (e.g. IOAPIC pin `source`) sends changes: `Some(message)` when it
    /// is unmasked, `None` when masked. A split-irqchip VMM mirrors these into the hypervisor's interrupt
    /// routing table, which is how the hypervisor learns which vectors need an IOAPIC EOI exit. The default
    /// ignores it.
    fn route_changed(&self, source: usize, msi: Option<MsiMessage>) {
        let _ = (source, msi);
    }
}

/// A level-triggered line that several devices share, as PCI INTx lines share an IOAPIC pin: the line is the OR of
/// its sources. Each device gets its own [`LevelSource`] from [`SharedLevelLine::source`] and holds its own level; the
/// underlying line is asserted while any source is and released when the last one lets go.
///
/// Lock order: a source takes the shared line's lock and, while holding it, calls the underlying line (e.g. an
/// IOAPIC pin, which never calls back into devices).
pub struct SharedLevelLine {
    shared: Arc<Shared>,
}

struct Shared {
    line: Arc<dyn InterruptLine>,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    /// Sources handed out so far (the next source's id).
    next_id: u64,
    /// The sources holding the line asserted.
    asserted: BTreeSet<u64>,
    /// The level the underlying line last accepted.
    driven: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, SharedState> {
        // Every update leaves the state consistent, so a panicked holder does not matter.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `id`'s level and drives the underlying line to the OR of all sources if that changed (or if an
    /// earlier attempt failed).
    fn set(&self, id: u64, asserted: bool) -> std::io::Result<()> {
        let mut state = self.state();
        if asserted {
            state.asserted.insert(id);
        } else {
            state.asserted.remove(&id);
        }
        let want = !state.asserted.is_empty();
        if want != state.driven {
            self.line.set_level(want)?;
            state.driven = want;
        }
        Ok(())
    }
}

impl SharedLevelLine {
    /// A shared line on top of `line` (e.g. an IOAPIC pin), released until a source asserts it.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        SharedLevelLine {
            shared: Arc::new(Shared {
                line,
                state: Mutex::new(SharedState::default()),
            }),
        }
    }

    /// A new source on this line, starting released.
    pub fn source(&self) -> Arc<LevelSource> {
        let id = {
            let mut state = self.shared.state();
            let id = state.next_id;
            state.next_id += 1;
            id
        };
        Arc::new(LevelSource {
            shared: self.shared.clone(),
            id,
            detached: AtomicBool::new(false),
        })
    }

    /// Whether any source holds the line asserted.
    pub fn is_asserted(&self) -> bool {
        !self.shared.state().asserted.is_empty()
    }
}

impl std::fmt::Debug for SharedLevelLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state();
        f.debug_struct("SharedLevelLine")
            .field("asserted_sources", &state.asserted.len())
            .field("driven", &state.driven)
            .finish_non_exhaustive()
    }
}

/// One device's share of a [`SharedLevelLine`]. Dropping it, or [`LevelSource::detach`], releases its level.
pub struct LevelSource {
    shared: Arc<Shared>,
    id: u64,
    detached: AtomicBool,
}

impl LevelSource {
    /// Releases this source's level for good: later `set_level(true)` calls are ignored. The VMM calls it when it
    /// removes the device, so a device thread that has not stopped yet cannot hold the line for the devices that
    /// stay.
    pub fn detach(&self) -> std::io::Result<()> {
        self.detached.store(true, Ordering::Release);
        self.shared.set(self.id, false)
    }
}

impl InterruptLine for LevelSource {
    /// A pulse on a level line: asserts it, then releases this source's level.
    fn trigger(&self) -> std::io::Result<()> {
        let asserted = self.set_level(true);
        let released = self.set_level(false);
        asserted.and(released)
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        let asserted = asserted && !self.detached.load(Ordering::Acquire);
        self.shared.set(self.id, asserted)
    }
}

impl Drop for LevelSource {
    fn drop(&mut self) {
        if let Err(e) = self.shared.set(self.id, false) {
            tracing::warn!("cannot release a shared interrupt line: {e}");
        }
    }
}

impl std::fmt::Debug for LevelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LevelSource")
            .field("id", &self.id)
            .field("detached", &self.detached.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every level the underlying line is driven to; can be told to fail.
    #[derive(Default)]
    struct Wire {
        levels: Mutex<Vec<bool>>,
        fail: AtomicBool,
    }

    impl InterruptLine for Wire {
        fn trigger(&self) -> std::io::Result<()> {
            unreachable!("a shared level line never pulses its wire")
        }
        fn set_level(&self, asserted: bool) -> std::io::Result<()> {
            if self.fail.load(Ordering::Acquire) {
                return Err(std::io::Error::other("pin unavailable"));
            }
            self.levels.lock().unwrap().push(asserted);
            Ok(())
        }
    }

    impl Wire {
        fn take(&self) -> Vec<bool> {
            std::mem::take(&mut *self.levels.lock().unwrap())
        }
    }

    fn setup() -> (SharedLevelLine, Arc<Wire>) {
        let wire = Arc::new(Wire::default());
        (SharedLevelLine::new(wire.clone()), wire)
    }

    #[test]
    fn line_is_the_or_of_its_sources() {
        let (line, wire) = setup();
        let a = line.source();
        let b = line.source();
        assert!(!line.is_asserted());
        a.set_level(true).unwrap();
        assert_eq!(wire.take(), [true]);
        // Already asserted: the second source changes nothing on the wire.
        b.set_level(true).unwrap();
        a.set_level(true).unwrap();
        assert!(wire.take().is_empty());
        // One source letting go keeps the line up while the other holds it.
        a.set_level(false).unwrap();
        assert!(wire.take().is_empty());
        assert!(line.is_asserted());
        b.set_level(false).unwrap();
        assert_eq!(wire.take(), [false]);
        assert!(!line.is_asserted());
        // Releasing a released source does nothing.
        b.set_level(false).unwrap();
        assert!(wire.take().is_empty());
    }

    #[test]
    fn dropping_a_source_releases_its_share() {
        let (line, wire) = setup();
        let a = line.source();
        let b = line.source();
        a.set_level(true).unwrap();
        b.set_level(true).unwrap();
        drop(a);
        assert!(line.is_asserted());
        assert_eq!(wire.take(), [true]);
        drop(b);
        assert_eq!(wire.take(), [false]);
        // A new source after the others are gone starts released.
        let c = line.source();
        assert!(!line.is_asserted());
        c.set_level(true).unwrap();
        assert_eq!(wire.take(), [true]);
    }

    #[test]
    fn a_detached_source_cannot_assert_again() {
        let (line, wire) = setup();
        let gone = line.source();
        let stays = line.source();
        gone.set_level(true).unwrap();
        gone.detach().unwrap();
        assert_eq!(wire.take(), [true, false]);
        gone.set_level(true).unwrap();
        gone.trigger().unwrap();
        assert!(wire.take().is_empty());
        assert!(!line.is_asserted());
        stays.set_level(true).unwrap();
        assert_eq!(wire.take(), [true]);
    }

    #[test]
    fn trigger_pulses_unless_another_source_holds_the_line() {
        let (line, wire) = setup();
        let a = line.source();
        let b = line.source();
        a.trigger().unwrap();
        assert_eq!(wire.take(), [true, false]);
        b.set_level(true).unwrap();
        wire.take();
        a.trigger().unwrap();
        assert!(wire.take().is_empty());
        assert!(line.is_asserted());
    }

    #[test]
    fn a_failed_wire_update_is_retried_on_the_next_change() {
        let (line, wire) = setup();
        let a = line.source();
        wire.fail.store(true, Ordering::Release);
        assert!(a.set_level(true).is_err());
        // The source's level is recorded even though the wire refused it.
        assert!(line.is_asserted());
        wire.fail.store(false, Ordering::Release);
        a.set_level(true).unwrap();
        assert_eq!(wire.take(), [true]);
    }

    #[test]
    fn drives_an_ioapic_level_pin() {
        use crate::bus::BusDevice;
        use crate::ioapic::Ioapic;

        #[derive(Default)]
        struct Msis(Mutex<Vec<u32>>);
        impl MsiSender for Msis {
            fn send_msi(&self, _address: u64, data: u32) -> std::io::Result<()> {
                self.0.lock().unwrap().push(data);
                Ok(())
            }
        }
        let msis = Arc::new(Msis::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(msis.clone())));
        // Pin 17: vector 0x60, level triggered, unmasked.
        {
            let mut io = ioapic.lock().unwrap();
            io.write(0, &[0x10 + 2 * 17]);
            io.write(0x10, &(0x60u32 | 1 << 15).to_le_bytes());
        }
        let line = SharedLevelLine::new(Ioapic::pin(&ioapic, 17));
        let (a, b) = (line.source(), line.source());
        a.set_level(true).unwrap();
        b.set_level(true).unwrap();
        assert_eq!(msis.0.lock().unwrap().len(), 1);
        // The guest serviced device a only: the EOI finds the line still up and delivers again.
        a.set_level(false).unwrap();
        ioapic.lock().unwrap().end_of_interrupt(0x60);
        assert_eq!(msis.0.lock().unwrap().len(), 2);
        // Device b serviced: nothing more after the EOI.
        b.set_level(false).unwrap();
        ioapic.lock().unwrap().end_of_interrupt(0x60);
        assert_eq!(msis.0.lock().unwrap().len(), 2);
        assert_eq!(ioapic.lock().unwrap().state().pin_levels & (1 << 17), 0);
    }
}
