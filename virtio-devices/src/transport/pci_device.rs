//! The modern virtio-pci transport (virtio 1.2 §4.1): one PCI function exposing a [`VirtioDevice`].
//!
//! # BAR layout
//!
//! Everything lives in BAR 0, a 64-bit non-prefetchable memory BAR of [`VIRTIO_PCI_BAR_SIZE`] bytes, one 4 KiB page
//! per structure so the VMM can map or trap each page on its own:
//!
//! | offset | structure |
//! |---|---|
//! | `0x0000` | common configuration (0x38 bytes) |
//! | `0x1000` | ISR status (1 byte, read to clear) |
//! | `0x2000` | device-specific configuration |
//! | `0x3000` | notifications: queue `n` at `0x3000 + 4 * n` (`notify_off_multiplier` 4, `queue_notify_off` = `n`) |
//! | `0x4000` | MSI-X table (one vector per queue plus one for configuration changes) |
//! | `0x5000` | MSI-X pending-bit array |
//!
//! The capability list holds MSI-X, then the common, ISR, device, notification and PCI-configuration-access virtio
//! capabilities.
//!
//! # Notifications
//!
//! Each queue has an [`EventFd`]. The VMM registers [`VirtioPciDevice::ioeventfds`] with KVM so doorbell writes
//! never leave the kernel; a doorbell write that does reach [`PciDevice::write_bar`] signals the same event.

use std::io;
use std::sync::{Arc, Mutex};

