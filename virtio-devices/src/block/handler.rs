//! Serving virtio-blk requests against a [`DiskBackend`].
//!
//! Data moves between the disk and guest buffers that vm-memory has checked and sliced (a buffer spanning two
//! memory regions becomes two slices), so a request can never touch host memory outside the guest's RAM whatever its
//! descriptors say. Every request is parsed and checked (layout, direction, range, read-only, that its buffers are
//! guest RAM) before any I/O starts, so a bad chain never reaches the kernel.
//!
//! Two ways to move data:
//! - synchronously on the device thread, one request at a time: [`RawFile`](super::RawFile) reads and writes the
//!   guest slices directly, other backends bounce through a scratch buffer the handler keeps;
//! - with [`AsyncIo`], for backends with a [`direct_fd`](DiskBackend::direct_fd): reads, writes and flushes go to
//!   an io_uring ring as each request is started (so the disk works on the first while the rest are parsed) and
//!   finish in any order, while the other request types (GET_ID, discard, write-zeroes) are still served at once.
//!   A flush waits for the writes started before it. Without a negotiated write cache every write is made durable
//!   on its own, by a sync of the range it wrote that the ring runs once the data is written.
//!
//! One exception on the io_uring path: a write that arrives while nothing is in the ring copies its data into the
//! page cache at once on the device thread (and, without a write cache, leaves only the sync to the ring). Most
//! file systems (ext4 among them) cannot do a buffered write without possibly blocking, so io_uring hands every
//! such write to a kernel worker thread: two more thread switches and a few microseconds more CPU for the same
//! copy, and buffered writes to one file are serialized by the kernel in any case. While reads or other I/O are in
//! flight, writes go through the ring so a write that blocks cannot hold up their completions.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryError};

use super::backend::DiskBackend;
use super::request::{Request, RequestError, RequestType, DISCARD_SEGMENT_SIZE, SECTOR_SIZE};
use super::uring::{IoKind, IoVecs, Uring};
use crate::counters::BlockCounters;
use crate::device::{GuestMemory, GuestMemoryMmap};
use crate::worker::{ChainHandler, Completion, Started};

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
    /// The device's counters, bumped as requests get their status.
    pub(crate) counters: Arc<BlockCounters>,
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

/// A request in the ring.
struct InFlight {
    queue_index: usize,
    head: u16,
    /// Where the status byte goes.
    status: GuestAddress,
    /// Data bytes the request puts in guest buffers when it succeeds.
    data_written: u32,
    /// The request's type and data length, for the counters.
    request_type: RequestType,
    data_len: u64,
    /// The guest memory the request's vectors point into; holding it keeps every region mapped.
    mem: Arc<GuestMemoryMmap>,
}

/// Reads, writes and flushes through io_uring on a backend's [`direct_fd`](DiskBackend::direct_fd).
pub(crate) struct AsyncIo {
    ring: Uring<InFlight>,
    /// Keeps the descriptor the ring uses open (and its number from being reused) while the ring lives.
    _disk: Arc<dyn DiskBackend>,
    memory: GuestMemory,
    /// The guest memory snapshot requests were last started on.
    snapshot: Option<Arc<GuestMemoryMmap>>,
}

impl AsyncIo {
    /// A ring with room for `entries` requests on `disk`'s direct descriptor; `Ok(None)` when the backend has none.
    /// Fails when the kernel does not offer io_uring.
    pub(crate) fn new(
        disk: &Arc<dyn DiskBackend>,
        memory: GuestMemory,
        entries: u32,
    ) -> io::Result<Option<Self>> {
        let Some(fd) = disk.direct_fd() else {
            return Ok(None);
        };
        let ring = Uring::new(fd.as_raw_fd(), entries)?;
        Ok(Some(Self {
            ring,
            _disk: disk.clone(),
            memory,
            snapshot: None,
        }))
    }

