//! One stream connection between a guest port and a host Unix socket: its state, the credit both sides give
//! each other (virtio 1.2 §5.10.6.3) and the bytes in flight towards the host.
//!
//! The device gives the guest [`CONN_BUF_SIZE`] bytes of credit per connection: guest data the host socket does
//! not take at once is kept, but never more than that, so a guest that ignores its credit is reset instead of
//! growing the buffer. Towards the guest nothing is buffered: the host socket is read only when the guest has
//! credit and a receive buffer is at hand.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use epoll::Events;
use thiserror::Error;

use super::packet::{Header, Op, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer the device offers the guest per connection (its `buf_alloc`).
pub(crate) const CONN_BUF_SIZE: u32 = super::VSOCK_CONN_BUF_SIZE;
/// The device tells the guest about freed buffer space once this much was freed since it last said.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// A connection's address: (host port, guest port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated; waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, Error)]
pub(crate) enum Fault {
    /// The guest broke the protocol (data beyond its credit, data before the connection is up).
    #[error("the guest broke the vsock protocol: {0}")]
    Protocol(&'static str),
    /// The host socket failed.
    #[error("the host socket failed: {0}")]
    Host(io::Error),
}

/// The next packet a connection has for the guest.
pub(crate) enum Next {
    /// A packet with this operation, flags and payload length (the payload is in the caller's buffer).
    Packet { op: Op, flags: u32, len: usize },
    /// Nothing to send now.
    Nothing,
    /// The connection failed and must be reset.
    Failed(Fault),
}

/// A connection.
pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    /// Identifies the stream in the device's epoll set.
    pub(crate) token: u64,
    pub(crate) state: State,
    /// The guest's receive buffer and how much of it the guest consumed, from its latest header.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    /// Guest payload bytes written to the host socket, and the value last told to the guest.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Written to the host before any guest data (the `OK <port>` reply to a host-initiated connection).
    greeting: Vec<u8>,
    /// Guest data the host socket has not taken yet; at most [`CONN_BUF_SIZE`] bytes.
    out: VecDeque<u8>,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_shutdown: Option<u32>,
    /// The host socket reached end of file (the guest was or will be told).
    host_eof: bool,
    /// The guest said it will send / receive no more.
    peer_no_send: bool,
    peer_no_recv: bool,
    /// The write side of the host socket was shut down.
    write_shut: bool,
    /// The host socket has something to read (or hung up) and is not polled for it until it was read.
    pub(crate) readable: bool,
    /// The host socket hung up; it is no longer polled.
    pub(crate) hung_up: bool,
    /// What the socket is polled for; `None` when it is not in the epoll set.
    pub(crate) interest: Option<Events>,
    /// In the device's list of connections with work for the receive queue.
    pub(crate) queued: bool,
}

impl Conn {
    /// A connection the guest asked for with `request`; the RESPONSE is pending.
    pub(crate) fn accepted(stream: UnixStream, token: u64, request: &Header) -> Self {
        let mut conn = Self::new(stream, token, State::Established);
        conn.send_response = true;
        conn.update_peer_credit(request);
        conn
    }

    /// A connection a host program asked for; the REQUEST is pending.
    pub(crate) fn requested(stream: UnixStream, token: u64) -> Self {
        let mut conn = Self::new(stream, token, State::Connecting);
        conn.send_request = true;
        conn
    }

    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            greeting: Vec::new(),
            out: VecDeque::new(),
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: None,
            host_eof: false,
            peer_no_send: false,
            peer_no_recv: false,
            write_shut: false,
            readable: false,
            hung_up: false,
            interest: None,
            queued: false,
        }
    }

    /// Every guest packet carries its current credit.
    pub(crate) fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than it was sent gets nothing.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The credit fields of a packet to the guest: (buf_alloc, fwd_cnt). Sending any packet tells the guest.
    pub(crate) fn credit_sent(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.send_credit_update = false;
        (CONN_BUF_SIZE, self.fwd_cnt)
    }

    /// The guest accepted a host-initiated connection: the host program is told the local port first.
    pub(crate) fn established(&mut self, local_port: u32) {
        self.state = State::Established;
        self.greeting = format!("OK {local_port}\n").into_bytes();
    }

    /// The guest asked for a credit update.
    pub(crate) fn request_credit_update(&mut self) {
        self.send_credit_update = true;
    }

    /// The guest shut down one or both directions.
    pub(crate) fn shutdown(&mut self, flags: u32) -> Result<(), Fault> {
        self.peer_no_recv |= flags & SHUTDOWN_RCV != 0;
        self.peer_no_send |= flags & SHUTDOWN_SEND != 0;
        self.flush()
    }

    /// Guest data for the host. Written at once as far as the host socket takes it, the rest kept.
    pub(crate) fn data(&mut self, payload: &[u8]) -> Result<(), Fault> {
        if self.state != State::Established || self.peer_no_send {
            return Err(Fault::Protocol(
                "data on a connection that is not open for it",
            ));
        }
        if self.out.len() + payload.len() > CONN_BUF_SIZE as usize {
            return Err(Fault::Protocol("data beyond the credit the device gave"));
        }
        let mut rest = payload;
        if self.greeting.is_empty() && self.out.is_empty() {
            let written = write_some(&self.stream, rest).map_err(Fault::Host)?;
            self.forwarded(written);
            rest = &rest[written..];
        }
        self.out.extend(rest);
        Ok(())
    }

    /// Writes pending bytes to the host socket until it would block, and shuts its write side once the guest
    /// will send no more.
    pub(crate) fn flush(&mut self) -> Result<(), Fault> {
        while !self.greeting.is_empty() {
            let written = write_some(&self.stream, &self.greeting).map_err(Fault::Host)?;
            if written == 0 {
                return Ok(());
            }
            self.greeting.drain(..written);
        }
        while !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            let written = write_some(&self.stream, front).map_err(Fault::Host)?;
            if written == 0 {
                return Ok(());
            }
            self.out.drain(..written);
            self.forwarded(written);
        }
        if self.peer_no_send && !self.write_shut && self.state == State::Established {
            self.write_shut = true;
            // The host may have closed already; it sees end of file either way.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    fn forwarded(&mut self, bytes: usize) {
        // Lossless: at most CONN_BUF_SIZE at a time; the counter wraps by design.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(bytes as u32);
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_no_recv
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub(crate) fn wants_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || self.send_shutdown.is_some()
            || (self.readable && self.can_send_data())
    }

    /// What the host socket should be polled for.
    pub(crate) fn wanted_interest(&self) -> Events {
        let mut events = Events::empty();
        if self.can_send_data() && !self.readable {
            events |= Events::EPOLLIN;
        }
        if !self.greeting.is_empty() || !self.out.is_empty() {
            events |= Events::EPOLLOUT;
        }
        events
    }

    /// Both sides are done and everything the guest sent reached the host: close with an RST to the guest.
    pub(crate) fn finished(&self) -> bool {
        self.state == State::Established
            && self.greeting.is_empty()
            && self.out.is_empty()
            && self.send_shutdown.is_none()
            && self.peer_no_send
            && (self.peer_no_recv || self.host_eof)
    }

    /// The next packet for the guest, with at most `room` payload bytes read into `buf`.
    pub(crate) fn next_packet(&mut self, room: usize, buf: &mut Vec<u8>) -> Next {
        if std::mem::take(&mut self.send_request) {
            return self.control(Op::Request);
        }
        if std::mem::take(&mut self.send_response) {
            return self.control(Op::Response);
        }
        let want = room.min(MAX_PAYLOAD).min(self.peer_credit() as usize);
        if self.readable && self.can_send_data() && want > 0 {
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match read_some(&self.stream, &mut buf[..want]) {
                Ok(Some(0)) => {
                    self.host_eof = true;
                    self.readable = false;
                    let mut flags = SHUTDOWN_SEND;
                    if self.hung_up {
                        flags |= SHUTDOWN_RCV;
                    }
                    self.send_shutdown = Some(flags);
                }
                Ok(Some(len)) => {
                    // Lossless: at most MAX_PAYLOAD bytes.
                    self.tx_cnt = self.tx_cnt.wrapping_add(len as u32);
                    return Next::Packet {
                        op: Op::Rw,
                        flags: 0,
                        len,
                    };
                }
                Ok(None) => self.readable = false,
                Err(err) => return Next::Failed(Fault::Host(err)),
            }
        }
        if let Some(flags) = self.send_shutdown.take() {
            return Next::Packet {
                op: Op::Shutdown,
                flags,
                len: 0,
            };
        }
        if self.send_credit_update {
            return self.control(Op::CreditUpdate);
        }
        Next::Nothing
    }

    fn control(&self, op: Op) -> Next {
        Next::Packet {
            op,
            flags: 0,
            len: 0,
        }
    }
}

/// Writes what the socket takes now; 0 when it would block.
fn write_some(mut stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(bytes) {
            Ok(0) if !bytes.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => return Ok(written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(err) => return Err(err),
        }
    }
}

/// Reads what the socket has now; `None` when it would block, `Some(0)` at end of file.
fn read_some(mut stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(len) => return Ok(Some(len)),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(err) => return Err(err),
        }
    }
}
