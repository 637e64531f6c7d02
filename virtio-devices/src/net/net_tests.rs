//! virtio-net against real taps, each test in its own network namespace (see `test_netns`).

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::Receiver;

use epoll::{Event, Events};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::handler::TAP_TOKEN_BASE;
use super::*;
use crate::io_worker::{IoHandler, Poller};
use crate::tap::{if_index, VNET_HDR_LEN};
use crate::test_netns::{in_private_netns, test_frame, PacketSocket};
use crate::test_queue::DriverQueue;
use crate::test_utils::{guest_memory, next_report, RecordingInterrupt, Reported};
use crate::worker::process_queue;
use crate::VirtioInterruptType;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Queue `i`'s rings are at `RINGS + i * 0x1_0000`.
const RINGS: u64 = 0x1_0000;
/// Buffers are 4 KiB apart from here.
const BUFFERS: u64 = 0x20_0000;
const RX_BUFFER_LEN: u32 = 2048;

fn ring_base(index: usize) -> u64 {
    RINGS + index as u64 * 0x1_0000
}

fn bit(feature: u32) -> u64 {
    1 << feature
}

/// A device activated with every queue, its driver side, and a packet socket on its tap.
struct Rig {
    net: Net,
    mem: GuestMemory,
    queues: Vec<DriverQueue>,
    kicks: Vec<EventFd>,
    reports: Receiver<Reported>,
    socket: PacketSocket,
    /// Next free 4 KiB buffer.
    next_buffer: u64,
    /// Address of each posted receive chain, by (queue, head).
    rx_buffers: HashMap<(usize, u32), u64>,
}

impl Rig {
    /// A device with `num_queues` queues whose driver accepts `features` (of those offered).
    fn new(num_queues: u16, features: u64) -> Self {
        let mut net = Net::new(&NetOptions {
            mac: Some(GUEST_MAC),
            num_queues,
            ..NetOptions::default()
        })
        .unwrap();
        let socket = PacketSocket::bind(net.if_name());
        let mem = guest_memory();
        net.ack_features(features);
        let count = net.queue_max_sizes().len();
        let queues: Vec<DriverQueue> = (0..count)
            .map(|index| DriverQueue::new(&mem, ring_base(index), 256))
            .collect();
        let events: Vec<EventFd> = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = events.iter().map(|e| e.try_clone().unwrap()).collect();
        let (interrupt, reports) = RecordingInterrupt::new();
        let enabled = queues
            .iter()
            .zip(events)
            .enumerate()
            .map(|(index, (queue, event))| (index, queue.queue(false), event))
            .collect();
        net.activate(mem.clone(), Arc::new(interrupt), enabled)
            .unwrap();
        Self {
            net,
            mem,
            queues,
            kicks,
            reports,
            socket,
            next_buffer: BUFFERS,
            rx_buffers: HashMap::new(),
        }
    }

    fn buffer(&mut self) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += 0x1000;
        addr
    }

    /// Waits until queue `index` has used `count` chains in total.
    fn wait_used(&self, index: usize, count: u16) {
        while self.queues[index].used_idx() < count {
            next_report(&self.reports);
        }
    }

    /// Posts one driver-readable chain of `bytes` split into pieces of `piece` bytes on `index` and notifies.
    fn post_tx(&mut self, index: usize, bytes: &[u8], piece: usize) {
        let mut bufs = Vec::new();
        for chunk in bytes.chunks(piece) {
            let addr = self.buffer();
            self.mem
                .memory()
                .write_slice(chunk, GuestAddress(addr))
                .unwrap();
            bufs.push((addr, chunk.len() as u32, false));
        }
        self.queues[index].add(&bufs);
        self.kicks[index].write(1).unwrap();
    }

    /// Posts `count` receive buffers on `index` and notifies.
    fn post_rx(&mut self, index: usize, count: usize) {
        for _ in 0..count {
            let addr = self.buffer();
            let head = self.queues[index].add(&[(addr, RX_BUFFER_LEN, true)]);
            self.rx_buffers.insert((index, u32::from(head)), addr);
        }
        self.kicks[index].write(1).unwrap();
    }

    /// The contents of used receive chain `n` of `index`.
    fn received(&self, index: usize, n: u16) -> Vec<u8> {
        let (head, len) = self.queues[index].used(n);
        let addr = self.rx_buffers[&(index, head)];
        let mut bytes = vec![0u8; len as usize];
        self.mem
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        bytes
    }

    /// Sends a control command and returns the ack byte.
    fn control(&mut self, command: &[u8]) -> u8 {
        let index = self.queues.len() - 1;
        let (cmd, ack) = (self.buffer(), self.buffer());
        let guard = self.mem.memory();
        guard.write_slice(command, GuestAddress(cmd)).unwrap();
        guard.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
        drop(guard);
        let done = self.queues[index].used_idx() + 1;
        self.queues[index].add(&[(cmd, command.len() as u32, false), (ack, 1, true)]);
        self.kicks[index].write(1).unwrap();
        self.wait_used(index, done);
        assert_eq!(self.queues[index].used(done - 1).1, 1);
        self.mem.memory().read_obj(GuestAddress(ack)).unwrap()
    }
}

