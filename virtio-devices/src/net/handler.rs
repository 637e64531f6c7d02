//! The virtio-net device thread: waits on the queue notifications and on the tap queue of every pair in use.
//!
//! Receiving is driven by the tap: when a tap queue is readable its frames go into the pair's receive queue. When
//! the receive queue has no room, the frame already read is kept, the tap stops being polled and the driver is asked
//! to notify when it posts buffers; that notification resumes receiving. Transmitting and the control queue are
//! driven by their notifications. Each wakeup moves at most [`RX_BUDGET`] frames from a tap so a flood on one
//! queue cannot starve the others.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::CtrlHandler;
use super::rx::{deliver_frame, fit_header, wait_for_buffers, Delivery};
use super::tx::TxHandler;
use super::MAX_FRAME_LEN;
use crate::counters::{Counter, NetCounters};
use crate::device::{GuestMemory, GuestMemoryMmap, VirtioInterrupt};
use crate::io_worker::{notify, serve_queue, stop_queue, IoHandler, Poller, QueueSlot};
use crate::tap::{Tap, TapOffloads, VNET_HDR_LEN};
use crate::worker::QueueError;

/// Tokens at and above this one are tap queues (token - base = pair); below are queue indices.
pub(super) const TAP_TOKEN_BASE: u64 = 1 << 32;
/// Most frames moved from one tap per wakeup.
pub(super) const RX_BUDGET: usize = 256;

/// One receive/transmit pair and its tap queue.
pub(super) struct Pair {
    tap: Arc<Tap>,
    rx: Option<QueueSlot>,
    tx: Option<QueueSlot>,
    /// Room for one frame, plus a byte to recognise frames that are too long.
    frame: Vec<u8>,
    /// Length of a frame read from the tap and waiting for receive buffers.
    pending: Option<usize>,
    /// Waiting for the driver to post receive buffers.
    parked: bool,
    /// The tap queue is in the epoll set.
    polled: bool,
}

impl Pair {
    pub(super) fn new(tap: Arc<Tap>, rx: Option<QueueSlot>, tx: Option<QueueSlot>) -> Self {
        Self {
            tap,
            rx,
            tx,
            frame: vec![0; MAX_FRAME_LEN + 1],
            pending: None,
            parked: false,
            polled: false,
        }
    }
}

/// What reading the tap gave.
enum Read {
    Frame(usize),
    Empty,
    Failed,
}

/// Reads the next frame of a usable size from `tap`, counting the others in `dropped`.
fn read_frame(tap: &Tap, buf: &mut [u8], dropped: &Counter) -> Read {
    loop {
        match tap.read(buf) {
            Ok(len) if (VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) => return Read::Frame(len),
            Ok(len) => {
                tracing::debug!(len, "dropping a frame of unusable size from the tap");
                dropped.inc();
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Read::Empty,
            Err(err) => {
                tracing::warn!(%err, tap = tap.if_name(), "reading the tap failed");
                return Read::Failed;
            }
        }
    }
}

/// Everything the device thread serves.
pub(super) struct NetHandler {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) pairs: Vec<Pair>,
    pub(super) ctrl: Option<QueueSlot>,
    pub(super) ctrl_handler: CtrlHandler,
    pub(super) tx: TxHandler,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub(super) mergeable: bool,
    /// The receive offloads the driver negotiated.
    pub(super) accepted: TapOffloads,
    /// The device's counters.
    pub(super) counters: Arc<NetCounters>,
}

impl NetHandler {
    /// Whether the tap queue of pair `p` should be polled now.
    fn wants_polling(&self, p: usize) -> bool {
        let pair = &self.pairs[p];
        let rx_usable = pair.rx.as_ref().is_some_and(|slot| !slot.broken);
        p < self.ctrl_handler.active_pairs() && rx_usable && !pair.parked
    }

    fn update_polling(&mut self, p: usize, poller: &Poller) {
        let want = self.wants_polling(p);
        let pair = &mut self.pairs[p];
        if want == pair.polled {
            return;
        }
        let fd = pair.tap.as_raw_fd();
        let result = if want {
            poller.add(fd, TAP_TOKEN_BASE + p as u64)
        } else {
            poller.remove(fd)
        };
        match result {
            Ok(()) => pair.polled = want,
            Err(err) => tracing::warn!(%err, pair = p, "cannot change the polling of a tap queue"),
        }
    }

