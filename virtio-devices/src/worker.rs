//! The device thread: an epoll loop over the queue notification events and a kill event, serving descriptor chains
//! through a device's [`ChainHandler`].
//!
//! Queue-level damage (an available index running ahead of the ring, a used ring the device cannot write, a head
//! index outside the table) stops that queue and asks the transport for DEVICE_NEEDS_RESET; chain-level damage is the
//! handler's business (it answers with an error status or a used length of 0).

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

/// Serves every available chain of `queue` with `handler`. Returns whether the driver must be interrupted.
pub(crate) fn process_queue<H: ChainHandler + ?Sized>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let mut used_any = false;
    loop {
        queue.disable_notification(mem).map_err(corrupt)?;
        let mut served = 0usize;
        loop {
            // `iter` re-checks the available index against the queue size on every chain.
            let chain = queue.iter(mem).map_err(corrupt)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = handler.handle_chain(index, chain, mem);
            queue.add_used(mem, head, len).map_err(corrupt)?;
            served += 1;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(corrupt)? {
            break;
        }
        if served == 0 {
            return Err(QueueError::Stalled { index });
        }
    }
    if !used_any {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(corrupt)
}

/// Token of the kill event in the epoll set.
const KILL_TOKEN: u64 = u64::MAX;

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
        let queues = queues
            .into_iter()
            .map(|(index, queue, event)| WorkerQueue {
                index,
                queue,
                event,
                broken: false,
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
    let mut events = vec![Event::new(Events::empty(), 0); queues.len() + 1];
    'outer: loop {
        let count = match epoll.wait(&mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(%err, "virtio device thread: epoll_wait failed; stopping");
                break;
            }
        };
        for event in &events[..count] {
            let token = event.data;
            if token == KILL_TOKEN {
                let _ = kill.read();
                break 'outer;
            }
            let Some(slot) = usize::try_from(token)
                .ok()
                .and_then(|token| queues.get_mut(token))
            else {
                continue;
            };
            // Clear the notification; a spurious wakeup (EAGAIN) is harmless.
            let _ = slot.event.read();
            if slot.broken {
                continue;
            }
            let guard = mem.memory();
            match process_queue(&mut handler, slot.index, &mut slot.queue, &guard) {
                Ok(true) => {
                    if let Err(err) =
                        interrupt.trigger(VirtioInterruptType::Queue(slot.index as u16))
                    {
                        tracing::warn!(queue = slot.index, %err, "failed to interrupt the driver");
                    }
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%err, "stopping a virtio queue");
                    slot.broken = true;
                    interrupt.set_needs_reset();
                }
            }
        }
    }
    queues
        .into_iter()
        .map(|slot| (slot.index, slot.event))
        .collect()
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
