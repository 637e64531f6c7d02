//! virtio-mem (device type 24): a region of guest-physical memory the driver plugs and unplugs block by block, so
//! the VMM can grow or shrink a running guest by changing one number, the requested size.
//!
//! The VMM maps the whole region into the guest before boot (one memory slot) and creates the device with the
//! region's [`VirtioMemGeometry`] and a [`MemoryDiscard`] that releases host memory. It then asks for memory with
//! [`VirtioMemHandle::set_requested_size`] and tells the driver through the transport's configuration-change
//! interrupt; the driver sends PLUG or UNPLUG requests (one request queue) until its plugged size matches. Unplugged
//! blocks are discarded before they are reported unplugged, so the host gets the memory back.
//!
//! VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE is not offered: unplugged blocks stay mapped, as the specification allows
//! without that feature (the driver may read them). A driver that writes to them anyway only uses host memory the
//! region could hold when fully plugged. VIRTIO_MEM_F_ACPI_PXM is not offered either (one NUMA node).
//!
//! Plugged blocks survive a device reset, as the specification asks; drivers unplug everything with UNPLUG_ALL when
//! they start. The configuration space, the requested size and the bitmap live behind one lock shared by the
//! device, its thread and the VMM's handle.

mod blocks;
mod request;

use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, GuestMemoryMmap, VirtioDevice, VirtioDeviceType,
    VirtioInterrupt, COMMON_FEATURES,
};
use crate::worker::{ChainHandler, Worker};

pub use blocks::{
    BlockMap, MemoryDiscard, VirtioMemGeometry, VirtioMemState, VIRTIO_MEM_CONFIG_SIZE,
    VIRTIO_MEM_MAX_BLOCKS,
};
pub use request::{
    BlockRange, BlockState, MemRequest, MemRequestError, MemRequestErrorKind, MemResponse,
    ParsedRequest, VIRTIO_MEM_REQUEST_SIZE, VIRTIO_MEM_RESPONSE_SIZE,
};

/// Size of the request queue.
pub const VIRTIO_MEM_QUEUE_SIZE: u16 = 128;
/// The block size the VMM uses: 2 MiB, a huge page on x86_64 (Linux plugs sub-blocks of its 128 MiB memory blocks).
pub const VIRTIO_MEM_BLOCK_SIZE: u64 = 2 << 20;

/// Errors creating or driving a virtio-mem device.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum VirtioMemError {
    /// The region cannot be managed.
    #[error(
        "virtio-mem region {addr:#x}+{region_size:#x} with {block_size:#x}-byte blocks: {reason}"
    )]
    BadGeometry {
        /// Region address.
        addr: u64,
        /// Region size.
        region_size: u64,
        /// Block size.
        block_size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A requested size that is not whole blocks.
    #[error("{size} bytes is not a multiple of the virtio-mem block size ({block_size} bytes); round it")]
    UnalignedSize {
        /// The size asked for.
        size: u64,
        /// The block size.
        block_size: u64,
    },
    /// A requested size larger than the region.
    #[error("{size} bytes is more than the virtio-mem region holds ({region_size} bytes); raise hotplug_size")]
    SizeBeyondRegion {
        /// The size asked for.
        size: u64,
        /// The region size.
        region_size: u64,
    },
    /// A saved state that does not describe a valid device.
    #[error("invalid virtio-mem state: {0}")]
    BadState(&'static str),
}

/// Locks the shared block map, whatever a panicking holder left behind (every update leaves it consistent).
fn lock(blocks: &Mutex<BlockMap>) -> MutexGuard<'_, BlockMap> {
    blocks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the request queue.
struct MemHandler {
    blocks: Arc<Mutex<BlockMap>>,
    discard: Arc<dyn MemoryDiscard>,
}

impl ChainHandler for MemHandler {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (response, addr) = match MemRequest::parse(chain, mem) {
            Ok(parsed) => {
                let response = lock(&self.blocks).process(parsed.request, self.discard.as_ref());
                if response != MemResponse::Ack && !matches!(response, MemResponse::AckState(_)) {
                    tracing::debug!(request = ?parsed.request, ?response, "virtio-mem request refused");
                }
                (response, parsed.response)
            }
            Err(err) => {
                tracing::debug!(%err, "virtio-mem: bad request");
                let Some(addr) = err.response() else {
                    return 0;
                };
                (MemResponse::Error, addr)
            }
        };
        match mem.write_slice(&response.encode(), addr) {
            // Lossless: 10.
            Ok(()) => VIRTIO_MEM_RESPONSE_SIZE as u32,
            Err(err) => {
                tracing::debug!(%err, "virtio-mem: cannot write the response");
                0
            }
        }
    }
}

