//! Interrupts for PCI devices.
//!
//! Message-signalled: each MSI-X vector gets a GSI, a KVM MSI route and an irqfd, so a device thread (or, later, a
//! vhost-user backend) raises an interrupt with one eventfd write and KVM delivers it.
//!
//! INTx: [`PciIntx`] wires INTA# of each slot to the IOAPIC pin the DSDT's `_PRT` names for it. Several slots share
//! a pin, so each pin is a [`SharedLevelLine`] and each device gets its own source on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::ioapic::Ioapic;
use devices::{LevelSource, SharedLevelLine};
use hypervisor::{MsiRoute, Vm};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs below this belong to the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's routing table limit (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

/// Errors setting up MSI vectors.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// Every GSI is in use.
    #[error("no free interrupt routes left (at most {MAX_GSI}); remove a device first")]
    OutOfGsis,
    /// An eventfd could not be created.
    #[error("cannot create an irqfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused a route or irqfd.
    #[error("cannot set up an interrupt route: {0}")]
    Hypervisor(#[source] hypervisor::HypervisorError),
}

/// The VM's MSI routing table, shared by every device.
pub struct MsiRouter {
    vm: Arc<dyn Vm>,
    inner: Mutex<RouterState>,
}

struct RouterState {
    routes: BTreeMap<u32, MsiRoute>,
    /// GSIs handed out (with or without a route yet).
    used: std::collections::BTreeSet<u32>,
}

impl MsiRouter {
    /// Creates an empty routing table for `vm`.
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        MsiRouter {
            vm,
            inner: Mutex::new(RouterState {
                routes: BTreeMap::new(),
                used: Default::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate(&self, count: usize) -> Result<Vec<u32>, InterruptError> {
        let mut state = self.state();
        let free: Vec<u32> = (FIRST_MSI_GSI..MAX_GSI)
            .filter(|g| !state.used.contains(g))
            .take(count)
            .collect();
        if free.len() < count {
            return Err(InterruptError::OutOfGsis);
        }
        state.used.extend(free.iter().copied());
        Ok(free)
    }

    fn release(&self, gsis: &[u32]) -> Result<(), InterruptError> {
        let mut state = self.state();
        for gsi in gsis {
            state.used.remove(gsi);
            state.routes.remove(gsi);
        }
        self.apply(&state)
    }

    fn set_route(&self, route: MsiRoute) -> Result<(), InterruptError> {
        let mut state = self.state();
        if state.routes.get(&route.gsi) == Some(&route) {
            return Ok(());
        }
        state.routes.insert(route.gsi, route);
        self.apply(&state)
    }

    fn apply(&self, state: &RouterState) -> Result<(), InterruptError> {
        let routes: Vec<MsiRoute> = state.routes.values().copied().collect();
        self.vm
            .set_msi_routing(&routes)
            .map_err(InterruptError::Hypervisor)
    }

    /// Mirrors IOAPIC pin `pin`'s message into the routing table (or removes it when masked). With KVM's split
    /// irqchip this is how KVM learns which vectors are level-triggered and need an EOI exit to the IOAPIC.
    pub fn set_ioapic_pin_route(
        &self,
        pin: u32,
        msi: Option<(u64, u32)>,
    ) -> Result<(), InterruptError> {
        if pin >= FIRST_MSI_GSI {
            return Ok(());
        }
        match msi {
            Some((address, data)) => self.set_route(MsiRoute {
                gsi: pin,
                address,
                data,
            }),
            None => {
                let mut state = self.state();
                if state.routes.remove(&pin).is_none() {
                    return Ok(());
                }
                self.apply(&state)
            }
        }
    }

    /// Sets up `vectors` MSI vectors for one device: a GSI and a registered irqfd each.
    pub fn device_vectors(
        self: &Arc<Self>,
        vectors: u16,
    ) -> Result<Arc<DeviceMsi>, InterruptError> {
        let gsis = self.allocate(usize::from(vectors))?;
        let mut irqfds = Vec::with_capacity(gsis.len());
        for &gsi in &gsis {
            let fd = match EventFd::new(EFD_NONBLOCK) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = self.release(&gsis);
                    return Err(InterruptError::EventFd(e));
                }
            };
            if let Err(e) = self.vm.register_irqfd(&fd, gsi) {
                for (old, gsi) in irqfds.iter().zip(&gsis) {
                    let _ = self.vm.unregister_irqfd(old, *gsi);
                }
                let _ = self.release(&gsis);
                return Err(InterruptError::Hypervisor(e));
            }
            irqfds.push(fd);
        }
        Ok(Arc::new(DeviceMsi {
            router: self.clone(),
            gsis,
            irqfds,
        }))
    }
}

/// One device's MSI vectors. Dropping it unregisters the irqfds and frees the GSIs (device removal).
pub struct DeviceMsi {
    router: Arc<MsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl DeviceMsi {
    /// The irqfd of `vector`, for backends that signal it directly.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }
}

impl pci::MsiDelivery for DeviceMsi {
    fn deliver(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        let index = usize::from(vector);
        let (Some(&gsi), Some(fd)) = (self.gsis.get(index), self.irqfds.get(index)) else {
            return Err(std::io::Error::other(format!("no MSI vector {vector}")));
        };
        // Make sure the route matches the message before signalling (a table write may not have reached KVM yet).
        self.router
            .set_route(MsiRoute { gsi, address, data })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        fd.write(1)
    }

