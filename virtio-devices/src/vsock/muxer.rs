//! All connections of one device: guest packets are dispatched to them, host sockets are polled for them, and
//! their packets for the guest are taken in turn.
//!
//! Host side (the hybrid convention Firecracker and Cloud Hypervisor use): a guest REQUEST to host port `N`
//! connects to the Unix socket `<socket>_N`; a host program connecting to `<socket>` writes `CONNECT <port>\n`,
//! the device sends the guest a REQUEST from a fresh host port and, on the guest's RESPONSE, answers
//! `OK <host port>\n` before relaying data.
//!
//! Everything is bounded: [`MAX_CONNECTIONS`] connections, [`MAX_PENDING_CLIENTS`] host programs that have not
//! sent their `CONNECT` line, and the RSTs waiting for receive buffers.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use epoll::{Event, Events};
use virtio_queue::DescriptorChain;

use super::conn::{Conn, ConnKey, Fault, Next, State};
use super::packet::{ChainBuffers, Header, Op, HEADER_SIZE, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};
use super::poll::HostPoll;
use super::unix;
use crate::chain::descriptors;
use crate::counters::VsockCounters;
use crate::device::GuestMemoryMmap;
use crate::worker::ChainHandler;

/// Most connections at a time.
pub(crate) const MAX_CONNECTIONS: usize = super::VSOCK_MAX_CONNECTIONS;
/// Most host programs connected to the listening socket that have not sent their `CONNECT` line yet.
pub(crate) const MAX_PENDING_CLIENTS: usize = 64;
/// Most RSTs for packets without a connection waiting for a receive buffer; more are dropped.
const MAX_QUEUED_RSTS: usize = 2 * MAX_CONNECTIONS;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out to host-initiated connections.
pub(crate) const FIRST_HOST_PORT: u32 = super::VSOCK_FIRST_HOST_PORT;
/// Token of the listening socket in the host epoll set.
const LISTENER_TOKEN: u64 = 0;
/// Most host events handled per wakeup (the rest keep the set readable).
const HOST_EVENTS: usize = 64;

/// A host program that connected to the listening socket and is writing its `CONNECT` line.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The connections of one device.
pub(crate) struct Muxer {
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    /// The listener is in the epoll set (it leaves it while accepting fails for lack of descriptors).
    listening: bool,
    poll: HostPoll,
    conns: HashMap<ConnKey, Conn>,
    tokens: HashMap<u64, ConnKey>,
    clients: HashMap<u64, Client>,
    next_token: u64,
    next_port: u32,
    /// Connections that may have a packet for the guest, in turn.
    rx_queue: VecDeque<ConnKey>,
    /// RSTs to send for connections that are gone or never were.
    rsts: VecDeque<ConnKey>,
    /// Payload of the packet being moved.
    payload: Vec<u8>,
    counters: Arc<VsockCounters>,
}

impl Muxer {
    pub(crate) fn new(
        guest_cid: u64,
        socket: PathBuf,
        listener: UnixListener,
        counters: Arc<VsockCounters>,
    ) -> io::Result<Self> {
        let poll = HostPoll::new()?;
        poll.add(listener.as_raw_fd(), LISTENER_TOKEN, Events::EPOLLIN)?;
        Ok(Self {
            guest_cid,
            socket,
            listener,
            listening: true,
            poll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            clients: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_port: FIRST_HOST_PORT,
            rx_queue: VecDeque::new(),
            rsts: VecDeque::new(),
            payload: Vec::new(),
            counters,
        })
    }

    /// The device's counters.
    pub(crate) fn counters(&self) -> &VsockCounters {
        &self.counters
    }

    /// The host epoll set, readable when a host socket is ready.
    pub(crate) fn poll_fd(&self) -> std::os::unix::io::RawFd {
        self.poll.fd()
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(LISTENER_TOKEN + 1);
        token
    }

