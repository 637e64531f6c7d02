//! virtio-mem's request parser (`virtio_devices::MemRequest::parse`) over descriptor chains a hostile driver builds,
//! and its block map (`virtio_devices::BlockMap`) under any sequence of requests, requested sizes and host discard
//! failures, checked against a plain per-block model of the rules.
//!
//! A parsed request's response buffer must be in guest memory, and so must the one an error names. The block map
//! must answer exactly what the model answers, release only whole blocks inside the region, and report the plugged
//! size, the requested size and the bitmap the model holds, in its state and in its configuration space.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_devices::{
    BlockMap, BlockRange, BlockState, GuestMemoryMmap, MemRequest, MemResponse, MemoryDiscard,
    VirtioMemGeometry, VIRTIO_MEM_REQUEST_SIZE, VIRTIO_MEM_RESPONSE_SIZE,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest RAM: 1 MiB at 0.
const MEM_SIZE: u64 = 0x10_0000;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const INDIRECT_TABLE: u64 = 0x4000;
const DATA: u64 = 0x8000;
const DESC_SIZE: u64 = 16;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Data(u16),
    Table(u8),
    Indirect(u8),
    End(u16),
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

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: u16,
    /// Raw flags: NEXT (1), WRITE (2), INDIRECT (4) and junk.
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(&self) -> [u8; DESC_SIZE as usize] {
        let mut bytes = [0u8; DESC_SIZE as usize];
        bytes[..8].copy_from_slice(&self.addr.resolve().to_le_bytes());
        bytes[8..12].copy_from_slice(&u32::from(self.len).to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
        bytes
    }
}

/// A block range as a driver may name it: near the region (in blocks) or anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Range {
    Blocks {
        first: i8,
        nb_blocks: u8,
    },
    Unaligned {
        first: u8,
        offset: u32,
        nb_blocks: u8,
    },
    Raw {
        addr: u64,
        nb_blocks: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Plug(Range),
    Unplug(Range),
    UnplugAll,
    State(Range),
    Unknown(u16),
    /// Ask for this many blocks (or a raw byte count).
    Request(u8),
    RequestBytes(u64),
    /// Make the host's discards fail (or work again).
    FailDiscards(bool),
}

#[derive(Arbitrary, Debug)]
struct Input {
    queue_size_log2: u8,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    heads: Vec<u16>,
    avail_idx: Option<u16>,
    data: Vec<u8>,
    /// log2 of the block size above 4 KiB (taken modulo 10) and the region in blocks (modulo 200, plus 1).
    block_shift: u8,
    region_blocks: u8,
    region_base_blocks: u32,
    ops: Vec<Op>,
}

/// Records discards; fails them on demand.
#[derive(Default)]
struct Discard {
    fail: AtomicBool,
    calls: Mutex<Vec<(u64, u64)>>,
}

impl MemoryDiscard for Discard {
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the host refused the discard"));
        }
        self.calls.lock().unwrap().push((offset, len));
        Ok(())
    }
}

/// The rules, one block at a time.
struct Model {
    base: u64,
    block: u64,
    plugged: Vec<bool>,
    requested: u64,
}

impl Model {
    fn blocks_of(&self, range: BlockRange) -> Option<(usize, usize)> {
        if range.nb_blocks == 0 || range.addr < self.base {
            return None;
        }
        let offset = range.addr - self.base;
        if !offset.is_multiple_of(self.block) {
            return None;
        }
        let first = u128::from(offset / self.block);
        let end = first + u128::from(range.nb_blocks);
        if end > self.plugged.len() as u128 {
            return None;
        }
        Some((first as usize, end as usize))
    }

    fn count(&self) -> u64 {
        self.plugged.iter().filter(|p| **p).count() as u64
    }

    fn answer(&mut self, request: MemRequest, discard_fails: bool) -> MemResponse {
        match request {
            MemRequest::Plug(range) => {
                let Some((first, end)) = self.blocks_of(range) else {
                    return MemResponse::Error;
                };
                if self.plugged[first..end].iter().any(|p| *p) {
                    return MemResponse::Error;
                }
                if (self.count() + (end - first) as u64) * self.block > self.requested {
                    return MemResponse::Nack;
                }
                self.plugged[first..end].fill(true);
                MemResponse::Ack
            }
            MemRequest::Unplug(range) => {
                let Some((first, end)) = self.blocks_of(range) else {
                    return MemResponse::Error;
                };
                if !self.plugged[first..end].iter().all(|p| *p) {
                    return MemResponse::Error;
                }
                if discard_fails {
                    return MemResponse::Busy;
                }
                self.plugged[first..end].fill(false);
                MemResponse::Ack
            }
            MemRequest::UnplugAll => {
                if self.count() > 0 && discard_fails {
                    return MemResponse::Busy;
                }
                self.plugged.fill(false);
                MemResponse::Ack
            }
            MemRequest::State(range) => {
                let Some((first, end)) = self.blocks_of(range) else {
                    return MemResponse::Error;
                };
                let plugged = self.plugged[first..end].iter().filter(|p| **p).count();
                MemResponse::AckState(if plugged == 0 {
                    BlockState::Unplugged
                } else if plugged == end - first {
                    BlockState::Plugged
                } else {
                    BlockState::Mixed
                })
            }
            MemRequest::Unsupported(_) => MemResponse::Error,
        }
    }
}

