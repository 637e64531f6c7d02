//! Virtio-pci interrupts: an MSI-X vector per queue and one for configuration changes, with the ISR status register
//! and the INTx line for drivers that leave MSI-X off.
//!
//! The driver picks the vectors through `config_msix_vector` and `queue_msix_vector`; [`InterruptVectors`] holds
//! them where both the transport (guest writes) and the device thread (triggers) see them. With MSI-X enabled, a
//! source whose vector is `VIRTIO_MSI_NO_VECTOR` raises nothing. With MSI-X disabled, the device sets the ISR bit and
//! asserts INTx, which stays asserted until the driver reads (and so clears) the ISR or resets the device. The line is
//! held released while INTx is blocked (the COMMAND register's Interrupt Disable bit, or MSI-X enabled); an interrupt
//! still pending when it is unblocked asserts it then.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::InterruptLine;
use pci::{MsixConfig, MsixError, MsixTrigger};

use crate::device::{VirtioInterrupt, VirtioInterruptType};

/// The vector value meaning "no interrupt for this source".
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// ISR bit: a queue has used buffers.
pub(crate) const ISR_QUEUE: u8 = 0x1;
/// ISR bit: the device configuration changed.
pub(crate) const ISR_CONFIG: u8 = 0x2;

/// The MSI-X vector of each interrupt source.
#[derive(Debug)]
pub(crate) struct InterruptVectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
    /// Number of MSI-X table entries: a vector at or above it is refused.
    table_size: u16,
}

impl InterruptVectors {
    /// `queues` queue vectors and the configuration vector, all unassigned.
    pub(crate) fn new(queues: usize, table_size: u16) -> Self {
        Self {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            table_size,
        }
    }