    /// A host port no connection uses, from [`FIRST_HOST_PORT`] up.
    fn host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|key| key.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// Queues an RST for `key` (dropped when too many wait).
    fn reject(&mut self, key: ConnKey) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(key);
        }
    }

    /// Forgets a connection, closing its host socket; tells the guest with an RST when `rst`.
    fn close(&mut self, key: ConnKey, rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            if conn.interest.is_some() {
                let _ = self.poll.remove(conn.stream.as_raw_fd());
            }
        }
        if rst {
            self.reject(key);
        }
        if !self.listening
            && self
                .poll
                .add(self.listener.as_raw_fd(), LISTENER_TOKEN, Events::EPOLLIN)
                .is_ok()
        {
            self.listening = true;
        }
    }

    fn reset(&mut self, key: ConnKey, fault: &Fault) {
        tracing::debug!(?key, %fault, "resetting a vsock connection");
        self.close(key, true);
    }

    /// Brings a changed connection's polling and place in the receive turn up to date, or closes it when done.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            self.close(key, true);
            return;
        }
        if !conn.hung_up {
            let wanted = conn.wanted_interest();
            if conn.interest != Some(wanted) {
                let fd = conn.stream.as_raw_fd();
                let result = match conn.interest {
                    None => self.poll.add(fd, conn.token, wanted),
                    Some(_) => self.poll.modify(fd, conn.token, wanted),
                };
                if let Err(err) = result {
                    self.reset(key, &Fault::Host(err));
                    return;
                }
                conn.interest = Some(wanted);
            }
        }
        if conn.wants_rx() && !conn.queued {
            conn.queued = true;
            self.rx_queue.push_back(key);
        }
    }

    /// Handles one packet from the guest's transmit queue.
    pub(crate) fn handle_packet(&mut self, chain: &ChainBuffers<'_>) {
        let mut raw = [0u8; HEADER_SIZE];
        if !chain.read_at(0, &mut raw) {
            tracing::debug!(
                len = chain.len(),
                "dropping a vsock packet shorter than its header"
            );
            return;
        }
        let header = Header::decode(&raw);
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            tracing::debug!(
                src = header.src_cid,
                dst = header.dst_cid,
                "dropping a vsock packet with foreign addresses"
            );
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let len = header.len as usize;
        let op = header.op();
        let well_formed = header.kind == TYPE_STREAM
            && len <= MAX_PAYLOAD
            && HEADER_SIZE + len <= chain.len()
            && (len == 0 || op == Some(Op::Rw));
        let Some(op) = op.filter(|_| well_formed) else {
            tracing::debug!(?header, "resetting on a malformed vsock packet");
            if op != Some(Op::Rst) {
                self.close(key, true);
            }
            return;
        };
        match op {
            Op::Request => self.guest_connect(key, &header),
            Op::Rst => self.close(key, false),
            _ => self.conn_packet(key, op, &header, chain),
        }
    }

    /// A guest REQUEST: connect to `<socket>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, header: &Header) {
        if self.conns.contains_key(&key) {
            // The guest reuses the address of a live connection: both are void.
            self.close(key, true);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("refusing a vsock connection: too many connections");
            self.reject(key);
            return;
        }
        let path = unix::port_path(&self.socket, key.local_port);
        match unix::connect(&path) {
            Ok(stream) => {
                let token = self.token();
                self.tokens.insert(token, key);
                self.conns
                    .insert(key, Conn::accepted(stream, token, header));
                self.counters.connections.inc();
                self.sync(key);
            }
            Err(err) => {
                tracing::debug!(path = %path.display(), %err, "refusing a vsock connection");
                self.reject(key);
            }
        }
    }

    /// A packet for an existing connection.
    fn conn_packet(&mut self, key: ConnKey, op: Op, header: &Header, chain: &ChainBuffers<'_>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reject(key);
            return;
        };
        conn.update_peer_credit(header);
        let result = match (op, conn.state) {
            (Op::Response, State::Connecting) => {
                conn.established(key.local_port);
                self.counters.connections.inc();
                conn.flush()
            }
            (Op::Response, State::Established) | (_, State::Connecting) => Err(Fault::Protocol(
                "unexpected packet for the connection's state",
            )),
            (Op::Rw, State::Established) => {
                let len = header.len as usize;
                let mut payload = std::mem::take(&mut self.payload);
                payload.resize(len, 0);
                let result = if chain.read_at(HEADER_SIZE, &mut payload) {
                    let taken = conn.data(&payload);
                    if taken.is_ok() {
                        self.counters.tx_bytes.add(len as u64);
                    }
                    taken
                } else {
                    Err(Fault::Protocol("payload outside the chain"))
                };
                self.payload = payload;
                result
            }
            (Op::Shutdown, State::Established) => conn.shutdown(header.flags),
            (Op::CreditRequest, State::Established) => {
                conn.request_credit_update();
                Ok(())
            }
            // CREDIT_UPDATE: the credit is already taken from the header.
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.sync(key),
            Err(fault) => self.reset(key, &fault),
        }
    }

    /// Handles what is ready on the host sockets.
    pub(crate) fn host_ready(&mut self) {
        let mut events = [Event::new(Events::empty(), 0); HOST_EVENTS];
        let count = match self.poll.ready(&mut events) {
            Ok(count) => count,
            Err(err) => {
                tracing::warn!(%err, "vsock: polling the host sockets failed");
                return;
            }
        };
        for event in &events[..count] {
            let token = event.data;
            let ready = Events::from_bits_truncate(event.events);
            if token == LISTENER_TOKEN {
                self.accept_clients();
            } else if self.clients.contains_key(&token) {
                self.read_connect_line(token);
            } else if let Some(&key) = self.tokens.get(&token) {
                self.conn_ready(key, ready);
            }
        }
    }

    fn conn_ready(&mut self, key: ConnKey, ready: Events) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if ready.intersects(Events::EPOLLHUP | Events::EPOLLERR) {
            // Hang-ups are reported whatever the interest: stop polling and read what is left until end of file.
            conn.hung_up = true;
            conn.readable = true;
            if conn.interest.take().is_some() {
                let _ = self.poll.remove(conn.stream.as_raw_fd());
            }
            if conn.state == State::Connecting {
                // The host program gave up before the guest answered.
                self.close(key, true);
                return;
            }
        }
        if ready.contains(Events::EPOLLIN) {
            conn.readable = true;
        }
        let result = if ready.contains(Events::EPOLLOUT) || conn.hung_up {
            conn.flush()
        } else {
            Ok(())
        };
        match result {
            Ok(()) => self.sync(key),
            Err(fault) => self.reset(key, &fault),
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_PENDING_CLIENTS
                        || self.conns.len() >= MAX_CONNECTIONS
                    {
                        tracing::debug!("vsock: closing a host connection: too many connections");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.token();
                    if self
                        .poll
                        .add(stream.as_raw_fd(), token, Events::EPOLLIN)
                        .is_ok()
                    {
                        self.clients.insert(
                            token,
                            Client {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    // Out of descriptors, typically: wait until a connection closes.
                    tracing::warn!(%err, "vsock: accepting a host connection failed");
                    if self.poll.remove(self.listener.as_raw_fd()).is_ok() {
                        self.listening = false;
                    }
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self, token: u64) -> Option<Client> {
        let client = self.clients.remove(&token)?;
        let _ = self.poll.remove(client.stream.as_raw_fd());
        Some(client)
    }

    /// Reads a host program's `CONNECT <port>\n` a byte at a time, so nothing after it is taken.
    fn read_connect_line(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match (&client.stream).read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if client.line.len() < MAX_CONNECT_LINE => client.line.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                // End of file, an error or an overlong line.
                _ => {
                    self.drop_client(token);
                    return;
                }
            }
        }
        let Some(client) = self.drop_client(token) else {
            return;
        };
        let Some(peer_port) = parse_connect(&client.line) else {
            tracing::debug!("vsock: closing a host connection without a valid CONNECT line");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let Some(local_port) = self.host_port() else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let token = self.token();
        self.tokens.insert(token, key);
        self.conns
            .insert(key, Conn::requested(client.stream, token));
        self.sync(key);
    }

    /// Whether a packet may be waiting for the guest.
    pub(crate) fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_queue.is_empty()
    }

    fn header(&self, key: ConnKey, op: Op, flags: u32, len: usize, credit: (u32, u32)) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            // Lossless: at most MAX_PAYLOAD.
            len: len as u32,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags,
            buf_alloc: credit.0,
            fwd_cnt: credit.1,
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes (then in [`Muxer::payload`]).
    pub(crate) fn next_rx(&mut self, room: usize) -> Option<Header> {
        let mut turns = self.rx_queue.len();
        loop {
            if let Some(key) = self.rsts.pop_front() {
                return Some(self.header(key, Op::Rst, 0, 0, (0, 0)));
            }
            if turns == 0 {
                return None;
            }
            turns -= 1;
            let key = self.rx_queue.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.next_packet(room, &mut self.payload) {
                Next::Packet { op, flags, len } => {
                    let credit = conn.credit_sent();
                    let header = self.header(key, op, flags, len, credit);
                    self.sync(key);
                    return Some(header);
                }
                Next::Nothing => self.sync(key),
                Next::Failed(fault) => self.reset(key, &fault),
            }
        }
    }

    /// The payload of the packet [`Muxer::next_rx`] returned.
    pub(crate) fn payload(&self, len: usize) -> &[u8] {
        &self.payload[..len.min(self.payload.len())]
    }
}

/// The guest port of a `CONNECT <port>` line (a trailing `\r` is allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

impl ChainHandler for Muxer {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        match descriptors(chain)
            .ok()
            .and_then(|descs| ChainBuffers::new(mem, descs, false))
        {
            Some(buffers) => self.handle_packet(&buffers),
            None => tracing::debug!("dropping a malformed vsock transmit chain"),
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
    }
}
