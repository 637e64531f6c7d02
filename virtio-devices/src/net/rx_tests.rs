use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::*;
use crate::counters::DeviceCounters;
use crate::device::GuestMemory;
use crate::test_queue::DriverQueue;
use crate::test_utils::{guest_memory, MEM_SIZE};

const RING: u64 = 0x1_0000;
const BUF: u64 = 0x10_0000;

/// A frame of `len` bytes (header included): a zero header, then a counting pattern.
fn frame(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| if i < VNET_HDR_LEN { 0 } else { (i % 251) as u8 })
        .collect()
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.memory()
        .read_slice(&mut bytes, GuestAddress(addr))
        .unwrap();
    bytes
}

/// The frame with `num_buffers` set as the device must.
fn expected(frame: &[u8], buffers: u16) -> Vec<u8> {
    let mut expected = frame.to_vec();
    expected[10..12].copy_from_slice(&buffers.to_le_bytes());
    expected
}

fn deliver(mem: &GuestMemory, queue: &mut Queue, frame: &[u8], mergeable: bool) -> Delivery {
    let mut frame = frame.to_vec();
    deliver_frame(
        queue,
        0,
        &mem.memory(),
        &mut frame,
        mergeable,
        &NetCounters::default(),
    )
    .unwrap()
}

#[test]
fn a_frame_fills_one_buffer_without_mergeable_buffers() {
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    // The header split over two descriptors, as a driver may do.
    dq.add(&[(BUF, 4, true), (BUF + 0x1000, 2000, true)]);
    let frame = frame(1000);
    assert_eq!(
        deliver(&mem, &mut queue, &frame, false),
        Delivery::Delivered { buffers: 1 }
    );
    assert_eq!(dq.used_idx(), 1);
    assert_eq!(dq.used(0), (0, 1000));
    let mut got = read(&mem, BUF, 4);
    got.extend(read(&mem, BUF + 0x1000, 996));
    assert_eq!(got, expected(&frame, 1));
    // Nothing past the frame was touched.
    assert_eq!(read(&mem, BUF + 0x1000 + 996, 4), [0; 4]);
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    dq.add(&[(BUF, 1526, true)]);
    assert_eq!(
        deliver(&mem, &mut queue, &frame(3000), false),
        Delivery::Dropped { returned: false }
    );
    assert_eq!(dq.used_idx(), 0);
    assert_eq!(queue.next_avail(), 0);
    let small = frame(60);
    assert_eq!(
        deliver(&mem, &mut queue, &small, false),
        Delivery::Delivered { buffers: 1 }
    );
    assert_eq!(dq.used(0), (0, 60));
    assert_eq!(read(&mem, BUF, 60), expected(&small, 1));
}

#[test]
fn mergeable_buffers_take_a_frame_across_chains() {
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    for i in 0..3 {
        dq.add(&[(BUF + i * 0x1000, 1500, true)]);
    }
    let frame = frame(3200);
    assert_eq!(
        deliver(&mem, &mut queue, &frame, true),
        Delivery::Delivered { buffers: 3 }
    );
    assert_eq!(dq.used_idx(), 3);
    assert_eq!(dq.used(0), (0, 1500));
    assert_eq!(dq.used(1), (1, 1500));
    assert_eq!(dq.used(2), (2, 200));
    let mut got = Vec::new();
    for (i, len) in [(0u64, 1500usize), (1, 1500), (2, 200)] {
        got.extend(read(&mem, BUF + i * 0x1000, len));
    }
    assert_eq!(got, expected(&frame, 3));
}

#[test]
fn too_few_buffers_consume_nothing_and_ask_for_a_notification() {
    for event_idx in [false, true] {
        let mem = guest_memory();
        let mut dq = DriverQueue::new(&mem, RING, 16);
        let mut queue = dq.queue(event_idx);
        dq.add(&[(BUF, 1000, true)]);
        let frame = frame(3000);
        let Delivery::NoBuffers { seen } = deliver(&mem, &mut queue, &frame, true) else {
            panic!("the frame should wait for buffers");
        };
        assert_eq!(seen, 1);
        assert_eq!(queue.next_avail(), 0, "nothing consumed");
        assert_eq!(dq.used_idx(), 0);
        queue.disable_notification(&*mem.memory()).unwrap();
        assert!(!wait_for_buffers(&mut queue, 0, &mem.memory(), seen).unwrap());
        if event_idx {
            // The driver notifies once it makes entry 1 available.
            assert_eq!(dq.avail_event(), 1);
        } else {
            assert_eq!(dq.used_flags(), 0);
        }
        assert_eq!(queue.next_avail(), 0);
        dq.add(&[(BUF + 0x1000, 4000, true)]);
        // A buffer posted meanwhile is noticed at once.
        assert!(wait_for_buffers(&mut queue, 0, &mem.memory(), seen).unwrap());
        assert_eq!(
            deliver(&mem, &mut queue, &frame, true),
            Delivery::Delivered { buffers: 2 }
        );
        assert_eq!(dq.used(0), (0, 1000));
        assert_eq!(dq.used(1), (1, 2000));
    }
}

#[test]
fn an_empty_queue_waits() {
    let mem = guest_memory();
    let dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    assert_eq!(
        deliver(&mem, &mut queue, &frame(100), false),
        Delivery::NoBuffers { seen: 0 }
    );
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped() {
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 4);
    let mut queue = dq.queue(false);
    for i in 0..4 {
        dq.add(&[(BUF + i * 0x1000, 100, true)]);
    }
    assert_eq!(
        deliver(&mem, &mut queue, &frame(1000), true),
        Delivery::Dropped { returned: false }
    );
    assert_eq!(queue.next_avail(), 0);
    assert_eq!(
        deliver(&mem, &mut queue, &frame(300), true),
        Delivery::Delivered { buffers: 3 }
    );
}

