//! Many requests in flight at once: batches on both engines, flush ordering, a full ring, and ending requests that
//! are stuck in the kernel (reset).

use std::io::{Read, Write};
use std::os::unix::io::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::tempfile::TempFile;

use super::tests::{context, handler_for, ENGINES};
use super::*;
use crate::device::GuestMemoryMmap;
use crate::test_utils::{desc, guest_memory, next_report, RecordingInterrupt, Reported};
use crate::worker::{process_queue_to_completion, serve_available, ChainHandler};
use crate::VirtioInterruptType;

const HEADERS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUSES: u64 = 0x30_0000;
/// Data buffer size per request slot.
const SLOT: u64 = 0x1000;
const IMAGE_SIZE: usize = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 249) as u8 + 3).collect()
}

/// Bytes every write of slot `slot` carries.
fn slot_data(slot: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (slot * 7 + i % 5) as u8 ^ 0xa5).collect()
}

fn image() -> TempFile {
    let file = TempFile::new().unwrap();
    file.as_file().write_all(&pattern(IMAGE_SIZE)).unwrap();
    file
}

/// One request of a batch.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read {
        sector: u64,
        len: u32,
    },
    Write {
        sector: u64,
        len: u32,
    },
    Flush,
    /// Two driver-readable descriptors: no status byte.
    NoStatus,
}

/// Writes the requests into slots 0.. (header `HEADERS + 16 * slot`, data `DATA + SLOT * slot`, status
/// `STATUSES + slot`, descriptors `3 * slot..`) and makes them available on `vq`.
fn submit(vq: &MockSplitQueue<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap, ops: &[Op]) {
    submit_from(vq, mem, 0, ops);
}

/// Like [`submit`], with request `i` in the buffers of slot `first_slot + i` (its descriptors are still `3 * i..`).
fn submit_from(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    first_slot: usize,
    ops: &[Op],
) {
    for (i, op) in ops.iter().enumerate() {
        let slot = first_slot + i;
        let first = 3 * i as u16;
        let header = HEADERS + 16 * slot as u64;
        let data = DATA + SLOT * slot as u64;
        let status = STATUSES + slot as u64;
        let (request_type, sector) = match *op {
            Op::Read { sector, .. } => (VIRTIO_BLK_T_IN, sector),
            Op::Write { sector, len } => {
                mem.write_slice(&slot_data(slot, len as usize), GuestAddress(data))
                    .unwrap();
                (VIRTIO_BLK_T_OUT, sector)
            }
            Op::Flush | Op::NoStatus => (VIRTIO_BLK_T_FLUSH, 0),
        };
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(header)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        // Two-descriptor chains leave their third table entry unused.
        let chain = match *op {
            Op::Read { len, .. } => [
                desc(header, 16, false, Some(first + 1)),
                desc(data, len, true, Some(first + 2)),
                desc(status, 1, true, None),
            ],
            Op::Write { len, .. } => [
                desc(header, 16, false, Some(first + 1)),
                desc(data, len, false, Some(first + 2)),
                desc(status, 1, true, None),
            ],
            Op::Flush => [
                desc(header, 16, false, Some(first + 1)),
                desc(status, 1, true, None),
                desc(0, 0, false, None),
            ],
            Op::NoStatus => [
                desc(header, 16, false, Some(first + 1)),
                desc(data, 512, false, None),
                desc(0, 0, false, None),
            ],
        };
        for (offset, raw) in chain.into_iter().enumerate() {
            vq.desc_table().store(first + offset as u16, raw).unwrap();
        }
        vq.avail().ring().ref_at(i).unwrap().store(first.to_le());
    }
    vq.avail().idx().store((ops.len() as u16).to_le());
}

/// The used ring as (slot, used length), in the order the device used the chains.
fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(usize, u32)> {
    let count = vq.used().idx().load();
    (0..usize::from(count))
        .map(|i| {
            let elem = vq.used().ring().ref_at(i).unwrap().load();
            ((elem.id() / 3) as usize, elem.len())
        })
        .collect()
}

fn status(mem: &GuestMemoryMmap, slot: usize) -> u8 {
    mem.read_obj(GuestAddress(STATUSES + slot as u64)).unwrap()
}

