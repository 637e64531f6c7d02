use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::*;
use crate::test_utils::{
    desc, guest_memory, hostile_queue, next_report, RecordingInterrupt, Reported, XorShift,
    MEM_SIZE,
};
use crate::worker::process_queue;
use crate::VirtioInterruptType;

/// The test region: 32 blocks of 2 MiB at 4 GiB.
const REGION: u64 = 0x1_0000_0000;
const BLOCK: u64 = 2 << 20;
const BLOCKS: u64 = 32;
/// Where requests and responses live in the test guest's RAM.
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x20_0000;

const ACK: u16 = 0;
const NACK: u16 = 1;
const BUSY: u16 = 2;
const ERROR: u16 = 3;

fn geometry() -> VirtioMemGeometry {
    VirtioMemGeometry {
        addr: REGION,
        region_size: BLOCKS * BLOCK,
        block_size: BLOCK,
        node_id: 0,
    }
}

/// Records discards; fails them while `fail` is set.
#[derive(Default)]
struct FakeDiscard {
    calls: Mutex<Vec<(u64, u64)>>,
    fail: Mutex<bool>,
}

impl MemoryDiscard for FakeDiscard {
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if *self.fail.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.calls.lock().unwrap().push((offset, len));
        Ok(())
    }
}

impl FakeDiscard {
    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

struct Fixture {
    mem: GuestMemory,
    handler: MemHandler,
    handle: VirtioMemHandle,
    discard: Arc<FakeDiscard>,
}

fn fixture() -> Fixture {
    let discard = Arc::new(FakeDiscard::default());
    let device = VirtioMem::new(geometry(), discard.clone()).unwrap();
    Fixture {
        mem: guest_memory(),
        handler: MemHandler {
            blocks: device.blocks.clone(),
            discard: discard.clone(),
        },
        handle: device.handle(),
        discard,
    }
}

fn request_bytes(request_type: u16, addr: u64, nb_blocks: u16) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[..2].copy_from_slice(&request_type.to_le_bytes());
    // Padding the device must ignore.
    bytes[2..8].fill(0xa5);
    bytes[8..16].copy_from_slice(&addr.to_le_bytes());
    bytes[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    bytes[18..].fill(0x5a);
    bytes
}

impl Fixture {
    /// Posts `descs` as one chain and serves it: (used length, response type, response state).
    fn serve(&mut self, descs: &[RawDescriptor]) -> (u32, u16, u16) {
        let guard = self.mem.memory();
        guard.write_slice(&[0xee; 16], GuestAddress(RESP)).unwrap();
        let vq = MockSplitQueue::new(&*guard, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        process_queue(&mut self.handler, 0, &mut queue, &guard).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        let len = vq.used().ring().ref_at(0).unwrap().load().len();
        let mut resp = [0u8; 10];
        guard.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        if len > 0 {
            assert_eq!(resp[2..8], [0; 6], "response padding is zero");
        }
        (
            len,
            u16::from_le_bytes([resp[0], resp[1]]),
            u16::from_le_bytes([resp[8], resp[9]]),
        )
    }

    /// Sends a well-formed request: (response type, state).
    fn send(&mut self, request_type: u16, addr: u64, nb_blocks: u16) -> (u16, u16) {
        self.mem
            .memory()
            .write_slice(
                &request_bytes(request_type, addr, nb_blocks),
                GuestAddress(REQ),
            )
            .unwrap();
        let (len, response, state) =
            self.serve(&[desc(REQ, 24, false, Some(1)), desc(RESP, 10, true, None)]);
        assert_eq!(len, 10);
        (response, state)
    }

    fn plug(&mut self, block: u64, count: u16) -> u16 {
        self.send(0, REGION + block * BLOCK, count).0
    }

    fn unplug(&mut self, block: u64, count: u16) -> u16 {
        self.send(1, REGION + block * BLOCK, count).0
    }

    /// STATE of a range: the state, or panics unless ACKed.
    fn state_of(&mut self, block: u64, count: u16) -> u16 {
        let (response, state) = self.send(3, REGION + block * BLOCK, count);
        assert_eq!(response, ACK);
        state
    }

    fn config(&self, offset: u64) -> u64 {
        let device = VirtioMem {
            blocks: self.handler.blocks.clone(),
            discard: self.discard.clone(),
            acked_features: 0,
            worker: None,
        };
        let mut data = [0u8; 8];
        device.read_config(offset, &mut data);
        u64::from_le_bytes(data)
    }
}

const PLUGGED: u16 = 0;
const UNPLUGGED: u16 = 1;
const MIXED: u16 = 2;

#[test]
fn the_configuration_space_follows_the_specification_layout() {
    let f = fixture();
    f.handle.set_requested_size(6 * BLOCK).unwrap();
    assert_eq!(f.config(0), BLOCK, "block_size");
    assert_eq!(f.config(8), 0, "node_id and padding");
    assert_eq!(f.config(16), REGION, "addr");
    assert_eq!(f.config(24), BLOCKS * BLOCK, "region_size");
    assert_eq!(f.config(32), BLOCKS * BLOCK, "usable_region_size");
    assert_eq!(f.config(40), 0, "plugged_size");
    assert_eq!(f.config(48), 6 * BLOCK, "requested_size");
    assert_eq!(f.config(56), 0, "past the end reads as zero");
    // Narrow reads of one field.
    let device = VirtioMem::new(geometry(), f.discard.clone()).unwrap();
    let mut two = [0u8; 2];
    device.read_config(20, &mut two);
    assert_eq!(u16::from_le_bytes(two), 1, "bits 32..47 of addr (4 GiB)");
}

#[test]
fn plug_state_unplug_and_unplug_all() {
    let mut f = fixture();
    f.handle.set_requested_size(8 * BLOCK).unwrap();
    assert_eq!(f.state_of(0, 32), UNPLUGGED);
    assert_eq!(f.plug(0, 4), ACK);
    assert_eq!(f.plug(10, 4), ACK);
    assert_eq!(f.handle.plugged_size(), 8 * BLOCK);
    assert_eq!(f.config(40), 8 * BLOCK, "plugged_size in the config");
    assert_eq!(f.state_of(0, 4), PLUGGED);
    assert_eq!(f.state_of(10, 4), PLUGGED);
    assert_eq!(f.state_of(0, 14), MIXED);
    assert_eq!(f.state_of(4, 6), UNPLUGGED);
    assert!(f.discard.take().is_empty(), "plugging discards nothing");

    // Shrink: the driver unplugs, the host gets the memory back.
    f.handle.set_requested_size(2 * BLOCK).unwrap();
    assert_eq!(f.unplug(10, 4), ACK);
    assert_eq!(f.discard.take(), vec![(10 * BLOCK, 4 * BLOCK)]);
    assert_eq!(f.unplug(2, 2), ACK);
    assert_eq!(f.discard.take(), vec![(2 * BLOCK, 2 * BLOCK)]);
    assert_eq!(f.handle.plugged_size(), 2 * BLOCK);
    assert_eq!(f.state_of(0, 2), PLUGGED);
    assert_eq!(f.state_of(2, 30), UNPLUGGED);

    // UNPLUG_ALL releases the usable region at once and needs no range.
    assert_eq!(f.send(2, 0xdead_beef, 0).0, ACK);
    assert_eq!(f.discard.take(), vec![(0, BLOCKS * BLOCK)]);
    assert_eq!(f.handle.plugged_size(), 0);
    assert_eq!(f.state_of(0, 32), UNPLUGGED);
    // With nothing plugged it has nothing to release.
    assert_eq!(f.send(2, 0, 0).0, ACK);
    assert!(f.discard.take().is_empty());
    // The last block of the region can be plugged.
    f.handle.set_requested_size(BLOCKS * BLOCK).unwrap();
    assert_eq!(f.plug(31, 1), ACK);
    assert_eq!(f.plug(0, 31), ACK);
    assert_eq!(f.state_of(0, 32), PLUGGED);
}

#[test]
fn bad_ranges_are_answered_error_and_change_nothing() {
    let mut f = fixture();
    f.handle.set_requested_size(BLOCKS * BLOCK).unwrap();
    assert_eq!(f.plug(4, 2), ACK);
    let end = REGION + BLOCKS * BLOCK;
    let bad: &[(u64, u16, &str)] = &[
        (REGION, 0, "no blocks"),
        (REGION + 4096, 1, "not block aligned"),
        (REGION + BLOCK / 2, 1, "half a block in"),
        (REGION - BLOCK, 1, "below the region"),
        (REGION - BLOCK, 2, "straddling its start"),
        (end, 1, "at its end"),
        (end - BLOCK, 2, "straddling its end"),
        (REGION, u16::MAX, "far beyond its end"),
        (0, 1, "guest RAM, not the region"),
        (u64::MAX - BLOCK + 1, u16::MAX, "wrapping the address space"),
        (u64::MAX, 1, "the last byte"),
    ];
    for (request_type, name) in [(0u16, "plug"), (1, "unplug"), (3, "state")] {
        for (addr, nb_blocks, why) in bad {
            assert_eq!(
                f.send(request_type, *addr, *nb_blocks),
                (ERROR, 0),
                "{name} {why}"
            );
        }
    }
    assert_eq!(f.handle.plugged_size(), 2 * BLOCK);
    assert_eq!(f.state_of(4, 2), PLUGGED);
    assert!(f.discard.take().is_empty());
}

#[test]
fn plugging_is_bounded_by_the_requested_size_and_the_plugged_state() {
    let mut f = fixture();
    assert_eq!(f.plug(0, 1), NACK, "nothing requested yet");
    f.handle.set_requested_size(4 * BLOCK).unwrap();
    assert_eq!(f.plug(0, 5), NACK, "more than requested");
    assert_eq!(f.plug(0, 3), ACK);
    assert_eq!(f.plug(3, 2), NACK, "one block too many");
    assert_eq!(f.plug(2, 1), ERROR, "already plugged");
    assert_eq!(f.plug(1, 3), ERROR, "partly plugged");
    assert_eq!(f.unplug(2, 2), ERROR, "partly unplugged");
    assert_eq!(f.unplug(5, 1), ERROR, "not plugged");
    assert_eq!(f.plug(3, 1), ACK);
    assert_eq!(f.handle.plugged_size(), 4 * BLOCK);
    // Shrinking the request leaves plugged memory alone until the driver unplugs it.
    f.handle.set_requested_size(0).unwrap();
    assert_eq!(f.handle.plugged_size(), 4 * BLOCK);
    assert_eq!(f.plug(8, 1), NACK);
    assert!(f.discard.take().is_empty());
}

#[test]
fn a_failed_discard_is_busy_and_keeps_the_blocks_plugged() {
    let mut f = fixture();
    f.handle.set_requested_size(4 * BLOCK).unwrap();
    assert_eq!(f.plug(0, 4), ACK);
    *f.discard.fail.lock().unwrap() = true;
    assert_eq!(f.unplug(0, 2), BUSY);
    assert_eq!(f.send(2, 0, 0).0, BUSY);
    assert_eq!(f.handle.plugged_size(), 4 * BLOCK);
    assert_eq!(f.state_of(0, 4), PLUGGED);
    *f.discard.fail.lock().unwrap() = false;
    assert_eq!(f.unplug(0, 2), ACK);
    assert_eq!(f.state_of(0, 4), MIXED);
}

#[test]
fn unknown_request_types_are_errors() {
    let mut f = fixture();
    f.handle.set_requested_size(BLOCK).unwrap();
    for request_type in [4u16, 0x100, u16::MAX] {
        assert_eq!(f.send(request_type, REGION, 1), (ERROR, 0));
    }
    assert_eq!(f.handle.plugged_size(), 0);
}

#[test]
fn malformed_chains_get_an_error_when_they_can_take_one() {
    let mut f = fixture();
    f.handle.set_requested_size(BLOCK).unwrap();
    let guard = f.mem.memory();
    guard
        .write_slice(&request_bytes(0, REGION, 1), GuestAddress(REQ))
        .unwrap();
    drop(guard);
    // The request split over two descriptors is fine (any layout).
    assert_eq!(
        f.serve(&[
            desc(REQ, 5, false, Some(1)),
            desc(REQ + 5, 19, false, Some(2)),
            desc(RESP, 10, true, None),
        ]),
        (10, ACK, 0)
    );
    assert_eq!(f.handle.plugged_size(), BLOCK);
    // So is a longer response buffer, or more writable buffers after it.
    assert_eq!(
        f.serve(&[
            desc(REQ, 24, false, Some(1)),
            desc(RESP, 64, true, Some(2)),
            desc(RESP + 64, 8, true, None),
        ]),
        (10, ERROR, 0),
        "the block is plugged already"
    );

    // Answerable: ERROR in the response buffer.
    let answered: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "short request",
            vec![desc(REQ, 23, false, Some(1)), desc(RESP, 10, true, None)],
        ),
        ("no request", vec![desc(RESP, 10, true, None)]),
        (
            "request outside memory",
            vec![
                desc(MEM_SIZE as u64 - 8, 24, false, Some(1)),
                desc(RESP, 10, true, None),
            ],
        ),
        (
            "request far outside memory",
            vec![
                desc(u64::MAX - 4, 24, false, Some(1)),
                desc(RESP, 10, true, None),
            ],
        ),
        (
            "readable after writable",
            vec![desc(RESP, 10, true, Some(1)), desc(REQ, 24, false, None)],
        ),
    ];
    for (why, descs) in answered {
        assert_eq!(f.serve(&descs), (10, ERROR, 0), "{why}");
    }

