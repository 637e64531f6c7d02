//! Virtio devices on PCI, VMM side: BAR space, MSI-X vectors (GSI routes + irqfds), INTA# on the IOAPIC pin of its
//! slot, queue doorbells (ioeventfds), and following the BAR when the guest moves it. Each device's live handles are
//! kept in a [`VirtioPciHandle`] so a device can be removed at run time.

use std::sync::{Arc, Mutex};

use devices::LevelSource;
use hypervisor::{IoEventAddress, Vm};
use pci::{PciBusError, PciDevice};
use virtio_devices::{
    DeviceCounters, GuestMemory, VirtioDevice, VirtioPciDevice, VIRTIO_PCI_BAR_SIZE,
};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::{DeviceMsi, InterruptError, MsiRouter, PciIntx};
use crate::pci_segment::{BarMoveHook, PciSegment, PciSegmentError};

/// Errors adding a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// PCI slot or BAR space.
    #[error(transparent)]
    Pci(#[from] PciSegmentError),
    /// MSI vectors.
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    /// The transport rejected the device.
    #[error("cannot create the virtio-pci function: {0}")]
    Transport(#[source] virtio_devices::VirtioPciError),
    /// Doorbell eventfds.
    #[error("cannot set up queue notifications: {0}")]
    Doorbell(String),
}

/// Queue doorbells registered with the hypervisor; they move with the BAR.
struct Doorbells {
    vm: Arc<dyn Vm>,
    /// (eventfd, offset from BAR 0)
    fds: Vec<(EventFd, u64)>,
    base: u64,
}

impl Doorbells {
    fn register(&self, base: u64) -> Result<(), String> {
        for (i, (fd, offset)) in self.fds.iter().enumerate() {
            if let Err(e) = self
                .vm
                .register_ioevent(fd, IoEventAddress::Mmio(base + offset), None)
            {
                for (fd, offset) in &self.fds[..i] {
                    let _ =
                        self.vm
                            .unregister_ioevent(fd, IoEventAddress::Mmio(base + offset), None);
                }
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    fn unregister(&self, base: u64) {
        for (fd, offset) in &self.fds {
            if let Err(e) =
                self.vm
                    .unregister_ioevent(fd, IoEventAddress::Mmio(base + offset), None)
            {
                tracing::warn!("cannot unregister a doorbell at {:#x}: {e}", base + offset);
            }
        }
    }

    fn moved(&mut self, old: u64, new: u64) {
        if old != self.base {
            return;
        }
        self.unregister(old);
        match self.register(new) {
            Ok(()) => self.base = new,
            Err(e) => {
                // Without ioeventfds the notify writes still reach the device through its BAR (slower path).
                tracing::warn!("doorbells not moved to {new:#x}: {e}");
                self.base = new;
                self.fds.clear();
            }
        }
    }
}

/// A virtio device attached to the PCI bus, with everything that must go when it is removed.
pub struct VirtioPciHandle {
    /// The PCI slot.
    pub slot: u8,
    /// The function.
    pub device: Arc<Mutex<VirtioPciDevice>>,
    doorbells: Arc<Mutex<Doorbells>>,
    _msi: Arc<DeviceMsi>,
    /// The device's share of its slot's INTx line.
    intx: Arc<LevelSource>,
    /// The device's counters, read without locking the function (its vCPU and device threads never wait on them).
    counters: Option<Arc<dyn DeviceCounters>>,
}

impl VirtioPciHandle {
    /// The device's counters as (name, value); empty for a device that keeps none.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters
            .as_ref()
            .map_or_else(Vec::new, |counters| counters.snapshot())
    }

    /// Takes the device off the bus: unmaps its BARs, unregisters its doorbells, frees its interrupt routes and
    /// releases its INTx line (for good, even if the device thread has not let go of it yet).
    pub fn remove(self, segment: &PciSegment) -> Result<(), PciSegmentError> {
        segment.remove_device(self.slot)?;
        let doorbells = self.doorbells.lock().unwrap_or_else(|p| p.into_inner());
        doorbells.unregister(doorbells.base);
        if let Err(e) = self.intx.detach() {
            tracing::warn!(
                "cannot release the INTx line of PCI slot {}: {e}",
                self.slot
            );
        }
        Ok(())
    }
}

/// The lowest free device slot on the bus (slot 0 is the host bridge's).
fn free_slot(segment: &PciSegment) -> Result<u8, PciSegmentError> {
    let occupied = segment.occupied_slots();
    (1..pci::NUM_DEVICE_SLOTS)
        .find(|slot| !occupied.contains(slot))
        .ok_or(PciSegmentError::Bus(PciBusError::NoFreeSlot))
}

/// Puts `device` on the PCI bus as a virtio-pci function in the lowest free slot, with MSI-X and INTA# (wired as
/// `intx` says for that slot). The caller serializes additions (the slot is chosen before the device is placed).
pub fn add_virtio_pci_device(
    vm: &Arc<dyn Vm>,
    segment: &PciSegment,
    router: &Arc<MsiRouter>,
    intx: &PciIntx,
    mem: &GuestMemory,
    device: Box<dyn VirtioDevice>,
) -> Result<VirtioPciHandle, VirtioError> {
    let queues = device.queue_max_sizes().len();
    // Taken before the transport owns the device: reading them later needs neither the device nor its lock.
    let counters = device.counters();
    let slot = free_slot(segment)?;
    let (gsi, intx) = intx
        .inta(slot)
        .ok_or(PciSegmentError::Bus(PciBusError::SlotOutOfRange(slot)))?;
    let bar = segment.allocate_bar(VIRTIO_PCI_BAR_SIZE, true)?;
    // One vector per queue plus the configuration-change vector.
    let vectors = u16::try_from(queues + 1).unwrap_or(u16::MAX);
    let msi = router.device_vectors(vectors)?;
    let mut function =
        VirtioPciDevice::new(device, mem.clone(), bar, msi.clone(), Some(intx.clone()))
            .map_err(VirtioError::Transport)?;
    // What firmware would leave in Interrupt Line for guests that do not read the ACPI routing; GSIs 16-23 fit.
    function
        .config_mut()
        .set_interrupt_line(u8::try_from(gsi).unwrap_or(u8::MAX));
    let fds = function
        .ioeventfds(bar)
        .map_err(|e| VirtioError::Doorbell(e.to_string()))?
        .into_iter()
        .map(|(fd, addr)| (fd, addr - bar))
        .collect();
    let doorbells = Doorbells {
        vm: vm.clone(),
        fds,
        base: bar,
    };
    doorbells.register(bar).map_err(VirtioError::Doorbell)?;
    let doorbells = Arc::new(Mutex::new(doorbells));
    let device = Arc::new(Mutex::new(function));
    let hook_doorbells = doorbells.clone();
    let hook: BarMoveHook = Arc::new(move |old, new| {
        hook_doorbells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .moved(old, new);
    });
    let slot = match segment.add_device(Some(slot), device.clone(), Some(hook)) {
        Ok(slot) => slot,
        Err(e) => {
            doorbells
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unregister(bar);
            return Err(e.into());
        }
    };
    Ok(VirtioPciHandle {
        slot,
        device,
        doorbells,
        _msi: msi,
        intx,
        counters,
    })
}
