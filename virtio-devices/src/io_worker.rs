//! A device thread for devices that wait on host descriptors as well as on queue notifications (a tap, an input
//! event).
//!
//! [`crate::worker::Worker`] serves queues that only the driver feeds. Devices with a host side need to wait on
//! more: virtio-net waits on its tap descriptors and stops waiting on one while its receive queue has no buffers.
//! Such a device implements [`IoHandler`]: it registers what it waits on with the [`Poller`] and is called for
//! each ready token, on its own thread, until the worker is stopped.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use epoll::{ControlOptions, Event, Events};
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActivateError, GuestMemory, VirtioInterrupt, VirtioInterruptType};
use crate::worker::{process_queue, ChainHandler, QueueError};

/// Token reserved for the worker's kill event; handlers must not register it.
pub(crate) const KILL_TOKEN: u64 = u64::MAX;

/// Most ready descriptors handled per wakeup.
const EVENTS_PER_WAIT: usize = 32;

/// An epoll set a handler registers its descriptors in (level-triggered, readable).
pub(crate) struct Poller(RawFd);

impl Poller {
    fn new() -> io::Result<Self> {
        epoll::create(true).map(Poller)
    }

    /// Starts waiting for `fd` to become readable; `token` identifies it in [`IoHandler::ready`].
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_ADD,
            fd,
            Event::new(Events::EPOLLIN, token),
        )
    }

    /// Stops waiting for `fd`.
    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_DEL,
            fd,
            Event::new(Events::empty(), 0),
        )
    }

    /// Waits for ready descriptors; `timeout_ms` -1 waits forever.
    pub(crate) fn wait(&self, events: &mut [Event], timeout_ms: i32) -> io::Result<usize> {
        epoll::wait(self.0, timeout_ms, events)
    }

    /// A poller for tests that drive a handler by hand.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::new().unwrap()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}

/// What a device thread does.
pub(crate) trait IoHandler: Send + 'static {
    /// Registers the descriptors to wait on. Runs before the thread starts, so a failure fails activation.
    fn register(&mut self, poller: &Poller) -> io::Result<()>;

    /// The descriptor registered with `token` is ready (or was when the wait returned).
    fn ready(&mut self, token: u64, poller: &Poller);

    /// The thread is stopping: gives back the queue notification events.
    fn into_queue_events(self) -> Vec<(usize, EventFd)>;
}

/// A queue the driver enabled, as an [`IoHandler`] holds it.
pub(crate) struct QueueSlot {
    pub(crate) index: usize,
    pub(crate) queue: Queue,
    pub(crate) event: EventFd,
    /// The rings are corrupt: the queue is not served until the device is reset.
    pub(crate) broken: bool,
}

impl QueueSlot {
    pub(crate) fn new(index: usize, queue: Queue, event: EventFd) -> Self {
        Self {
            index,
            queue,
            event,
            broken: false,
        }
    }
}

/// Interrupts the driver for queue `index`.
pub(crate) fn notify(interrupt: &dyn VirtioInterrupt, index: usize) {
    // Lossless: queue indices are below MAX_QUEUES.
    if let Err(err) = interrupt.trigger(VirtioInterruptType::Queue(index as u16)) {
        tracing::warn!(queue = index, %err, "failed to interrupt the driver");
    }
}

/// Stops serving a queue whose rings are corrupt and asks the driver for a reset.
pub(crate) fn stop_queue(interrupt: &dyn VirtioInterrupt, slot: &mut QueueSlot, err: &QueueError) {
    tracing::warn!(%err, "stopping a virtio queue");
    slot.broken = true;
    interrupt.set_needs_reset();
}

/// Clears `slot`'s notification and serves its chains with `handler`, interrupting the driver or asking for a
/// reset as needed.
pub(crate) fn serve_queue<H: ChainHandler>(
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    handler: &mut H,
    slot: &mut QueueSlot,
) {
    // A spurious wakeup (EAGAIN) is harmless.
    let _ = slot.event.read();
    if slot.broken {
        return;
    }
    let guard = mem.memory();
    match process_queue(handler, slot.index, &mut slot.queue, &guard) {
        Ok(true) => notify(interrupt, slot.index),
        Ok(false) => {}
        Err(err) => stop_queue(interrupt, slot, &err),
    }
}

