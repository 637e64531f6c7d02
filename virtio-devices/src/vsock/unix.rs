//! The host's Unix sockets: the listening socket host programs connect to, and non-blocking connections to the
//! per-port sockets guest programs connect to.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::VsockError;

/// The socket for guest connections to host port `port`: `<socket>_<port>`.
pub(crate) fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut name = OsString::from(socket.as_os_str());
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Listens on `path`, non-blocking. A stale socket file there is replaced; any other kind of file is an error.
pub(crate) fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    let too_long = || VsockError::PathTooLong(path.to_path_buf());
    // Leave room for `_<port>` (up to 11 bytes) and the terminating NUL.
    if path.as_os_str().len() + 12 > max_path_len() {
        return Err(too_long());
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(meta) => {
            let kind = if meta.is_file() {
                "a regular file"
            } else if meta.is_dir() {
                "a directory"
            } else {
                "a file that is not a socket"
            };
            return Err(VsockError::PathInUse {
                path: path.to_path_buf(),
                kind,
            });
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VsockError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let bind_err = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Removes the socket file at `path` if it is still a socket.
pub(crate) fn remove_socket(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn max_path_len() -> usize {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_path.len()
}

/// Connects a non-blocking stream socket to `path` without ever waiting: a listener whose backlog is full
/// refuses like one that does not exist.
pub(crate) fn connect(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just created and owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes that outlives the call.
    let ret = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
