//! virtio-blk (device type 2) over a [`DiskBackend`].
//!
//! Requests: IN, OUT, FLUSH (`fdatasync`), GET_ID (the serial, 20 bytes), DISCARD and WRITE_ZEROES (hole punching
//! with `fallocate`). Offered features: SEG_MAX, BLK_SIZE, FLUSH, MQ, RO for read-only images, and DISCARD and
//! WRITE_ZEROES for writable ones. Without FLUSH negotiated the device is write-through. Read-only disks fail every
//! write with VIRTIO_BLK_S_IOERR, unknown request types get VIRTIO_BLK_S_UNSUPP and requests past the capacity get
//! VIRTIO_BLK_S_IOERR.
//!
//! Disk images are raw files ([`RawFile`]) or qcow2 ([`Qcow2File`]), both behind [`DiskBackend`] and both locked
//! on open so two VMs cannot write one image.
//!
//! Raw images are read, written and flushed through io_uring with many requests in flight ([`IoEngine::Auto`]);
//! where the kernel does not offer io_uring the device says so once in the log and serves them synchronously, one at
//! a time, as it does qcow2 images.

mod backend;
mod handler;
mod lock;
mod qcow2;
mod request;
mod uring;

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::{Arc, Once};

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use backend::{DiskBackend, DiskError, RawFile};
pub use handler::VIRTIO_BLK_ID_BYTES;
pub use qcow2::Qcow2File;
pub use request::{
    Request, RequestError, RequestErrorKind, RequestType, Segment, DISCARD_SEGMENT_SIZE,
    REQUEST_HEADER_SIZE, SECTOR_SIZE,
};

use crate::counters::{BlockCounters, DeviceCounters};
use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, VirtioDevice, VirtioDeviceType, VirtioInterrupt,
    COMMON_FEATURES,
};
use crate::transport::MAX_QUEUES;
use crate::worker::Worker;
use handler::{AsyncIo, BlockContext, BlockHandler, RangeLimits};

/// The format of a disk image. It is always given, never guessed from the contents: a guest that can write a raw
/// image could otherwise make it look like a qcow2 image pointing at host files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw: disk byte `n` is file byte `n`.
    Raw,
    /// qcow2, without backing files or external data files.
    Qcow2,
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(format!(
                "unknown disk image format {other:?}; use raw or qcow2"
            )),
        }
    }
}

/// Opens and locks the image at `path` (exclusively for read-write, shared for read-only).
pub fn open_disk(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
) -> Result<Arc<dyn DiskBackend>, DiskError> {
    Ok(match format {
        DiskFormat::Raw => Arc::new(RawFile::open(path, read_only)?),
        DiskFormat::Qcow2 => Arc::new(Qcow2File::open(path, read_only)?),
    })
}

/// Default size of each request queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most ranges in one discard or write-zeroes request.
const MAX_RANGE_SEGMENTS: u32 = 32;
/// Discard granularity advertised to the driver, in sectors (4 KiB: hole punching works on file system blocks).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Most requests one device keeps in its io_uring ring at once.
const MAX_RING_ENTRIES: u32 = 1024;

/// How a block device moves data for images it can access directly (raw images).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring with every available request in flight at once; synchronous I/O when the kernel does not offer
    /// io_uring.
    #[default]
    Auto,
    /// Synchronous reads and writes on the device thread, one request at a time.
    Sync,
}

