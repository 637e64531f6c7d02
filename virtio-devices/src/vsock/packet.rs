//! The virtio-vsock packet header (`virtio_vsock_hdr`, virtio 1.2 §5.10.6) and copying packets between guest
//! descriptor chains and the host.
//!
//! A packet is a 44-byte little-endian header followed by `len` payload bytes. A transmit chain holds both in
//! driver-readable buffers, a receive chain offers driver-writable room for both; either may be split over any
//! number of descriptors.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::device::GuestMemoryMmap;

/// Size of `virtio_vsock_hdr`.
pub(crate) const HEADER_SIZE: usize = 44;
/// The host's CID.
pub(crate) const HOST_CID: u64 = 2;
/// `type` of a stream socket; the only type offered.
pub(crate) const TYPE_STREAM: u16 = 1;

/// Largest payload the device sends or accepts in one packet (Linux uses at most 64 KiB).
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;

/// SHUTDOWN flag: the sender will receive no more data.
pub(crate) const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub(crate) const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub(crate) fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }

    pub(crate) fn raw(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Rst => 3,
            Self::Shutdown => 4,
            Self::Rw => 5,
            Self::CreditUpdate => 6,
            Self::CreditRequest => 7,
        }
    }
}

/// A decoded `virtio_vsock_hdr`. `op` stays raw so that unknown operations can be answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) src_cid: u64,
    pub(crate) dst_cid: u64,
    pub(crate) src_port: u32,
    pub(crate) dst_port: u32,
    pub(crate) len: u32,
    pub(crate) kind: u16,
    pub(crate) op: u16,
    pub(crate) flags: u32,
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

fn u16_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

impl Header {
    pub(crate) fn decode(bytes: &[u8; HEADER_SIZE]) -> Self {
        Self {
            src_cid: u64_at(bytes, 0),
            dst_cid: u64_at(bytes, 8),
            src_port: u32_at(bytes, 16),
            dst_port: u32_at(bytes, 20),
            len: u32_at(bytes, 24),
            kind: u16_at(bytes, 28),
            op: u16_at(bytes, 30),
            flags: u32_at(bytes, 32),
            buf_alloc: u32_at(bytes, 36),
            fwd_cnt: u32_at(bytes, 40),
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// The decoded operation, if known.
    pub(crate) fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}

/// The buffers of one descriptor chain, all in the same direction and all inside guest memory.
pub(crate) struct ChainBuffers<'a> {
    mem: &'a GuestMemoryMmap,
    descs: Vec<Descriptor>,
    len: usize,
}

impl<'a> ChainBuffers<'a> {
    /// The chain's buffers if every one of them is `writable` (or driver-readable when false) and inside guest
    /// memory, else `None`.
    pub(crate) fn new(
        mem: &'a GuestMemoryMmap,
        descs: Vec<Descriptor>,
        writable: bool,
    ) -> Option<Self> {
        let mut len = 0usize;
        for desc in &descs {
            if desc.is_write_only() != writable
                || !mem.check_range(desc.addr(), desc.len() as usize)
            {
                return None;
            }
            len = len.checked_add(desc.len() as usize)?;
        }
        Some(Self { mem, descs, len })
    }

    /// Total bytes in the chain.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Calls `f(guest address, start in the chain, length)` for each piece of `offset..offset + len`; stops early
    /// when `f` fails. Returns false when the range is not inside the chain or `f` failed.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(vm_memory::GuestAddress, usize, usize) -> bool,
    ) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.len {
            return false;
        }
        let mut start = 0usize;
        for desc in &self.descs {
            let desc_len = desc.len() as usize;
            let desc_end = start + desc_len;
            if desc_end > offset && start < end {
                let from = offset.max(start);
                let to = end.min(desc_end);
                let Some(addr) = desc.addr().checked_add((from - start) as u64) else {
                    return false;
                };
                if !f(addr, from - offset, to - from) {
                    return false;
                }
            }
            start = desc_end;
            if start >= end {
                break;
            }
        }
        true
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. False if they are not all there.
    pub(crate) fn read_at(&self, offset: usize, buf: &mut [u8]) -> bool {
        let mem = self.mem;
        self.walk(offset, buf.len(), |addr, at, len| {
            mem.read_slice(&mut buf[at..at + len], addr).is_ok()
        })
    }

    /// Writes `data` at `offset`. False if it does not fit.
    pub(crate) fn write_at(&self, offset: usize, data: &[u8]) -> bool {
        let mem = self.mem;
        self.walk(offset, data.len(), |addr, at, len| {
            mem.write_slice(&data[at..at + len], addr).is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddressSpace;

    use super::*;
    use crate::test_utils::guest_memory;

    #[test]
    fn headers_round_trip_in_the_spec_layout() {
        let header = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 52,
            len: 7,
            kind: TYPE_STREAM,
            op: Op::Rw.raw(),
            flags: 3,
            buf_alloc: 0x1_0000,
            fwd_cnt: 99,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[20..24], &52u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &[1, 0, 5, 0]);
        assert_eq!(&bytes[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::decode(&bytes), header);
        assert_eq!(header.op(), Some(Op::Rw));
        assert_eq!(Op::from_raw(0), None);
        assert_eq!(Op::from_raw(8), None);
        for raw in 1..=7 {
            assert_eq!(Op::from_raw(raw).unwrap().raw(), raw);
        }
    }

    #[test]
    fn split_chains_are_read_and_written_across_descriptors() {
        let mem = guest_memory();
        let guard = mem.memory();
        let descs = vec![
            Descriptor::new(0x1000, 3, 2, 0),
            Descriptor::new(0x2000, 0, 2, 0),
            Descriptor::new(0x3000, 5, 2, 0),
        ];
        let chain = ChainBuffers::new(&guard, descs.clone(), true).unwrap();
        assert_eq!(chain.len(), 8);
        assert!(chain.write_at(1, b"abcdef"));
        assert!(!chain.write_at(4, b"abcde"));
        let mut back = [0u8; 6];
        assert!(chain.read_at(1, &mut back));
        assert_eq!(&back, b"abcdef");
        let mut piece = [0u8; 2];
        guard
            .read_slice(&mut piece, vm_memory::GuestAddress(0x1001))
            .unwrap();
        assert_eq!(&piece, b"ab");
        // Wrong direction or outside memory.
        assert!(ChainBuffers::new(&guard, descs, false).is_none());
        let outside = vec![Descriptor::new(u64::MAX - 4, 16, 2, 0)];
        assert!(ChainBuffers::new(&guard, outside, true).is_none());
    }
}
