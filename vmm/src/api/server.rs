//! The server thread: one epoll loop over the listening socket, the shutdown eventfd and every client connection.
//! Each connection is non-blocking with its own input and output buffer; its requests are answered in order, one at
//! a time, by sending them to the VMM and waiting for the answer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Response, MAX_BODY, MAX_HEAD};
use super::routes;
use super::{ApiResponse, ApiSender, Shared};

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 256;
/// Input kept per connection: one largest request plus a little of the next.
const MAX_INPUT: usize = MAX_HEAD + MAX_BODY + 4096;

/// How often a wait for the VMM's answer checks whether the server is stopping.
const STOP_CHECK: Duration = Duration::from_millis(100);

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// `100 Continue` was sent for the request being received.
    continued: bool,
    /// The peer will send no more.
    eof: bool,
    /// Close once `output` is sent.
    closing: bool,
    /// The epoll interest registered now.
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            continued: false,
            eof: false,
            closing: false,
            interest: EventSet::IN,
        }
    }

    /// The epoll interest this connection needs now.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.eof && !self.closing && self.input.len() < MAX_INPUT {
            set |= EventSet::IN;
        }
        if !self.output.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the connection has nothing more to do.
    fn finished(&self) -> bool {
        self.output.is_empty() && (self.closing || self.eof)
    }

    /// Reads what the peer has sent, up to the input limit.
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 << 10];
        while self.input.len() < MAX_INPUT {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends as much of the output as the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

pub(super) struct Server {
    listener: UnixListener,
    wake: EventFd,
    sender: ApiSender,
    shared: Arc<Shared>,
    epoll: Epoll,
    connections: HashMap<u64, Connection>,
    next_token: u64,
}

impl Server {
    pub(super) fn new(
        listener: UnixListener,
        wake: EventFd,
        sender: ApiSender,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(Server {
            listener,
            wake,
            sender,
            shared,
            epoll,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION,
        })
    }

    /// Serves until the handle asks the thread to stop.
    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        while !self.shared.stopping() {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("API server: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                if self.shared.stopping() {
                    return;
                }
                match event.data() {
                    LISTENER => self.accept_all(),
                    WAKE => {
                        // Only a stop request writes here; the loop condition sees it.
                        let _ = self.wake.read();
                    }
                    token => self.serve(token, event.event_set()),
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors: the pending connection stays queued; try again on the next event.
                    tracing::warn!("API server: cannot accept a connection: {e}");
                    return;
                }
            }
        }
    }

    fn add_connection(&mut self, mut stream: UnixStream) {
        if self.connections.len() >= MAX_CONNECTIONS {
            let busy = Response::error(
                503,
                &format!(
                    "the API server already has {MAX_CONNECTIONS} connections; close one and retry"
                ),
            );
            // Best effort: the socket is new, so its buffer takes this small answer.
            let _ = stream.write_all(&busy.encode(false));
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("API server: cannot make a connection non-blocking: {e}");
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let registered = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        );
        if let Err(e) = registered {
            tracing::warn!("API server: cannot watch a connection: {e}");
            return;
        }
        self.connections.insert(token, Connection::new(stream));
    }

    fn serve(&mut self, token: u64, events: EventSet) {
        let Some(mut conn) = self.connections.remove(&token) else {
            return;
        };
        let healthy = self.serve_connection(&mut conn, events);
        if healthy.is_ok() && !conn.finished() {
            let wanted = conn.wanted();
            if wanted != conn.interest {
                let modified = self.epoll.ctl(
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(wanted, token),
                );
                if modified.is_err() {
                    self.close(conn);
                    return;
                }
                conn.interest = wanted;
            }
            self.connections.insert(token, conn);
        } else {
            self.close(conn);
        }
    }

    fn close(&self, conn: Connection) {
        // Deregister before the stream is dropped (which closes the descriptor); failure leaves nothing to undo.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Reads, answers complete requests in order, and writes; an error means the connection is broken.
    fn serve_connection(&mut self, conn: &mut Connection, events: EventSet) -> io::Result<()> {
        if events.contains(EventSet::IN) {
            conn.fill()?;
        } else if events.intersects(EventSet::ERROR | EventSet::HANG_UP) && conn.output.is_empty() {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        loop {
            conn.flush()?;
            if !conn.output.is_empty() || conn.closing || self.shared.stopping() {
                return Ok(());
            }
            match http::parse_request(&conn.input) {
                Ok(Some(request)) => {
                    conn.input.drain(..request.len());
                    conn.continued = false;
                    let keep_alive = request.head.keep_alive;
                    let response = self.answer(&request);
                    conn.output.extend_from_slice(&response.encode(keep_alive));
                    conn.closing = !keep_alive;
                }
                Ok(None) => {
                    if conn.eof {
                        // A partial request the peer will never finish: nothing to answer.
                        conn.closing = true;
                    } else if !conn.continued && !conn.input.is_empty() {
                        if let Ok(Some(head)) = http::parse_head(&conn.input) {
                            if head.expect_continue {
                                conn.output.extend_from_slice(http::CONTINUE);
                                conn.continued = true;
                                continue;
                            }
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    // The stream's framing is lost: answer and close.
                    conn.output
                        .extend_from_slice(&Response::error(e.status, &e.message).encode(false));
                    conn.closing = true;
                }
            }
        }
    }

    /// The response to one complete request.
    fn answer(&self, request: &http::Request) -> Response {
        let api_request =
            match routes::route(&request.head.method, &request.head.path, &request.body) {
                Ok(r) => r,
                Err(e) => {
                    let mut response = Response::error(e.status(), &e.to_string());
                    response.allow = e.allow().map(str::to_string);
                    return response;
                }
            };
        match self.ask_vmm(api_request) {
            ApiResponse::Done => Response::no_content(),
            ApiResponse::Json(value) => Response::json(value.to_string()),
            ApiResponse::Error { status, message } => Response::error(status, &message),
        }
    }

    /// Sends a request to the VMM and waits for its answer (or for the handle to stop the server).
    fn ask_vmm(&self, request: super::ApiRequest) -> ApiResponse {
        let gone = || {
            ApiResponse::error(
                503,
                "the VMM is not taking API requests (it is shutting down or has stopped)",
            )
        };
        let (answer_tx, answer_rx) = mpsc::channel();
        if self.sender.requests.send((request, answer_tx)).is_err() {
            return gone();
        }
        if let Err(e) = self.sender.notify.write(1) {
            tracing::warn!("API server: cannot wake the VMM: {e}");
        }
        // The VMM normally answers at once. The timeout only bounds how long a shutdown of this server waits when
        // the VMM cannot answer any more (for example because it is the thread shutting the server down).
        loop {
            match answer_rx.recv_timeout(STOP_CHECK) {
                Ok(answer) => return answer,
                Err(RecvTimeoutError::Disconnected) => return gone(),
                Err(RecvTimeoutError::Timeout) if self.shared.stopping() => {
                    return ApiResponse::error(503, "the API server is shutting down")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}