/// How a block device presents its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOptions {
    /// Serial returned by GET_ID: at most 20 bytes, padded with NULs.
    pub serial: String,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Size of each queue: a power of two from 4 to 32768.
    pub queue_size: u16,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            serial: String::new(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Errors creating a block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The serial is longer than 20 bytes.
    #[error("block device serial {0:?} is longer than 20 bytes; shorten it")]
    SerialTooLong(String),
    /// The queue count is 0 or above the transport's limit.
    #[error("block device queue count {0} is invalid; use 1 to {MAX_QUEUES}")]
    QueueCount(u16),
    /// The queue size is not a power of two in range.
    #[error("block device queue size {0} is invalid; use a power of two from 4 to 32768")]
    QueueSize(u16),
    /// The disk has no whole sector.
    #[error("disk image is smaller than one 512-byte sector; use a larger image")]
    DiskTooSmall,
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<dyn DiskBackend>,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config: Vec<u8>,
    io_engine: IoEngine,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity_bytes", &self.disk.size())
            .field("read_only", &self.disk.is_read_only())
            .field("queues", &self.queue_sizes.len())
            .field("io_engine", &self.io_engine)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// Writes `value`'s little-endian bytes at `offset` of `config`.
fn put(config: &mut [u8], offset: usize, value: &[u8]) {
    config[offset..offset + value.len()].copy_from_slice(value);
}

fn range_limits() -> RangeLimits {
    RangeLimits {
        max_sectors: u32::MAX,
        max_segments: MAX_RANGE_SEGMENTS,
    }
}

impl Block {
    /// A block device serving `disk`. The device is read-only when the disk was opened read-only.
    pub fn new(disk: Arc<dyn DiskBackend>, options: &BlockOptions) -> Result<Self, BlockError> {
        let serial_bytes = options.serial.as_bytes();
        if serial_bytes.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockError::SerialTooLong(options.serial.clone()));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..serial_bytes.len()].copy_from_slice(serial_bytes);
        if options.num_queues == 0 || usize::from(options.num_queues) > MAX_QUEUES {
            return Err(BlockError::QueueCount(options.num_queues));
        }
        let size = options.queue_size;
        if !size.is_power_of_two() || !(4..=32768).contains(&size) {
            return Err(BlockError::QueueSize(size));
        }
        let capacity = disk.size() / SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::DiskTooSmall);
        }
        let mut features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ);
        if disk.is_read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = build_config(capacity, size, options.num_queues);
        Ok(Self {
            disk,
            serial,
            queue_sizes: vec![size; usize::from(options.num_queues)],
            avail_features: features,
            acked_features: 0,
            config,
            io_engine: IoEngine::default(),
            counters: Arc::default(),
            worker: None,
        })
    }

    /// Chooses how the device moves data from its next activation on.
    pub fn set_io_engine(&mut self, engine: IoEngine) {
        self.io_engine = engine;
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }
}

/// The `virtio_blk_config` structure for this device.
fn build_config(capacity: u64, queue_size: u16, num_queues: u16) -> Vec<u8> {
    let limits = range_limits();
    let mut config = vec![0u8; size_of::<virtio_blk_config>()];
    put(
        &mut config,
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    // Two descriptors of each request carry the header and the status.
    let seg_max = u32::from(queue_size) - 2;
    put(
        &mut config,
        offset_of!(virtio_blk_config, seg_max),
        &seg_max.to_le_bytes(),
    );
    let blk_size = SECTOR_SIZE as u32;
    put(
        &mut config,
        offset_of!(virtio_blk_config, blk_size),
        &blk_size.to_le_bytes(),
    );
    put(
        &mut config,
        offset_of!(virtio_blk_config, num_queues),
        &num_queues.to_le_bytes(),
    );
    for (sectors, segments) in [
        (
            offset_of!(virtio_blk_config, max_discard_sectors),
            offset_of!(virtio_blk_config, max_discard_seg),
        ),
        (
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
        ),
    ] {
        put(&mut config, sectors, &limits.max_sectors.to_le_bytes());
        put(&mut config, segments, &limits.max_segments.to_le_bytes());
    }
    put(
        &mut config,
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
    );
    put(
        &mut config,
        offset_of!(virtio_blk_config, write_zeroes_may_unmap),
        &[1],
    );
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Block
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a virtio-blk config write"
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
        if queues.is_empty() {
            return Err(ActivateError::BadQueues(
                "virtio-blk needs at least one request queue".into(),
            ));
        }
        let ctx = BlockContext {
            disk: self.disk.clone(),
            read_only: self.disk.is_read_only(),
            writeback: self.acked_features & (1 << VIRTIO_BLK_F_FLUSH) != 0,
            serial: self.serial,
            discard: range_limits(),
            write_zeroes: range_limits(),
            counters: self.counters.clone(),
        };
        let handler = match self.io_engine {
            IoEngine::Sync => BlockHandler::new(ctx),
            IoEngine::Auto => {
                let entries: u32 = queues
                    .iter()
                    .map(|(_, queue, _)| u32::from(queue.size()))
                    .sum();
                match AsyncIo::new(&self.disk, mem.clone(), entries.min(MAX_RING_ENTRIES)) {
                    Ok(Some(io)) => BlockHandler::with_async_io(ctx, io),
                    Ok(None) => BlockHandler::new(ctx),
                    Err(err) => {
                        static WARNED: Once = Once::new();
                        WARNED.call_once(|| {
                            let reason = if uring::unavailable(&err) {
                                "the kernel does not offer io_uring or forbids it here"
                            } else {
                                "setting up io_uring failed"
                            };
                            tracing::warn!(%err, "{reason}; virtio-blk devices fall back to synchronous I/O, one request at a time");
                        });
                        BlockHandler::new(ctx)
                    }
                }
            }
        };
        self.worker = Some(Worker::spawn(
            "virtio-blk",
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

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "async_tests.rs"]
mod async_tests;
