use std::sync::mpsc::Receiver;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;
use crate::test_queue::{Buf, DriverQueue};
use crate::test_utils::{guest_memory, next_report, RecordingInterrupt, Reported};
use crate::worker::process_queue;

const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const BUFFERS: u64 = 0x10_0000;

/// A writer the test can read back.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedOutput {
    fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// An active console and its driver side.
struct Rig {
    console: Console,
    output: SharedOutput,
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    kicks: [EventFd; 2],
    reports: Receiver<Reported>,
    next_buffer: u64,
}

impl Rig {
    /// A console; `early` is queued as input before activation.
    fn new(early: &[u8]) -> Self {
        let output = SharedOutput::default();
        let mut console = Console::new(Box::new(output.clone())).unwrap();
        console.input().enqueue_input(early).unwrap();
        let mem = guest_memory();
        let rx = DriverQueue::new(&mem, RX_RING, 16);
        let tx = DriverQueue::new(&mem, TX_RING, 16);
        let events = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let kicks = [
            events[0].try_clone().unwrap(),
            events[1].try_clone().unwrap(),
        ];
        let (interrupt, reports) = RecordingInterrupt::new();
        let [rx_event, tx_event] = events;
        console.ack_features(console.features());
        console
            .activate(
                mem.clone(),
                Arc::new(interrupt),
                vec![
                    (0, rx.queue(false), rx_event),
                    (1, tx.queue(false), tx_event),
                ],
            )
            .unwrap();
        Self {
            console,
            output,
            mem,
            rx,
            tx,
            kicks,
            reports,
            next_buffer: BUFFERS,
        }
    }

    fn buffer(&mut self) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += 0x1000;
        addr
    }

    fn wait(&self, queue: &DriverQueue, count: u16) {
        while queue.used_idx() < count {
            next_report(&self.reports);
        }
    }

    /// Posts an output chain holding `pieces` and notifies.
    fn write(&mut self, pieces: &[&[u8]]) {
        let mut bufs: Vec<Buf> = Vec::new();
        for piece in pieces {
            let addr = self.buffer();
            self.mem
                .memory()
                .write_slice(piece, GuestAddress(addr))
                .unwrap();
            bufs.push((addr, piece.len() as u32, false));
        }
        self.tx.add(&bufs);
        self.kicks[1].write(1).unwrap();
    }

    /// Posts a receive buffer of `len` bytes and notifies; returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let addr = self.buffer();
        self.rx.add(&[(addr, len, true)]);
        self.kicks[0].write(1).unwrap();
        addr
    }

    fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; len as usize];
        self.mem
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        bytes
    }
}

#[test]
fn the_device_describes_itself() {
    let mut console = Console::new(Box::new(io::sink())).unwrap();
    assert_eq!(console.device_type(), VirtioDeviceType::Console);
    assert_eq!(console.device_type().id(), 3);
    assert_eq!(console.queue_max_sizes(), &[256, 256]);
    assert_ne!(console.features() & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE), 0);
    assert_eq!(console.features() & 0b11, 0, "neither SIZE nor MULTIPORT");
    console.ack_features(u64::MAX);
    assert_eq!(console.acked_features(), console.features());
    let mut config = [0xffu8; 16];
    console.read_config(0, &mut config);
    assert_eq!(config, [0; 16]);
    assert!(console.reset().is_none());
}

#[test]
fn guest_output_reaches_the_writer_in_order() {
    let mut rig = Rig::new(b"");
    rig.write(&[b"hello", b", "]);
    rig.write(&[b"world\n"]);
    rig.wait(&rig.tx, 2);
    assert_eq!(rig.output.contents(), b"hello, world\n");
    assert_eq!((rig.tx.used(0).1, rig.tx.used(1).1), (0, 0));
    let counters = rig.console.counters().unwrap();
    assert_eq!(counters.snapshot(), [("rx_bytes", 0), ("tx_bytes", 13)]);
    // An emergency write is output too; a reset keeps the counts.
    rig.console.write_config(EMERG_WR_OFFSET, b"!");
    rig.console.reset().unwrap();
    assert_eq!(counters.snapshot(), [("rx_bytes", 0), ("tx_bytes", 14)]);
}

#[test]
fn host_input_reaches_guest_buffers_as_they_are_posted() {
    let mut rig = Rig::new(b"early");
    // Input queued before activation is delivered once there is a buffer.
    let first = rig.post_rx(8);
    rig.wait(&rig.rx, 1);
    assert_eq!(rig.rx.used(0).1, 5);
    assert_eq!(rig.read(first, 5), b"early");

    // More input than buffers: what fits now, the rest when the driver posts more.
    let second = rig.post_rx(8);
    let input = rig.console.input();
    input.enqueue_input(b"0123456789abcdefghij").unwrap();
    rig.wait(&rig.rx, 2);
    assert_eq!(rig.read(second, 8), b"01234567");
    assert_eq!(input.capacity(), CONSOLE_INPUT_CAPACITY - 12);
    let third = rig.post_rx(8);
    let fourth = rig.post_rx(8);
    rig.wait(&rig.rx, 4);
    assert_eq!(rig.read(third, 8), b"89abcdef");
    assert_eq!(rig.rx.used(3).1, 4);
    assert_eq!(rig.read(fourth, 4), b"ghij");
    assert_eq!(input.capacity(), CONSOLE_INPUT_CAPACITY);
    let counters = rig.console.counters().unwrap().snapshot();
    assert_eq!(counters, [("rx_bytes", 25), ("tx_bytes", 0)]);
}

