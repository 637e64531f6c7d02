//! The transmit path: a driver chain (virtio-net header and frame, all driver-readable) written to the tap.
//!
//! The chain is checked and gathered into a host buffer before the tap sees it: it must be complete,
//! driver-readable only, inside guest memory, between the header length and [`MAX_FRAME_LEN`] bytes, and its
//! header may only ask for offloads the driver negotiated. A refused chain is returned with a used length of 0 and
//! nothing is sent. The used length of a transmit chain is always 0: the device writes nothing into it.

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::MAX_FRAME_LEN;
use crate::chain::{descriptors, ChainError};
use crate::counters::NetCounters;
use crate::device::GuestMemoryMmap;
use crate::tap::{Tap, TapOffloads, VNET_HDR_LEN};
use crate::worker::ChainHandler;

/// Why a transmit chain is refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub(super) enum TxError {
    /// The chain itself is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A descriptor is device-writable.
    #[error("a transmit descriptor is device-writable")]
    Writable,
    /// A descriptor points outside guest memory.
    #[error("a transmit buffer is outside guest memory")]
    OutsideMemory,
    /// The chain cannot even hold the header.
    #[error("the transmit chain holds {0} bytes, less than the 12-byte virtio-net header")]
    TooShort(usize),
    /// The chain holds more than a frame can be.
    #[error("the transmit chain holds {0} bytes, more than {MAX_FRAME_LEN}")]
    TooLong(u64),
    /// The header asks for an offload the driver did not negotiate.
    #[error("the transmit header asks for offloads it did not negotiate (flags {flags:#x}, gso type {gso_type:#x})")]
    Offload {
        /// `flags` of the header.
        flags: u8,
        /// `gso_type` of the header.
        gso_type: u8,
    },
}

/// Whether a header's `gso_type` only uses segmentation offloads in `allowed`.
pub(super) fn gso_permitted(gso_type: u8, allowed: TapOffloads) -> bool {
    // Lossless: the header constants are small.
    let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    match u32::from(gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => allowed.tso4 && (!ecn || allowed.tso_ecn),
        VIRTIO_NET_HDR_GSO_TCPV6 => allowed.tso6 && (!ecn || allowed.tso_ecn),
        VIRTIO_NET_HDR_GSO_UDP => allowed.ufo && !ecn,
        _ => false,
    }
}

/// Checks the `flags` and `gso_type` of a transmit header against the offloads the driver may use.
pub(super) fn check_header(header: &[u8], allowed: TapOffloads) -> Result<(), TxError> {
    let (flags, gso_type) = (header[0], header[1]);
    // Lossless: the flag is bit 0.
    let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let flags_ok = flags & !needs_csum == 0 && (flags & needs_csum == 0 || allowed.csum);
    if !flags_ok || !gso_permitted(gso_type, allowed) {
        return Err(TxError::Offload { flags, gso_type });
    }
    Ok(())
}

/// Gathers a transmit chain into `buf` (normally [`MAX_FRAME_LEN`] bytes; a longer chain is refused) and returns
/// its length.
pub(super) fn gather_frame(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    allowed: TapOffloads,
) -> Result<usize, TxError> {
    let descs = descriptors(chain)?;
    let mut total = 0u64;
    for desc in &descs {
        if desc.is_write_only() {
            return Err(TxError::Writable);
        }
        total += u64::from(desc.len());
    }
    if total > MAX_FRAME_LEN.min(buf.len()) as u64 {
        return Err(TxError::TooLong(total));
    }
    // Lossless: at most MAX_FRAME_LEN.
    let total = total as usize;
    if total < VNET_HDR_LEN {
        return Err(TxError::TooShort(total));
    }
    let mut offset = 0usize;
    for desc in &descs {
        let len = desc.len() as usize;
        let target = &mut buf[offset..offset + len];
        if !mem.check_range(desc.addr(), len) || mem.read_slice(target, desc.addr()).is_err() {
            return Err(TxError::OutsideMemory);
        }
        offset += len;
    }
    check_header(&buf[..VNET_HDR_LEN], allowed)?;
    Ok(total)
}

/// Serves the transmit queues: queue `2p + 1` goes to the tap queue of pair `p`.
pub(super) struct TxHandler {
    taps: Vec<Arc<Tap>>,
    allowed: TapOffloads,
    buf: Vec<u8>,
    counters: Arc<NetCounters>,
}

impl TxHandler {
    pub(super) fn new(
        taps: Vec<Arc<Tap>>,
        allowed: TapOffloads,
        counters: Arc<NetCounters>,
    ) -> Self {
        Self {
            taps,
            allowed,
            buf: vec![0; MAX_FRAME_LEN],
            counters,
        }
    }
}