fn range_of(range: Range, model: &Model) -> BlockRange {
    match range {
        Range::Blocks { first, nb_blocks } => BlockRange {
            addr: model
                .base
                .wrapping_add((i64::from(first) as u64).wrapping_mul(model.block)),
            nb_blocks: u16::from(nb_blocks),
        },
        Range::Unaligned {
            first,
            offset,
            nb_blocks,
        } => BlockRange {
            addr: model.base + u64::from(first) * model.block + u64::from(offset) % model.block,
            nb_blocks: u16::from(nb_blocks),
        },
        Range::Raw { addr, nb_blocks } => BlockRange { addr, nb_blocks },
    }
}

fn check(map: &BlockMap, model: &Model, discard: &Discard) {
    assert_eq!(map.plugged_size(), model.count() * model.block);
    assert_eq!(map.requested_size(), model.requested);
    let state = map.state();
    for (i, plugged) in model.plugged.iter().enumerate() {
        assert_eq!(
            (state.plugged[i / 64] >> (i % 64)) & 1 == 1,
            *plugged,
            "block {i}"
        );
    }
    let config = map.config();
    assert_eq!(
        u64::from_le_bytes(config[40..48].try_into().unwrap()),
        map.plugged_size()
    );
    assert_eq!(
        u64::from_le_bytes(config[48..56].try_into().unwrap()),
        model.requested
    );
    let region = model.plugged.len() as u64 * model.block;
    for (offset, len) in discard.calls.lock().unwrap().drain(..) {
        assert!(offset.is_multiple_of(model.block) && len.is_multiple_of(model.block) && len > 0);
        assert!(offset + len <= region, "{offset:#x}+{len:#x}");
    }
}

fn apply(map: &mut BlockMap, model: &mut Model, discard: &Discard, request: MemRequest) {
    let expected = model.answer(request, discard.fail.load(Ordering::Relaxed));
    assert_eq!(map.process(request, discard), expected, "{request:?}");
    check(map, model, discard);
}

fn write_table(mem: &GuestMemoryMmap, base: u64, descs: &[Desc], max: usize) {
    for (i, desc) in descs.iter().take(max).enumerate() {
        mem.write_slice(&desc.bytes(), GuestAddress(base + DESC_SIZE * i as u64))
            .unwrap();
    }
}

fuzz_target!(|input: Input| {
    let block = 4096u64 << (input.block_shift % 10);
    let blocks = u64::from(input.region_blocks % 200) + 1;
    let geometry = VirtioMemGeometry {
        addr: u64::from(input.region_base_blocks) * block,
        region_size: blocks * block,
        block_size: block,
        node_id: 0,
    };
    let mut map = BlockMap::new(geometry).unwrap();
    let mut model = Model {
        base: geometry.addr,
        block,
        plugged: vec![false; blocks as usize],
        requested: 0,
    };
    let discard = Discard::default();

    // Requests as a driver posts them.
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
    model.requested = geometry.region_size / 2 / block * block;
    map.set_requested_size(model.requested).unwrap();
    if let Ok(chains) = queue.iter(&mem) {
        for chain in chains {
            match MemRequest::parse(chain, &mem) {
                Ok(parsed) => {
                    assert!(mem.check_range(parsed.response, VIRTIO_MEM_RESPONSE_SIZE));
                    apply(&mut map, &mut model, &discard, parsed.request);
                }
                Err(err) => {
                    if let Some(response) = err.response() {
                        assert!(
                            mem.check_range(response, VIRTIO_MEM_RESPONSE_SIZE),
                            "{err:?}"
                        );
                    }
                }
            }
        }
    }

    // Then the rules directly, with the VMM moving the requested size and the host failing discards.
    for op in input.ops.iter().take(256) {
        let request = match *op {
            Op::Plug(range) => MemRequest::Plug(range_of(range, &model)),
            Op::Unplug(range) => MemRequest::Unplug(range_of(range, &model)),
            Op::UnplugAll => MemRequest::UnplugAll,
            Op::State(range) => MemRequest::State(range_of(range, &model)),
            Op::Unknown(kind) => {
                let mut bytes = [0u8; VIRTIO_MEM_REQUEST_SIZE];
                bytes[..2].copy_from_slice(&kind.to_le_bytes());
                MemRequest::decode(&bytes)
            }
            Op::Request(count) => {
                let bytes = u64::from(count) * block;
                let fits = bytes <= geometry.region_size;
                assert_eq!(map.set_requested_size(bytes).is_ok(), fits);
                if fits {
                    model.requested = bytes;
                }
                check(&map, &model, &discard);
                continue;
            }
            Op::RequestBytes(bytes) => {
                let fits = bytes.is_multiple_of(block) && bytes <= geometry.region_size;
                assert_eq!(map.set_requested_size(bytes).is_ok(), fits);
                if fits {
                    model.requested = bytes;
                }
                check(&map, &model, &discard);
                continue;
            }
            Op::FailDiscards(fail) => {
                discard.fail.store(fail, Ordering::Relaxed);
                continue;
            }
        };
        apply(&mut map, &mut model, &discard, request);
    }
});
