//! The serial console's host side: where guest output goes and where guest input comes from, for each
//! `--serial` mode. It outlives a single boot, so a guest reboot keeps the terminal, file or socket.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_sys_util::terminal::Terminal;

use crate::config::ConsoleOutputMode;

/// The byte that starts an escape sequence on an interactive terminal (Ctrl-A).
pub const ESCAPE_BYTE: u8 = 0x01;
/// After the escape byte: quit the VMM.
pub const ESCAPE_QUIT: u8 = b'x';

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be created.
    #[error("--serial file={path}: cannot create the file: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("--serial socket={path}: cannot listen on the socket: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Duplicating stdout failed.
    #[error("cannot use standard output for the serial console: {0}")]
    Stdout(#[source] io::Error),
}

/// Where guest output currently goes.
enum Sink {
    Discard,
    File(File),
    /// A socket client, when one is connected.
    Client(Option<UnixStream>),
}

/// A cloneable writer the UART writes through.
#[derive(Clone)]
pub struct ConsoleWriter(Arc<Mutex<Sink>>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Discard => Ok(buf.len()),
            Sink::File(f) => f.write(buf),
            Sink::Client(Some(stream)) => match stream.write_all(buf) {
                Ok(()) => Ok(buf.len()),
                Err(_) => {
                    // The client went away: drop it and keep the guest running.
                    *sink = Sink::Client(None);
                    Ok(buf.len())
                }
            },
            Sink::Client(None) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut *self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Sink::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// What a readable console input produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleInput {
    /// Bytes for the guest.
    Bytes(Vec<u8>),
    /// The operator typed the quit escape sequence.
    Quit,
    /// The input ended (EOF or a client disconnected); stop watching this fd.
    Closed,
    /// Nothing to do (e.g. a new client was accepted).
    Nothing,
}

/// The console's host side.
pub struct Console {
    enabled: bool,
    sink: Arc<Mutex<Sink>>,
    /// Whether stdin feeds the guest.
    stdin: bool,
    /// Whether stdin is a terminal we put in raw mode (restored on drop).
    raw_tty: bool,
    escape_pending: bool,
    listener: Option<(UnixListener, PathBuf)>,
}

impl Console {
    /// Opens the host side for `mode`.
    pub fn new(mode: &ConsoleOutputMode) -> Result<Self, ConsoleError> {
        let mut console = Console {
            enabled: true,
            sink: Arc::new(Mutex::new(Sink::Discard)),
            stdin: false,
            raw_tty: false,
            escape_pending: false,
            listener: None,
        };
        match mode {
            ConsoleOutputMode::Off => console.enabled = false,
            ConsoleOutputMode::Null => {}
            ConsoleOutputMode::Tty => {
                // SAFETY: dup() has no memory-safety preconditions; we check its result.
                let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
                if fd < 0 {
                    return Err(ConsoleError::Stdout(io::Error::last_os_error()));
                }
                // SAFETY: `fd` is a fresh descriptor from dup() that nothing else owns.
                let file = unsafe { File::from_raw_fd(fd) };
                *console.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::File(file);
                console.stdin = true;
                let stdin = io::stdin();
                // SAFETY: isatty() only inspects the descriptor.
                let is_tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
                if is_tty && stdin.lock().set_raw_mode().is_ok() {
                    console.raw_tty = true;
                }
            }
            ConsoleOutputMode::File(path) => {
                let file = File::create(path).map_err(|source| ConsoleError::File {
                    path: path.clone(),
                    source,
                })?;
                *console.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::File(file);
            }
            ConsoleOutputMode::Socket(path) => {
                remove_stale_socket(path);
                let listener = UnixListener::bind(path).map_err(|source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|source| ConsoleError::Socket {
                        path: path.clone(),
                        source,
                    })?;
                *console.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::Client(None);
                console.listener = Some((listener, path.clone()));
            }
        }
        Ok(console)
    }

    /// Whether the guest gets a serial port at all (`--serial off` removes it).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A writer for the UART's output.
    pub fn writer(&self) -> ConsoleWriter {
        ConsoleWriter(self.sink.clone())
    }