    /// An owned snapshot of guest memory, the same one as `mem` unless the map was swapped meanwhile (then buffers
    /// are checked again against the new map).
    fn snapshot(&mut self, mem: &GuestMemoryMmap) -> Arc<GuestMemoryMmap> {
        if let Some(snapshot) = &self.snapshot {
            if std::ptr::eq(Arc::as_ptr(snapshot), mem) {
                return snapshot.clone();
            }
        }
        let fresh = self.memory.memory().into_inner();
        self.snapshot = Some(fresh.clone());
        fresh
    }
}

/// Serves the request queues of one block device.
pub(crate) struct BlockHandler {
    ctx: BlockContext,
    /// Scratch space for backends that cannot move data straight to and from guest memory.
    scratch: Vec<u8>,
    /// The io_uring path, when the backend and the kernel allow it.
    io: Option<AsyncIo>,
}

impl BlockHandler {
    /// A handler that serves every request synchronously.
    pub(crate) fn new(ctx: BlockContext) -> Self {
        Self {
            ctx,
            scratch: Vec::new(),
            io: None,
        }
    }

    /// A handler that reads, writes and flushes through `io`.
    pub(crate) fn with_async_io(ctx: BlockContext, io: AsyncIo) -> Self {
        Self {
            io: Some(io),
            ..Self::new(ctx)
        }
    }

    /// Whether reads, writes and flushes go through io_uring.
    #[cfg(test)]
    pub(crate) fn is_async(&self) -> bool {
        self.io.is_some()
    }

    /// Flushes and durable writes sent through io_uring so far.
    #[cfg(test)]
    pub(crate) fn ring_syncs(&self) -> u64 {
        self.io.as_ref().map_or(0, |io| io.ring.syncs())
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
        self.ctx
            .counters
            .request(request.request_type, request.data_len, result.is_ok());
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
        self.write_data(request, mem)?;
        self.write_through()
    }