#[test]
fn a_full_input_buffer_says_how_much_it_took() {
    let console = Console::new(Box::new(io::sink())).unwrap();
    let input = console.input();
    input.enqueue_input(b"").unwrap();
    let big = vec![b'x'; CONSOLE_INPUT_CAPACITY + 10];
    match input.enqueue_input(&big) {
        Err(ConsoleError::InputFull { accepted, len }) => {
            assert_eq!((accepted, len), (CONSOLE_INPUT_CAPACITY, big.len()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(input.capacity(), 0);
    let err = input.enqueue_input(b"y").unwrap_err();
    assert!(err.to_string().contains("0 of 1 bytes"), "{err}");
}

#[test]
fn emergency_writes_reach_the_output() {
    let output = SharedOutput::default();
    let mut console = Console::new(Box::new(output.clone())).unwrap();
    console.write_config(EMERG_WR_OFFSET, &u32::from(b'!').to_le_bytes());
    console.write_config(EMERG_WR_OFFSET, b"?");
    // Other fields are read-only.
    console.write_config(0, &[b'x'; 4]);
    console.write_config(EMERG_WR_OFFSET, &[]);
    assert_eq!(output.contents(), b"!?");
}

#[test]
fn bad_chains_are_used_empty_and_lose_nothing() {
    let mut rig = Rig::new(b"");
    // An output chain with a device-writable buffer is skipped; the next one is written.
    let addr = rig.buffer();
    rig.tx.add(&[(addr, 4, false), (addr + 4, 4, true)]);
    rig.write(&[b"ok"]);
    rig.wait(&rig.tx, 2);
    assert_eq!(rig.output.contents(), b"ok");
    // An input chain with a driver-readable buffer is skipped; the input goes into the next one.
    let bad = rig.buffer();
    rig.rx.add(&[(bad, 8, false)]);
    rig.rx
        .add(&[(crate::test_utils::MEM_SIZE as u64 - 2, 8, true)]);
    let good = rig.post_rx(8);
    rig.console.input().enqueue_input(b"kept").unwrap();
    rig.wait(&rig.rx, 3);
    assert_eq!(
        (rig.rx.used(0).1, rig.rx.used(1).1, rig.rx.used(2).1),
        (0, 0, 4)
    );
    assert_eq!(rig.read(good, 4), b"kept");
    assert_eq!(rig.read(bad, 4), [0; 4]);
}

#[test]
fn activation_checks_the_queues() {
    let mut console = Console::new(Box::new(io::sink())).unwrap();
    let mem = guest_memory();
    let interrupt = Arc::new(RecordingInterrupt::new().0);
    let queue = |index: usize| {
        (
            index,
            DriverQueue::new(&mem, RX_RING + index as u64 * 0x1000, 16).queue(false),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
    };
    assert!(matches!(
        console.activate(mem.clone(), interrupt.clone(), Vec::new()),
        Err(ActivateError::BadQueues(_))
    ));
    let err = console
        .activate(mem.clone(), interrupt.clone(), vec![queue(2)])
        .unwrap_err();
    assert!(err.to_string().contains("no queue 2"), "{err}");
    // Transmit only is fine (a driver may not want input).
    console
        .activate(mem.clone(), interrupt.clone(), vec![queue(1)])
        .unwrap();
    assert!(matches!(
        console.activate(mem.clone(), interrupt, vec![queue(0)]),
        Err(ActivateError::AlreadyActive)
    ));
    let events = console.reset().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, 1);
}

#[test]
fn hostile_chains_never_panic() {
    use crate::test_utils::{hostile_queue, XorShift};

    let output = SharedOutput::default();
    let counters = Arc::new(ConsoleCounters::default());
    let mut handler = OutputHandler {
        output: Arc::new(Mutex::new(Box::new(output))),
        buf: vec![0; OUTPUT_CHUNK],
        failing: false,
        counters: counters.clone(),
    };
    let mem = guest_memory();
    let mut rng = XorShift(0xc0ff_ee00_1234_5678);
    for _ in 0..3000 {
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        hostile_queue(&vq, &mut rng);
        let mut queue: Queue = vq.create_queue().unwrap();
        if rng.next().is_multiple_of(2) {
            let _ = process_queue(&mut handler, 1, &mut queue, &guard);
        } else {
            let mut input: VecDeque<u8> = (0..rng.next() % 5000).map(|i| i as u8).collect();
            let before = input.len();
            let delivered_before = counters.rx_bytes.get();
            if deliver_input(&mut queue, 0, &guard, &mut input, &counters.rx_bytes).is_ok() {
                let used = vq.used().idx().load();
                let delivered: u32 = (0..used.min(8))
                    .map(|slot| {
                        vq.used()
                            .ring()
                            .ref_at(usize::from(slot))
                            .unwrap()
                            .load()
                            .len()
                    })
                    .sum();
                assert!(delivered as usize <= before);
                let counted = counters.rx_bytes.get() - delivered_before;
                assert_eq!(counted as usize, before - input.len());
            }
        }
    }
}