    // Unanswerable: used length 0, nothing written.
    let dropped: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("no response buffer", vec![desc(REQ, 24, false, None)]),
        (
            "short response buffer",
            vec![desc(REQ, 24, false, Some(1)), desc(RESP, 9, true, None)],
        ),
        (
            "response outside memory",
            vec![
                desc(REQ, 24, false, Some(1)),
                desc(MEM_SIZE as u64 - 4, 10, true, None),
            ],
        ),
        (
            "a loop",
            vec![desc(REQ, 24, false, Some(1)), desc(RESP, 10, true, Some(0))],
        ),
        (
            "runs past the queue",
            vec![
                desc(REQ, 24, false, Some(1)),
                desc(RESP, 10, true, Some(40)),
            ],
        ),
    ];
    for (why, descs) in dropped {
        let (len, response, _) = f.serve(&descs);
        assert_eq!(len, 0, "{why}");
        assert_eq!(response, 0xeeee, "{why}: nothing written");
    }
    assert_eq!(f.handle.plugged_size(), BLOCK, "nothing changed");
}

#[test]
fn requested_sizes_are_whole_blocks_within_the_region() {
    let f = fixture();
    assert_eq!(
        f.handle.set_requested_size(BLOCK + 4096),
        Err(VirtioMemError::UnalignedSize {
            size: BLOCK + 4096,
            block_size: BLOCK
        })
    );
    assert_eq!(
        f.handle.set_requested_size((BLOCKS + 1) * BLOCK),
        Err(VirtioMemError::SizeBeyondRegion {
            size: (BLOCKS + 1) * BLOCK,
            region_size: BLOCKS * BLOCK
        })
    );
    assert_eq!(f.handle.requested_size(), 0);
    f.handle.set_requested_size(BLOCKS * BLOCK).unwrap();
    assert_eq!(f.handle.requested_size(), BLOCKS * BLOCK);
    let message = f.handle.set_requested_size(1).unwrap_err().to_string();
    assert!(message.contains("block size"), "{message}");
}