fn guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// A handler on a fresh image for every engine available here, with room for `entries` requests in the ring.
fn handlers(entries: u32) -> Vec<(IoEngine, TempFile, BlockHandler, GuestMemory)> {
    ENGINES
        .iter()
        .filter_map(|&engine| {
            let image = image();
            let disk: Arc<dyn DiskBackend> =
                Arc::new(RawFile::open(image.as_path(), false).unwrap());
            let mem = guest_memory();
            let handler = handler_for(engine, context(disk, false, true), &mem, entries)?;
            Some((engine, image, handler, mem))
        })
        .collect()
}

#[test]
fn thirty_two_requests_in_flight_complete_with_the_right_data() {
    for (engine, image, mut handler, mem) in handlers(64) {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 128);
        let ops: Vec<Op> = (0..32u64)
            .map(|i| match i % 2 {
                0 => Op::Read {
                    sector: i * 8 + 1,
                    len: 4096,
                },
                _ => Op::Write {
                    sector: 1024 + i * 8,
                    len: 4096,
                },
            })
            .collect();
        submit(&vq, &guard, &ops);
        let mut queue: Queue = vq.create_queue().unwrap();
        let served = serve_available(&mut handler, 0, &mut queue, &guard).unwrap();
        if engine == IoEngine::Auto {
            // All 32 are in the ring at once, none answered yet.
            assert_eq!(handler.in_flight(), 32);
            assert!(!served.used && !served.blocked);
            assert_eq!(vq.used().idx().load(), 0);
        }
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        let mut used = used(&vq);
        assert_eq!(used.len(), 32, "{engine:?}");
        used.sort_unstable();
        let host = std::fs::read(image.as_path()).unwrap();
        let original = pattern(IMAGE_SIZE);
        for (slot, len) in used {
            assert_eq!(status(&guard, slot), OK, "{engine:?} slot {slot}");
            match ops[slot] {
                Op::Read { sector, len: size } => {
                    assert_eq!(len, size + 1);
                    let at = sector as usize * 512;
                    let data = guest(&guard, DATA + SLOT * slot as u64, size as usize);
                    assert!(
                        data == original[at..at + size as usize],
                        "{engine:?} slot {slot}"
                    );
                }
                Op::Write { sector, len: size } => {
                    assert_eq!(len, 1);
                    let at = sector as usize * 512;
                    assert!(host[at..at + size as usize] == slot_data(slot, size as usize)[..]);
                }
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn a_flush_completes_after_the_writes_before_it() {
    for (engine, image, mut handler, mem) in handlers(64) {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 64);
        // A read first (so the writes after it go through the ring too), eight writes, a flush, and more reads of
        // other sectors alongside.
        let mut ops = vec![Op::Read {
            sector: 1,
            len: 4096,
        }];
        ops.extend((0..8u64).map(|i| Op::Write {
            sector: 64 + 16 * i,
            len: 4096,
        }));
        ops.push(Op::Flush);
        ops.extend((0..4u64).map(|i| Op::Read {
            sector: 8 * i,
            len: 4096,
        }));
        submit(&vq, &guard, &ops);
        let mut queue: Queue = vq.create_queue().unwrap();
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        let order = used(&vq);
        assert_eq!(order.len(), ops.len());
        let flush_at = order.iter().position(|&(slot, _)| slot == 9).unwrap();
        for (position, &(slot, _)) in order.iter().enumerate() {
            assert_eq!(status(&guard, slot), OK, "{engine:?} slot {slot}");
            if (1..9).contains(&slot) {
                assert!(
                    position < flush_at,
                    "{engine:?}: write {slot} completed after the flush: {order:?}"
                );
            }
        }
        // Every write is in the file, and a read after the flush completed sees it.
        let host = std::fs::read(image.as_path()).unwrap();
        for slot in 1..9 {
            let at = (64 + 16 * (slot - 1)) * 512;
            assert!(host[at..at + 4096] == slot_data(slot, 4096)[..]);
        }
        let vq = MockSplitQueue::new(&*guard, 64);
        let reads: Vec<Op> = (0..8u64)
            .map(|i| Op::Read {
                sector: 64 + 16 * i,
                len: 4096,
            })
            .collect();
        submit(&vq, &guard, &reads);
        let mut queue: Queue = vq.create_queue().unwrap();
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        for slot in 0..8 {
            assert_eq!(status(&guard, slot), OK);
            assert!(guest(&guard, DATA + SLOT * slot as u64, 4096) == slot_data(slot + 1, 4096));
        }
    }
}

#[test]
fn a_cached_write_with_nothing_in_flight_is_written_at_once() {
    for (writeback, expect_in_flight) in [(true, 0), (false, 1)] {
        let image = image();
        let disk: Arc<dyn DiskBackend> = Arc::new(RawFile::open(image.as_path(), false).unwrap());
        let mem = guest_memory();
        let ctx = context(disk, false, writeback);
        let Some(mut handler) = handler_for(IoEngine::Auto, ctx, &mem, 16) else {
            return;
        };
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        submit(
            &vq,
            &guard,
            &[Op::Write {
                sector: 8,
                len: 4096,
            }],
        );
        let mut queue: Queue = vq.create_queue().unwrap();
        let served = serve_available(&mut handler, 0, &mut queue, &guard).unwrap();
        // With a write cache the write went into the page cache on the spot; a durable write waits in the ring.
        assert_eq!(
            handler.in_flight(),
            expect_in_flight,
            "writeback {writeback}"
        );
        assert_eq!(served.used, expect_in_flight == 0);
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        assert_eq!(used(&vq), [(0, 1)]);
        assert_eq!(status(&guard, 0), OK);
        let host = std::fs::read(image.as_path()).unwrap();
        assert!(host[4096..8192] == slot_data(0, 4096)[..]);
    }
}

#[test]
fn an_out_of_range_request_among_valid_ones_fails_alone() {
    for (engine, _image, mut handler, mem) in handlers(64) {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 64);
        let capacity = (IMAGE_SIZE / 512) as u64;
        let ops = [
            Op::Read {
                sector: 0,
                len: 4096,
            },
            Op::Read {
                sector: 16,
                len: 4096,
            },
            Op::Read {
                sector: capacity - 4,
                len: 4096,
            },
            Op::NoStatus,
            Op::Write {
                sector: capacity,
                len: 512,
            },
            Op::Read {
                sector: 32,
                len: 4096,
            },
        ];
        submit(&vq, &guard, &ops);
        let mut queue: Queue = vq.create_queue().unwrap();
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        let mut used = used(&vq);
        used.sort_unstable();
        assert_eq!(
            used,
            [(0, 4097), (1, 4097), (2, 1), (3, 0), (4, 1), (5, 4097)],
            "{engine:?}"
        );
        let original = pattern(IMAGE_SIZE);
        for (slot, sector) in [(0usize, 0usize), (1, 16), (5, 32)] {
            assert_eq!(status(&guard, slot), OK);
            let data = guest(&guard, DATA + SLOT * slot as u64, 4096);
            assert!(data == original[sector * 512..sector * 512 + 4096]);
        }
        assert_eq!(status(&guard, 2), IOERR);
        assert_eq!(status(&guard, 3), 0xee);
        assert_eq!(status(&guard, 4), IOERR);
    }
}

#[test]
fn a_full_ring_leaves_the_rest_of_the_queue_for_later() {
    // Room for four requests in flight, 32 on the queue.
    for (engine, _image, mut handler, mem) in handlers(4) {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 128);
        let ops: Vec<Op> = (0..32u64)
            .map(|i| Op::Read {
                sector: 8 * i,
                len: 4096,
            })
            .collect();
        submit(&vq, &guard, &ops);
        let mut queue: Queue = vq.create_queue().unwrap();
        let served = serve_available(&mut handler, 0, &mut queue, &guard).unwrap();
        assert_eq!(served.blocked, engine == IoEngine::Auto);
        process_queue_to_completion(&mut handler, 0, &mut queue, &guard).unwrap();
        assert_eq!(used(&vq).len(), 32);
        let original = pattern(IMAGE_SIZE);
        for slot in 0..32 {
            assert_eq!(status(&guard, slot), OK);
            let at = 8 * slot * 512;
            assert!(guest(&guard, DATA + SLOT * slot as u64, 4096) == original[at..at + 4096]);
        }
    }
}

