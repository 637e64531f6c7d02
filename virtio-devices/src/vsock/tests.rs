//! virtio-vsock driven through its queues like a driver would, against real Unix sockets.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::packet::{Header, Op, HEADER_SIZE, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::test_queue::DriverQueue;
use crate::test_utils::{guest_memory, next_report, RecordingInterrupt, Reported, XorShift};

const GUEST_CID: u64 = 3;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const EVENT_RING: u64 = 0x3_0000;
const BUFFERS: u64 = 0x10_0000;
const BUFFERS_END: u64 = 0xf0_0000;
const RX_BUF: u32 = HEADER_SIZE as u32 + 4096;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// A fresh directory for one test's sockets.
fn test_dir() -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "atrium-vsock-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A guest packet header from guest port `src` to host port `dst`.
fn header(op: Op, src: u32, dst: u32, len: usize) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port: src,
        dst_port: dst,
        len: len as u32,
        kind: TYPE_STREAM,
        op: op.raw(),
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// An active device and its driver side.
struct Rig {
    device: Vsock,
    dir: PathBuf,
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    kicks: [EventFd; 3],
    reports: Receiver<Reported>,
    next_buffer: u64,
    rx_buffers: HashMap<u32, u64>,
    rx_seen: u16,
    tx_sent: u16,
}

impl Rig {
    fn new() -> Self {
        let dir = test_dir();
        let mut device = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        let mem = guest_memory();
        let rx = DriverQueue::new(&mem, RX_RING, 256);
        let tx = DriverQueue::new(&mem, TX_RING, 256);
        let event = DriverQueue::new(&mem, EVENT_RING, 256);
        let events: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = [
            events[0].try_clone().unwrap(),
            events[1].try_clone().unwrap(),
            events[2].try_clone().unwrap(),
        ];
        let (interrupt, reports) = RecordingInterrupt::new();
        let mut events = events.into_iter();
        device.ack_features(device.features());
        device
            .activate(
                mem.clone(),
                Arc::new(interrupt),
                vec![
                    (0, rx.queue(false), events.next().unwrap()),
                    (1, tx.queue(false), events.next().unwrap()),
                    (2, event.queue(false), events.next().unwrap()),
                ],
            )
            .unwrap();
        Self {
            device,
            dir,
            mem,
            rx,
            tx,
            kicks,
            reports,
            next_buffer: BUFFERS,
            rx_buffers: HashMap::new(),
            rx_seen: 0,
            tx_sent: 0,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    fn port_socket(&self, port: u32) -> PathBuf {
        self.dir.join(format!("v.sock_{port}"))
    }

    fn buffer(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += (u64::from(len) + 0xfff) & !0xfff;
        assert!(self.next_buffer <= BUFFERS_END, "test ran out of buffers");
        addr
    }

    /// Posts a transmit chain of `pieces` (driver-readable unless marked) and waits until the device used it.
    fn send_raw(&mut self, pieces: &[(&[u8], bool)]) {
        let mut bufs = Vec::new();
        for (bytes, writable) in pieces {
            let addr = self.buffer(bytes.len().max(1) as u32);
            self.mem
                .memory()
                .write_slice(bytes, GuestAddress(addr))
                .unwrap();
            bufs.push((addr, bytes.len() as u32, *writable));
        }
        self.tx.add(&bufs);
        self.tx_sent += 1;
        self.kicks[1].write(1).unwrap();
        while self.tx.used_idx() < self.tx_sent {
            assert_ne!(next_report(&self.reports), Reported::NeedsReset);
        }
    }

    /// Sends a packet, the header and payload in separate descriptors.
    fn send(&mut self, header: Header, payload: &[u8]) {
        let raw = header.encode();
        if payload.is_empty() {
            self.send_raw(&[(&raw, false)]);
        } else {
            self.send_raw(&[(&raw, false), (payload, false)]);
        }
    }

    fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = self.buffer(RX_BUF);
            let head = self.rx.add(&[(addr, RX_BUF, true)]);
            self.rx_buffers.insert(u32::from(head), addr);
        }
        self.kicks[0].write(1).unwrap();
    }

