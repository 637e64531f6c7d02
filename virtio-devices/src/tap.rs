//! Tap interfaces: `/dev/net/tun` in tap mode with virtio-net headers.
//!
//! A [`Tap`] is one queue (one open descriptor) of a tap interface, opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` when the interface has several queues) and a 12-byte virtio-net header
//! (`TUNSETVNETHDRSZ`), so every frame read or written starts with a `virtio_net_hdr_v1`. Descriptors are
//! non-blocking.
//!
//! Atrium never makes a tap persistent: a tap it created (a kernel-chosen `tapN` name, or a name that did not
//! exist) disappears when its last queue is closed, that is when the last [`Tap`] is dropped. A persistent tap
//! that existed before (`ip tuntap add`) is left in place.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_ior_nr;

// TUNGETIFF: _IOR('T', 210, unsigned int), not in libc.
ioctl_ior_nr!(TUNGETIFF, 'T' as u32, 210, libc::c_uint);

/// Length of the virtio-net header in front of every frame on the tap (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// The tun character device.
const TUN_PATH: &str = "/dev/net/tun";
/// The name template for a tap whose name the kernel chooses.
const DEFAULT_NAME_TEMPLATE: &str = "tap%d";
/// Most bytes in an interface name (IFNAMSIZ less the NUL).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Most queues a tap interface has (the kernel's MAX_TAP_QUEUES).
pub const MAX_TAP_QUEUES: usize = 256;

/// Errors opening or configuring a tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// The interface name is not one the kernel accepts.
    #[error("tap name {0:?} is invalid; use 1 to 15 bytes without '/', ':' or whitespace")]
    InvalidName(String),
    /// The queue count is 0 or above the kernel's limit.
    #[error("a tap needs 1 to {MAX_TAP_QUEUES} queues, not {0}; change the queue count")]
    QueueCount(usize),
    /// `/dev/net/tun` may not be opened.
    #[error("cannot open /dev/net/tun: permission denied; run as root or grant CAP_NET_ADMIN")]
    TunPermission,
    /// `/dev/net/tun` does not exist.
    #[error("cannot open /dev/net/tun: no such device; load the tun module (modprobe tun)")]
    TunMissing,
    /// `/dev/net/tun` cannot be opened for another reason.
    #[error("cannot open /dev/net/tun: {0}; check that the tun driver works on this host")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot create or attach tap {name}: {source}; {hint}")]
    Attach {
        /// The requested name.
        name: String,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A tap-level ioctl (header size, offloads, queue attach) failed.
    #[error("cannot {action} on tap {name}: {source}; the host kernel may be too old for this tap feature")]
    Configure {
        /// What was being done.
        action: &'static str,
        /// The interface.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// A descriptor passed in is not a usable tap.
    #[error("fd {fd} is not a usable tap: {reason}")]
    NotATap {
        /// The descriptor number.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// Reading or setting the interface flags failed.
    #[error("cannot bring tap {name} up: {source}; run as root or grant CAP_NET_ADMIN")]
    LinkUp {
        /// The interface.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Offloads the reader of a tap accepts (`TUNSETOFFLOAD`): frames with partial checksums and segmentation
/// offloads the kernel may hand over instead of finishing them itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// Partial checksums (`TUN_F_CSUM`). Every other offload needs it.
    pub csum: bool,
    /// TCP segmentation over IPv4 (`TUN_F_TSO4`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (`TUN_F_TSO6`).
    pub tso6: bool,
    /// TCP segmentation with ECN (`TUN_F_TSO_ECN`); needs `tso4` or `tso6`.
    pub tso_ecn: bool,
    /// UDP fragmentation (`TUN_F_UFO`).
    pub ufo: bool,
}

impl TapOffloads {
    /// Every offload.
    pub const ALL: Self = Self {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
        ufo: true,
    };

    /// The `TUNSETOFFLOAD` argument. Offloads whose prerequisites are missing are left out, as the kernel would
    /// reject them.
    pub fn flags(self) -> libc::c_uint {
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        if self.tso_ecn && (self.tso4 || self.tso6) {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if self.ufo {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }
}

/// One queue of a tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
    multi_queue: bool,
    /// Whether the queue takes part in the interface's traffic (always true for a single-queue tap).
    attached: AtomicBool,
}

/// Whether the kernel would accept `name` as an interface name (or, with `%d`, a name template).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

/// The index of interface `name` in the calling thread's network namespace, if it exists.
pub(crate) fn if_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// An `ifreq` naming `name` (already validated: at most 15 bytes), everything else zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a byte array and a union of integers, arrays and a pointer); all zeroes is a
    // valid value of every member.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME_LEN)) {
        *dst = src as libc::c_char;
    }
    req
}

/// The name the kernel wrote back into `req`.
fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn attach_hint(err: &io::Error, multi_queue: bool) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "run as root or grant CAP_NET_ADMIN",
        Some(libc::EBUSY) => "another process uses this tap; close it or pick another name",
        Some(libc::EINVAL) if multi_queue => {
            "an interface with this name exists but is not a multi-queue tap; delete it or pick another name"
        }
        Some(libc::EINVAL) => {
            "an interface with this name exists but is not a single-queue tap; delete it or pick another name"
        }
        _ => "check the interface name and the host's tun support",
    }
}

