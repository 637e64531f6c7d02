//! The device thread: an epoll loop over the queue notification events and a kill event, serving descriptor chains
//! through a device's [`ChainHandler`].
//!
//! Queue-level damage (an available index running ahead of the ring, a used ring the device cannot write, a head
//! index outside the table) stops that queue and asks the transport for DEVICE_NEEDS_RESET; chain-level damage is the
//! handler's business (it answers with an error status or a used length of 0).
//!
//! Most handlers serve a chain before returning from it. A handler may instead leave chains in flight
//! ([`Started::InFlight`]) and finish them later: it then names an event that fires on completions, and the thread
//! collects finished chains with [`ChainHandler::poll_completions`] after every round of events, puts them in their
//! queue's used ring and interrupts the driver once per queue and round. Before the thread exits (device reset or
//! removal) it calls [`ChainHandler::quiesce`], so nothing is in flight once the queues are handed back.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use epoll::{ControlOptions, Event, Events};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    ActivateError, GuestMemory, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType,
};

/// What a handler did with a chain it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Started {
    /// Served; the used length.
    Done(u32),
    /// Still in flight: the handler reports it from [`ChainHandler::poll_completions`] when it finishes.
    InFlight,
}

/// A chain a handler finished after leaving it in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The queue the chain came from.
    pub(crate) queue_index: usize,
    /// Its head descriptor.
    pub(crate) head: u16,
    /// The used length.
    pub(crate) len: u32,
}

/// Serves one descriptor chain of a queue.
pub(crate) trait ChainHandler: Send + 'static {
    /// Handles the chain and returns the number of bytes written into its device-writable buffers (the used
    /// length). Malformed chains are answered here (error status, or 0 bytes), never by panicking.
    fn handle_chain(
        &mut self,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32;

    /// Starts serving a chain. The default serves it at once with [`ChainHandler::handle_chain`].
    fn start_chain(
        &mut self,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Started {
        Started::Done(self.handle_chain(queue_index, chain, mem))
    }

    /// Whether the handler can start another chain now. A handler without room leaves the rest of the queue (with
    /// notifications off) until chains in flight finish.
    fn has_room(&self) -> bool {
        true
    }

    /// The event that fires when chains in flight finish; `None` for handlers that never leave chains in flight.
    fn completion_event(&self) -> Option<&EventFd> {
        None
    }

    /// Sends the chains started since the last call on their way and appends every chain that has finished since
    /// to `done`. Never blocks.
    fn poll_completions(&mut self, _done: &mut Vec<Completion>) {}

    /// Number of chains in flight.
    fn in_flight(&self) -> usize {
        0
    }

    /// Ends every chain in flight (cancelling what can be cancelled and waiting for the rest) without reporting
    /// them: the device is being reset or removed, so the driver no longer expects them and no I/O may touch guest
    /// memory afterwards.
    fn quiesce(&mut self) {}
}

/// A queue the worker cannot serve any more.
#[derive(Debug, Error)]
pub(crate) enum QueueError {
    /// virtio-queue rejected the rings (bad available index, unwritable used ring, bad head index).
    #[error("virtio queue {index} is corrupt: {source}; the driver must reset the device")]
    Corrupt {
        /// Queue index.
        index: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// The available index says there is work but no chain can be read.
    #[error("virtio queue {index} announces chains that cannot be read; the driver must reset the device")]
    Stalled {
        /// Queue index.
        index: usize,
    },
}

/// What starting a queue's available chains did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Served {
    /// Chains went to the used ring.
    pub(crate) used: bool,
    /// The handler ran out of room with chains left on the ring; notifications stay off until the queue is served
    /// again.
    pub(crate) blocked: bool,
}

/// Starts every available chain of `queue` with `handler`, putting the ones it finishes at once in the used ring.
pub(crate) fn serve_available<H: ChainHandler + ?Sized>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Served, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let mut served = Served::default();
    loop {
        queue.disable_notification(mem).map_err(corrupt)?;
        let mut taken = 0usize;
        loop {
            if !handler.has_room() {
                served.blocked = true;
                return Ok(served);
            }
            // `iter` re-checks the available index against the queue size on every chain.
            let chain = queue.iter(mem).map_err(corrupt)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Started::Done(len) = handler.start_chain(index, chain, mem) {
                queue.add_used(mem, head, len).map_err(corrupt)?;
                served.used = true;
            }
            taken += 1;
        }
        if !queue.enable_notification(mem).map_err(corrupt)? {
            break;
        }
        if taken == 0 {
            return Err(QueueError::Stalled { index });
        }
    }
    Ok(served)
}