use devices::InterruptLine;
use pci::{
    BarReprogramming, ConfigurationError, MsiDelivery, MsixCapability, MsixConfig, MsixConfigState,
    MsixError, PciBarConfiguration, PciClassCode, PciConfiguration, PciConfigurationState,
    PciDevice, PciHeader, PciInterruptPin, COMMAND_INTERRUPT_DISABLE, COMMAND_STATUS_REG,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::capabilities::{
    PciCfgCap, VirtioPciCap, VirtioPciCapType, CAP_BAR_OFFSET, CAP_LENGTH_OFFSET,
    CAP_OFFSET_OFFSET, CAP_PCI_CFG_DATA_OFFSET,
};
use super::common_config::{
    status_change, CommonConfig, StatusChange, WriteEffect, COMMON_CONFIG_LEN, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use super::interrupt::{lock_msix, InterruptVectors, VirtioPciInterrupt};
use crate::device::{
    GuestMemory, VirtioDevice, VirtioDeviceState, VirtioDeviceType, VirtioInterrupt,
    VirtioInterruptType,
};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of non-transitional devices (the specification asks for 0x40 or higher).
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;

/// Size of BAR 0.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CONFIG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status register in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Offset of the notification doorbells in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Distance between two queues' doorbells.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Size of each structure's page.
const REGION_SIZE: u64 = 0x1000;
/// Most queues a device can have: one MSI-X vector each plus one for configuration must fit the table page.
pub const MAX_QUEUES: usize = (REGION_SIZE / pci::MSIX_TABLE_ENTRY_SIZE) as usize - 1;
/// Largest queue size the split virtqueue format allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors building a virtio-pci function.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The device offers no queues or more than [`MAX_QUEUES`].
    #[error("a virtio-pci device needs 1 to {MAX_QUEUES} queues, this one has {0}; change the device's queue count")]
    QueueCount(usize),
    /// A queue's maximum size is not a power of two from 1 to 32768.
    #[error("queue {index} maximum size {size} is invalid; use a power of two from 1 to 32768")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Its maximum size.
        size: u16,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, which the modern transport requires.
    #[error("the virtio device does not offer VIRTIO_F_VERSION_1; the modern virtio-pci transport needs it")]
    NotModern,
    /// Building the configuration space failed.
    #[error("failed to build the virtio-pci configuration space: {0}")]
    Configuration(#[from] ConfigurationError),
    /// Building the MSI-X table failed.
    #[error("failed to set up virtio-pci MSI-X: {0}")]
    Msix(#[from] MsixError),
    /// Creating a queue notification event failed.
    #[error("failed to create a queue notification event: {0}; check the process's file descriptor limit")]
    EventFd(io::Error),
}

/// Saved state of a virtio-pci function (registers only; the VMM pauses the device before taking it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciDeviceState {
    pci: PciConfigurationState,
    msix: MsixConfigState,
    common: CommonConfig,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
    needs_reset: bool,
    device: VirtioDeviceState,
}

/// A virtio device on the modern virtio-pci transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    common: CommonConfig,
    msix: Arc<Mutex<MsixConfig>>,
    vectors: Arc<InterruptVectors>,
    interrupt: Arc<VirtioPciInterrupt>,
    queue_events: Vec<EventFd>,
    msix_cap_reg: usize,
    pci_cfg_cap: usize,
    active: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.device_status())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

fn class_code(device_type: VirtioDeviceType) -> PciClassCode {
    match device_type {
        // Network, Ethernet.
        VirtioDeviceType::Net => PciClassCode::new(0x02, 0x00, 0x00),
        // Mass storage, other.
        VirtioDeviceType::Block => PciClassCode::new(0x01, 0x80, 0x00),
        // Simple communication, other.
        VirtioDeviceType::Console => PciClassCode::new(0x07, 0x80, 0x00),
        VirtioDeviceType::Rng => PciClassCode::OTHER,
        // Simple communication, other.
        VirtioDeviceType::Vsock => PciClassCode::new(0x07, 0x80, 0x00),
        VirtioDeviceType::Mem => PciClassCode::OTHER,
    }
}

impl VirtioPciDevice {
    /// Puts `device` on a PCI function whose BAR 0 starts at `bar_addr` (aligned to [`VIRTIO_PCI_BAR_SIZE`]).
    /// MSI-X messages go through `msi`; with `intx`, the function also has INTA# for drivers without MSI-X.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        bar_addr: u64,
        msi: Arc<dyn MsiDelivery>,
        intx: Option<Arc<dyn InterruptLine>>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(VirtioPciError::QueueSize { index, size });
            }
        }
        if device.features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VirtioPciError::NotModern);
        }
        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type.id() as u16,
            revision_id: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            multi_function: false,
            interrupt_pin: intx.as_ref().map(|_| PciInterruptPin::IntA),
        })?;
        config.add_pci_bar(&PciBarConfiguration::memory64(
            0,
            bar_addr,
            VIRTIO_PCI_BAR_SIZE,
        ))?;
        // Lossless: MAX_QUEUES + 1 vectors fit the 4 KiB table page.
        let vector_count = max_sizes.len() as u16 + 1;
        let msix_cap = MsixCapability::new(
            vector_count,
            0,
            MSIX_TABLE_OFFSET as u32,
            0,
            MSIX_PBA_OFFSET as u32,
        )?;
        let msix_cap_reg = config.add_capability(&msix_cap)? / 4;
        let notify_len = max_sizes.len() as u32 * NOTIFY_OFF_MULTIPLIER;
        let caps = [
            VirtioPciCap::new(
                VirtioPciCapType::Common,
                0,
                COMMON_CONFIG_OFFSET as u32,
                COMMON_CONFIG_LEN,
            ),
            VirtioPciCap::new(VirtioPciCapType::Isr, 0, ISR_OFFSET as u32, 1),
            VirtioPciCap::new(
                VirtioPciCapType::Device,
                0,
                DEVICE_CONFIG_OFFSET as u32,
                REGION_SIZE as u32,
            ),
            VirtioPciCap::notify(0, NOTIFY_OFFSET as u32, notify_len, NOTIFY_OFF_MULTIPLIER),
        ];
        for cap in &caps {
            config.add_capability(cap)?;
        }
        let pci_cfg_cap = config.add_capability(&PciCfgCap)?;
        let msix = Arc::new(Mutex::new(MsixConfig::new(vector_count, msi)?));
        let vectors = Arc::new(InterruptVectors::new(max_sizes.len(), vector_count));
        let interrupt = Arc::new(VirtioPciInterrupt::new(msix.clone(), vectors.clone(), intx));
        let queue_events = (0..max_sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VirtioPciError::EventFd)?;
        Ok(Self {
            config,
            device,
            mem,
            common: CommonConfig::new(&max_sizes),
            msix,
            vectors,
            interrupt,
            queue_events,
            msix_cap_reg,
            pci_cfg_cap,
            active: false,
        })
    }

    /// The queue notification events and the guest addresses of their doorbells when BAR 0 is at `bar_base`, for
    /// the VMM to register as ioeventfds (any access length, no data match).
    pub fn ioeventfds(&self, bar_base: u64) -> io::Result<Vec<(EventFd, u64)>> {
        self.queue_events
            .iter()
            .enumerate()
            .map(|(queue, event)| Ok((event.try_clone()?, notify_address(bar_base, queue))))
            .collect()
    }

    /// The device type.
    pub fn device_type(&self) -> VirtioDeviceType {
        self.device.device_type()
    }

    /// Whether the device is running (the driver set DRIVER_OK and activation succeeded).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u8 {
        let reset = if self.interrupt.needs_reset() {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.common.device_status() | reset
    }

    /// The device changed its configuration space: bumps `config_generation` and interrupts the driver.
    pub fn config_changed(&mut self) {
        self.common.bump_config_generation();
        if self.common.device_status() & STATUS_DRIVER_OK != 0 {
            if let Err(err) = self.interrupt.trigger(VirtioInterruptType::Config) {
                tracing::warn!(%err, "failed to send a configuration change interrupt");
            }
        }
    }

    /// The saved state of the function.
    pub fn state(&self) -> VirtioPciDeviceState {
        VirtioPciDeviceState {
            pci: self.config.state(),
            msix: lock_msix(&self.msix).state(),
            common: self.common.clone(),
            config_vector: self.vectors.config(),
            queue_vectors: (0..self.queue_events.len())
                .map(|queue| self.vectors.queue(queue))
                .collect(),
            isr: self.interrupt.isr(),
            needs_reset: self.interrupt.needs_reset(),
            device: self.device.state(),
        }
    }

    /// Asks the driver for a reset (DEVICE_NEEDS_RESET), interrupting it when DRIVER_OK is set.
    fn needs_reset(&self, reason: &dyn std::fmt::Display) {
        tracing::warn!(%reason, "virtio device needs a reset");
        let driver_ok = self.common.device_status() & STATUS_DRIVER_OK != 0;
        self.interrupt.raise_needs_reset(driver_ok);
    }

    fn write_status(&mut self, written: u8) {
        match status_change(self.common.device_status(), written) {
            StatusChange::Reset => self.reset(),
            StatusChange::Invalid(reason) => {
                tracing::debug!(written, reason, "ignoring an invalid virtio status write");
            }
            StatusChange::Advance {
                mut status,
                features_ok,
                driver_ok,
            } => {
                if features_ok {
                    if self.features_acceptable() {
                        self.device.ack_features(self.common.driver_features());
                    } else {
                        status &= !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                    }
                }
                self.common.set_device_status(status);
                if driver_ok && status & STATUS_DRIVER_OK != 0 {
                    self.activate();
                }
            }
        }
    }

    /// Whether the driver's features are a subset of the device's and include VIRTIO_F_VERSION_1.
    fn features_acceptable(&self) -> bool {
        let driver = self.common.driver_features();
        let offered = self.device.features();
        if driver & !offered != 0 {
            tracing::debug!(
                driver,
                offered,
                "driver accepted features the device did not offer; refusing FEATURES_OK"
            );
            return false;
        }
        if driver & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::debug!("driver did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        if self.active {
            return;
        }
        let event_idx = self.common.driver_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = self.mem.memory();
        let mut queues = Vec::new();
        for (index, queue_config) in self.common.queues().iter().enumerate() {
            if !queue_config.enabled() {
                continue;
            }
            // Memory may have changed since the queue was enabled.
            if let Err(err) = queue_config.validate(index, &mem) {
                self.needs_reset(&err);
                return;
            }
            let queue = match queue_config.build(event_idx) {
                Ok(queue) => queue,
                Err(err) => {
                    self.needs_reset(&format!("queue {index} cannot be built: {err}"));
                    return;
                }
            };
            let event = match self.queue_events[index].try_clone() {
                Ok(event) => event,
                Err(err) => {
                    self.needs_reset(&format!("queue {index} event cannot be shared: {err}"));
                    return;
                }
            };
            queues.push((index, queue, event));
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        match self.device.activate(self.mem.clone(), interrupt, queues) {
            Ok(()) => self.active = true,
            Err(err) => self.needs_reset(&err),
        }
    }

    /// Device reset (the driver wrote 0 to `device_status`).
    fn reset(&mut self) {
        // The device gives back its copies of the queue events; the transport keeps its own.
        drop(self.device.reset());
        self.active = false;
        self.device.ack_features(0);
        self.common.reset();
        self.vectors.reset();
        self.interrupt.reset();
        for event in &self.queue_events {
            // Drop notifications meant for the old queues.
            let _ = event.read();
        }
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        self.common.read(
            offset,
            data,
            self.device.features(),
            &self.vectors,
            self.interrupt.needs_reset(),
        );
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mem = self.mem.memory();
        match self.common.write(offset, data, &self.vectors, &mem) {
            WriteEffect::None => {}
            WriteEffect::Status(value) => self.write_status(value),
            WriteEffect::NeedsReset(err) => self.needs_reset(&err),
        }
    }

    fn notify(&self, offset: u64) {
        let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
        if !offset.is_multiple_of(multiplier) {
            tracing::debug!(offset, "dropping a misaligned virtio doorbell write");
            return;
        }
        let Some(event) = usize::try_from(offset / multiplier)
            .ok()
            .and_then(|queue| self.queue_events.get(queue))
        else {
            tracing::debug!(
                offset,
                "dropping a doorbell write for a queue that does not exist"
            );
            return;
        };
        if let Err(err) = event.write(1) {
            tracing::warn!(%err, "failed to signal a virtio queue");
        }
    }

    /// Register index of the PCI configuration access window's data.
    fn pci_cfg_data_reg(&self) -> usize {
        (self.pci_cfg_cap + CAP_PCI_CFG_DATA_OFFSET) / 4
    }

    /// The (offset, length) the driver programmed in the PCI configuration access capability, if they describe a
    /// valid 1-, 2- or 4-byte aligned access inside BAR 0.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let bar = self.config.byte(self.pci_cfg_cap + CAP_BAR_OFFSET);
        let offset = u64::from(
            self.config
                .read_reg((self.pci_cfg_cap + CAP_OFFSET_OFFSET) / 4),
        );
        let length = self
            .config
            .read_reg((self.pci_cfg_cap + CAP_LENGTH_OFFSET) / 4);
        let length = match length {
            1 | 2 | 4 => length as usize,
            _ => return None,
        };
        let valid = bar == 0
            && offset.is_multiple_of(length as u64)
            && offset + length as u64 <= VIRTIO_PCI_BAR_SIZE;
        valid.then_some((offset, length))
    }
}

