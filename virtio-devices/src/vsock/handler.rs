//! The virtio-vsock device thread: serves the transmit queue, polls the host sockets, and fills the receive queue
//! with whatever the connections have for the guest while the driver posts buffers. The event queue is accepted
//! but never used (the device never sends TRANSPORT_RESET).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{ChainBuffers, HEADER_SIZE};
use crate::chain::descriptors;
use crate::device::{GuestMemory, GuestMemoryMmap, VirtioInterrupt};
use crate::io_worker::{notify, serve_queue, stop_queue, IoHandler, Poller, QueueSlot};
use crate::worker::QueueError;

/// Queue indices.
pub(crate) const RX_QUEUE: usize = 0;
pub(crate) const TX_QUEUE: usize = 1;
pub(crate) const EVENT_QUEUE: usize = 2;
/// Token of the host sockets' epoll set in the thread's poller (below it: queue indices).
const HOST_TOKEN: u64 = 3;

/// The device thread's state.
pub(crate) struct VsockHandler {
    pub(crate) mem: GuestMemory,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) rx: Option<QueueSlot>,
    pub(crate) tx: Option<QueueSlot>,
    pub(crate) event: Option<QueueSlot>,
    pub(crate) muxer: Muxer,
}

impl VsockHandler {
    fn receive(&mut self) {
        let Some(slot) = self.rx.as_mut().filter(|slot| !slot.broken) else {
            return;
        };
        if !self.muxer.has_rx_work() {
            return;
        }
        let guard = self.mem.memory();
        let corrupt = |source| QueueError::Corrupt {
            index: slot.index,
            source,
        };
        let result =
            fill_rx(&mut slot.queue, slot.index, &guard, &mut self.muxer).and_then(|used| {
                if !used {
                    return Ok(false);
                }
                slot.queue.needs_notification(&*guard).map_err(corrupt)
            });
        match result {
            Ok(true) => notify(&*self.interrupt, slot.index),
            Ok(false) => {}
            Err(err) => stop_queue(&*self.interrupt, slot, &err),
        }
    }
}

/// Moves packets from the connections into the receive queue's chains until either runs out. Returns whether
/// the used ring changed. Unusable chains (driver-readable, outside guest memory, shorter than a header) are
/// returned with a used length of 0.
fn fill_rx(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
) -> Result<bool, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let mut used = false;
    let mut rechecked = false;
    queue.disable_notification(mem).map_err(corrupt)?;
    while muxer.has_rx_work() {
        let chain = queue.iter(mem).map_err(corrupt)?.next();
        let Some(chain) = chain else {
            if rechecked {
                return Err(QueueError::Stalled { index });
            }
            // Out of buffers: have the driver say when it posts more.
            if queue.enable_notification(mem).map_err(corrupt)? {
                rechecked = true;
                continue;
            }
            break;
        };
        rechecked = false;
        let head = chain.head_index();
        let buffers = descriptors(chain)
            .ok()
            .and_then(|descs| ChainBuffers::new(mem, descs, true))
            .filter(|buffers| buffers.len() >= HEADER_SIZE);
        let Some(buffers) = buffers else {
            tracing::debug!("skipping a malformed vsock receive chain");
            queue.add_used(mem, head, 0).map_err(corrupt)?;
            used = true;
            continue;
        };
        let Some(header) = muxer.next_rx(buffers.len() - HEADER_SIZE) else {
            // Nothing after all: leave the chain for the next packet.
            queue.go_to_previous_position();
            break;
        };
        let payload = muxer.payload(header.len as usize);
        let written =
            buffers.write_at(0, &header.encode()) && buffers.write_at(HEADER_SIZE, payload);
        // Lossless: a header and at most MAX_PAYLOAD bytes. The writes only fail if the memory map changed
        // under the chain, after it was checked.
        let len = if written {
            muxer.counters().rx_bytes.add(payload.len() as u64);
            (HEADER_SIZE + payload.len()) as u32
        } else {
            0
        };
        queue.add_used(mem, head, len).map_err(corrupt)?;
        used = true;
    }
    Ok(used)
}

impl IoHandler for VsockHandler {
    fn register(&mut self, poller: &Poller) -> io::Result<()> {
        for slot in [&self.rx, &self.tx, &self.event].into_iter().flatten() {
            poller.add(slot.event.as_raw_fd(), slot.index as u64)?;
        }
        poller.add(self.muxer.poll_fd(), HOST_TOKEN)
    }

    fn ready(&mut self, token: u64, _poller: &Poller) {
        match token {
            HOST_TOKEN => self.muxer.host_ready(),
            t if t == RX_QUEUE as u64 => {
                if let Some(slot) = &self.rx {
                    let _ = slot.event.read();
                }
            }
            t if t == TX_QUEUE as u64 => {
                if let Some(slot) = self.tx.as_mut() {
                    serve_queue(&self.mem, &*self.interrupt, &mut self.muxer, slot);
                }
            }
            t if t == EVENT_QUEUE as u64 => {
                if let Some(slot) = &self.event {
                    let _ = slot.event.read();
                }
            }
            _ => return,
        }
        self.receive();
    }

    fn into_queue_events(self) -> Vec<(usize, EventFd)> {
        [self.rx, self.tx, self.event]
            .into_iter()
            .flatten()
            .map(|slot| (slot.index, slot.event))
            .collect()
    }
}