    /// The next packet the device put in the receive queue.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        while self.rx.used_idx() == self.rx_seen {
            assert_ne!(next_report(&self.reports), Reported::NeedsReset);
        }
        let (head, len) = self.rx.used(self.rx_seen);
        self.rx_seen += 1;
        let addr = self.rx_buffers.remove(&head).unwrap();
        let mut raw = [0u8; HEADER_SIZE];
        let mem = self.mem.memory();
        mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let header = Header::decode(&raw);
        assert_eq!(len as usize, HEADER_SIZE + header.len as usize);
        let mut payload = vec![0u8; header.len as usize];
        mem.read_slice(&mut payload, GuestAddress(addr + HEADER_SIZE as u64))
            .unwrap();
        assert_eq!((header.src_cid, header.dst_cid), (2, GUEST_CID));
        assert_eq!(header.kind, TYPE_STREAM);
        (header, payload)
    }

    /// The next packet, which must have operation `op`.
    fn expect(&mut self, op: Op) -> (Header, Vec<u8>) {
        let (header, payload) = self.recv();
        assert_eq!(header.op(), Some(op), "unexpected packet {header:?}");
        (header, payload)
    }

    /// Opens a guest connection from guest port `src` to host port `dst`, where a host program listens.
    fn guest_connect(&mut self, listener: &UnixListener, src: u32, dst: u32) -> UnixStream {
        self.post_rx(1);
        self.send(header(Op::Request, src, dst, 0), &[]);
        let (response, _) = self.expect(Op::Response);
        assert_eq!((response.src_port, response.dst_port), (dst, src));
        assert_eq!(response.buf_alloc, VSOCK_CONN_BUF_SIZE);
        let (stream, _) = listener.accept().unwrap();
        stream
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.device.reset();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_exact(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).unwrap();
    bytes
}