    fn update_route(
        &self,
        vector: u16,
        address: u64,
        data: u32,
        _masked: bool,
    ) -> std::io::Result<()> {
        // Masking is done by the MSI-X layer (it holds masked messages pending); the route just follows the table.
        let Some(&gsi) = self.gsis.get(usize::from(vector)) else {
            return Err(std::io::Error::other(format!("no MSI vector {vector}")));
        };
        self.router
            .set_route(MsiRoute { gsi, address, data })
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl Drop for DeviceMsi {
    fn drop(&mut self) {
        for (fd, gsi) in self.irqfds.iter().zip(&self.gsis) {
            if let Err(e) = self.router.vm.unregister_irqfd(fd, *gsi) {
                tracing::warn!("cannot unregister irqfd for GSI {gsi}: {e}");
            }
        }
        if let Err(e) = self.router.release(&self.gsis) {
            tracing::warn!("cannot release interrupt routes: {e}");
        }
    }
}

/// INTA# of the slots on PCI bus 0: one shared level-triggered line per IOAPIC pin from
/// [`arch::layout::PCI_INTX_GSI_BASE`] on, slots spread over them as [`arch::layout::pci_intx_gsi`] says.
pub struct PciIntx {
    /// Indexed by GSI minus `PCI_INTX_GSI_BASE`.
    lines: Vec<SharedLevelLine>,
}

impl PciIntx {
    /// Shared lines on the IOAPIC's PCI pins.
    pub fn new(ioapic: &Arc<Mutex<Ioapic>>) -> Self {
        let base = arch::layout::PCI_INTX_GSI_BASE;
        let lines = (base..base + arch::layout::PCI_INTX_GSIS)
            .map(|gsi| SharedLevelLine::new(Ioapic::pin(ioapic, gsi as usize)))
            .collect();
        PciIntx { lines }
    }

    /// The GSI INTA# of `slot` raises and a new source on its line for the device in that slot; `None` for the host
    /// bridge's slot 0 and slots that do not exist.
    pub fn inta(&self, slot: u8) -> Option<(u32, Arc<LevelSource>)> {
        let gsi = arch::layout::pci_intx_gsi(slot, 0)?;
        let line = self
            .lines
            .get(usize::try_from(gsi.checked_sub(arch::layout::PCI_INTX_GSI_BASE)?).ok()?)?;
        Some((gsi, line.source()))
    }
}

impl std::fmt::Debug for PciIntx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciIntx")
            .field("lines", &self.lines)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use devices::{BusDevice, InterruptLine, MsiSender};

    use super::*;

    #[derive(Default)]
    struct Sent(Mutex<Vec<u32>>);

    impl MsiSender for Sent {
        fn send_msi(&self, _address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push(data);
            Ok(())
        }
    }

    /// Routes IOAPIC `pin` level-triggered to `vector`, unmasked.
    fn route_level(ioapic: &Arc<Mutex<Ioapic>>, pin: u8, vector: u8) {
        let mut io = ioapic.lock().unwrap();
        io.write(0, &[0x10 + 2 * pin]);
        io.write(0x10, &(u32::from(vector) | 1 << 15).to_le_bytes());
    }

    #[test]
    fn slots_sharing_a_gsi_share_one_level_line() {
        let sent = Arc::new(Sent::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sent.clone())));
        let intx = PciIntx::new(&ioapic);
        assert!(intx.inta(0).is_none(), "the host bridge has no INTx");
        assert!(intx.inta(32).is_none());
        let (gsi1, slot1) = intx.inta(1).unwrap();
        let (gsi9, slot9) = intx.inta(9).unwrap();
        let (gsi2, slot2) = intx.inta(2).unwrap();
        assert_eq!((gsi1, gsi9, gsi2), (17, 17, 18));
        route_level(&ioapic, 17, 0x60);
        route_level(&ioapic, 18, 0x61);

        slot1.set_level(true).unwrap();
        slot9.set_level(true).unwrap();
        slot2.set_level(true).unwrap();
        assert_eq!(*sent.0.lock().unwrap(), [0xc060, 0xc061]);
        // Slot 1 serviced, slot 9 still asserting: the EOI delivers pin 17 again.
        slot1.set_level(false).unwrap();
        ioapic.lock().unwrap().end_of_interrupt(0x60);
        assert_eq!(sent.0.lock().unwrap().len(), 3);
        // Slot 9's device goes away while asserting: its share is released.
        slot9.detach().unwrap();
        ioapic.lock().unwrap().end_of_interrupt(0x60);
        assert_eq!(sent.0.lock().unwrap().len(), 3);
        let levels = ioapic.lock().unwrap().state().pin_levels;
        assert_eq!(levels & (1 << 17), 0);
        assert_ne!(levels & (1 << 18), 0);
        drop(slot2);
        assert_eq!(ioapic.lock().unwrap().state().pin_levels, 0);
    }
}