    /// Writes the request's data, without making it durable.
    fn write_data(&mut self, request: &Request, mem: &GuestMemoryMmap) -> Result<(), Failure> {
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
        Ok(())
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

impl BlockHandler {
    /// Starts the ring operation `kind` for `request`, after every check the synchronous path makes. A read or
    /// write moves the request's data; a range sync covers data already written.
    fn start_io(
        &mut self,
        queue_index: usize,
        head: u16,
        request: &Request,
        kind: IoKind,
        mem: &GuestMemoryMmap,
    ) -> Result<(), Failure> {
        // `parse` checked that `sector * 512 + data_len` does not overflow for reads and writes.
        let offset = match kind {
            IoKind::Flush => 0,
            _ => request.sector * SECTOR_SIZE,
        };
        let moves_data = matches!(kind, IoKind::Read | IoKind::Write { .. });
        if matches!(kind, IoKind::Write { .. }) && self.ctx.read_only {
            tracing::debug!("write to a read-only virtio-blk device");
            return Err(Failure::IoErr);
        }
        if moves_data {
            self.check_range(offset, request.data_len)?;
        }
        let Some(io) = self.io.as_mut() else {
            return Err(Failure::IoErr);
        };
        let snapshot = io.snapshot(mem);
        let mut vecs = IoVecs::default();
        let data = if moves_data { &request.data[..] } else { &[] };
        for segment in data {
            for slice in snapshot.get_slices(segment.addr, segment.len as usize) {
                let slice = slice.map_err(memory_failure)?;
                vecs.push(slice.ptr_guard_mut().as_ptr(), slice.len());
            }
        }
        let data_written = if kind == IoKind::Read {
            // Lossless: a chain holds at most 4 GiB in total.
            request.data_len.min(u64::from(u32::MAX)) as u32
        } else {
            0
        };
        let token = InFlight {
            queue_index,
            head,
            status: request.status,
            data_written,
            request_type: request.request_type,
            data_len: request.data_len,
            mem: snapshot,
        };
        // SAFETY: every vector is a slice vm-memory cut out of `token.mem`'s regions (so it lies inside a mapping of
        // guest RAM), and `token` holds that memory map, which keeps the regions mapped, until the ring hands the
        // token back after the kernel is done. Guest memory is only ever accessed through raw pointers and volatile
        // copies, so no Rust reference aliases the bytes the kernel writes.
        unsafe { io.ring.push(kind, offset, vecs, token) }.map_err(|_| {
            tracing::warn!("virtio-blk: the io_uring ring is full");
            Failure::IoErr
        })
    }
}

/// Writes `status` to `addr` and returns the used length: the data bytes written plus the status byte, or 0 when the
/// status cannot be written.
fn finish(mem: &GuestMemoryMmap, addr: GuestAddress, status: u8, written: u32) -> u32 {
    if let Err(err) = mem.write_obj(status, addr) {
        tracing::debug!(%err, "failed to write a virtio-blk status");
        return 0;
    }
    written.saturating_add(1)
}

/// Answers a request that failed to parse: VIRTIO_BLK_S_IOERR when it has a status byte, a used length of 0 when not.
fn reject(err: &RequestError, mem: &GuestMemoryMmap) -> u32 {
    tracing::debug!(%err, "rejecting a virtio-blk request");
    match err.status() {
        Some(addr) => finish(mem, addr, VIRTIO_BLK_S_IOERR as u8, 0),
        None => 0,
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
        match Request::parse(chain, mem) {
            Ok(request) => {
                let (status, written) = self.execute(&request, mem);
                finish(mem, request.status, status, written)
            }
            Err(err) => {
                self.ctx.counters.errors.inc();
                reject(&err, mem)
            }
        }
    }

    fn start_chain(
        &mut self,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Started {
        if self.io.is_none() {
            return Started::Done(self.handle_chain(queue_index, chain, mem));
        }
        let head = chain.head_index();
        let request = match Request::parse(chain, mem) {
            Ok(request) => request,
            Err(err) => {
                self.ctx.counters.errors.inc();
                return Started::Done(reject(&err, mem));
            }
        };
        let durable = !self.ctx.writeback;
        let started = match request.request_type {
            RequestType::In => self.start_io(queue_index, head, &request, IoKind::Read, mem),
            RequestType::Flush => self.start_io(queue_index, head, &request, IoKind::Flush, mem),
            RequestType::Out if self.in_flight() > 0 => {
                let kind = IoKind::Write { durable };
                self.start_io(queue_index, head, &request, kind, mem)
            }
            // Nothing in the ring: the data goes into the page cache here (see the module documentation), and
            // the ring syncs it when the driver has no write cache.
            RequestType::Out if durable => self.write_data(&request, mem).and_then(|()| {
                let kind = IoKind::SyncRange {
                    len: request.data_len,
                };
                self.start_io(queue_index, head, &request, kind, mem)
            }),
            _ => {
                let (status, written) = self.execute(&request, mem);
                return Started::Done(finish(mem, request.status, status, written));
            }
        };
        match started {
            Ok(()) => Started::InFlight,
            Err(failure) => {
                self.ctx.counters.errors.inc();
                Started::Done(finish(mem, request.status, failure.status(), 0))
            }
        }
    }

    fn has_room(&self) -> bool {
        self.io.as_ref().is_none_or(|io| io.ring.has_room())
    }

    fn completion_event(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.io.as_ref().map(|io| io.ring.event())
    }

    fn poll_completions(&mut self, done: &mut Vec<Completion>) {
        let Some(io) = self.io.as_mut() else {
            return;
        };
        let counters = &self.ctx.counters;
        io.ring.poll(|request, result| {
            counters.request(request.request_type, request.data_len, result.is_ok());
            let status = match result {
                Ok(()) => VIRTIO_BLK_S_OK as u8,
                Err(err) => io_failure("I/O", &err).status(),
            };
            let written = if status == VIRTIO_BLK_S_OK as u8 {
                request.data_written
            } else {
                0
            };
            done.push(Completion {
                queue_index: request.queue_index,
                head: request.head,
                len: finish(&request.mem, request.status, status, written),
            });
        });
        if io.ring.in_flight() == 0 {
            // Nothing needs the snapshot any more; do not keep an old memory map alive.
            io.snapshot = None;
        }
    }

    fn in_flight(&self) -> usize {
        self.io.as_ref().map_or(0, |io| io.ring.in_flight())
    }

    fn quiesce(&mut self) {
        if let Some(io) = self.io.as_mut() {
            io.ring.cancel_all();
            io.snapshot = None;
        }
    }
}