#[test]
fn the_device_describes_itself() {
    let dir = test_dir();
    let socket = dir.join("v.sock");
    let mut device = Vsock::new(42, &socket).unwrap();
    assert_eq!(device.device_type(), VirtioDeviceType::Vsock);
    assert_eq!(device.device_type().id(), 19);
    assert_eq!(device.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(device.features() & 0b111, 1, "STREAM only, no SEQPACKET");
    let mut config = [0u8; 8];
    device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), 42);
    device.write_config(0, &[9; 8]);
    device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), 42);
    let mut high = [0xffu8; 4];
    device.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    assert_eq!(device.guest_cid(), 42);
    assert_eq!(device.socket(), socket);
    drop(device);
    assert!(
        !socket.exists(),
        "the socket file is removed with the device"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_cids_and_paths_are_refused() {
    let dir = test_dir();
    let socket = dir.join("v.sock");
    for cid in [0, 1, 2] {
        let err = Vsock::new(cid, &socket).unwrap_err();
        assert!(matches!(err, VsockError::ReservedCid { .. }));
        assert!(err.to_string().contains("use 3 or more"), "{err}");
    }
    assert_eq!(
        Vsock::new(2, &socket).unwrap_err().to_string(),
        "cid 2 is the host's; use 3 or more"
    );
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &socket),
        Err(VsockError::CidOutOfRange(_))
    ));
    std::fs::write(&socket, b"keep me").unwrap();
    let err = Vsock::new(3, &socket).unwrap_err();
    assert!(
        err.to_string().contains("in use by a regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&socket).unwrap(), b"keep me");
    std::fs::remove_file(&socket).unwrap();
    assert!(matches!(
        Vsock::new(3, &dir),
        Err(VsockError::PathInUse { .. })
    ));
    let long = dir.join("x".repeat(120));
    assert!(matches!(
        Vsock::new(3, &long),
        Err(VsockError::PathTooLong(_))
    ));
    assert!(matches!(
        Vsock::new(3, &dir.join("missing/v.sock")),
        Err(VsockError::Bind { .. })
    ));
    // A stale socket is replaced, and the new one accepts connections.
    drop(UnixListener::bind(&socket).unwrap());
    let device = Vsock::new(3, &socket).unwrap();
    UnixStream::connect(&socket).unwrap();
    drop(device);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn activation_needs_the_data_queues() {
    let dir = test_dir();
    let mut device = Vsock::new(3, &dir.join("v.sock")).unwrap();
    let mem = guest_memory();
    let (interrupt, _reports) = RecordingInterrupt::new();
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(interrupt);
    let queue = DriverQueue::new(&mem, RX_RING, 16).queue(false);
    let only_rx = vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap())];
    let queue = DriverQueue::new(&mem, TX_RING, 16).queue(false);
    assert!(matches!(
        device.activate(mem.clone(), interrupt.clone(), only_rx),
        Err(ActivateError::BadQueues(_))
    ));
    let extra = vec![(3, queue, EventFd::new(EFD_NONBLOCK).unwrap())];
    assert!(matches!(
        device.activate(mem, interrupt, extra),
        Err(ActivateError::BadQueues(_))
    ));
    assert!(device.reset().is_none());
    drop(device);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_connection_carries_data_both_ways_and_shuts_down() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_socket(52)).unwrap();
    let mut host = rig.guest_connect(&listener, 40_000, 52);

    rig.send(header(Op::Rw, 40_000, 52, 5), b"hello");
    assert_eq!(read_exact(&mut host, 5), b"hello");

    rig.post_rx(1);
    host.write_all(b"world").unwrap();
    let (packet, payload) = rig.expect(Op::Rw);
    assert_eq!((packet.src_port, packet.dst_port), (52, 40_000));
    assert_eq!(payload, b"world");
    assert_eq!(packet.fwd_cnt, 5, "the device reports what it forwarded");
    let counters = rig.device.counters().unwrap();
    let expected = [("rx_bytes", 5), ("tx_bytes", 5), ("connections", 1)];
    assert_eq!(counters.snapshot(), expected);

    // The guest closes: the host sees end of file and the device completes the close with an RST.
    rig.post_rx(1);
    let mut shutdown = header(Op::Shutdown, 40_000, 52, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(shutdown, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let (rst, _) = rig.expect(Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (52, 40_000));

    // The connection is gone: more data is answered with an RST, and not counted.
    rig.post_rx(1);
    rig.send(header(Op::Rw, 40_000, 52, 1), b"x");
    rig.expect(Op::Rst);
    assert_eq!(counters.snapshot(), expected);
}

#[test]
fn a_host_that_closes_shuts_the_guest_connection_down() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_socket(7)).unwrap();
    let host = rig.guest_connect(&listener, 1234, 7);
    rig.post_rx(2);
    drop(host);
    let (shutdown, _) = rig.expect(Op::Shutdown);
    assert_eq!(shutdown.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    // Guest data for a closed host is refused.
    rig.send(header(Op::Rw, 1234, 7, 3), b"abc");
    rig.expect(Op::Rst);
}

#[test]
fn connecting_to_a_port_without_a_listener_is_reset() {
    let mut rig = Rig::new();
    rig.post_rx(1);
    rig.send(header(Op::Request, 999, 77, 0), &[]);
    let (rst, _) = rig.expect(Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (77, 999));
}

/// A host program connects to the device socket and asks for guest port `port`.
fn host_connect(rig: &Rig, port: u32) -> UnixStream {
    let mut client = UnixStream::connect(rig.socket()).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    client
}