#[test]
fn bad_chains_are_returned_empty_with_the_frame_dropped() {
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        vec![(BUF, 2000, false)],
        vec![(BUF, 100, true), (BUF + 0x1000, 2000, false)],
        vec![(MEM_SIZE as u64 - 100, 2000, true)],
        vec![(u64::MAX - 10, 2000, true)],
    ];
    for mergeable in [false, true] {
        for chain in &bad {
            let mem = guest_memory();
            let mut dq = DriverQueue::new(&mem, RING, 16);
            let mut queue = dq.queue(false);
            dq.add(chain);
            assert_eq!(
                deliver(&mem, &mut queue, &frame(1000), mergeable),
                Delivery::Dropped { returned: true },
                "{chain:?}"
            );
            assert_eq!(dq.used_idx(), 1);
            assert_eq!(dq.used(0).1, 0);
            assert_eq!(read(&mem, BUF, 16), [0; 16], "nothing written");
        }
    }
    // A good chain collected for a merged frame is returned too when a bad one follows.
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    dq.add(&[(BUF, 500, true)]);
    dq.add(&[(BUF + 0x1000, 2000, false)]);
    assert_eq!(
        deliver(&mem, &mut queue, &frame(1000), true),
        Delivery::Dropped { returned: true }
    );
    assert_eq!(dq.used_idx(), 2);
    assert_eq!((dq.used(0).1, dq.used(1).1), (0, 0));
    // With mergeable buffers the first chain must hold the header.
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    dq.add(&[(BUF, 8, true)]);
    dq.add(&[(BUF + 0x1000, 2000, true)]);
    assert_eq!(
        deliver(&mem, &mut queue, &frame(100), true),
        Delivery::Dropped { returned: true }
    );
}

#[test]
fn looping_chains_are_returned_empty() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    vq.add_desc_chains(
        &[
            crate::test_utils::desc(BUF, 100, true, Some(1)),
            crate::test_utils::desc(BUF + 0x1000, 100, true, Some(0)),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut frame = frame(150);
    let counters = NetCounters::default();
    assert_eq!(
        deliver_frame(&mut queue, 0, &guard, &mut frame, true, &counters).unwrap(),
        Delivery::Dropped { returned: true }
    );
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(counters.rx_dropped.get(), 1);
}

#[test]
fn deliveries_and_drops_are_counted_before_the_used_ring_shows_them() {
    let mem = guest_memory();
    let mut dq = DriverQueue::new(&mem, RING, 16);
    let mut queue = dq.queue(false);
    let counters = NetCounters::default();
    let deliver = |queue: &mut Queue, len: usize, mergeable: bool| {
        let mut frame = frame(len);
        deliver_frame(queue, 0, &mem.memory(), &mut frame, mergeable, &counters).unwrap()
    };
    // Nothing posted: the frame waits and nothing is counted.
    assert!(matches!(
        deliver(&mut queue, 100, false),
        Delivery::NoBuffers { .. }
    ));
    dq.add(&[(BUF, 1526, true)]);
    // Too big for the buffer, then one that fits.
    deliver(&mut queue, 3000, false);
    deliver(&mut queue, 60, false);
    // Spread over two mergeable buffers.
    dq.add(&[(BUF + 0x1000, 1000, true)]);
    dq.add(&[(BUF + 0x2000, 1000, true)]);
    deliver(&mut queue, 1500, true);
    // A bad chain.
    dq.add(&[(BUF + 0x3000, 1000, false)]);
    deliver(&mut queue, 100, true);
    assert_eq!(dq.used_idx(), 4);
    assert_eq!(
        counters.snapshot(),
        [
            ("rx_bytes", (60 - 12) + (1500 - 12)),
            ("rx_frames", 2),
            ("tx_bytes", 0),
            ("tx_frames", 0),
            ("rx_dropped", 2),
            ("tx_dropped", 0),
        ]
    );
}

#[test]
fn headers_are_fitted_to_the_negotiated_receive_offloads() {
    let none = TapOffloads::default();
    let all = TapOffloads::ALL;
    let mut header = [0u8; VNET_HDR_LEN];
    // DATA_VALID is cleared without GUEST_CSUM, kept with it.
    header[0] = 2;
    assert!(fit_header(&mut header, none));
    assert_eq!(header[0], 0);
    header[0] = 2 | 4;
    assert!(fit_header(&mut header, all));
    assert_eq!(header[0], 2, "RSC_INFO is never passed on");
    // A partial checksum or GSO the driver cannot take.
    header[0] = 1;
    assert!(!fit_header(&mut header, none));
    header[0] = 1;
    header[1] = 1;
    assert!(!fit_header(&mut header, none));
    assert!(fit_header(&mut header, all));
    assert!(!fit_header(&mut [0u8; 4], all), "runt");
}

#[test]
fn hostile_receive_chains_never_panic() {
    use crate::test_utils::{hostile_queue, XorShift};

    let mem = guest_memory();
    let counters = NetCounters::default();
    let mut rng = XorShift(0xfeed_f00d_dead_beef);
    for _ in 0..3000 {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        hostile_queue(&vq, &mut rng);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut frame = frame(rng.pick(&[12usize, 60, 1514, 4000, crate::net::MAX_FRAME_LEN]));
        let mergeable = rng.next().is_multiple_of(2);
        for _ in 0..4 {
            match deliver_frame(&mut queue, 0, &guard, &mut frame, mergeable, &counters) {
                Ok(Delivery::NoBuffers { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let used = vq.used().idx().load();
        for slot in 0..used.min(8) {
            let elem = vq.used().ring().ref_at(usize::from(slot)).unwrap().load();
            assert!(elem.len() as usize <= frame.len());
        }
    }
}