    /// Moves frames from the tap of pair `p` into its receive queue.
    fn receive(&mut self, p: usize, poller: &Poller) {
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let (mergeable, accepted) = (self.mergeable, self.accepted);
        let interrupt = &*self.interrupt;
        let counters = &*self.counters;
        let pair = &mut self.pairs[p];
        let Some(slot) = pair.rx.as_mut() else {
            return;
        };
        pair.parked = false;
        let mut returned = false;
        let mut failure = None;
        if let Err(source) = slot.queue.disable_notification(mem) {
            failure = Some(QueueError::Corrupt {
                index: slot.index,
                source,
            });
        }
        let mut budget = RX_BUDGET;
        let mut last_seen = None;
        // A frame waiting for buffers is always finished, whatever the budget says.
        while failure.is_none() && (budget > 0 || pair.pending.is_some()) {
            let len = match pair.pending.take() {
                Some(len) => len,
                None => match read_frame(&pair.tap, &mut pair.frame, &counters.rx_dropped) {
                    Read::Frame(len) => {
                        budget -= 1;
                        len
                    }
                    Read::Empty => break,
                    Read::Failed => {
                        // Retried when the driver next posts buffers, instead of spinning on the error.
                        pair.parked = true;
                        let posted = slot.queue.avail_idx(mem, Ordering::Acquire);
                        if let Err(err) = posted
                            .map_err(|source| QueueError::Corrupt {
                                index: slot.index,
                                source,
                            })
                            .and_then(|posted| {
                                wait_for_buffers(&mut slot.queue, slot.index, mem, posted.0)
                            })
                        {
                            failure = Some(err);
                        }
                        break;
                    }
                },
            };
            let frame = &mut pair.frame[..len];
            if !fit_header(frame, accepted) {
                tracing::debug!(
                    "dropping a received frame with offloads the driver did not negotiate"
                );
                counters.rx_dropped.inc();
                continue;
            }
            match deliver_frame(&mut slot.queue, slot.index, mem, frame, mergeable, counters) {
                Ok(Delivery::Delivered { .. }) => {
                    returned = true;
                    last_seen = None;
                }
                Ok(Delivery::Dropped { returned: used }) => {
                    returned |= used;
                    last_seen = None;
                }
                Ok(Delivery::NoBuffers { seen }) => {
                    pair.pending = Some(len);
                    if last_seen == Some(seen) {
                        // The available index says there are more chains, but none can be read.
                        failure = Some(QueueError::Stalled { index: slot.index });
                        break;
                    }
                    last_seen = Some(seen);
                    match wait_for_buffers(&mut slot.queue, slot.index, mem, seen) {
                        Ok(true) => {}
                        Ok(false) => {
                            pair.parked = true;
                            break;
                        }
                        Err(err) => failure = Some(err),
                    }
                }
                Err(err) => failure = Some(err),
            }
        }
        if failure.is_none() && returned {
            match slot.queue.needs_notification(mem) {
                Ok(true) => notify(interrupt, slot.index),
                Ok(false) => {}
                Err(source) => {
                    failure = Some(QueueError::Corrupt {
                        index: slot.index,
                        source,
                    });
                }
            }
        }
        if let Some(err) = failure {
            stop_queue(interrupt, slot, &err);
        }
        drop(guard);
        self.update_polling(p, poller);
    }

    /// The driver posted receive buffers on pair `p`.
    fn rx_kick(&mut self, p: usize, poller: &Poller) {
        let pair = &self.pairs[p];
        let Some(slot) = &pair.rx else {
            return;
        };
        // Clear the notification; a spurious wakeup (EAGAIN) is harmless.
        let _ = slot.event.read();
        if slot.broken || p >= self.ctrl_handler.active_pairs() || !pair.parked {
            // Not waiting for buffers: the tap's own readiness drives receiving.
            return;
        }
        self.receive(p, poller);
    }

    fn transmit(&mut self, p: usize) {
        let Self {
            mem,
            interrupt,
            pairs,
            tx,
            ..
        } = self;
        if let Some(slot) = pairs[p].tx.as_mut() {
            serve_queue(mem, &**interrupt, tx, slot);
        }
    }

    fn control(&mut self, poller: &Poller) {
        let before = self.ctrl_handler.active_pairs();
        let Self {
            mem,
            interrupt,
            ctrl,
            ctrl_handler,
            ..
        } = self;
        let Some(slot) = ctrl.as_mut() else {
            return;
        };
        serve_queue(mem, &**interrupt, ctrl_handler, slot);
        if self.ctrl_handler.active_pairs() == before {
            return;
        }
        for p in 0..self.pairs.len() {
            if p >= self.ctrl_handler.active_pairs() {
                // The pair left: its queues are the driver's again, and a frame read for it is lost.
                let pair = &mut self.pairs[p];
                pair.pending = None;
                pair.parked = false;
            }
            self.update_polling(p, poller);
        }
    }

    /// Whether pair `p`'s tap is polled (for tests).
    #[cfg(test)]
    pub(super) fn is_polled(&self, p: usize) -> bool {
        self.pairs[p].polled
    }

    /// Whether pair `p` holds a frame waiting for buffers (for tests).
    #[cfg(test)]
    pub(super) fn has_pending(&self, p: usize) -> bool {
        self.pairs[p].pending.is_some()
    }
}

impl IoHandler for NetHandler {
    fn register(&mut self, poller: &Poller) -> io::Result<()> {
        let slots = self
            .pairs
            .iter()
            .flat_map(|pair| [&pair.rx, &pair.tx])
            .chain([&self.ctrl])
            .flatten();
        for slot in slots {
            poller.add(slot.event.as_raw_fd(), slot.index as u64)?;
        }
        for p in 0..self.pairs.len() {
            if self.wants_polling(p) {
                poller.add(self.pairs[p].tap.as_raw_fd(), TAP_TOKEN_BASE + p as u64)?;
                self.pairs[p].polled = true;
            }
        }
        Ok(())
    }

    fn ready(&mut self, token: u64, poller: &Poller) {
        if token >= TAP_TOKEN_BASE {
            let Some(p) = usize::try_from(token - TAP_TOKEN_BASE)
                .ok()
                .filter(|p| *p < self.pairs.len())
            else {
                return;
            };
            self.receive(p, poller);
            return;
        }
        let Ok(index) = usize::try_from(token) else {
            return;
        };
        if self.ctrl.as_ref().is_some_and(|slot| slot.index == index) {
            self.control(poller);
        } else if index / 2 < self.pairs.len() {
            if index % 2 == 0 {
                self.rx_kick(index / 2, poller);
            } else {
                self.transmit(index / 2);
            }
        }
    }

    fn into_queue_events(self) -> Vec<(usize, EventFd)> {
        let mut events: Vec<(usize, EventFd)> = self
            .pairs
            .into_iter()
            .flat_map(|pair| [pair.rx, pair.tx])
            .chain([self.ctrl])
            .flatten()
            .map(|slot| (slot.index, slot.event))
            .collect();
        events.sort_by_key(|(index, _)| *index);
        events
    }
}
