//! Serving virtio-blk requests against a [`DiskBackend`].
//!
//! Data moves between the disk and guest buffers that vm-memory has checked and sliced (a buffer spanning two
//! memory regions becomes two slices), so a request can never touch host memory outside the guest's RAM whatever its
//! descriptors say. [`RawFile`](super::RawFile) reads and writes those slices directly; other backends bounce
//! through a scratch buffer the handler keeps.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryError};

use super::backend::DiskBackend;
use super::request::{Request, RequestType, DISCARD_SEGMENT_SIZE, SECTOR_SIZE};
use crate::device::GuestMemoryMmap;
use crate::worker::ChainHandler;

/// Length of the device ID GET_ID returns.
pub const VIRTIO_BLK_ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Limits the device advertises for discard and write-zeroes, enforced per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RangeLimits {
    pub(crate) max_sectors: u32,
    pub(crate) max_segments: u32,
}

/// What the handler needs to know about the device.
#[derive(Clone)]
pub(crate) struct BlockContext {
    pub(crate) disk: Arc<dyn DiskBackend>,
    pub(crate) read_only: bool,
    /// The driver negotiated VIRTIO_BLK_F_FLUSH: writes may stay cached until a flush. Without it every write is
    /// made durable before it completes.
    pub(crate) writeback: bool,
    pub(crate) serial: [u8; VIRTIO_BLK_ID_BYTES],
    pub(crate) discard: RangeLimits,
    pub(crate) write_zeroes: RangeLimits,
}

/// Why a request failed: the status it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    IoErr,
    Unsupported,
}

impl Failure {
    fn status(self) -> u8 {
        match self {
            Self::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Self::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Serves the request queues of one block device.
pub(crate) struct BlockHandler {
    ctx: BlockContext,
    /// Scratch space for backends that cannot move data straight to and from guest memory.
    scratch: Vec<u8>,
}

impl BlockHandler {
    pub(crate) fn new(ctx: BlockContext) -> Self {
        Self {
            ctx,
            scratch: Vec::new(),
        }
    }

    fn capacity(&self) -> u64 {
        // Whole sectors only: a trailing partial sector is not addressable.
        self.ctx.disk.size() / SECTOR_SIZE * SECTOR_SIZE
    }

    /// Checks that `len` bytes at `offset` are inside the disk.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), Failure> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => {
                tracing::debug!(offset, len, "virtio-blk request beyond the end of the disk");
                Err(Failure::IoErr)
            }
        }
    }

    /// Serves `request`; returns its status and the number of data bytes written into guest buffers.
    fn execute(&mut self, request: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let result = match request.request_type {
            RequestType::In => self.read(request, mem).map(|()| request.data_len),
            RequestType::Out => self.write(request, mem).map(|()| 0),
            RequestType::Flush => self.flush().map(|()| 0),
            RequestType::GetId => self.get_id(request, mem),
            RequestType::Discard => self.ranges(request, mem, false).map(|()| 0),
            RequestType::WriteZeroes => self.ranges(request, mem, true).map(|()| 0),
            RequestType::Unsupported(raw) => {
                tracing::debug!(raw, "unsupported virtio-blk request type");
                Err(Failure::Unsupported)
            }
        };
        match result {
            // Lossless: a chain holds at most 4 GiB in total.
            Ok(written) => (
                VIRTIO_BLK_S_OK as u8,
                written.min(u64::from(u32::MAX)) as u32,
            ),
            Err(failure) => (failure.status(), 0),
        }
    }

    fn read(&mut self, request: &Request, mem: &GuestMemoryMmap) -> Result<(), Failure> {
        let mut offset = request.sector * SECTOR_SIZE;
        self.check_range(offset, request.data_len)?;
        let disk = self.ctx.disk.clone();
        for segment in &request.data {
            for slice in mem.get_slices(segment.addr, segment.len as usize) {
                let slice = slice.map_err(memory_failure)?;
                disk.read_to_guest(&slice, offset, &mut self.scratch)
                    .map_err(|err| io_failure("read", &err))?;
                offset += slice.len() as u64;
            }
        }
        Ok(())
    }

    fn write(&mut self, request: &Request, mem: &GuestMemoryMmap) -> Result<(), Failure> {
        if self.ctx.read_only {
            tracing::debug!("write to a read-only virtio-blk device");
            return Err(Failure::IoErr);
        }
        let mut offset = request.sector * SECTOR_SIZE;
        self.check_range(offset, request.data_len)?;
        let disk = self.ctx.disk.clone();
        for segment in &request.data {
            for slice in mem.get_slices(segment.addr, segment.len as usize) {
                let slice = slice.map_err(memory_failure)?;
                disk.write_from_guest(&slice, offset, &mut self.scratch)
                    .map_err(|err| io_failure("write", &err))?;
                offset += slice.len() as u64;
            }
        }
        self.write_through()
    }

