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

use atrium_fuzz::hostile_queue::QueueInput;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_devices::{
    BlockMap, BlockRange, BlockState, MemRequest, MemResponse, MemoryDiscard, VirtioMemGeometry,
    VIRTIO_MEM_REQUEST_SIZE, VIRTIO_MEM_RESPONSE_SIZE,
};
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryBackend;

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
    /// The request queue as the driver lays it out.
    queue: QueueInput,
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
    let (mem, mut queue) = input.queue.build();
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
