//! Virtio 1.x devices for Atrium, on the modern virtio-pci transport.
//!
//! - [`VirtioDevice`] is what a device implements: its type, queues, features and configuration space, and
//!   `activate`/`reset`. Each active device serves its queues on its own thread, woken by epoll on the queue
//!   notification events and a kill event.
//! - [`VirtioInterrupt`] is how a device notifies the driver; the transport implements it.
//! - [`DeviceCounters`] are a device's statistics ([`VirtioDevice::counters`]), read without locking the device.
//! - [`VirtioPciDevice`] is the modern virtio-pci transport: a [`pci::PciDevice`] with the common, notification,
//!   ISR and device configuration structures and MSI-X in BAR 0 (layout in its documentation).
//! - [`Rng`] is virtio-rng; [`Block`] is virtio-blk over a [`DiskBackend`] ([`RawFile`] or [`Qcow2File`], opened
//!   with [`open_disk`]). [`Request::parse`] is the block request parser on its own, for fuzzing.
//! - [`VirtioMem`] is virtio-mem: a region of guest memory plugged and unplugged in blocks, resized through its
//!   [`VirtioMemHandle`]; [`MemRequest::parse`] and [`BlockMap`] are its request parser and rules, for fuzzing.
//!
//! Guest input is never trusted: descriptor chains are walked with virtio-queue's bounded iterator and every guest
//! buffer is accessed through vm-memory's checked accessors. A malformed request gets an error status (or a used
//! length of 0 when it has no status byte); corrupt rings or an invalid queue setup set DEVICE_NEEDS_RESET.
//!
//! Nothing here knows about KVM: the VMM registers the notification events the transport exposes as ioeventfds and
//! implements [`pci::MsiDelivery`] for MSI-X.

mod block;
mod chain;
mod console;
mod counters;
mod device;
mod io_worker;
mod mem;
mod net;
mod rng;
mod tap;
mod transport;
mod vsock;
mod worker;

#[cfg(test)]
mod test_netns;
#[cfg(test)]
mod test_queue;
#[cfg(test)]
mod test_utils;

pub use block::{
    open_disk, Block, BlockError, BlockOptions, DiskBackend, DiskError, DiskFormat, IoEngine,
    Qcow2File, RawFile, Request, RequestError, RequestErrorKind, RequestType, Segment,
    DEFAULT_QUEUE_SIZE, DISCARD_SEGMENT_SIZE, REQUEST_HEADER_SIZE, SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
};
pub use chain::ChainError;
pub use console::{
    Console, ConsoleError, ConsoleInput, CONSOLE_INPUT_CAPACITY, CONSOLE_QUEUE_SIZE,
};
pub use counters::DeviceCounters;
pub use device::{
    ActivateError, GuestMemory, GuestMemoryMmap, VirtioDevice, VirtioDeviceState, VirtioDeviceType,
    VirtioInterrupt, VirtioInterruptType, COMMON_FEATURES,
};
pub use mem::{
    BlockMap, BlockRange, BlockState, MemRequest, MemRequestError, MemRequestErrorKind,
    MemResponse, MemoryDiscard, ParsedRequest, VirtioMem, VirtioMemError, VirtioMemGeometry,
    VirtioMemHandle, VirtioMemState, VIRTIO_MEM_BLOCK_SIZE, VIRTIO_MEM_CONFIG_SIZE,
    VIRTIO_MEM_MAX_BLOCKS, VIRTIO_MEM_QUEUE_SIZE, VIRTIO_MEM_REQUEST_SIZE,
    VIRTIO_MEM_RESPONSE_SIZE,
};
pub use net::{Net, NetError, NetOptions, MAX_FRAME_LEN, NET_DEFAULT_QUEUE_SIZE};
pub use rng::{Rng, RngError, RngSource, MAX_BYTES_PER_REQUEST, RNG_QUEUE_SIZE};
pub use tap::{Tap, TapError, TapOffloads, MAX_TAP_QUEUES, VNET_HDR_LEN};
pub use transport::{
    notify_address, VirtioPciDevice, VirtioPciDeviceState, VirtioPciError, COMMON_CONFIG_OFFSET,
    DEVICE_CONFIG_OFFSET, ISR_OFFSET, MAX_QUEUES, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_BAR_SIZE,
    VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID,
};
pub use vsock::{
    Vsock, VsockError, VSOCK_CONN_BUF_SIZE, VSOCK_FIRST_HOST_PORT, VSOCK_MAX_CONNECTIONS,
    VSOCK_QUEUE_SIZE,
};
