//! The trait every PCI function implements, and the adapter that puts one of its BARs on a device bus.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::BusDevice;

use crate::bar::{BarReprogramming, PciBarRegion};
use crate::configuration::PciConfiguration;

/// A PCI function on a [`PciBus`](crate::PciBus).
///
/// The configuration methods have defaults that go straight to the [`PciConfiguration`]; a device overrides them to
/// react to its own registers (for instance, to pass MSI-X message control writes to its
/// [`MsixConfig`](crate::MsixConfig)). BAR accesses arrive with `offset` relative to the BAR's base, wherever the
/// guest has moved it.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;

    /// The configuration space, mutable.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Guest read of configuration register `reg` (offset `reg * 4`); all-ones past the end of the space.
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Guest write of `data` at byte `offset` within configuration register `reg`. Returns the BARs the write moved
    /// (the caller remaps them).
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogramming> {
        self.config_mut().write_config_register(reg, offset, data)
    }

    /// Guest read of BAR `bar` at `offset`. Devices without BAR registers read all-ones.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// Guest write of BAR `bar` at `offset`. Devices without BAR registers drop it.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// The device's BARs, where they are decoded now.
    fn bars(&self) -> Vec<PciBarRegion> {
        self.config().bar_regions()
    }
}

/// A shared handle to a PCI function.
pub type PciDeviceHandle = Arc<Mutex<dyn PciDevice>>;

/// Locks a device, carrying on with its state if a previous holder panicked (the device's registers stay
/// consistent: every method leaves them valid between statements that can panic).
pub(crate) fn lock_device<'a>(
    device: &'a Mutex<dyn PciDevice>,
) -> MutexGuard<'a, dyn PciDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One BAR of a device as a [`BusDevice`], for the VMM to insert on its MMIO or port bus at the BAR's base. When the
/// guest moves the BAR, the VMM moves this same adapter: offsets stay relative to the BAR.
pub struct PciBarBusDevice {
    device: PciDeviceHandle,
    bar: usize,
}

impl PciBarBusDevice {
    /// An adapter routing bus accesses to BAR `bar` of `device`.
    pub fn new(device: PciDeviceHandle, bar: usize) -> Self {
        Self { device, bar }
    }

    /// The BAR index this adapter serves.
    pub fn bar(&self) -> usize {
        self.bar
    }
}

impl BusDevice for PciBarBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_device(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_device(&self.device).write_bar(self.bar, offset, data);
    }
}
