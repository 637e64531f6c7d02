//! `virtio_devices::Request::parse` over descriptor chains a hostile driver builds: loops, chains running past the
//! queue, indirect tables (nested, misaligned, aliasing the ring), buffers straddling the end of guest memory or far
//! outside it, and arbitrary flags and headers.
//!
//! A request the parser accepts must be servable without further checks: every buffer and the status byte are in
//! guest memory and the lengths fit the request type.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_devices::{GuestMemoryMmap, Request, RequestType, DISCARD_SEGMENT_SIZE, SECTOR_SIZE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest RAM: 1 MiB at 0.
const MEM_SIZE: u64 = 0x10_0000;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Where the input's second descriptor table goes (for indirect descriptors to point at).
const INDIRECT_TABLE: u64 = 0x4000;
/// Where the input's raw bytes (headers, data) go.
const DATA: u64 = 0x8000;
/// Size of a split-queue descriptor.
const DESC_SIZE: u64 = 16;

/// A guest address a descriptor can hold.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// In the data area, which holds the input's bytes.
    Data(u16),
    /// Entry `n` of the descriptor table (so a buffer or indirect table aliases the ring).
    Table(u8),
    /// Entry `n` of the second table.
    Indirect(u8),
    /// `n` bytes before the end of guest memory.
    End(u16),
    /// Anywhere.
    Raw(u64),
}

impl Addr {
    fn resolve(self) -> u64 {
        match self {
            Self::Data(offset) => DATA + u64::from(offset),
            Self::Table(index) => DESC_TABLE + DESC_SIZE * u64::from(index),
            Self::Indirect(index) => INDIRECT_TABLE + DESC_SIZE * u64::from(index),
            Self::End(back) => MEM_SIZE.wrapping_sub(u64::from(back)),
            Self::Raw(addr) => addr,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    /// Raw flags: NEXT (1), WRITE (2), INDIRECT (4) and junk.
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(&self) -> [u8; DESC_SIZE as usize] {
        let len = match self.len {
            Len::Small(len) => u32::from(len),
            Len::Raw(len) => len,
        };
        let mut bytes = [0u8; DESC_SIZE as usize];
        bytes[..8].copy_from_slice(&self.addr.resolve().to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
        bytes
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// log2 of the queue size (taken modulo 9: 1 to 256 entries).
    queue_size_log2: u8,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    /// Head indexes in the available ring.
    heads: Vec<u16>,
    /// The available index; the number of heads when absent.
    avail_idx: Option<u16>,
    data: Vec<u8>,
}

fn write_table(mem: &GuestMemoryMmap, base: u64, descs: &[Desc], max: usize) {
    for (i, desc) in descs.iter().take(max).enumerate() {
        mem.write_slice(&desc.bytes(), GuestAddress(base + DESC_SIZE * i as u64))
            .unwrap();
    }
}

fn check_accepted(request: &Request, mem: &GuestMemoryMmap) {
    assert!(mem.check_range(request.status, 1), "{request:?}");
    let mut total = 0u64;
    for segment in &request.data {
        assert!(segment.len > 0, "{request:?}");
        assert!(
            mem.check_range(segment.addr, segment.len as usize),
            "{request:?}"
        );
        total += u64::from(segment.len);
    }
    assert_eq!(total, request.data_len, "{request:?}");
    match request.request_type {
        RequestType::In | RequestType::Out => {
            assert!(request.data_len.is_multiple_of(SECTOR_SIZE), "{request:?}");
            assert!(
                request
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|offset| offset.checked_add(request.data_len))
                    .is_some(),
                "{request:?}"
            );
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            assert!(request.data_len > 0, "{request:?}");
            assert!(
                request.data_len.is_multiple_of(DISCARD_SEGMENT_SIZE),
                "{request:?}"
            );
        }
        RequestType::GetId => assert!(request.data_len > 0, "{request:?}"),
        RequestType::Flush | RequestType::Unsupported(_) => {
            assert!(request.data.is_empty(), "{request:?}")
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let size = 1u16 << (input.queue_size_log2 % 9);
    write_table(&mem, DESC_TABLE, &input.table, usize::from(size));
    write_table(&mem, INDIRECT_TABLE, &input.indirect, 256);
    let data_len = input.data.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&input.data[..data_len], GuestAddress(DATA))
        .unwrap();
    let avail_idx = input.avail_idx.unwrap_or(input.heads.len() as u16);
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    for (i, head) in input.heads.iter().take(usize::from(size)).enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
            .unwrap();
    }

    let mut queue = Queue::new(size).unwrap();
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));

    // An available index more than a queue ahead is refused as a whole.
    let Ok(chains) = queue.iter(&mem) else {
        return;
    };
    for chain in chains {
        match Request::parse(chain, &mem) {
            Ok(request) => check_accepted(&request, &mem),
            Err(err) => {
                if let Some(status) = err.status() {
                    assert!(mem.check_range(status, 1), "{err:?}");
                }
            }
        }
    }
});
