//! The receive path: one frame read from the tap (virtio-net header first) into the driver's receive buffers.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF a frame goes into one chain, which must be big enough: a frame that does not
//! fit is dropped and the chain is kept for the next one. With it, a frame spreads over as many chains as it needs
//! and the header's `num_buffers` says how many. Chains are validated before anything is written: a malformed
//! chain (driver-readable descriptor, outside guest memory, looping) is returned with a used length of 0 and the
//! frame it was meant for is dropped.

use thiserror::Error;
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::tx::gso_permitted;
use crate::chain::{descriptors, ChainError};
use crate::counters::NetCounters;
use crate::device::GuestMemoryMmap;
use crate::tap::{TapOffloads, VNET_HDR_LEN};
use crate::worker::QueueError;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Written into this many chains.
    Delivered {
        /// Chains used (always 1 without mergeable buffers).
        buffers: u16,
    },
    /// Dropped. `returned` says whether chains were returned to the driver (with a used length of 0).
    Dropped {
        /// Whether the used ring changed.
        returned: bool,
    },
    /// The posted buffers cannot hold the frame yet; nothing was consumed. The driver has posted buffers up to
    /// available-ring position `seen`: it must be asked to notify when it posts more.
    NoBuffers {
        /// The available-ring position after the last chain looked at.
        seen: u16,
    },
}

/// Why a receive chain is refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub(super) enum RxChainError {
    /// The chain itself is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A descriptor is driver-readable.
    #[error("a receive descriptor is driver-readable")]
    Readable,
    /// A descriptor points outside guest memory.
    #[error("a receive buffer is outside guest memory")]
    OutsideMemory,
    /// The first chain of a merged frame cannot hold the header.
    #[error("a receive chain is smaller than the virtio-net header")]
    NoRoomForHeader,
}

/// A validated receive chain.
struct RxBuffer {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// Checks `chain` for a receive buffer.
fn rx_buffer(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<RxBuffer, RxChainError> {
    let head = chain.head_index();
    let descs = descriptors(chain)?;
    let mut segments = Vec::with_capacity(descs.len());
    let mut capacity = 0usize;
    for desc in descs {
        if !desc.is_write_only() {
            return Err(RxChainError::Readable);
        }
        // Lossless: usize is at least 32 bits on the hosts Atrium runs on.
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len) {
            return Err(RxChainError::OutsideMemory);
        }
        capacity += len;
        segments.push((desc.addr(), len));
    }
    Ok(RxBuffer {
        head,
        segments,
        capacity,
    })
}

/// Returns `buffers` and the chain at `head` to the driver unused.
fn return_unused(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    buffers: &[RxBuffer],
    head: u16,
) -> Result<(), virtio_queue::Error> {
    for buffer in buffers {
        queue.add_used(mem, buffer.head, 0)?;
    }
    queue.add_used(mem, head, 0)
}

/// Makes a header read from the tap fit what the driver negotiated (`accepted`: the receive offloads):
/// checksum flags are cleared when it did not negotiate VIRTIO_NET_F_GUEST_CSUM. Returns false for a frame the
/// driver cannot take (a partial checksum or a segmentation offload it did not negotiate), which is dropped.
pub(super) fn fit_header(frame: &mut [u8], accepted: TapOffloads) -> bool {
    // Lossless: the flags are bits 0 and 1.
    let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let data_valid = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    if frame.len() < VNET_HDR_LEN {
        return false;
    }
    if accepted.csum {
        frame[0] &= needs_csum | data_valid;
    } else if frame[0] & needs_csum != 0 {
        return false;
    } else {
        frame[0] = 0;
    }
    gso_permitted(frame[1], accepted)
}

/// Delivers `frame` (a virtio-net header and an Ethernet frame, as read from the tap) into receive queue
/// `index`. `num_buffers` in `frame` is filled in here. Queue-level damage is an error; everything else is a
/// [`Delivery`], counted in `counters` (frames delivered or dropped) before the used ring shows it.
pub(super) fn deliver_frame(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    counters: &NetCounters,
) -> Result<Delivery, QueueError> {
    let corrupt = |source| QueueError::Corrupt { index, source };
    let start = queue.next_avail();
    let mut buffers: Vec<RxBuffer> = Vec::new();
    let mut capacity = 0usize;
    while capacity < frame.len() {
        if buffers.len() >= usize::from(queue.size()) {
            // Every buffer the ring can hold is not enough: the frame can never be delivered.
            queue.set_next_avail(start);
            tracing::debug!(
                len = frame.len(),
                "dropping a frame larger than the whole receive ring"
            );
            counters.rx_dropped.inc();
            return Ok(Delivery::Dropped { returned: false });
        }
        let chain = queue.iter(mem).map_err(corrupt)?.next();
        let Some(chain) = chain else {
            let seen = queue.next_avail();
            queue.set_next_avail(start);
            return Ok(Delivery::NoBuffers { seen });
        };
        let head = chain.head_index();
        let buffer = rx_buffer(chain, mem).and_then(|buffer| {
            if mergeable && buffers.is_empty() && buffer.capacity < VNET_HDR_LEN {
                Err(RxChainError::NoRoomForHeader)
            } else {
                Ok(buffer)
            }
        });
        let buffer = match buffer {
            Ok(buffer) => buffer,
            Err(err) => {
                tracing::debug!(%err, "dropping a frame: bad receive chain");
                counters.rx_dropped.inc();
                return_unused(queue, mem, &buffers, head).map_err(corrupt)?;
                return Ok(Delivery::Dropped { returned: true });
            }
        };
        if !mergeable && buffer.capacity < frame.len() {
            // Keep the chain for a frame that fits.
            queue.set_next_avail(start);
            tracing::debug!(
                len = frame.len(),
                capacity = buffer.capacity,
                "dropping a frame larger than the receive buffer"
            );
            counters.rx_dropped.inc();
            return Ok(Delivery::Dropped { returned: false });
        }
        capacity += buffer.capacity;
        buffers.push(buffer);
    }
    // Lossless: at most the queue size (32768) buffers.
    let count = buffers.len() as u16;
    if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
        field.copy_from_slice(&count.to_le_bytes());
    }
    counters.rx_frames.inc();
    counters
        .rx_bytes
        .add(frame.len().saturating_sub(VNET_HDR_LEN) as u64);
    let mut offset = 0usize;
    for buffer in &buffers {
        let mut written = 0usize;
        for (addr, len) in &buffer.segments {
            let take = (*len).min(frame.len() - offset);
            if take == 0 {
                break;
            }
            if let Err(err) = mem.write_slice(&frame[offset..offset + take], *addr) {
                // Checked above, so only a concurrent change of the memory map gets here.
                tracing::warn!(%err, "failed to write a frame into guest memory");
            }
            offset += take;
            written += take;
        }
        // Lossless: a frame is at most MAX_FRAME_LEN bytes.
        queue
            .add_used(mem, buffer.head, written as u32)
            .map_err(corrupt)?;
    }
    Ok(Delivery::Delivered { buffers: count })
}

/// Asks the driver to notify the device when it posts buffers past `seen`. Returns true when it already has
/// (so the caller should retry now rather than wait).
pub(super) fn wait_for_buffers(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    seen: u16,
) -> Result<bool, QueueError> {
    let next = queue.next_avail();
    // enable_notification arms the notification at `next_avail` and compares the available index with it.
    queue.set_next_avail(seen);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(next);
    more.map_err(|source| QueueError::Corrupt { index, source })
}

#[cfg(test)]
#[path = "rx_tests.rs"]
mod tests;