/// A read-only "disk" whose direct descriptor is the read end of a pipe: reads stay in the kernel until the test
/// writes into the pipe.
struct PipeDisk {
    reader: std::io::PipeReader,
}

impl DiskBackend for PipeDisk {
    fn size(&self) -> u64 {
        IMAGE_SIZE as u64
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.reader.as_fd())
    }
}

/// A pipe disk, a second handle on the pipe's read end, and its write end.
fn pipe_disk() -> (Arc<PipeDisk>, std::io::PipeReader, std::io::PipeWriter) {
    let (reader, writer) = std::io::pipe().unwrap();
    let spare = reader.try_clone().unwrap();
    (Arc::new(PipeDisk { reader }), spare, writer)
}

/// Checks that reads stuck in the kernel were ended: writing into the pipe reaches nobody but the test, and the
/// requests' buffers and statuses are untouched.
fn assert_nothing_reads(
    mem: &GuestMemoryMmap,
    reads: usize,
    spare: &mut std::io::PipeReader,
    writer: &mut std::io::PipeWriter,
) {
    writer.write_all(&[0x11; 2048]).unwrap();
    let mut back = [0u8; 2048];
    spare.read_exact(&mut back).unwrap();
    assert_eq!(back, [0x11; 2048]);
    for slot in 0..reads {
        assert_eq!(status(mem, slot), 0xee);
        assert!(guest(mem, DATA + SLOT * slot as u64, 512)
            .iter()
            .all(|&byte| byte == 0));
    }
}

