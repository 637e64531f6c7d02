//! The device's own epoll set for its host sockets, nested in the device thread's poller.
//!
//! The device thread's poller only waits for readability. Connections also need to wait for room to write and to
//! stop waiting while the guest has no credit, so they live in this set, whose descriptor is readable whenever one
//! of them is ready.

use std::io;
use std::os::unix::io::RawFd;

use epoll::{ControlOptions, Event, Events};

/// An epoll set, closed on drop.
pub(crate) struct HostPoll(RawFd);

impl HostPoll {
    pub(crate) fn new() -> io::Result<Self> {
        epoll::create(true).map(HostPoll)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64, events: Events) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_ADD,
            fd,
            Event::new(events, token),
        )
    }

    pub(crate) fn modify(&self, fd: RawFd, token: u64, events: Events) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_MOD,
            fd,
            Event::new(events, token),
        )
    }

    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        epoll::ctl(
            self.0,
            ControlOptions::EPOLL_CTL_DEL,
            fd,
            Event::new(Events::empty(), 0),
        )
    }

    /// The descriptors ready now, without waiting.
    pub(crate) fn ready(&self, events: &mut [Event]) -> io::Result<usize> {
        loop {
            match epoll::wait(self.0, 0, events) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl Drop for HostPoll {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}