impl ChainHandler for TxHandler {
    fn handle_chain(
        &mut self,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let Some(tap) = self.taps.get(queue_index / 2) else {
            self.counters.tx_dropped.inc();
            return 0;
        };
        let len = match gather_frame(chain, mem, &mut self.buf, self.allowed) {
            Ok(len) => len,
            Err(err) => {
                tracing::debug!(%err, "skipping a virtio-net transmit chain");
                self.counters.tx_dropped.inc();
                return 0;
            }
        };
        match tap.write(&self.buf[..len]) {
            Ok(_) => {
                self.counters.tx_frames.inc();
                // Lossless: at most MAX_FRAME_LEN, and at least the header (checked by gather_frame).
                self.counters.tx_bytes.add((len - VNET_HDR_LEN) as u64);
            }
            // The tap's queue is full: the frame is lost, as on a congested link.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                tracing::debug!("tap queue full; dropping a transmitted frame");
                self.counters.tx_dropped.inc();
            }
            Err(err) => {
                tracing::debug!(%err, "the tap refused a transmitted frame");
                self.counters.tx_dropped.inc();
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestAddressSpace};

    use super::*;
    use crate::test_utils::{desc, guest_memory, MEM_SIZE};

    fn gather(
        descs: &[RawDescriptor],
        setup: impl FnOnce(&GuestMemoryMmap),
        allowed: TapOffloads,
    ) -> (Result<usize, TxError>, Vec<u8>) {
        let mem = guest_memory();
        let guard = mem.memory();
        setup(&guard);
        let vq = MockSplitQueue::new(&*guard, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&*guard).unwrap().next().unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let result = gather_frame(chain, &guard, &mut buf, allowed);
        (result, buf)
    }

    fn header(flags: u32, gso_type: u32) -> [u8; VNET_HDR_LEN] {
        let mut header = [0u8; VNET_HDR_LEN];
        header[0] = flags as u8;
        header[1] = gso_type as u8;
        header
    }

    #[test]
    fn a_split_chain_is_gathered_in_order() {
        let (result, buf) = gather(
            &[
                desc(0x10_0000, 12, false, Some(1)),
                desc(0x20_0000, 5, false, Some(2)),
                desc(0x30_0000, 3, false, None),
            ],
            |mem| {
                mem.write_slice(b"hello", GuestAddress(0x20_0000)).unwrap();
                mem.write_slice(b"abc", GuestAddress(0x30_0000)).unwrap();
            },
            TapOffloads::default(),
        );
        assert_eq!(result, Ok(20));
        assert_eq!(&buf[..12], &[0; 12]);
        assert_eq!(&buf[12..20], b"helloabc");
    }

    #[test]
    fn malformed_chains_are_refused() {
        let none = TapOffloads::default();
        let cases: Vec<(Vec<RawDescriptor>, TxError)> = vec![
            (
                vec![
                    desc(0x10_0000, 12, false, Some(1)),
                    desc(0x20_0000, 64, true, None),
                ],
                TxError::Writable,
            ),
            (
                vec![desc(0x10_0000, 11, false, None)],
                TxError::TooShort(11),
            ),
            (
                vec![
                    desc(0x10_0000, 65_000, false, Some(1)),
                    desc(0x20_0000, 1000, false, None),
                ],
                TxError::TooLong(66_000),
            ),
            (
                vec![desc(MEM_SIZE as u64 - 8, 64, false, None)],
                TxError::OutsideMemory,
            ),
            (
                vec![desc(u64::MAX - 3, 64, false, None)],
                TxError::OutsideMemory,
            ),
            (
                vec![
                    desc(0x10_0000, 12, false, Some(1)),
                    desc(0x20_0000, 8, false, Some(0)),
                ],
                TxError::Chain(ChainError::Truncated),
            ),
        ];
        for (descs, expected) in cases {
            assert_eq!(gather(&descs, |_| {}, none).0, Err(expected), "{descs:?}");
        }
    }

    #[test]
    fn headers_may_only_use_negotiated_offloads() {
        let none = TapOffloads::default();
        let csum_only = TapOffloads { csum: true, ..none };
        let all = TapOffloads::ALL;
        let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        let gso_none = VIRTIO_NET_HDR_GSO_NONE;
        let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4;
        let tcp6 = VIRTIO_NET_HDR_GSO_TCPV6;
        let udp = VIRTIO_NET_HDR_GSO_UDP;
        let ecn = VIRTIO_NET_HDR_GSO_ECN;
        assert!(check_header(&header(0, gso_none), none).is_ok());
        assert!(check_header(&header(needs_csum, gso_none), none).is_err());
        assert!(check_header(&header(needs_csum, gso_none), csum_only).is_ok());
        assert!(check_header(&header(needs_csum, tcp4), csum_only).is_err());
        for gso in [tcp4, tcp6, udp, tcp4 | ecn, tcp6 | ecn] {
            assert!(check_header(&header(needs_csum, gso), all).is_ok(), "{gso}");
        }
        // DATA_VALID is for received frames; unknown GSO types; ECN without TCP.
        assert!(check_header(&header(2, gso_none), all).is_err());
        assert!(check_header(&header(needs_csum, 5), all).is_err());
        assert!(check_header(&header(needs_csum, 2), all).is_err());
        assert!(check_header(&header(needs_csum, udp | ecn), all).is_err());
        assert!(check_header(&header(needs_csum, ecn), all).is_err());
        let no_ecn = TapOffloads {
            tso_ecn: false,
            ..all
        };
        assert!(check_header(&header(needs_csum, tcp4 | ecn), no_ecn).is_err());
        let err = check_header(&header(needs_csum, tcp4), csum_only).unwrap_err();
        assert!(err.to_string().contains("did not negotiate"), "{err}");
    }
}
