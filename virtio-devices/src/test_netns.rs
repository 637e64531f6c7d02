//! Real taps for tests: a private network namespace per test and a raw packet socket on the tap.
//!
//! Each test runs on a thread that moved into a new network namespace (`unshare(CLONE_NEWNET)`, like
//! `unshare -n`). Taps and sockets created there belong to that namespace, and the namespace (with every interface
//! in it) is freed by the kernel when its last descriptor closes, so nothing is left behind even when a test fails.
//! Tests need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `/dev/net/tun`: without them they are skipped with a
//! message, and fail under `CI=true`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An IEEE 802 local experimental ethertype, which nothing else on the test interface sends.
pub(crate) const TEST_ETHERTYPE: u16 = 0x88b5;

/// Runs `test` on a thread in a new network namespace. Returns `None` (after saying so) when the host cannot
/// provide one; panics instead when `CI` is `true`.
pub(crate) fn in_private_netns<R: Send>(name: &str, test: impl FnOnce() -> R + Send) -> Option<R> {
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<R, String> {
                // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only the calling thread to a new namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "cannot create a network namespace: {}",
                        io::Error::last_os_error()
                    ));
                }
                if let Err(err) = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                {
                    return Err(format!("cannot open /dev/net/tun: {err}"));
                }
                // Keep IPv6 autoconfiguration traffic off the test taps (best effort: IPv6 may be absent).
                for knob in ["default", "all"] {
                    let _ =
                        std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
                }
                Ok(test())
            })
            .join()
    });
    match result {
        Ok(Ok(value)) => Some(value),
        Ok(Err(reason)) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{name}: {reason}; tap tests need root and /dev/net/tun");
            }
            eprintln!("SKIPPED {name}: {reason}; tap tests need root and /dev/net/tun");
            None
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// An Ethernet frame of the test ethertype carrying `payload`.
pub(crate) fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Whether `frame` is of the test ethertype.
pub(crate) fn is_test_frame(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&TEST_ETHERTYPE.to_be_bytes()[..])
}

/// A raw `AF_PACKET` socket bound to one interface: what it sends leaves through the interface (and is read from
/// the tap), what is written into the tap arrives here.
pub(crate) struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Binds to `if_name` in the calling thread's namespace. Receives give up after 30 s, which only guards
    /// against a hung test.
    pub(crate) fn bind(if_name: &str) -> Self {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(if_name).unwrap();
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {if_name}");
        // SAFETY: sockaddr_ll is plain old data; zero is valid for every field.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll of the size given, alive across the call.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the size given, alive across the call.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        Self { fd, ifindex }
    }

    /// Sends `frame` out of the interface.
    pub(crate) fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain old data; zero is valid for every field.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given and alive across the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame of the test ethertype arriving on the interface (other traffic is skipped).
    pub(crate) fn recv_test_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain old data; zero is valid for every field.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut addr_len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `addr` are valid for the lengths given and exclusively borrowed for the call.
            let len = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut addr as *mut libc::sockaddr_ll).cast(),
                    &mut addr_len,
                )
            };
            assert!(
                len >= 0,
                "no frame arrived on the tap: {}",
                io::Error::last_os_error()
            );
            let frame = &buf[..len as usize];
            if addr.sll_pkttype != libc::PACKET_OUTGOING && is_test_frame(frame) {
                return frame.to_vec();
            }
        }
    }
}