/// Serves every available chain of `queue` with `handler`, a handler that finishes every chain at once. Returns
/// whether the driver must be interrupted.
pub(crate) fn process_queue<H: ChainHandler + ?Sized>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, QueueError> {
    if !serve_available(handler, index, queue, mem)?.used {
        return Ok(false);
    }
    queue
        .needs_notification(mem)
        .map_err(|source| QueueError::Corrupt { index, source })
}

/// Serves every available chain of `queue` and waits until the handler has finished all of them (and everything
/// else it had in flight), putting them in the used ring. Returns whether the driver must be interrupted.
#[cfg(test)]
pub(crate) fn process_queue_to_completion<H: ChainHandler + ?Sized>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let mut used = false;
    let mut blocked = true;
    let mut done = Vec::new();
    loop {
        if blocked {
            let served = serve_available(handler, index, queue, mem)?;
            used |= served.used;
            blocked = served.blocked;
        }
        handler.poll_completions(&mut done);
        for completion in done.drain(..) {
            assert_eq!(completion.queue_index, index, "a chain of another queue");
            queue
                .add_used(mem, completion.head, completion.len)
                .map_err(corrupt)?;
            used = true;
        }
        if blocked && handler.has_room() {
            continue;
        }
        if handler.in_flight() == 0 {
            assert!(!blocked, "the handler has no room with nothing in flight");
            break;
        }
        if let Some(event) = handler.completion_event() {
            wait_readable(event);
            let _ = event.read();
        }
    }
    if !used {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(corrupt)
}

/// Blocks until `event` is readable.
#[cfg(test)]
fn wait_readable(event: &EventFd) {
    let mut pollfd = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is one valid pollfd that lives for the duration of the call.
    let ret = unsafe { libc::poll(&mut pollfd, 1, -1) };
    assert!(
        ret >= 0 || io::Error::last_os_error().kind() == io::ErrorKind::Interrupted,
        "poll failed: {}",
        io::Error::last_os_error()
    );
}

/// Token of the kill event in the epoll set.
const KILL_TOKEN: u64 = u64::MAX;
/// Token of the handler's completion event in the epoll set.
const COMPLETION_TOKEN: u64 = u64::MAX - 1;

/// An epoll descriptor, closed on drop.
struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        epoll::create(true).map(Epoll)
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_ADD,
            fd,
            Event::new(Events::EPOLLIN, token),
        )
    }

    fn wait(&self, events: &mut [Event]) -> io::Result<usize> {
        epoll::wait(self.0, -1, events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}

/// A queue as the worker holds it.
struct WorkerQueue {
    index: usize,
    queue: Queue,
    event: EventFd,
    broken: bool,
    /// Chains went to the used ring since the driver was last considered for an interrupt.
    used: bool,
    /// Chains were left on the ring for lack of room.
    blocked: bool,
}

/// A running device thread.
pub(crate) struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<Vec<(usize, EventFd)>>>,
}