    /// The descriptors the control loop should poll for input.
    pub fn input_fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        if self.stdin {
            fds.push(libc::STDIN_FILENO);
        }
        if let Some((listener, _)) = &self.listener {
            fds.push(listener.as_raw_fd());
        }
        fds
    }

    /// The connected socket client's descriptor, if any (to poll for its input).
    pub fn client_fd(&self) -> Option<RawFd> {
        match &*self.sink.lock().unwrap_or_else(|p| p.into_inner()) {
            Sink::Client(Some(stream)) => Some(stream.as_raw_fd()),
            _ => None,
        }
    }

    /// Handles readiness of `fd` (one of `input_fds` or `client_fd`).
    pub fn handle_readable(&mut self, fd: RawFd) -> ConsoleInput {
        if let Some((listener, _)) = &self.listener {
            if fd == listener.as_raw_fd() {
                if let Ok((stream, _)) = listener.accept() {
                    // One client at a time: a new one replaces the old.
                    let _ = stream.set_nonblocking(true);
                    *self.sink.lock().unwrap_or_else(|p| p.into_inner()) =
                        Sink::Client(Some(stream));
                }
                return ConsoleInput::Nothing;
            }
        }
        let mut buf = [0u8; 64];
        let read = if fd == libc::STDIN_FILENO {
            io::stdin().lock().read(&mut buf)
        } else {
            let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *sink {
                Sink::Client(Some(stream)) if stream.as_raw_fd() == fd => {
                    let r = stream.read(&mut buf);
                    if matches!(r, Ok(0) | Err(_))
                        && !matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                    {
                        *sink = Sink::Client(None);
                    }
                    r
                }
                _ => return ConsoleInput::Closed,
            }
        };
        match read {
            Ok(0) => ConsoleInput::Closed,
            Ok(n) => self.filter_escape(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                ConsoleInput::Nothing
            }
            Err(_) => ConsoleInput::Closed,
        }
    }

    /// On an interactive terminal, Ctrl-A x quits and Ctrl-A Ctrl-A sends one Ctrl-A; elsewhere bytes pass as is.
    fn filter_escape(&mut self, bytes: &[u8]) -> ConsoleInput {
        if !self.raw_tty {
            return ConsoleInput::Bytes(bytes.to_vec());
        }
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    ESCAPE_QUIT => return ConsoleInput::Quit,
                    ESCAPE_BYTE => out.push(ESCAPE_BYTE),
                    _ => {}
                }
            } else if b == ESCAPE_BYTE {
                self.escape_pending = true;
            } else {
                out.push(b);
            }
        }
        ConsoleInput::Bytes(out)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.raw_tty {
            let _ = io::stdin().lock().set_canon_mode();
        }
        if let Some((_, path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes a socket file left behind by an earlier run, but never a regular file.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_console() -> Console {
        let mut c = Console::new(&ConsoleOutputMode::Null).unwrap();
        c.raw_tty = true;
        c
    }

    #[test]
    fn escape_sequence_quits() {
        let mut c = raw_console();
        assert_eq!(c.filter_escape(b"ab"), ConsoleInput::Bytes(b"ab".to_vec()));
        assert_eq!(c.filter_escape(&[ESCAPE_BYTE]), ConsoleInput::Bytes(vec![]));
        assert_eq!(c.filter_escape(b"x"), ConsoleInput::Quit);
    }

    #[test]
    fn doubled_escape_sends_one() {
        let mut c = raw_console();
        assert_eq!(
            c.filter_escape(&[ESCAPE_BYTE, ESCAPE_BYTE, b'z']),
            ConsoleInput::Bytes(vec![ESCAPE_BYTE, b'z'])
        );
    }

    #[test]
    fn pipes_pass_bytes_unchanged() {
        let mut c = Console::new(&ConsoleOutputMode::Null).unwrap();
        assert_eq!(
            c.filter_escape(&[ESCAPE_BYTE, b'x']),
            ConsoleInput::Bytes(vec![ESCAPE_BYTE, b'x'])
        );
    }

    #[test]
    fn file_output_receives_bytes() {
        let dir = std::env::temp_dir().join(format!("atrium-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.txt");
        let c = Console::new(&ConsoleOutputMode::File(path.clone())).unwrap();
        c.writer().write_all(b"hello").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