#[test]
fn quiescing_ends_requests_stuck_in_the_kernel() {
    let (disk, mut spare, mut writer) = pipe_disk();
    let mem = guest_memory();
    let Some(mut handler) = handler_for(IoEngine::Auto, context(disk, true, true), &mem, 16) else {
        return;
    };
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let ops: Vec<Op> = (0..4u64)
        .map(|i| Op::Read {
            sector: i,
            len: 512,
        })
        .collect();
    submit(&vq, &guard, &ops);
    let mut queue: Queue = vq.create_queue().unwrap();
    serve_available(&mut handler, 0, &mut queue, &guard).unwrap();
    let mut done = Vec::new();
    handler.poll_completions(&mut done);
    assert!(done.is_empty());
    assert_eq!(handler.in_flight(), 4);
    handler.quiesce();
    assert_eq!(handler.in_flight(), 0);
    handler.poll_completions(&mut done);
    assert!(done.is_empty(), "ended requests are not reported");
    assert_nothing_reads(&guard, 4, &mut spare, &mut writer);
}

#[test]
fn resetting_the_device_ends_requests_in_flight_first() {
    let (disk, mut spare, mut writer) = pipe_disk();
    let mut block = Block::new(disk, &BlockOptions::default()).unwrap();
    block.ack_features(block.features());
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let ops: Vec<Op> = (0..4u64)
        .map(|i| Op::Read {
            sector: i,
            len: 512,
        })
        .collect();
    submit(&vq, &guard, &ops);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let doorbell = event.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    block
        .activate(mem.clone(), Arc::new(interrupt), vec![(0, queue, event)])
        .unwrap();
    doorbell.write(1).unwrap();
    // The device has taken all four chains once it asks to be notified past them (`avail_event`, after the used
    // ring). The deadline only guards against a hung test.
    let avail_event = vq.used_addr().unchecked_add(4 + 8 * 16);
    let deadline = Instant::now() + Duration::from_secs(60);
    while u16::from_le(guard.read_obj(avail_event).unwrap()) != 4 {
        assert!(
            Instant::now() < deadline,
            "the device never took the chains"
        );
        std::thread::yield_now();
    }
    let events = block.reset().expect("the device was running");
    assert_eq!(events.len(), 1);
    assert_eq!(
        vq.used().idx().load(),
        0,
        "nothing was returned to the driver"
    );
    assert!(rx.try_recv().is_err(), "no interrupt");
    assert_nothing_reads(&guard, 4, &mut spare, &mut writer);
}