/// A running device thread.
pub(crate) struct IoWorker {
    kill: EventFd,
    thread: Option<JoinHandle<Vec<(usize, EventFd)>>>,
}

impl IoWorker {
    /// Registers `handler`'s descriptors and starts a thread named `name` serving them.
    pub(crate) fn spawn<H: IoHandler>(name: &str, mut handler: H) -> Result<Self, ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let poller = Poller::new().map_err(ActivateError::Worker)?;
        poller
            .add(kill.as_raw_fd(), KILL_TOKEN)
            .map_err(ActivateError::Worker)?;
        handler.register(&poller).map_err(ActivateError::Worker)?;
        let thread_kill = kill.try_clone().map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&poller, &thread_kill, handler))
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

impl Drop for IoWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread body: dispatches ready tokens until the kill event fires.
fn run<H: IoHandler>(poller: &Poller, kill: &EventFd, mut handler: H) -> Vec<(usize, EventFd)> {
    let mut events = [Event::new(Events::empty(), 0); EVENTS_PER_WAIT];
    'outer: loop {
        let count = match poller.wait(&mut events, -1) {
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
            handler.ready(token, poller);
        }
    }
    handler.into_queue_events()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};

    use super::*;

    /// Forwards every ready token to a channel and consumes the event.
    struct Echo {
        events: Vec<(u64, EventFd)>,
        seen: Sender<u64>,
    }

    impl IoHandler for Echo {
        fn register(&mut self, poller: &Poller) -> io::Result<()> {
            for (token, event) in &self.events {
                poller.add(event.as_raw_fd(), *token)?;
            }
            Ok(())
        }

        fn ready(&mut self, token: u64, poller: &Poller) {
            let Some((_, event)) = self.events.iter().find(|(t, _)| *t == token) else {
                return;
            };
            let _ = event.read();
            // Token 7 unregisters itself after its first event.
            if token == 7 {
                poller.remove(event.as_raw_fd()).unwrap();
            }
            self.seen.send(token).unwrap();
        }

        fn into_queue_events(self) -> Vec<(usize, EventFd)> {
            self.events
                .into_iter()
                .map(|(token, event)| (token as usize, event))
                .collect()
        }
    }

    #[test]
    fn ready_tokens_reach_the_handler_until_it_stops() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let (a_kick, b_kick) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let (tx, rx) = channel();
        let worker = IoWorker::spawn(
            "io-worker-test",
            Echo {
                events: vec![(3, a), (7, b)],
                seen: tx,
            },
        )
        .unwrap();
        a_kick.write(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 3);
        b_kick.write(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 7);
        // Token 7 removed itself: another kick is not seen, a kick of 3 is.
        b_kick.write(1).unwrap();
        a_kick.write(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 3);
        let events = worker.stop();
        let tokens: Vec<usize> = events.iter().map(|(token, _)| *token).collect();
        assert_eq!(tokens, vec![3, 7]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_registration_failure_fails_activation() {
        struct Bad;
        impl IoHandler for Bad {
            fn register(&mut self, poller: &Poller) -> io::Result<()> {
                // Registering the same descriptor twice fails like any epoll error.
                let event = EventFd::new(EFD_NONBLOCK)?;
                poller.add(event.as_raw_fd(), 1)?;
                poller.add(event.as_raw_fd(), 2)
            }
            fn ready(&mut self, _token: u64, _poller: &Poller) {}
            fn into_queue_events(self) -> Vec<(usize, EventFd)> {
                Vec::new()
            }
        }
        assert!(matches!(
            IoWorker::spawn("io-worker-test", Bad),
            Err(ActivateError::Worker(_))
        ));
    }
}
