use std::io::Write;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::test_utils::{desc, guest_memory, next_report, RecordingInterrupt, Reported};
use crate::worker::process_queue;
use crate::VirtioInterruptType;

/// A file source holding bytes 0, 1, 2, ... (mod 251).
fn pattern_source(len: usize) -> (TempFile, RngSource) {
    let file = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    file.as_file().write_all(&bytes).unwrap();
    let source = RngSource::File(file.as_path().to_path_buf());
    (file, source)
}

/// Posts one chain and serves it; returns the used length.
fn serve(handler: &mut RngHandler, descs: &[RawDescriptor]) -> u32 {
    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    process_queue(handler, 0, &mut queue, &guard).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    vq.used().ring().ref_at(0).unwrap().load().len()
}

/// Serves `descs` against a memory the test can inspect afterwards.
fn serve_in(mem: &GuestMemory, handler: &mut RngHandler, descs: &[RawDescriptor]) -> u32 {
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    process_queue(handler, 0, &mut queue, &guard).unwrap();
    vq.used().ring().ref_at(0).unwrap().load().len()
}

fn handler(source: &RngSource) -> RngHandler {
    RngHandler::new(Rng::new(source).unwrap().entropy, Arc::default())
}

#[test]
fn writable_buffers_are_filled_from_the_source_in_order() {
    let (_file, source) = pattern_source(4096);
    let mut handler = handler(&source);
    let mem = guest_memory();
    let len = serve_in(
        &mem,
        &mut handler,
        &[
            desc(0x10_0000, 16, true, Some(1)),
            desc(0x20_0000, 300, true, None),
        ],
    );
    assert_eq!(len, 316);
    assert_eq!(handler.counters.snapshot(), [("bytes", 316)]);
    let guard = mem.memory();
    let mut first = [0u8; 16];
    guard
        .read_slice(&mut first, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(first.to_vec(), (0..16).collect::<Vec<u8>>());
    let mut second = vec![0u8; 301];
    guard
        .read_slice(&mut second, GuestAddress(0x20_0000))
        .unwrap();
    let expected: Vec<u8> = (16..316).map(|i| (i % 251) as u8).collect();
    assert_eq!(second[..300], expected[..]);
    assert_eq!(second[300], 0, "nothing written past the buffer");
}

#[test]
fn getrandom_fills_the_buffer() {
    let mut handler = handler(&RngSource::Getrandom);
    let mem = guest_memory();
    let len = serve_in(&mem, &mut handler, &[desc(0x10_0000, 64, true, None)]);
    assert_eq!(len, 64);
    let mut bytes = [0u8; 64];
    mem.memory()
        .read_slice(&mut bytes, GuestAddress(0x10_0000))
        .unwrap();
    // 64 zero bytes from getrandom has probability 2^-512.
    assert!(bytes.iter().any(|byte| *byte != 0));
}

#[test]
fn requests_are_capped() {
    let mut handler = handler(&RngSource::Getrandom);
    let len = serve(
        &mut handler,
        &[
            desc(0x10_0000, 0x8000, true, Some(1)),
            desc(0x20_0000, 0x10000, true, None),
        ],
    );
    assert_eq!(len as usize, MAX_BYTES_PER_REQUEST);
}

#[test]
fn a_short_source_gives_what_it_has() {
    let (_file, source) = pattern_source(10);
    let mut handler = handler(&source);
    assert_eq!(serve(&mut handler, &[desc(0x10_0000, 64, true, None)]), 10);
    assert_eq!(serve(&mut handler, &[desc(0x10_0000, 64, true, None)]), 0);
    assert_eq!(
        handler.counters.bytes.get(),
        10,
        "only the bytes given count"
    );
}

#[test]
fn bad_chains_are_skipped_with_length_zero() {
    let (_file, source) = pattern_source(4096);
    let mut handler = handler(&source);
    let mem = guest_memory();
    // A driver-readable descriptor anywhere in the chain.
    let cases: Vec<Vec<RawDescriptor>> = vec![
        vec![desc(0x10_0000, 64, false, None)],
        vec![
            desc(0x10_0000, 64, true, Some(1)),
            desc(0x20_0000, 8, false, None),
        ],
        // A loop.
        vec![
            desc(0x10_0000, 64, true, Some(1)),
            desc(0x20_0000, 8, true, Some(0)),
        ],
        // Outside guest memory, or straddling its end.
        vec![desc(0x4000_0000, 64, true, None)],
        vec![desc(crate::test_utils::MEM_SIZE as u64 - 8, 64, true, None)],
        vec![desc(u64::MAX - 3, 64, true, None)],
    ];
    for descs in cases {
        assert_eq!(serve_in(&mem, &mut handler, &descs), 0, "{descs:?}");
    }
    assert_eq!(handler.counters.bytes.get(), 0);
    // Nothing was written anywhere.
    let mut bytes = [0u8; 64];
    mem.memory()
        .read_slice(&mut bytes, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(bytes, [0; 64]);
}

#[test]
fn a_missing_source_file_is_reported_with_its_path() {
    let err = Rng::new(&RngSource::File("/nonexistent/entropy".into())).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("/nonexistent/entropy"), "{message}");
}

#[test]
fn the_device_describes_itself_and_runs_on_its_thread() {
    let mut rng = Rng::new(&RngSource::Getrandom).unwrap();
    assert_eq!(rng.device_type(), VirtioDeviceType::Rng);
    assert_eq!(rng.queue_max_sizes(), &[256]);
    rng.ack_features(u64::MAX);
    assert_eq!(rng.acked_features(), COMMON_FEATURES);
    let mut data = [0xffu8; 4];
    rng.read_config(0, &mut data);
    assert_eq!(data, [0; 4]);
    assert!(rng.reset().is_none());

    let mem = guest_memory();
    let guard = mem.memory();
    let vq = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
    let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let doorbell = event.try_clone().unwrap();
    let (interrupt, rx) = RecordingInterrupt::new();
    let interrupt = Arc::new(interrupt);
    // Only queue 0 is acceptable.
    let wrong = vec![(1, vq.create_queue().unwrap(), event.try_clone().unwrap())];
    assert!(matches!(
        rng.activate(mem.clone(), interrupt.clone(), wrong),
        Err(ActivateError::BadQueues(_))
    ));
    rng.activate(
        mem.clone(),
        interrupt.clone(),
        vec![(0, vq.create_queue().unwrap(), event)],
    )
    .unwrap();
    let again = vec![(0, vq.create_queue().unwrap(), doorbell.try_clone().unwrap())];
    assert!(matches!(
        rng.activate(mem.clone(), interrupt.clone(), again),
        Err(ActivateError::AlreadyActive)
    ));
    vq.add_desc_chains(&[desc(0x10_0000, 32, true, None)], 0)
        .unwrap();
    doorbell.write(1).unwrap();
    assert_eq!(
        next_report(&rx),
        Reported::Interrupt(VirtioInterruptType::Queue(0))
    );
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 32);
    let counters = rng.counters().unwrap();
    assert_eq!(counters.snapshot(), [("bytes", 32)]);
    let events = rng.reset().unwrap();
    assert_eq!(events.len(), 1);
    assert!(rng.reset().is_none());
    // The counters outlive a reset and go on counting after the next activation.
    assert_eq!(counters.snapshot(), [("bytes", 32)]);
    let (_, doorbell) = events.into_iter().next().unwrap();
    let vq = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
    let again = doorbell.try_clone().unwrap();
    rng.activate(
        mem.clone(),
        interrupt,
        vec![(0, vq.create_queue().unwrap(), again)],
    )
    .unwrap();
    vq.add_desc_chains(&[desc(0x10_0000, 16, true, None)], 0)
        .unwrap();
    doorbell.write(1).unwrap();
    assert_eq!(
        next_report(&rx),
        Reported::Interrupt(VirtioInterruptType::Queue(0))
    );
    assert_eq!(counters.snapshot(), [("bytes", 48)]);
    assert_eq!(rng.counters().unwrap().snapshot(), [("bytes", 48)]);
    rng.reset().unwrap();
}

#[test]
fn hostile_chains_never_panic() {
    use crate::test_utils::{hostile_queue, XorShift};

    let mut handler = handler(&RngSource::Getrandom);
    let mem = guest_memory();
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    for _ in 0..3000 {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        hostile_queue(&vq, &mut rng);
        let mut queue: Queue = vq.create_queue().unwrap();
        if process_queue(&mut handler, 0, &mut queue, &guard).is_ok() {
            for slot in 0..vq.used().idx().load() {
                let used = vq.used().ring().ref_at(usize::from(slot)).unwrap().load();
                assert!(used.len() as usize <= MAX_BYTES_PER_REQUEST);
            }
        }
    }
}