impl Worker {
    /// Starts a thread named `name` serving `queues` with `handler`.
    pub(crate) fn spawn<H: ChainHandler>(
        name: &str,
        handler: H,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<Self, ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        epoll
            .add(kill.as_raw_fd(), KILL_TOKEN)
            .map_err(ActivateError::Worker)?;
        for (token, (_, _, event)) in queues.iter().enumerate() {
            epoll
                .add(event.as_raw_fd(), token as u64)
                .map_err(ActivateError::Worker)?;
        }
        if let Some(event) = handler.completion_event() {
            epoll
                .add(event.as_raw_fd(), COMPLETION_TOKEN)
                .map_err(ActivateError::Worker)?;
        }
        let queues = queues
            .into_iter()
            .map(|(index, queue, event)| WorkerQueue {
                index,
                queue,
                event,
                broken: false,
                used: false,
                blocked: false,
            })
            .collect();
        let thread_kill = kill.try_clone().map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(epoll, thread_kill, handler, mem, interrupt, queues))
            .map_err(ActivateError::Worker)?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the queue events it held.
    pub(crate) fn stop(mut self) -> Vec<(usize, EventFd)> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Vec<(usize, EventFd)> {
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        if let Err(err) = self.kill.write(1) {
            // The thread cannot be told to stop; leave it running rather than block forever on join.
            tracing::error!(%err, "failed to signal the virtio device thread to stop");
            return Vec::new();
        }
        thread.join().unwrap_or_else(|_| {
            tracing::error!("the virtio device thread panicked");
            Vec::new()
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread body: waits for queue notifications until the kill event fires.
fn run<H: ChainHandler>(
    epoll: Epoll,
    kill: EventFd,
    mut handler: H,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    mut queues: Vec<WorkerQueue>,
) -> Vec<(usize, EventFd)> {
    let mut events = vec![Event::new(Events::empty(), 0); queues.len() + 2];
    let mut done = Vec::new();
    'outer: loop {
        let count = match epoll.wait(&mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(%err, "virtio device thread: epoll_wait failed; stopping");
                break;
            }
        };
        let guard = mem.memory();
        for event in &events[..count] {
            let token = event.data;
            if token == KILL_TOKEN {
                let _ = kill.read();
                break 'outer;
            }
            if token == COMPLETION_TOKEN {
                // Cleared before the completions are collected, so a later completion fires it again.
                if let Some(event) = handler.completion_event() {
                    let _ = event.read();
                }
                continue;
            }
            let Some(slot) = usize::try_from(token)
                .ok()
                .and_then(|token| queues.get_mut(token))
            else {
                continue;
            };
            // Clear the notification; a spurious wakeup (EAGAIN) is harmless.
            let _ = slot.event.read();
            serve(&mut handler, slot, &guard, interrupt.as_ref());
        }
        settle(
            &mut handler,
            &mut queues,
            &guard,
            interrupt.as_ref(),
            &mut done,
        );
    }
    handler.quiesce();
    if handler.in_flight() > 0 {
        tracing::error!(
            in_flight = handler.in_flight(),
            "virtio device thread stopping with requests still in flight"
        );
    }
    queues
        .into_iter()
        .map(|slot| (slot.index, slot.event))
        .collect()
}

/// Marks a queue the worker cannot serve any more and tells the transport.
fn stop_queue(slot: &mut WorkerQueue, err: &QueueError, interrupt: &dyn VirtioInterrupt) {
    tracing::warn!(%err, "stopping a virtio queue");
    slot.broken = true;
    interrupt.set_needs_reset();
}

/// Starts the available chains of a queue that is still working.
fn serve<H: ChainHandler>(
    handler: &mut H,
    slot: &mut WorkerQueue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
) {
    if slot.broken {
        return;
    }
    match serve_available(handler, slot.index, &mut slot.queue, mem) {
        Ok(served) => {
            slot.used |= served.used;
            slot.blocked = served.blocked;
        }
        Err(err) => stop_queue(slot, &err, interrupt),
    }
}

/// Ends a round of events: sends what the handler started on its way, returns finished chains to their queues,
/// serves the queues that waited for room, and interrupts the driver for every queue that used chains (as far as
/// notification suppression asks for it).
fn settle<H: ChainHandler>(
    handler: &mut H,
    queues: &mut [WorkerQueue],
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    done: &mut Vec<Completion>,
) {
    loop {
        handler.poll_completions(done);
        let mut progressed = !done.is_empty();
        for completion in done.drain(..) {
            let Some(slot) = queues
                .iter_mut()
                .find(|slot| slot.index == completion.queue_index)
            else {
                continue;
            };
            if slot.broken {
                continue;
            }
            match slot.queue.add_used(mem, completion.head, completion.len) {
                Ok(()) => slot.used = true,
                Err(source) => stop_queue(
                    slot,
                    &QueueError::Corrupt {
                        index: slot.index,
                        source,
                    },
                    interrupt,
                ),
            }
        }
        for slot in queues.iter_mut() {
            if slot.blocked && handler.has_room() {
                serve(handler, slot, mem, interrupt);
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    for slot in queues.iter_mut().filter(|slot| slot.used) {
        slot.used = false;
        if slot.broken {
            continue;
        }
        match slot.queue.needs_notification(mem) {
            Ok(true) => {
                if let Err(err) = interrupt.trigger(VirtioInterruptType::Queue(slot.index as u16)) {
                    tracing::warn!(queue = slot.index, %err, "failed to interrupt the driver");
                }
            }
            Ok(false) => {}
            Err(source) => stop_queue(
                slot,
                &QueueError::Corrupt {
                    index: slot.index,
                    source,
                },
                interrupt,
            ),
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