/// A virtio-net header with no offload, then `frame`.
fn packet(frame: &[u8]) -> Vec<u8> {
    let mut packet = vec![0u8; VNET_HDR_LEN];
    packet.extend_from_slice(frame);
    packet
}

/// An IPv4/UDP frame to the guest from source port `port`.
fn udp_frame(port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&9999u16.to_be_bytes());
    frame.extend_from_slice(&[0, 10, 0, 0, b'm', b'q']);
    frame
}

fn is_udp_test_frame(frame: &[u8]) -> bool {
    frame.len() == 44 && frame[12..14] == [0x08, 0x00] && frame[36..38] == 9999u16.to_be_bytes()
}

#[test]
fn bad_options_are_refused_before_a_tap_is_opened() {
    let cases = [
        (
            NetOptions {
                num_queues: 0,
                ..NetOptions::default()
            },
            "queue count 0",
        ),
        (
            NetOptions {
                num_queues: 3,
                ..NetOptions::default()
            },
            "queue count 3",
        ),
        (
            NetOptions {
                num_queues: 256,
                ..NetOptions::default()
            },
            "from 2 to 254",
        ),
        (
            NetOptions {
                queue_size: 100,
                ..NetOptions::default()
            },
            "queue size 100",
        ),
        (
            NetOptions {
                mac: Some([1, 0, 0, 0, 0, 1]),
                ..NetOptions::default()
            },
            "01:00:00:00:00:01 is a multicast",
        ),
    ];
    for (options, message) in cases {
        let err = Net::new(&options).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
}

#[test]
fn random_macs_are_unicast_and_locally_administered() {
    let mac = random_mac().unwrap();
    assert_eq!(mac[0] & 3, 2);
    assert_ne!(random_mac().unwrap(), mac);
}

#[test]
fn feature_bits_follow_the_offloads_and_their_prerequisites() {
    assert_eq!(offload_features(TapOffloads::default()), 0);
    let all = offload_features(TapOffloads::ALL);
    for feature in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
    ] {
        assert_ne!(all & bit(feature), 0, "{feature}");
    }
    // The driver's view: TSO without the checksum offload means nothing.
    let acked = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_CSUM);
    assert_eq!(negotiated_offloads(acked, false), TapOffloads::default());
    let acked = all & !bit(VIRTIO_NET_F_HOST_TSO4) & !bit(VIRTIO_NET_F_HOST_TSO6);
    let host = negotiated_offloads(acked, true);
    assert!(
        host.csum && !host.tso4 && !host.tso_ecn && host.ufo,
        "{host:?}"
    );
    assert_eq!(negotiated_offloads(all, false), TapOffloads::ALL);
}

#[test]
fn the_device_describes_itself() {
    in_private_netns("net describe", || {
        let mut net = Net::new(&NetOptions {
            mac: Some(GUEST_MAC),
            ..NetOptions::default()
        })
        .unwrap();
        assert_eq!(net.device_type(), VirtioDeviceType::Net);
        assert!(net.if_name().starts_with("tap"), "{}", net.if_name());
        assert!(net.taps[0].is_up().unwrap());
        assert_eq!(net.mac(), GUEST_MAC);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let features = net.features();
        for feature in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
        ] {
            assert_ne!(features & bit(feature), 0, "feature {feature}");
        }
        assert_eq!(
            features & (bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ)),
            0
        );
        let mut config = [0u8; 12];
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &GUEST_MAC);
        assert_eq!(&config[6..8], &1u16.to_le_bytes(), "LINK_UP");
        assert_eq!(&config[8..10], &1u16.to_le_bytes(), "one pair");
        net.write_config(0, &[0xff; 6]);
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &GUEST_MAC, "the MAC is read-only");
        net.ack_features(u64::MAX);
        assert_eq!(net.acked_features(), features);
        assert!(net.reset().is_none());
    });
}