/// Guest address of queue `queue`'s doorbell when BAR 0 is at `bar_base`.
pub fn notify_address(bar_base: u64, queue: usize) -> u64 {
    bar_base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_data_reg() {
            if let Some((offset, length)) = self.pci_cfg_window() {
                let mut bytes = [0u8; 4];
                self.read_bar(0, offset, &mut bytes[..length]);
                return u32::from_le_bytes(bytes);
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogramming> {
        let moved = self.config.write_config_register(reg, offset, data);
        if reg == self.msix_cap_reg {
            let control = (self.config.read_reg(reg) >> 16) as u16;
            lock_msix(&self.msix).set_message_control(control);
        }
        if reg == self.msix_cap_reg || reg == COMMAND_STATUS_REG {
            // A function may not assert INTx while the driver disables it or uses MSI-X.
            let blocked = self.config.command() & COMMAND_INTERRUPT_DISABLE != 0
                || lock_msix(&self.msix).enabled();
            self.interrupt.set_intx_blocked(blocked);
        }
        if reg == self.pci_cfg_data_reg() {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let bytes = self.config.read_reg(reg).to_le_bytes();
                self.write_bar(0, bar_offset, &bytes[..length]);
            }
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        let region = offset / REGION_SIZE * REGION_SIZE;
        let within = offset - region;
        if within.saturating_add(data.len() as u64) > REGION_SIZE {
            tracing::debug!(offset, len = data.len(), "virtio BAR read crosses a region");
            return;
        }
        match region {
            COMMON_CONFIG_OFFSET => self.read_common(within, data),
            ISR_OFFSET if within == 0 => {
                if let Some(first) = data.first_mut() {
                    *first = self.interrupt.read_isr();
                }
            }
            DEVICE_CONFIG_OFFSET => self.device.read_config(within, data),
            MSIX_TABLE_OFFSET => lock_msix(&self.msix).read_table(within, data),
            MSIX_PBA_OFFSET => lock_msix(&self.msix).read_pba(within, data),
            // Doorbells read as zero, as does the unused part of the BAR.
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let region = offset / REGION_SIZE * REGION_SIZE;
        let within = offset - region;
        if data.is_empty() || within.saturating_add(data.len() as u64) > REGION_SIZE {
            tracing::debug!(
                offset,
                len = data.len(),
                "dropping a virtio BAR write crossing a region"
            );
            return;
        }
        match region {
            COMMON_CONFIG_OFFSET => self.write_common(within, data),
            DEVICE_CONFIG_OFFSET => self.device.write_config(within, data),
            NOTIFY_OFFSET => self.notify(within),
            MSIX_TABLE_OFFSET => lock_msix(&self.msix).write_table(within, data),
            MSIX_PBA_OFFSET => lock_msix(&self.msix).write_pba(within, data),
            _ => tracing::debug!(
                offset,
                "dropping a write to a read-only or unused virtio BAR offset"
            ),
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        drop(self.device.reset());
    }
}

#[cfg(test)]
#[path = "pci_device_tests.rs"]
mod tests;
