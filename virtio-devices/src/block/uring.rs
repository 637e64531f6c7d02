//! Asynchronous reads, writes and flushes on one file through io_uring (the `io-uring` crate: the kernel interface
//! only, no async runtime).
//!
//! A [`Uring`] owns a ring and the eventfd registered with it for completions. [`Uring::push`] sends a request to
//! the kernel at once: the I/O vectors it transfers and a token that comes back when it finishes. [`Uring::poll`]
//! sends what is still queued (the rest of a short transfer, a flush that waited) and hands back the requests that
//! have finished, in whatever order the kernel finished them.
//!
//! A transfer the kernel cuts short is sent again for the rest, which is also how a request with more
//! than `IOV_MAX` vectors goes out. A flush (`fdatasync`) is held back until every write pushed before it has
//! finished, however many submissions those writes take. A durable write is a plain write followed, once it has
//! finished, by an `fdatasync` of the range it wrote: the kernel runs buffered writes to one file one after another
//! on one worker thread, so a write that also waited for the disk there (`RWF_DSYNC`) would make every durable write
//! wait for the previous one's disk flush, while separate syncs can overlap and share the file system's commits.
//!
//! One `io_uring_enter` per request rather than one per batch: a buffered read that misses the page cache costs its
//! submitter several microseconds in the kernel (page allocation, readahead, the block request), and a batch goes to
//! the disk only when its whole submission is over (the block layer plugs it). With 32 reads in one call the disk
//! sat idle for about a quarter of every cycle; sent one by one, the disk starts on the first while the device
//! thread prepares the next. The extra system calls cost the device thread about a quarter of a microsecond per
//! request.
//!
//! The vectors point into memory the caller keeps alive through the token, so the ring never lets go of a token
//! while the kernel may still use its vectors: [`Uring::cancel_all`] (also run on drop) cancels what the kernel can
//! cancel and waits for the rest, and if it cannot wait it keeps the tokens forever rather than let their memory go.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Most vectors the kernel takes in one request (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// How often a request the kernel answers with EINTR or EAGAIN is sent again before it fails.
const MAX_RETRIES: u8 = 8;
/// `user_data` of cancellation requests, which belong to no slot.
const CANCEL_TAG: u64 = u64::MAX;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoKind {
    /// Fill the vectors from the file.
    Read,
    /// Write the vectors to the file; a `durable` write then syncs the range it wrote before it completes.
    Write {
        /// Per-write durability.
        durable: bool,
    },
    /// `fdatasync`, once every write pushed before it has finished.
    Flush,
    /// `fdatasync` of `len` bytes at the request's offset, for data already written; goes out at once.
    SyncRange {
        /// Length of the range.
        len: u64,
    },
}

/// The I/O vectors of one request.
#[derive(Debug, Default)]
pub(crate) struct IoVecs(Vec<libc::iovec>);

// SAFETY: the vectors are only addresses and lengths. Whoever pushes them keeps the memory they name alive through
// the request's token (see `Uring::push`), and only the kernel reads or writes that memory, so handing the vectors
// to another thread cannot create a data race in this process.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Adds `len` bytes at `base`.
    pub(crate) fn push(&mut self, base: *mut u8, len: usize) {
        if len > 0 {
            self.0.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
        }
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|vec| vec.iov_len as u64).sum()
    }
}

/// A request the ring holds.
struct Slot<T> {
    kind: IoKind,
    /// File offset of the request's first byte.
    start: u64,
    /// File offset of the first byte still to transfer.
    offset: u64,
    vecs: IoVecs,
    /// Index of the first vector not completely transferred.
    next: usize,
    /// Bytes still to transfer.
    remaining: u64,
    retries: u8,
    /// Order of pushing.
    seq: u64,
    /// For a held-back flush: writes pushed before it that have not finished.
    earlier_writes: usize,
    token: T,
}

