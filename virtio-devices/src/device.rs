//! What every virtio device implements, and how it raises interrupts.
//!
//! A [`VirtioDevice`] knows its device type, its queues, its feature bits and its device-specific configuration
//! space. The transport (virtio-pci) owns everything else: the common configuration registers, feature negotiation,
//! the status state machine and the queue registers. When the driver sets DRIVER_OK the transport hands the device
//! the guest memory, a [`VirtioInterrupt`] and the queues the driver enabled; the device then serves them on its own
//! thread until [`VirtioDevice::reset`] stops it.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

use crate::counters::DeviceCounters;

/// Guest memory as the devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest memory behind an atomic pointer, so the VMM can swap in a new map (hotplug) while devices run.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The feature bits every device in this crate offers: virtio 1.x, indirect descriptors and event-index
/// notification suppression. The device-independent parts (descriptor walking, notification suppression) are done by
/// `virtio-queue`, so every device supports them.
pub const COMMON_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// The virtio device types this crate implements (virtio 1.2 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VirtioDeviceType {
    /// Network device (type 1).
    Net,
    /// Block device (type 2).
    Block,
    /// Console (type 3).
    Console,
    /// Entropy source (type 4).
    Rng,
    /// Socket device (type 19).
    Vsock,
    /// Memory device (type 24).
    Mem,
}

impl VirtioDeviceType {
    /// The virtio device ID.
    pub fn id(self) -> u32 {
        match self {
            Self::Net => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            Self::Block => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Self::Console => virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE,
            Self::Rng => virtio_bindings::virtio_ids::VIRTIO_ID_RNG,
            Self::Vsock => virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK,
            Self::Mem => virtio_bindings::virtio_ids::VIRTIO_ID_MEM,
        }
    }
}

/// What an interrupt is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VirtioInterruptType {
    /// The device configuration space changed (or the device needs a reset).
    Config,
    /// The device used buffers of this queue.
    Queue(u16),
}

/// How a device notifies the driver. The transport implements it (virtio-pci: an MSI-X vector per queue, with the
/// ISR register and INTx when MSI-X is off).
pub trait VirtioInterrupt: Send + Sync {
    /// Notifies the driver.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()>;

    /// The device hit an error it cannot recover from without a reset (for instance, a queue whose rings the driver
    /// corrupted): the transport sets DEVICE_NEEDS_RESET and tells the driver. The default only logs it.
    fn set_needs_reset(&self) {
        tracing::warn!("virtio device needs a reset, but its transport cannot report it");
    }
}

/// Errors activating a device.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// `activate` was called on a running device.
    #[error("the virtio device is already active; reset it before activating it again")]
    AlreadyActive,
    /// The driver enabled a queue set the device cannot work with.
    #[error(
        "the driver enabled an unusable queue set: {0}; the driver must enable the device's queues"
    )]
    BadQueues(String),
    /// Creating an event descriptor, the epoll set or the thread failed.
    #[error("failed to start the virtio device worker: {0}; check the process's file descriptor and thread limits")]
    Worker(io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The device type.
    fn device_type(&self) -> VirtioDeviceType;

    /// The maximum size of each queue (a power of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// The feature bits the driver accepted (a subset of [`VirtioDevice::features`], already validated by the
    /// transport), before activation.
    fn ack_features(&mut self, features: u64);

    /// The feature bits accepted so far.
    fn acked_features(&self) -> u64;

    /// Driver read of the device configuration space at `offset`. Bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Driver write of the device configuration space at `offset`. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts serving the enabled queues, given as (queue index, queue, notification event). The device signals
    /// used buffers through `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(), ActivateError>;

    /// Stops the device's worker and gives back the queue notification events it was given, or `None` when the
    /// device was not active. The device is ready for a new negotiation afterwards.
    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>>;

    /// The device's counters (bytes moved, requests served...), shared with its threads: reading them takes no lock
    /// and never waits for the device. They count over the device's life, across driver resets. `None` for a device
    /// that keeps none.
    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        None
    }

    /// The device's saved state.
    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: self.device_type(),
            avail_features: self.features(),
            acked_features: self.acked_features(),
        }
    }
}

/// The device-side state a snapshot needs (the transport saves its own registers and the queues).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device type.
    pub device_type: VirtioDeviceType,
    /// Feature bits offered.
    pub avail_features: u64,
    /// Feature bits accepted by the driver.
    pub acked_features: u64,
}

/// Copies the bytes of a device configuration space at `offset` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(source) = config.get(start..) {
        let len = source.len().min(data.len());
        data[..len].copy_from_slice(&source[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        let mut one = [0u8; 1];
        read_config_bytes(&config, 0, &mut one);
        assert_eq!(one, [1]);
    }

    #[test]
    fn device_type_ids() {
        assert_eq!(VirtioDeviceType::Net.id(), 1);
        assert_eq!(VirtioDeviceType::Block.id(), 2);
        assert_eq!(VirtioDeviceType::Console.id(), 3);
        assert_eq!(VirtioDeviceType::Rng.id(), 4);
        assert_eq!(VirtioDeviceType::Vsock.id(), 19);
        assert_eq!(VirtioDeviceType::Mem.id(), 24);
    }
}