#[test]
fn bad_geometries_are_refused() {
    let discard: Arc<dyn MemoryDiscard> = Arc::new(FakeDiscard::default());
    let good = geometry();
    let cases = [
        VirtioMemGeometry {
            block_size: 3 << 20,
            ..good
        },
        VirtioMemGeometry {
            block_size: 2048,
            ..good
        },
        VirtioMemGeometry {
            block_size: 0,
            ..good
        },
        VirtioMemGeometry {
            region_size: 0,
            ..good
        },
        VirtioMemGeometry {
            region_size: BLOCK + 4096,
            ..good
        },
        VirtioMemGeometry {
            addr: REGION + 4096,
            ..good
        },
        VirtioMemGeometry {
            addr: u64::MAX - BLOCK + 1,
            ..good
        },
        VirtioMemGeometry {
            region_size: (VIRTIO_MEM_MAX_BLOCKS + 1) * 4096,
            block_size: 4096,
            ..good
        },
    ];
    for geometry in cases {
        let err = VirtioMem::new(geometry, discard.clone()).unwrap_err();
        assert!(
            matches!(err, VirtioMemError::BadGeometry { .. }),
            "{geometry:?}: {err}"
        );
    }
}

#[test]
fn state_round_trips_and_bad_states_are_refused() {
    let mut f = fixture();
    f.handle.set_requested_size(6 * BLOCK).unwrap();
    assert_eq!(f.plug(1, 2), ACK);
    assert_eq!(f.plug(30, 2), ACK);
    let state = f.handle.state();
    assert_eq!(state.requested_size, 6 * BLOCK);
    assert_eq!(state.plugged, vec![0b110 | (0b11 << 30)]);
    let json = serde_json::to_string(&state).unwrap();
    let back: VirtioMemState = serde_json::from_str(&json).unwrap();
    let restored = VirtioMem::restore(&back, f.discard.clone()).unwrap();
    let handle = restored.handle();
    assert_eq!(handle.plugged_size(), 4 * BLOCK);
    assert_eq!(handle.state(), state);

    let mut long = state.clone();
    long.plugged.push(0);
    let mut past_end = state.clone();
    past_end.plugged[0] |= 1 << 40;
    let mut too_much = state.clone();
    too_much.requested_size = (BLOCKS + 1) * BLOCK;
    for bad in [long, past_end, too_much] {
        assert!(
            VirtioMem::restore(&bad, f.discard.clone()).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn hostile_queues_never_panic() {
    let mut f = fixture();
    f.handle.set_requested_size(BLOCKS * BLOCK).unwrap();
    let mut rng = XorShift(0x7a11_0c8e_5eed_0001);
    for _ in 0..2000 {
        let guard = f.mem.memory();
        // Requests of every type and plausible ranges where the buffers mostly land.
        for offset in (0..0x4000u64).step_by(24) {
            let bytes = request_bytes(
                (rng.next() % 5) as u16,
                REGION + (rng.next() % (BLOCKS + 2)) * BLOCK,
                (rng.next() % 4) as u16,
            );
            guard
                .write_slice(&bytes, GuestAddress(0x10_0000 + offset))
                .unwrap();
        }
        let vq = MockSplitQueue::new(&*guard, 16);
        hostile_queue(&vq, &mut rng);
        let mut queue: Queue = vq.create_queue().unwrap();
        let _ = process_queue(&mut f.handler, 0, &mut queue, &guard);
        let state = f.handle.state();
        let plugged: u64 = state
            .plugged
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        assert_eq!(plugged * BLOCK, f.handle.plugged_size());
    }
}

#[test]
fn the_device_describes_itself_and_serves_its_queue_on_a_thread() {
    let discard = Arc::new(FakeDiscard::default());
    let mut device = VirtioMem::new(geometry(), discard).unwrap();
    assert_eq!(device.device_type(), VirtioDeviceType::Mem);
    assert_eq!(device.queue_max_sizes(), &[VIRTIO_MEM_QUEUE_SIZE]);
    device.ack_features(u64::MAX);
    assert_eq!(device.acked_features(), COMMON_FEATURES);
    // The configuration is read-only.
    device.write_config(48, &u64::MAX.to_le_bytes());
    let handle = device.handle();
    assert_eq!(handle.requested_size(), 0);
    assert!(device.reset().is_none());
    handle.set_requested_size(2 * BLOCK).unwrap();

    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
    let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let doorbell = event.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    let interrupt = Arc::new(interrupt);
    let wrong = vec![(1, vq.create_queue().unwrap(), event.try_clone().unwrap())];
    assert!(matches!(
        device.activate(mem.clone(), interrupt.clone(), wrong),
        Err(ActivateError::BadQueues(_))
    ));
    device
        .activate(
            mem.clone(),
            interrupt.clone(),
            vec![(0, vq.create_queue().unwrap(), event)],
        )
        .unwrap();
    let again = vec![(0, vq.create_queue().unwrap(), doorbell.try_clone().unwrap())];
    assert!(matches!(
        device.activate(mem.clone(), interrupt.clone(), again),
        Err(ActivateError::AlreadyActive)
    ));
    guard
        .write_slice(&request_bytes(0, REGION, 2), GuestAddress(REQ))
        .unwrap();
    vq.add_desc_chains(
        &[desc(REQ, 24, false, Some(1)), desc(RESP, 10, true, None)],
        0,
    )
    .unwrap();
    doorbell.write(1).unwrap();
    assert_eq!(
        next_report(&rx),
        Reported::Interrupt(VirtioInterruptType::Queue(0))
    );
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 10);
    assert_eq!(handle.plugged_size(), 2 * BLOCK);
    let events = device.reset().unwrap();
    assert_eq!(events.len(), 1);
    // A reset keeps the plugged blocks (the driver unplugs them when it starts again).
    assert_eq!(handle.plugged_size(), 2 * BLOCK);
}