impl<T> Slot<T> {
    /// Records that the kernel moved `count` more bytes.
    fn advance(&mut self, count: u64) {
        let count = count.min(self.remaining);
        self.offset += count;
        self.remaining -= count;
        // Lossless: at most the length of the vectors, which are in memory.
        let mut left = count as usize;
        while left > 0 {
            let Some(vec) = self.vecs.0.get_mut(self.next) else {
                break;
            };
            if left >= vec.iov_len {
                left -= vec.iov_len;
                self.next += 1;
            } else {
                vec.iov_base = vec.iov_base.cast::<u8>().wrapping_add(left).cast();
                vec.iov_len -= left;
                left = 0;
            }
        }
    }
}

/// Requests pushed, by kind, for the log.
#[derive(Debug, Default)]
struct Counts {
    reads: u64,
    writes: u64,
    flushes: u64,
    /// Range syncs, after durable writes or on their own.
    range_syncs: u64,
    resubmitted: u64,
}

/// An io_uring instance doing I/O on one file descriptor.
pub(crate) struct Uring<T> {
    ring: IoUring,
    event: EventFd,
    fd: RawFd,
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    /// Slots in use: queued, held back or in the kernel.
    in_flight: usize,
    /// Writes pushed and not finished.
    writes: usize,
    /// Flushes waiting for earlier writes, in pushing order.
    held_flushes: Vec<usize>,
    next_seq: u64,
    /// Completions collected from the ring and not yet processed: (`user_data`, result).
    cqes: Vec<(u64, i32)>,
    counts: Counts,
}

impl<T> std::fmt::Debug for Uring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.fd)
            .field("capacity", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// Whether an error from setting up a ring means the kernel does not offer io_uring (or forbids it here).
pub(crate) fn unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EOPNOTSUPP)
    )
}

/// Creates a ring, with cooperative task running when the kernel has it (no interprocessor interrupt to run
/// completion work while the device thread is busy: it runs at the thread's next system call).
fn build_ring(entries: u32) -> io::Result<IoUring> {
    match IoUring::builder()
        .dontfork()
        .setup_coop_taskrun()
        .build(entries)
    {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().dontfork().build(entries)
        }
        other => other,
    }
}

impl<T> Uring<T> {
    /// A ring for I/O on `fd` with room for `entries` requests at once (rounded up to a power of two). Fails when
    /// the kernel has no io_uring, forbids it, or lacks one of the operations used.
    pub(crate) fn new(fd: RawFd, entries: u32) -> io::Result<Self> {
        let ring = build_ring(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::AsyncCancel::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
        }
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // Every request holds at most one submission entry, and the completion ring is at least as large.
        let capacity = ring.params().sq_entries() as usize;
        Ok(Self {
            ring,
            event,
            fd,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            in_flight: 0,
            writes: 0,
            held_flushes: Vec::new(),
            next_seq: 0,
            cqes: Vec::with_capacity(capacity),
            counts: Counts::default(),
        })
    }