    /// A vector the table can hold, or `VIRTIO_MSI_NO_VECTOR` (what the driver reads back when the device cannot
    /// use the vector it asked for).
    fn checked(&self, vector: u16) -> u16 {
        if vector < self.table_size {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The configuration change vector.
    pub(crate) fn config(&self) -> u16 {
        self.config.load(Ordering::Acquire)
    }

    /// Sets the configuration change vector (refused vectors become `VIRTIO_MSI_NO_VECTOR`).
    pub(crate) fn set_config(&self, vector: u16) {
        self.config.store(self.checked(vector), Ordering::Release);
    }

    /// The vector of queue `queue` (`VIRTIO_MSI_NO_VECTOR` for a queue that does not exist).
    pub(crate) fn queue(&self, queue: usize) -> u16 {
        self.queues
            .get(queue)
            .map_or(VIRTIO_MSI_NO_VECTOR, |vector| {
                vector.load(Ordering::Acquire)
            })
    }

    /// Sets the vector of queue `queue`; writes for a queue that does not exist are dropped.
    pub(crate) fn set_queue(&self, queue: usize, vector: u16) {
        if let Some(slot) = self.queues.get(queue) {
            slot.store(self.checked(vector), Ordering::Release);
        }
    }

    /// Unassigns every vector (device reset).
    pub(crate) fn reset(&self) {
        self.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for vector in &self.queues {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

/// Locks the MSI-X state, carrying on if a previous holder panicked (the table stays consistent between
/// statements).
pub(crate) fn lock_msix(msix: &Mutex<MsixConfig>) -> MutexGuard<'_, MsixConfig> {
    msix.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The INTx side of a function: whether an interrupt is pending on the line, whether the driver blocks INTx, and the
/// level the line last took.
#[derive(Debug, Default)]
struct IntxState {
    pending: bool,
    blocked: bool,
    driven: bool,
}

/// The [`VirtioInterrupt`] of a virtio-pci function.
pub(crate) struct VirtioPciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    vectors: Arc<InterruptVectors>,
    /// Changed only under `intx_state`'s lock, so the ISR and the line agree.
    isr: AtomicU8,
    needs_reset: AtomicBool,
    intx: Option<Arc<dyn InterruptLine>>,
    intx_state: Mutex<IntxState>,
}

impl VirtioPciInterrupt {
    pub(crate) fn new(
        msix: Arc<Mutex<MsixConfig>>,
        vectors: Arc<InterruptVectors>,
        intx: Option<Arc<dyn InterruptLine>>,
    ) -> Self {
        Self {
            msix,
            vectors,
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            intx,
            intx_state: Mutex::new(IntxState::default()),
        }
    }

    fn intx_state(&self) -> MutexGuard<'_, IntxState> {
        // Each update leaves the state consistent; a panicked holder does not matter.
        self.intx_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Driver read of the ISR register: returns the bits and clears them, releasing INTx.
    pub(crate) fn read_isr(&self) -> u8 {
        let mut intx = self.intx_state();
        let isr = self.isr.swap(0, Ordering::AcqRel);
        intx.pending = false;
        self.drive_intx(&mut intx);
        isr
    }

    /// Blocks INTx (the driver set COMMAND's Interrupt Disable bit or enabled MSI-X) or unblocks it. A blocked
    /// function keeps the line released; unblocking a pending interrupt asserts it.
    pub(crate) fn set_intx_blocked(&self, blocked: bool) {
        let mut intx = self.intx_state();
        intx.blocked = blocked;
        self.drive_intx(&mut intx);
    }

    /// The ISR bits, without clearing them (for saving state).
    pub(crate) fn isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Whether the device has asked for a reset.
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Marks the device as needing a reset and, when `notify`, sends a configuration change interrupt (the
    /// specification requires one once DRIVER_OK is set).
    pub(crate) fn raise_needs_reset(&self, notify: bool) {
        self.needs_reset.store(true, Ordering::Release);
        if notify {
            if let Err(err) = self.trigger(VirtioInterruptType::Config) {
                tracing::warn!(%err, "failed to tell the driver the device needs a reset");
            }
        }
    }

    /// Clears the ISR and the reset request, releasing INTx (device reset).
    pub(crate) fn reset(&self) {
        self.needs_reset.store(false, Ordering::Release);
        let mut intx = self.intx_state();
        self.isr.store(0, Ordering::Release);
        intx.pending = false;
        self.drive_intx(&mut intx);
    }

    /// Sets the line to "pending and not blocked" if that differs from what it holds.
    fn drive_intx(&self, intx: &mut IntxState) {
        let Some(line) = &self.intx else {
            return;
        };
        let level = intx.pending && !intx.blocked;
        if level == intx.driven {
            return;
        }
        match line.set_level(level) {
            Ok(()) => intx.driven = level,
            Err(err) => tracing::warn!(%err, level, "failed to drive the virtio INTx line"),
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        let (vector, isr_bit) = match kind {
            VirtioInterruptType::Config => (self.vectors.config(), ISR_CONFIG),
            VirtioInterruptType::Queue(queue) => {
                (self.vectors.queue(usize::from(queue)), ISR_QUEUE)
            }
        };
        let mut msix = lock_msix(&self.msix);
        if msix.enabled() {
            // The configuration bit is set whatever the interrupt mode; the queue bit only matters for INTx.
            if kind == VirtioInterruptType::Config {
                let _intx = self.intx_state();
                self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
            }
            if vector == VIRTIO_MSI_NO_VECTOR {
                return Ok(());
            }
            return match msix.trigger(vector) {
                Ok(MsixTrigger::Delivered | MsixTrigger::Pending) => Ok(()),
                Ok(MsixTrigger::Disabled) => Ok(()),
                Err(MsixError::Delivery { source, .. }) => Err(source),
                Err(err) => Err(io::Error::other(err.to_string())),
            };
        }
        drop(msix);
        let mut intx = self.intx_state();
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        intx.pending = true;
        self.drive_intx(&mut intx);
        Ok(())
    }

    fn set_needs_reset(&self) {
        // Only an active device (DRIVER_OK set) has a worker that can call this.
        self.raise_needs_reset(true);
    }
}