/// A virtio-mem device.
pub struct VirtioMem {
    blocks: Arc<Mutex<BlockMap>>,
    discard: Arc<dyn MemoryDiscard>,
    acked_features: u64,
    worker: Option<Worker>,
}

impl std::fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMem")
            .field("geometry", &lock(&self.blocks).geometry())
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl VirtioMem {
    /// A device managing `geometry`, with nothing plugged and nothing requested; `discard` releases unplugged memory.
    pub fn new(
        geometry: VirtioMemGeometry,
        discard: Arc<dyn MemoryDiscard>,
    ) -> Result<Self, VirtioMemError> {
        Ok(Self::with_blocks(BlockMap::new(geometry)?, discard))
    }

    /// A device in a saved state (checked).
    pub fn restore(
        state: &VirtioMemState,
        discard: Arc<dyn MemoryDiscard>,
    ) -> Result<Self, VirtioMemError> {
        Ok(Self::with_blocks(BlockMap::restore(state)?, discard))
    }

    fn with_blocks(blocks: BlockMap, discard: Arc<dyn MemoryDiscard>) -> Self {
        Self {
            blocks: Arc::new(Mutex::new(blocks)),
            discard,
            acked_features: 0,
            worker: None,
        }
    }

    /// The VMM's handle on the requested size and the plugged state; it stays valid while the device lives.
    pub fn handle(&self) -> VirtioMemHandle {
        VirtioMemHandle {
            blocks: self.blocks.clone(),
        }
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Mem
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[VIRTIO_MEM_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&lock(&self.blocks).config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a write to the read-only virtio-mem configuration"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 || queues[0].0 != 0 {
            return Err(ActivateError::BadQueues(
                "virtio-mem needs exactly its request queue (0)".into(),
            ));
        }
        let handler = MemHandler {
            blocks: self.blocks.clone(),
            discard: self.discard.clone(),
        };
        self.worker = Some(Worker::spawn(
            "virtio-mem",
            handler,
            mem,
            interrupt,
            queues,
        )?);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.worker.take().map(Worker::stop)
    }
}

/// The VMM's side of a virtio-mem device: sets the requested size and reads what the driver has plugged.
#[derive(Clone, Debug)]
pub struct VirtioMemHandle {
    blocks: Arc<Mutex<BlockMap>>,
}

impl VirtioMemHandle {
    /// Asks the driver to reach `bytes` of plugged memory (a multiple of the block size, at most the region). The
    /// caller then signals a configuration change through the transport
    /// ([`crate::VirtioPciDevice::config_changed`]), which bumps the generation and interrupts the driver.
    pub fn set_requested_size(&self, bytes: u64) -> Result<(), VirtioMemError> {
        lock(&self.blocks).set_requested_size(bytes)
    }

    /// The size the driver was asked to reach.
    pub fn requested_size(&self) -> u64 {
        lock(&self.blocks).requested_size()
    }

    /// The memory the driver has plugged now.
    pub fn plugged_size(&self) -> u64 {
        lock(&self.blocks).plugged_size()
    }

    /// The region.
    pub fn geometry(&self) -> VirtioMemGeometry {
        lock(&self.blocks).geometry()
    }

    /// The device's saved state (region, requested size, plugged blocks).
    pub fn state(&self) -> VirtioMemState {
        lock(&self.blocks).state()
    }
}

#[cfg(test)]
mod tests;