#[test]
fn a_host_connection_gets_ok_and_carries_data_both_ways() {
    let mut rig = Rig::new();
    rig.post_rx(1);
    // Data right after the CONNECT line waits for the connection.
    let mut client = UnixStream::connect(rig.socket()).unwrap();
    client.write_all(b"CONNECT 5000\nearly").unwrap();
    let (request, _) = rig.expect(Op::Request);
    assert_eq!(request.dst_port, 5000);
    let host_port = request.src_port;
    assert!(host_port >= VSOCK_FIRST_HOST_PORT);

    let mut response = header(Op::Response, 5000, host_port, 0);
    response.buf_alloc = GUEST_BUF_ALLOC;
    rig.post_rx(1);
    rig.send(response, &[]);
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    let (data, payload) = rig.expect(Op::Rw);
    assert_eq!((data.src_port, data.dst_port), (host_port, 5000));
    assert_eq!(payload, b"early");

    rig.send(header(Op::Rw, 5000, host_port, 4), b"pong");
    let mut pong = [0u8; 4];
    reader.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    let counters = rig.device.counters().unwrap();
    let expected = [("rx_bytes", 5), ("tx_bytes", 4), ("connections", 1)];
    assert_eq!(counters.snapshot(), expected);

    // A second connection gets its own host port.
    rig.post_rx(1);
    let _second = host_connect(&rig, 5000);
    let (second, _) = rig.expect(Op::Request);
    assert_ne!(second.src_port, host_port);
    assert_eq!(counters.snapshot(), expected, "not established yet");

    // The host program leaves: the guest is told nothing more comes and nothing more is taken.
    rig.post_rx(1);
    drop(reader);
    drop(client);
    let (shutdown, _) = rig.expect(Op::Shutdown);
    assert_eq!(shutdown.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
}

#[test]
fn a_guest_that_refuses_closes_the_host_connection() {
    let mut rig = Rig::new();
    rig.post_rx(1);
    let mut client = host_connect(&rig, 6000);
    let (request, _) = rig.expect(Op::Request);
    rig.send(header(Op::Rst, 6000, request.src_port, 0), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line for a refused connection");
}

#[test]
fn bad_connect_lines_are_closed() {
    let rig = Rig::new();
    for line in [&b"CONNECT x\n"[..], b"HELLO 5\n", &[b'9'; 100]] {
        let mut client = UnixStream::connect(rig.socket()).unwrap();
        client.write_all(line).unwrap();
        let mut rest = Vec::new();
        match client.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            // Closed with the overlong line unread.
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
}

#[test]
fn data_to_the_guest_follows_its_credit() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_socket(80)).unwrap();
    rig.post_rx(1);
    let mut request = header(Op::Request, 3000, 80, 0);
    request.buf_alloc = 8;
    rig.send(request, &[]);
    rig.expect(Op::Response);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"0123456789abcdefghij").unwrap();

    rig.post_rx(4);
    let (_, first) = rig.expect(Op::Rw);
    assert_eq!(first, b"01234567");
    // The credit is used up: asked for credit, the device answers before sending anything else.
    let mut ask = header(Op::CreditRequest, 3000, 80, 0);
    ask.buf_alloc = 8;
    rig.send(ask, &[]);
    let (update, _) = rig.expect(Op::CreditUpdate);
    assert_eq!(update.buf_alloc, VSOCK_CONN_BUF_SIZE);

    // The guest consumed the first 8 bytes: 8 more may come, then the rest after the next update.
    let mut credit = header(Op::CreditUpdate, 3000, 80, 0);
    credit.buf_alloc = 8;
    credit.fwd_cnt = 8;
    rig.send(credit, &[]);
    let (_, second) = rig.expect(Op::Rw);
    assert_eq!(second, b"89abcdef");
    credit.fwd_cnt = 16;
    rig.send(credit, &[]);
    let (_, third) = rig.expect(Op::Rw);
    assert_eq!(third, b"ghij");
}

#[test]
fn the_device_sends_credit_updates_as_it_forwards() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_socket(81)).unwrap();
    let mut host = rig.guest_connect(&listener, 3001, 81);
    rig.post_rx(1);
    let chunk = vec![7u8; 4096];
    let chunks = VSOCK_CONN_BUF_SIZE as usize / 4 / chunk.len();
    for _ in 0..chunks {
        rig.send(header(Op::Rw, 3001, 81, chunk.len()), &chunk);
    }
    assert_eq!(
        read_exact(&mut host, chunks * chunk.len()).len(),
        chunks * 4096
    );
    let (update, _) = rig.expect(Op::CreditUpdate);
    assert_eq!(update.fwd_cnt as usize, chunks * chunk.len());
}