#[test]
fn transmitted_frames_reach_the_tap_and_bad_chains_do_not() {
    in_private_netns("net transmit", || {
        let mut rig = Rig::new(2, bit(VIRTIO_F_VERSION_1));
        // A chain with a device-writable descriptor is skipped.
        let bad = test_frame([0xff; 6], GUEST_MAC, b"never sent");
        let bad_packet = packet(&bad);
        let addr = rig.buffer();
        rig.mem
            .memory()
            .write_slice(&bad_packet, GuestAddress(addr))
            .unwrap();
        rig.queues[1].add(&[(addr, 12, false), (addr + 12, bad.len() as u32, true)]);
        // A partial checksum the driver did not negotiate is refused too.
        let mut csum = packet(&bad);
        csum[0] = 1;
        rig.post_tx(1, &csum, 4096);
        // A good frame, split after the header and in the middle.
        let frame = test_frame([0xff; 6], GUEST_MAC, &[0xab; 300]);
        rig.post_tx(1, &packet(&frame), 100);
        rig.wait_used(1, 3);
        for n in 0..3 {
            assert_eq!(
                rig.queues[1].used(n).1,
                0,
                "transmit chains are used with length 0"
            );
        }
        assert_eq!(rig.socket.recv_test_frame(), frame);
        // Frame bytes count without the virtio-net header; the two refused chains are drops.
        let counters = rig.net.counters().unwrap();
        let expected = |tx_bytes: usize| {
            vec![
                ("rx_bytes", 0),
                ("rx_frames", 0),
                ("tx_bytes", tx_bytes as u64),
                ("tx_frames", 1),
                ("rx_dropped", 0),
                ("tx_dropped", 2),
            ]
        };
        assert_eq!(counters.snapshot(), expected(frame.len()));
        // A driver reset stops the device thread, not the counting.
        rig.net.reset().unwrap();
        assert_eq!(counters.snapshot(), expected(frame.len()));
        assert_eq!(
            rig.net.counters().unwrap().snapshot(),
            expected(frame.len())
        );
    });
}

#[test]
fn frames_from_the_tap_land_in_receive_buffers() {
    in_private_netns("net receive", || {
        let features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF);
        let mut rig = Rig::new(2, features);
        rig.post_rx(0, 4);
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| test_frame(GUEST_MAC, HOST_MAC, &[i; 100]))
            .collect();
        for frame in &frames {
            rig.socket.send(frame);
        }
        rig.wait_used(0, 3);
        for (n, frame) in frames.iter().enumerate() {
            let got = rig.received(0, n as u16);
            assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
            assert_eq!(&got[..10], &[0; 10], "no offload in the header");
            assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
        }
        // The last buffer waits for the next frame, which can come after more buffers are posted.
        assert_eq!(rig.queues[0].used_idx(), 3);
        let counters = rig.net.counters().unwrap().snapshot();
        let bytes: usize = frames.iter().map(Vec::len).sum();
        assert_eq!(
            counters[..2],
            [("rx_bytes", bytes as u64), ("rx_frames", 3)]
        );
        assert_eq!(counters[4], ("rx_dropped", 0));
    });
}