    /// The eventfd the kernel signals when requests complete.
    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }

    /// Whether another request can be pushed.
    pub(crate) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Flushes and range syncs sent so far.
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.counts.flushes + self.counts.range_syncs
    }

    /// Requests pushed and not yet handed back.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Sends a request to the kernel (a flush that must wait for earlier writes goes once they have finished).
    /// Gives the token back when there is no room.
    ///
    /// # Safety
    ///
    /// Every vector of `vecs` must name memory that stays mapped, writable for a read, until `token` is handed back
    /// by [`Uring::poll`] or [`Uring::cancel_all`] (or forever, if the ring keeps it), and that no Rust reference
    /// aliases while the request is in flight.
    pub(crate) unsafe fn push(
        &mut self,
        kind: IoKind,
        offset: u64,
        vecs: IoVecs,
        token: T,
    ) -> Result<(), T> {
        let Some(index) = self.free.pop() else {
            return Err(token);
        };
        let earlier_writes = if kind == IoKind::Flush {
            self.writes
        } else {
            0
        };
        match kind {
            IoKind::Read => self.counts.reads += 1,
            IoKind::Write { .. } => {
                self.counts.writes += 1;
                self.writes += 1;
            }
            IoKind::Flush => self.counts.flushes += 1,
            IoKind::SyncRange { .. } => self.counts.range_syncs += 1,
        }
        let remaining = vecs.total();
        self.slots[index] = Some(Slot {
            kind,
            start: offset,
            offset,
            vecs,
            next: 0,
            remaining,
            retries: 0,
            seq: self.next_seq,
            earlier_writes,
            token,
        });
        self.next_seq += 1;
        self.in_flight += 1;
        if earlier_writes > 0 {
            self.held_flushes.push(index);
        } else {
            self.queue(index);
            self.submit();
        }
        Ok(())
    }

    /// Puts the submission entry for what slot `index` still has to do in the submission ring.
    fn queue(&mut self, index: usize) {
        let Some(slot) = self.slots.get(index).and_then(Option::as_ref) else {
            return;
        };
        let fd = types::Fd(self.fd);
        let vecs = slot.vecs.0.get(slot.next..).unwrap_or_default();
        // Lossless: at most IOV_MAX.
        let count = vecs.len().min(IOV_MAX) as u32;
        let entry = match slot.kind {
            IoKind::Read => opcode::Readv::new(fd, vecs.as_ptr(), count)
                .offset(slot.offset)
                .build(),
            IoKind::Write { .. } => opcode::Writev::new(fd, vecs.as_ptr(), count)
                .offset(slot.offset)
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // A range too long to name syncs the whole file (offset and length 0).
            IoKind::SyncRange { len } => match u32::try_from(len) {
                Ok(len) if len > 0 => opcode::Fsync::new(fd).offset(slot.start).len(len),
                _ => opcode::Fsync::new(fd),
            }
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        }
        .user_data(index as u64);
        // SAFETY: the entry names the slot's vectors, which live in the slot until its token is handed back (they
        // are neither moved nor changed while the entry is in the kernel: `advance` runs only on its completion),
        // and the memory they name stays valid that long by `push`'s contract.
        let queued = unsafe { self.ring.submission().push(&entry) };
        if queued.is_err() {
            // Cannot happen: every slot holds at most one entry and the ring has one per slot. Fail the request
            // rather than lose it.
            self.cqes.push((index as u64, -libc::EBUSY));
        }
    }

    /// Sends the queued entries to the kernel. Entries the kernel does not take now stay queued for the next call.
    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(err) = self.ring.submit() {
            if !matches!(
                err.raw_os_error(),
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
            ) {
                tracing::warn!(%err, "virtio-blk: io_uring submission failed; will retry");
            }
        }
    }

    /// Moves the completions the kernel posted into `self.cqes`.
    fn collect(&mut self) {
        for entry in self.ring.completion() {
            self.cqes.push((entry.user_data(), entry.result()));
        }
    }

    /// Sends everything queued to the kernel and calls `done` with the token and outcome of every request that has
    /// finished. Never blocks.
    pub(crate) fn poll(&mut self, mut done: impl FnMut(T, io::Result<()>)) {
        loop {
            self.submit();
            self.collect();
            if self.cqes.is_empty() {
                return;
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            for (user_data, result) in cqes.drain(..) {
                self.complete(user_data, result, &mut done);
            }
            // Keep the allocation; `complete` may have added failures of its own meanwhile.
            cqes.append(&mut self.cqes);
            self.cqes = cqes;
        }
    }

    /// Handles one completion: the request finishes, or goes out again for what is left.
    fn complete(&mut self, user_data: u64, result: i32, done: &mut impl FnMut(T, io::Result<()>)) {
        if user_data == CANCEL_TAG {
            return;
        }
        let index = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            tracing::warn!(
                user_data,
                "virtio-blk: io_uring completed a request it was not given"
            );
            return;
        };
        let outcome = if result < 0 {
            let errno = -result;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                None
            } else {
                Some(Err(io::Error::from_raw_os_error(errno)))
            }
        } else if matches!(slot.kind, IoKind::Flush | IoKind::SyncRange { .. }) {
            Some(Ok(()))
        } else {
            // Lossless: non-negative.
            let moved = result as u64;
            slot.advance(moved);
            if slot.remaining == 0 {
                Some(Ok(()))
            } else if moved == 0 {
                Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the disk image ended in the middle of a transfer",
                )))
            } else {
                None
            }
        };
        match outcome {
            None => {
                self.counts.resubmitted += 1;
                self.queue(index);
            }
            Some(Ok(())) if slot.kind == (IoKind::Write { durable: true }) => {
                // The data is written: now the sync. For flushes held back, the write has finished.
                slot.kind = IoKind::SyncRange {
                    len: slot.offset - slot.start,
                };
                slot.retries = 0;
                let seq = slot.seq;
                self.counts.range_syncs += 1;
                self.write_finished(seq);
                self.queue(index);
            }
            Some(result) => {
                if let Some(token) = self.release(index) {
                    done(token, result);
                }
            }
        }
    }

    /// Records that the write pushed as `seq` has finished: flushes that waited only for it go out.
    fn write_finished(&mut self, seq: u64) {
        self.writes -= 1;
        let mut ready = Vec::new();
        self.held_flushes.retain(|&flush| {
            let Some(flush_slot) = self.slots.get_mut(flush).and_then(Option::as_mut) else {
                return false;
            };
            if flush_slot.seq > seq {
                flush_slot.earlier_writes -= 1;
            }
            if flush_slot.earlier_writes == 0 {
                ready.push(flush);
                return false;
            }
            true
        });
        for flush in ready {
            self.queue(flush);
        }
    }

    /// Frees slot `index` and returns its token; releases flushes that waited for it.
    fn release(&mut self, index: usize) -> Option<T> {
        let slot = self.slots.get_mut(index)?.take()?;
        self.free.push(index);
        self.in_flight -= 1;
        if matches!(slot.kind, IoKind::Write { .. }) {
            self.write_finished(slot.seq);
        }
        Some(slot.token)
    }

    /// Ends every request without handing it back: held-back flushes are dropped, the kernel is asked to cancel the
    /// rest, and this waits until the kernel has let go of all of them. If waiting fails, the remaining tokens are
    /// kept forever, so the memory their vectors name stays valid.
    pub(crate) fn cancel_all(&mut self) {
        for flush in std::mem::take(&mut self.held_flushes) {
            if let Some(slot) = self.slots.get_mut(flush).and_then(Option::take) {
                self.free.push(flush);
                self.in_flight -= 1;
                drop(slot);
            }
        }
        let busy: Vec<usize> = (0..self.slots.len())
            .filter(|&index| self.slots[index].is_some())
            .collect();
        for index in busy {
            let entry = opcode::AsyncCancel::new(index as u64)
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancellation names no memory.
            while unsafe { self.ring.submission().push(&entry) }.is_err() {
                if let Err(err) = self.ring.submit() {
                    if err.kind() != io::ErrorKind::Interrupted {
                        break;
                    }
                }
            }
        }
        loop {
            // Completions collected earlier (or failures recorded without the kernel) end their requests too.
            for (user_data, _) in std::mem::take(&mut self.cqes) {
                if user_data != CANCEL_TAG {
                    let index = usize::try_from(user_data).unwrap_or(usize::MAX);
                    drop(self.release(index));
                }
            }
            if self.in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::error!(%err, "virtio-blk: cannot wait for io_uring requests; keeping their buffers");
                    for slot in self.slots.iter_mut() {
                        if let Some(slot) = slot.take() {
                            std::mem::forget(slot);
                        }
                    }
                    self.in_flight = 0;
                    break;
                }
            }
            self.collect();
        }
        self.writes = 0;
    }
}

impl<T> Drop for Uring<T> {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            self.cancel_all();
        }
        tracing::debug!(counts = ?self.counts, "virtio-blk: io_uring closed");
    }
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;