#[test]
fn guest_data_beyond_the_credit_resets_the_connection() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_socket(82)).unwrap();
    let host = rig.guest_connect(&listener, 3002, 82);
    // The host does not read: its socket fills, then the device's buffer, then the guest is over its credit.
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..32 {
        rig.post_rx(1);
        rig.send(header(Op::Rw, 3002, 82, chunk.len()), &chunk);
        while rig.rx.used_idx() > rig.rx_seen {
            // Credit updates while the host socket still took data, then the RST.
            let (packet, _) = rig.recv();
            if packet.op() == Some(Op::Rst) {
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "the device never reset a guest ignoring its credit");
    // The host socket is closed: it reads the data that got through, then end of file.
    drop(listener);
    let mut host = host;
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert!(all.len() >= VSOCK_CONN_BUF_SIZE as usize);
}

#[test]
fn hostile_packets_are_dropped_or_reset() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    // A foreign source or destination CID is dropped without an answer.
    let mut foreign = header(Op::Request, 1, 77, 0);
    foreign.src_cid = 9;
    rig.send(foreign, &[]);
    let mut not_host = header(Op::Request, 1, 77, 0);
    not_host.dst_cid = 5;
    rig.send(not_host, &[]);
    // Too short for a header, or writable: dropped.
    rig.send_raw(&[(&[0u8; 20], false)]);
    rig.send_raw(&[(&header(Op::Request, 1, 77, 0).encode(), true)]);
    // Unknown type, unknown operation, a length past the chain, an oversized length: RST.
    let mut dgram = header(Op::Request, 2, 77, 0);
    dgram.kind = 3;
    rig.send(dgram, &[]);
    let mut unknown = header(Op::Request, 3, 77, 0);
    unknown.op = 99;
    rig.send(unknown, &[]);
    rig.send(header(Op::Rw, 4, 77, 100), b"short");
    let huge = header(Op::Rw, 5, 77, usize::try_from(u32::MAX).unwrap());
    rig.send(huge, &[]);
    // Data for no connection: RST.
    rig.send(header(Op::Rw, 6, 77, 1), b"x");
    for port in [2, 3, 4, 5, 6] {
        let (rst, _) = rig.expect(Op::Rst);
        assert_eq!(
            rst.dst_port, port,
            "answers come in order, none for dropped packets"
        );
    }
    // An RST for nothing is not answered.
    rig.send(header(Op::Rst, 7, 77, 0), &[]);

    // Random headers with the right addresses: no panic, no reset request, and the device still works.
    let mut rng = XorShift(0x5eed_1234);
    for _ in 0..300 {
        let mut raw = [0u8; HEADER_SIZE];
        for byte in raw.iter_mut() {
            *byte = rng.next() as u8;
        }
        let mut packet = Header::decode(&raw);
        packet.src_cid = GUEST_CID;
        packet.dst_cid = 2;
        packet.dst_port = rng.pick(&[77, 78, 1024]);
        packet.kind = rng.pick(&[1, 1, 2]);
        packet.op = rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8]);
        packet.len = rng.pick(&[0, 1, 16, 70_000]);
        let payload = vec![0u8; rng.pick(&[0usize, 1, 16])];
        rig.send(packet, &payload);
    }
    let listener = UnixListener::bind(rig.port_socket(90)).unwrap();
    rig.send(header(Op::Request, 4242, 90, 0), &[]);
    // Answers to the random packets come first.
    let mut host = loop {
        rig.post_rx(1);
        let (packet, _) = rig.recv();
        if packet.dst_port == 4242 {
            assert_eq!(packet.op(), Some(Op::Response));
            break listener.accept().unwrap().0;
        }
    };
    rig.send(header(Op::Rw, 4242, 90, 2), b"ok");
    assert_eq!(read_exact(&mut host.try_clone().unwrap(), 2), b"ok");
    host.write_all(b"!").unwrap();
}

#[test]
fn unusable_receive_buffers_are_returned_empty() {
    let mut rig = Rig::new();
    // Driver-readable, and too short for a header: both come back with nothing written.
    let readable = rig.buffer(RX_BUF);
    rig.rx.add(&[(readable, RX_BUF, false)]);
    let short = rig.buffer(RX_BUF);
    rig.rx.add(&[(short, 20, true)]);
    rig.post_rx(1);
    rig.send(header(Op::Request, 11, 77, 0), &[]);
    while rig.rx.used_idx() < 3 {
        assert_ne!(next_report(&rig.reports), Reported::NeedsReset);
    }
    assert_eq!(rig.rx.used(0).1, 0);
    assert_eq!(rig.rx.used(1).1, 0);
    rig.rx_seen = 2;
    let (rst, _) = rig.expect(Op::Rst);
    assert_eq!(rst.dst_port, 11);
}