    /// Makes a completed write durable when the driver did not negotiate a write cache.
    fn write_through(&self) -> Result<(), Failure> {
        if self.ctx.writeback {
            return Ok(());
        }
        self.flush()
    }

    fn flush(&self) -> Result<(), Failure> {
        self.ctx
            .disk
            .flush()
            .map_err(|err| io_failure("flush", &err))
    }

    fn get_id(&self, request: &Request, mem: &GuestMemoryMmap) -> Result<u64, Failure> {
        let mut written = 0usize;
        for segment in &request.data {
            let take = (segment.len as usize).min(VIRTIO_BLK_ID_BYTES - written);
            mem.write_slice(&self.ctx.serial[written..written + take], segment.addr)
                .map_err(memory_failure)?;
            written += take;
            if written == VIRTIO_BLK_ID_BYTES {
                break;
            }
        }
        Ok(written as u64)
    }

    /// Discard (`zero` false) or write-zeroes (`zero` true) over the request's range list.
    fn ranges(
        &mut self,
        request: &Request,
        mem: &GuestMemoryMmap,
        zero: bool,
    ) -> Result<(), Failure> {
        if self.ctx.read_only {
            tracing::debug!("discard or write-zeroes on a read-only virtio-blk device");
            return Err(Failure::IoErr);
        }
        let limits = if zero {
            self.ctx.write_zeroes
        } else {
            self.ctx.discard
        };
        let count = request.data_len / DISCARD_SEGMENT_SIZE;
        if count > u64::from(limits.max_segments) {
            tracing::debug!(count, "too many discard or write-zeroes ranges");
            return Err(Failure::IoErr);
        }
        // Lossless: at most max_segments * 16 bytes.
        let mut list = vec![0u8; request.data_len as usize];
        let mut filled = 0usize;
        for segment in &request.data {
            let end = filled + segment.len as usize;
            mem.read_slice(&mut list[filled..end], segment.addr)
                .map_err(memory_failure)?;
            filled = end;
        }
        let mut ranges = Vec::new();
        for raw in list.chunks_exact(DISCARD_SEGMENT_SIZE as usize) {
            let field = |start: usize, len: usize| {
                let mut bytes = [0u8; 8];
                bytes[..len].copy_from_slice(&raw[start..start + len]);
                u64::from_le_bytes(bytes)
            };
            let (sector, sectors, flags) = (field(0, 8), field(8, 4), field(12, 4) as u32);
            let known_flags = if zero {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !known_flags != 0 {
                tracing::debug!(
                    flags,
                    "discard or write-zeroes range with unsupported flags"
                );
                return Err(Failure::Unsupported);
            }
            if sectors > u64::from(limits.max_sectors) {
                tracing::debug!(sectors, "discard or write-zeroes range too long");
                return Err(Failure::IoErr);
            }
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::IoErr)?;
            let len = sectors * SECTOR_SIZE;
            self.check_range(offset, len)?;
            ranges.push((offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
        }
        // Every range is checked before any is applied.
        for (offset, len, unmap) in ranges {
            let result = if zero {
                self.ctx.disk.write_zeroes(offset, len, unmap)
            } else {
                self.ctx.disk.discard(offset, len)
            };
            result.map_err(|err| io_failure("discard/write-zeroes", &err))?;
        }
        self.write_through()
    }
}

fn io_failure(what: &str, err: &std::io::Error) -> Failure {
    tracing::warn!(%err, "virtio-blk {what} failed");
    Failure::IoErr
}

fn memory_failure(err: GuestMemoryError) -> Failure {
    tracing::debug!(%err, "virtio-blk guest buffer access failed");
    Failure::IoErr
}

impl ChainHandler for BlockHandler {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (status_addr, status, written) = match Request::parse(chain, mem) {
            Ok(request) => {
                let (status, written) = self.execute(&request, mem);
                (request.status, status, written)
            }
            Err(err) => {
                tracing::debug!(%err, "rejecting a virtio-blk request");
                match err.status() {
                    Some(addr) => (addr, VIRTIO_BLK_S_IOERR as u8, 0),
                    None => return 0,
                }
            }
        };
        if let Err(err) = mem.write_obj(status, status_addr) {
            tracing::debug!(%err, "failed to write a virtio-blk status");
            return 0;
        }
        written.saturating_add(1)
    }
}