#[test]
fn without_receive_buffers_the_tap_is_not_polled_until_the_driver_posts_some() {
    in_private_netns("net backpressure", || {
        let tap = Tap::open(None).unwrap();
        tap.set_up().unwrap();
        let net = Net::with_taps(vec![tap], Some(GUEST_MAC), 256).unwrap();
        let socket = PacketSocket::bind(net.if_name());
        let tap = net.taps[0].clone();
        let mem = guest_memory();
        let mut rxq = DriverQueue::new(&mem, ring_base(0), 256);
        let rx_event = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = rx_event.try_clone().unwrap();
        let (interrupt, reports) = RecordingInterrupt::new();
        let mut handler = NetHandler {
            mem: mem.clone(),
            interrupt: Arc::new(interrupt),
            pairs: vec![Pair::new(
                tap.clone(),
                Some(QueueSlot::new(0, rxq.queue(false), rx_event)),
                None,
            )],
            ctrl: None,
            ctrl_handler: CtrlHandler::new(vec![tap.clone()], false),
            tx: TxHandler::new(vec![tap.clone()], TapOffloads::default(), Arc::default()),
            mergeable: true,
            accepted: TapOffloads::default(),
            counters: Arc::default(),
        };
        let poller = Poller::for_tests();
        handler.register(&poller).unwrap();
        let mut events = [Event::new(Events::empty(), 0); 4];
        let wait = |events: &mut [Event], timeout| poller.wait(events, timeout).unwrap();

        let first = test_frame(GUEST_MAC, HOST_MAC, b"first");
        socket.send(&first);
        assert_eq!(wait(&mut events, 30_000), 1);
        assert_eq!({ events[0].data }, TAP_TOKEN_BASE);
        handler.ready(TAP_TOKEN_BASE, &poller);
        assert!(handler.has_pending(0), "the frame waits for a buffer");
        assert!(!handler.is_polled(0), "the tap is no longer polled");

        // Another frame makes the tap readable, but nothing wakes the device thread for it.
        let second = test_frame(GUEST_MAC, HOST_MAC, b"second");
        socket.send(&second);
        let mut poll = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` is one valid pollfd, alive across the call.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 30_000) }, 1);
        assert_eq!(
            wait(&mut events, 0),
            0,
            "no busy loop while the ring is full"
        );

        // The driver posts buffers and notifies: both frames are delivered in order and the tap is polled again.
        rxq.add(&[(BUFFERS, RX_BUFFER_LEN, true)]);
        rxq.add(&[(BUFFERS + 0x1000, RX_BUFFER_LEN, true)]);
        kick.write(1).unwrap();
        assert_eq!(wait(&mut events, 30_000), 1);
        assert_eq!({ events[0].data }, 0);
        handler.ready(0, &poller);
        assert_eq!(rxq.used_idx(), 2);
        for (n, frame) in [first, second].iter().enumerate() {
            let (_, len) = rxq.used(n as u16);
            assert_eq!(len as usize, VNET_HDR_LEN + frame.len());
            let mut got = vec![0u8; frame.len()];
            mem.memory()
                .read_slice(
                    &mut got,
                    GuestAddress(BUFFERS + n as u64 * 0x1000 + VNET_HDR_LEN as u64),
                )
                .unwrap();
            assert_eq!(&got, frame);
        }
        assert_eq!(
            next_report(&reports),
            Reported::Interrupt(VirtioInterruptType::Queue(0))
        );
        assert!(handler.is_polled(0) && !handler.has_pending(0));
        // The frame held back while the ring was full is counted once, when it was delivered.
        assert_eq!(handler.counters.rx_frames.get(), 2);
        let events = handler.into_queue_events();
        assert_eq!(events.len(), 1);
    });
}

#[test]
fn queue_pairs_follow_the_control_queue() {
    in_private_netns("net multi-queue", || {
        let probe = Net::new(&NetOptions {
            num_queues: 4,
            ..NetOptions::default()
        })
        .unwrap();
        assert_eq!(probe.queue_max_sizes().len(), 5);
        let offered = probe.features();
        assert_ne!(offered & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(offered & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        let mut config = [0u8; 2];
        probe.read_config(8, &mut config);
        assert_eq!(config, 2u16.to_le_bytes());
        drop(probe);

        let features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MQ)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        let mut rig = Rig::new(4, features);
        // Only the first pair is in use until the driver says otherwise.
        assert!(rig.net.taps[0].is_queue_enabled());
        assert!(!rig.net.taps[1].is_queue_enabled());
        assert_eq!(rig.control(&[4, 0, 3, 0]), 1, "3 pairs: out of range");
        assert_eq!(rig.control(&[4, 0, 0, 0]), 1, "0 pairs: out of range");
        assert_eq!(rig.control(&[0, 0, 1]), 1, "CTRL_RX is not offered");
        assert_eq!(rig.control(&[4, 0, 2, 0]), 0);
        assert!(rig.net.taps[1].is_queue_enabled());

        // The second pair transmits through its own tap queue.
        let frame = test_frame([0xff; 6], GUEST_MAC, b"from pair 1");
        rig.post_tx(3, &packet(&frame), 4096);
        assert_eq!(rig.socket.recv_test_frame(), frame);

        // Flows are spread over both receive queues, and none is lost.
        const FLOWS: u16 = 64;
        rig.post_rx(0, usize::from(FLOWS));
        rig.post_rx(2, usize::from(FLOWS));
        for port in 0..FLOWS {
            rig.socket.send(&udp_frame(1000 + port));
        }
        let count = |rig: &Rig, index: usize| {
            (0..rig.queues[index].used_idx())
                .filter(|n| is_udp_test_frame(&rig.received(index, *n)[VNET_HDR_LEN..]))
                .count()
        };
        while count(&rig, 0) + count(&rig, 2) < usize::from(FLOWS) {
            next_report(&rig.reports);
        }
        assert!(
            count(&rig, 0) > 0 && count(&rig, 2) > 0,
            "64 flows all hashed to one queue"
        );

        // Back to one pair: every frame goes to the first receive queue.
        assert_eq!(rig.control(&[4, 0, 1, 0]), 0);
        assert!(!rig.net.taps[1].is_queue_enabled());
        let before = (rig.queues[0].used_idx(), rig.queues[2].used_idx());
        rig.post_rx(0, 16);
        for port in 0..16 {
            rig.socket.send(&udp_frame(2000 + port));
        }
        rig.wait_used(0, before.0 + 16);
        assert_eq!(rig.queues[2].used_idx(), before.1);
        let events = rig.net.reset().unwrap();
        assert_eq!(events.len(), 5);
    });
}

#[test]
fn activation_checks_the_queue_layout() {
    in_private_netns("net activation", || {
        let mut net = Net::new(&NetOptions::default()).unwrap();
        net.ack_features(bit(VIRTIO_F_VERSION_1));
        let mem = guest_memory();
        let queue = |index: usize| {
            (
                index,
                DriverQueue::new(&mem, ring_base(index), 16).queue(false),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
        };
        let interrupt = Arc::new(RecordingInterrupt::new().0);
        assert!(matches!(
            net.activate(mem.clone(), interrupt.clone(), Vec::new()),
            Err(ActivateError::BadQueues(_))
        ));
        // No control queue without CTRL_VQ.
        let err = net
            .activate(mem.clone(), interrupt.clone(), vec![queue(0), queue(2)])
            .unwrap_err();
        assert!(err.to_string().contains("no queue 2"), "{err}");
        net.activate(mem.clone(), interrupt.clone(), vec![queue(1)])
            .unwrap();
        assert!(matches!(
            net.activate(mem.clone(), interrupt.clone(), vec![queue(0)]),
            Err(ActivateError::AlreadyActive)
        ));
        let events = net.reset().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, 1);
        // After a reset the device activates again, and dropping it removes the tap it created.
        net.activate(mem.clone(), interrupt, vec![queue(0), queue(1)])
            .unwrap();
        let name = net.if_name().to_string();
        drop(net);
        assert!(if_index(&name).is_none(), "{name} outlived the device");
    });
}

#[test]
fn hostile_transmit_chains_never_panic() {
    use crate::test_utils::{hostile_queue, XorShift};

    in_private_netns("net hostile transmit", || {
        let tap = Arc::new(Tap::open(None).unwrap());
        tap.set_up().unwrap();
        let mut handler = TxHandler::new(vec![tap], TapOffloads::ALL, Arc::default());
        let mem = guest_memory();
        let mut rng = XorShift(0x5eed_f00d_0000_7a90);
        for _ in 0..3000 {
            let guard = mem.memory();
            let vq = MockSplitQueue::new(&*guard, 16);
            hostile_queue(&vq, &mut rng);
            let mut queue: Queue = vq.create_queue().unwrap();
            if process_queue(&mut handler, 1, &mut queue, &guard).is_ok() {
                for slot in 0..vq.used().idx().load().min(8) {
                    let used = vq.used().ring().ref_at(usize::from(slot)).unwrap().load();
                    assert_eq!(used.len(), 0);
                }
            }
        }
    });
}
