use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;
use crate::test_utils::{desc, guest_memory, next_report, RecordingInterrupt, Reported};

/// Records (queue, descriptor count) per chain and reports `len` bytes used.
#[derive(Clone, Default)]
struct CountingHandler {
    seen: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl ChainHandler for CountingHandler {
    fn handle_chain(
        &mut self,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        _mem: &GuestMemoryMmap,
    ) -> u32 {
        let count = chain.count();
        self.seen.lock().unwrap().push((queue_index, count));
        count as u32 * 10
    }
}

#[test]
fn process_queue_serves_every_chain_and_fills_the_used_ring() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    vq.add_desc_chains(
        &[
            desc(0x10_0000, 16, false, Some(1)),
            desc(0x10_1000, 512, true, None),
            desc(0x10_2000, 16, true, None),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut handler = CountingHandler::default();
    let notify = process_queue(&mut handler, 3, &mut queue, &guard).unwrap();
    assert!(notify);
    assert_eq!(*handler.seen.lock().unwrap(), vec![(3, 2), (3, 1)]);
    assert_eq!(vq.used().idx().load(), 2);
    let first = vq.used().ring().ref_at(0).unwrap().load();
    let second = vq.used().ring().ref_at(1).unwrap().load();
    assert_eq!((first.id(), first.len()), (0, 20));
    assert_eq!((second.id(), second.len()), (2, 10));
    // Nothing new: no interrupt.
    assert!(!process_queue(&mut handler, 3, &mut queue, &guard).unwrap());
}

#[test]
fn an_available_index_running_ahead_of_the_ring_is_corruption() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(100);
    let mut handler = CountingHandler::default();
    let err = process_queue(&mut handler, 0, &mut queue, &guard).unwrap_err();
    assert!(matches!(err, QueueError::Corrupt { index: 0, .. }), "{err}");
    assert!(handler.seen.lock().unwrap().is_empty());
}

#[test]
fn a_head_index_outside_the_table_is_corruption() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(40);
    vq.avail().idx().store(1);
    let mut handler = CountingHandler::default();
    let err = process_queue(&mut handler, 0, &mut queue, &guard).unwrap_err();
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");
    // The handler saw the chain as empty (the head is outside the table) and did not panic.
    assert_eq!(*handler.seen.lock().unwrap(), vec![(0, 0)]);
}

#[test]
fn the_thread_serves_notified_queues_and_gives_the_events_back() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq0 = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
    let vq1 = MockSplitQueue::create(&*guard, GuestAddress(0x8000), 16);
    let queues = vec![
        (
            0,
            vq0.create_queue().unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ),
        (
            5,
            vq1.create_queue().unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ),
    ];
    let notify1 = queues[1].2.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    let handler = CountingHandler::default();
    let worker = Worker::spawn(
        "test-worker",
        handler.clone(),
        mem.clone(),
        Arc::new(interrupt),
        queues,
    )
    .unwrap();
    vq1.add_desc_chains(&[desc(0x10_0000, 64, true, None)], 0)
        .unwrap();
    notify1.write(1).unwrap();
    assert_eq!(
        next_report(&rx),
        Reported::Interrupt(VirtioInterruptType::Queue(5))
    );
    assert_eq!(*handler.seen.lock().unwrap(), vec![(5, 1)]);
    assert_eq!(vq1.used().idx().load(), 1);
    let events = worker.stop();
    let indices: Vec<usize> = events.iter().map(|(index, _)| *index).collect();
    assert_eq!(indices, vec![0, 5]);
}

#[test]
fn the_thread_asks_for_a_reset_when_a_queue_is_corrupt_and_stops_serving_it() {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let notify = event.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    let handler = CountingHandler::default();
    let worker = Worker::spawn(
        "test-worker",
        handler.clone(),
        mem.clone(),
        Arc::new(interrupt),
        vec![(0, vq.create_queue().unwrap(), event)],
    )
    .unwrap();
    vq.avail().idx().store(0x8000);
    notify.write(1).unwrap();
    assert_eq!(next_report(&rx), Reported::NeedsReset);
    drop(worker);
    // Dropping the worker joined the thread: nothing else was reported.
    assert!(rx.try_recv().is_err());
    assert!(handler.seen.lock().unwrap().is_empty());
}