#[test]
fn completions_go_back_to_the_queue_they_came_from() {
    for engine in ENGINES {
        let image = image();
        let disk = Arc::new(RawFile::open(image.as_path(), false).unwrap());
        let mut block = Block::new(
            disk,
            &BlockOptions {
                num_queues: 2,
                ..BlockOptions::default()
            },
        )
        .unwrap();
        block.set_io_engine(engine);
        block.ack_features(block.features());
        let mem = guest_memory();
        let guard = mem.memory();
        let (interrupt, rx) = RecordingInterrupt::new();
        let mut queues = Vec::new();
        let mut doorbells = Vec::new();
        let mut rings = Vec::new();
        for (index, base) in [(0usize, 0x8000u64), (1, 0xc000)] {
            let vq = MockSplitQueue::create(&*guard, GuestAddress(base), 16);
            let event = EventFd::new(EFD_NONBLOCK).unwrap();
            doorbells.push(event.try_clone().unwrap());
            queues.push((index, vq.create_queue().unwrap(), event));
            rings.push(vq);
        }
        // Queue 0 reads sector 8 into slot 0, queue 1 sector 24 into slot 1.
        submit_from(
            &rings[0],
            &guard,
            0,
            &[Op::Read {
                sector: 8,
                len: 512,
            }],
        );
        submit_from(
            &rings[1],
            &guard,
            1,
            &[Op::Read {
                sector: 24,
                len: 512,
            }],
        );
        block
            .activate(mem.clone(), Arc::new(interrupt), queues)
            .unwrap();
        for doorbell in &doorbells {
            doorbell.write(1).unwrap();
        }
        let mut reported = [next_report(&rx), next_report(&rx)];
        reported.sort_by_key(|report| format!("{report:?}"));
        assert_eq!(
            reported,
            [
                Reported::Interrupt(VirtioInterruptType::Queue(0)),
                Reported::Interrupt(VirtioInterruptType::Queue(1)),
            ],
            "{engine:?}"
        );
        let original = pattern(IMAGE_SIZE);
        for (vq, slot, sector) in [(&rings[0], 0usize, 8usize), (&rings[1], 1, 24)] {
            assert_eq!(used(vq), [(0, 513)], "{engine:?}");
            assert_eq!(status(&guard, slot), OK);
            let data = guest(&guard, DATA + SLOT * slot as u64, 512);
            assert!(data == original[sector * 512..sector * 512 + 512]);
        }
        block.reset().unwrap();
    }
}

#[test]
fn the_device_thread_comes_back_to_chains_it_had_no_room_for() {
    // More chains than the device's ring holds (its size is capped at 1,024): the device thread must start the
    // rest as earlier ones finish, without a new notification.
    const CHAINS: u16 = 1100;
    const QUEUE: u16 = 4096;
    const BUFFERS: u64 = 0x50_0000;
    let image = image();
    let disk = Arc::new(RawFile::open(image.as_path(), false).unwrap());
    let mut block = Block::new(
        disk,
        &BlockOptions {
            queue_size: QUEUE,
            ..BlockOptions::default()
        },
    )
    .unwrap();
    block.ack_features(block.features());
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::create(&*guard, GuestAddress(0x8000), QUEUE);
    // Each request: the header, then 512 data bytes and the status byte in one device-writable buffer.
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    for i in 0..CHAINS {
        let sector = u64::from(i) % 2048;
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        let header = HEADERS + 16 * u64::from(i);
        let buffer = BUFFERS + 1024 * u64::from(i);
        guard.write_slice(&raw, GuestAddress(header)).unwrap();
        guard.write_obj(0xeeu8, GuestAddress(buffer + 512)).unwrap();
        vq.desc_table()
            .store(2 * i, desc(header, 16, false, Some(2 * i + 1)))
            .unwrap();
        vq.desc_table()
            .store(2 * i + 1, desc(buffer, 513, true, None))
            .unwrap();
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store((2 * i).to_le());
    }
    vq.avail().idx().store(CHAINS.to_le());
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let doorbell = event.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    block
        .activate(
            mem.clone(),
            Arc::new(interrupt),
            vec![(0, vq.create_queue().unwrap(), event)],
        )
        .unwrap();
    doorbell.write(1).unwrap();
    // Without EVENT_IDX every round that used chains interrupts; wait until all are used.
    while vq.used().idx().load() != CHAINS {
        assert_eq!(
            next_report(&rx),
            Reported::Interrupt(VirtioInterruptType::Queue(0))
        );
    }
    let original = pattern(IMAGE_SIZE);
    for i in 0..CHAINS {
        let buffer = BUFFERS + 1024 * u64::from(i);
        let at = (usize::from(i) % 2048) * 512;
        assert_eq!(
            guard.read_obj::<u8>(GuestAddress(buffer + 512)).unwrap(),
            OK
        );
        assert!(
            guest(&guard, buffer, 512) == original[at..at + 512],
            "chain {i}"
        );
    }
    block.reset().unwrap();
}