fn open_tun() -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|err| match err.kind() {
            io::ErrorKind::PermissionDenied => TapError::TunPermission,
            io::ErrorKind::NotFound => TapError::TunMissing,
            _ => TapError::OpenTun(err),
        })
}

impl Tap {
    /// Opens a single-queue tap: `name` if given (created when it does not exist), else a new tap whose name the
    /// kernel chooses.
    pub fn open(name: Option<&str>) -> Result<Self, TapError> {
        let mut queues = Self::open_queues(name, 1)?;
        // open_queues returns exactly one queue for a count of 1.
        queues.pop().ok_or(TapError::QueueCount(0))
    }

    /// Takes over a tap queue another process opened and passed in (e.g. by a management daemon without
    /// CAP_NET_ADMIN for us). It must be a tap (not tun) opened with IFF_VNET_HDR; Atrium never deletes it.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let not_tap = |reason: String| TapError::NotATap { fd: raw, reason };
        let file = File::from(fd);
        let mut req = ifreq("");
        // SAFETY: TUNGETIFF writes a `struct ifreq`; `req` is one, exclusively borrowed for the call. On a descriptor
        // that is not a tun/tap the kernel rejects the request without touching `req`.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNGETIFF(), &mut req) };
        if ret < 0 {
            return Err(not_tap(format!(
                "{} (pass a descriptor of /dev/net/tun attached to a tap)",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & libc::IFF_TAP == 0 {
            return Err(not_tap("it is a tun device; Atrium needs a tap".into()));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(not_tap(
                "it was opened without IFF_VNET_HDR; open it with that flag".into(),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL only read and set the descriptor's status flags.
        let nonblocking = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            fl >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(not_tap(format!(
                "cannot make it non-blocking: {}",
                io::Error::last_os_error()
            )));
        }
        let tap = Self {
            file,
            name: ifreq_name(&req),
            created: false,
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
            attached: AtomicBool::new(true),
        };
        // Lossless: 12 fits an int.
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through its pointer argument; `hdr_len` lives across the call.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(tap.configure_error("set the virtio-net header size"));
        }
        Ok(tap)
    }

    /// Opens `count` queues of one tap (`IFF_MULTI_QUEUE` when `count` > 1): `name` if given (created when it does
    /// not exist), else a new tap whose name the kernel chooses.
    pub fn open_queues(name: Option<&str>, count: usize) -> Result<Vec<Self>, TapError> {
        if count == 0 || count > MAX_TAP_QUEUES {
            return Err(TapError::QueueCount(count));
        }
        let requested = name.unwrap_or(DEFAULT_NAME_TEMPLATE);
        if !valid_name(requested) {
            return Err(TapError::InvalidName(requested.to_string()));
        }
        let created = requested.contains('%') || if_index(requested).is_none();
        let multi_queue = count > 1;
        let first = Self::open_queue(requested, multi_queue, created)?;
        let mut queues = Vec::with_capacity(count);
        let name = first.name.clone();
        queues.push(first);
        for _ in 1..count {
            queues.push(Self::open_queue(&name, multi_queue, created)?);
        }
        Ok(queues)
    }

    fn open_queue(name: &str, multi_queue: bool, created: bool) -> Result<Self, TapError> {
        let file = open_tun()?;
        let mut req = ifreq(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        // Lossless: the flags fit in 16 bits.
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, exclusively borrowed for the call, and
        // `file` is an open tun descriptor.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Attach {
                name: name.to_string(),
                hint: attach_hint(&source, multi_queue),
                source,
            });
        }
        let tap = Self {
            file,
            name: ifreq_name(&req),
            created,
            multi_queue,
            attached: AtomicBool::new(true),
        };
        // Lossless: 12 fits an int.
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through its pointer argument; `hdr_len` lives across the call.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(tap.configure_error("set the virtio-net header size"));
        }
        Ok(tap)
    }

    fn configure_error(&self, action: &'static str) -> TapError {
        TapError::Configure {
            action,
            name: self.name.clone(),
            source: io::Error::last_os_error(),
        }
    }

    /// The interface name.
    pub fn if_name(&self) -> &str {
        &self.name
    }

    /// Whether Atrium created the interface (it disappears when its last queue is closed).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether the tap has several queues.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// Sets the offloads the reader accepts (`TUNSETOFFLOAD`); [`TapOffloads::default`] turns them all off.
    pub fn set_offloads(&self, offloads: TapOffloads) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no user memory.
        let ret = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads.flags()),
            )
        };
        if ret < 0 {
            return Err(self.configure_error("set offloads"));
        }
        Ok(())
    }

    /// The richest offload set the tap accepts, found by trying; leaves every offload off.
    pub fn supported_offloads(&self) -> TapOffloads {
        let all = TapOffloads::ALL;
        let candidates = [
            all,
            TapOffloads { ufo: false, ..all },
            TapOffloads {
                csum: true,
                ..TapOffloads::default()
            },
        ];
        let supported = candidates
            .into_iter()
            .find(|offloads| self.set_offloads(*offloads).is_ok())
            .unwrap_or_default();
        if let Err(err) = self.set_offloads(TapOffloads::default()) {
            tracing::warn!(%err, "cannot turn tap offloads off after probing them");
        }
        supported
    }

    /// Makes this queue take part in (or leave) the interface's traffic (`TUNSETQUEUE`). The kernel only steers
    /// frames to attached queues. A single-queue tap is always attached.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        if self.attached.load(Ordering::Acquire) == enabled {
            return Ok(());
        }
        if !self.multi_queue {
            return Err(TapError::Configure {
                action: "detach the queue",
                name: self.name.clone(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut req = ifreq("");
        let flags = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        // Lossless: the flags fit in 16 bits.
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETQUEUE reads a `struct ifreq`; `req` is one and lives across the call.
        let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE, &req) };
        if ret < 0 {
            return Err(self.configure_error(if enabled {
                "attach the queue"
            } else {
                "detach the queue"
            }));
        }
        self.attached.store(enabled, Ordering::Release);
        Ok(())
    }

    /// Whether this queue takes part in the interface's traffic.
    pub fn is_queue_enabled(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Brings the interface up (`IFF_UP`), as `ip link set NAME up` does.
    pub fn set_up(&self) -> Result<(), TapError> {
        let socket = self.control_socket()?;
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS writes the flags into the `struct ifreq` it is given; `req` is one, exclusively
        // borrowed for the call.
        let ret = unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS, &mut req) };
        if ret < 0 {
            return Err(self.link_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        // Lossless: IFF_UP is bit 0.
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the `struct ifreq` it is given; `req` is one and lives across the call.
        let ret = unsafe { ioctl_with_ref(&socket, libc::SIOCSIFFLAGS, &req) };
        if ret < 0 {
            return Err(self.link_error());
        }
        Ok(())
    }

    /// Whether the interface is up.
    pub fn is_up(&self) -> Result<bool, TapError> {
        let socket = self.control_socket()?;
        let mut req = ifreq(&self.name);
        // SAFETY: as in `set_up`.
        let ret = unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS, &mut req) };
        if ret < 0 {
            return Err(self.link_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        Ok(i32::from(flags) & libc::IFF_UP != 0)
    }

    /// An AF_INET socket for interface ioctls, in the network namespace of the calling thread.
    fn control_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.link_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn link_error(&self) -> TapError {
        TapError::LinkUp {
            name: self.name.clone(),
            source: io::Error::last_os_error(),
        }
    }

    /// Reads one frame (virtio-net header first) into `buf`; `WouldBlock` when there is none. A frame longer than
    /// `buf` is cut short.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
