//! virtio-net on a real tap and the virtio console, end to end with the in-tree guest.
//!
//! The network test runs in a private network namespace: the test thread unshares its network namespace, starts the
//! VMM from that thread (the child inherits the namespace, so the tap Atrium creates lives there), and talks to the
//! guest through a raw packet socket on the tap. The namespace and the tap vanish with the last process using them.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const ETHERTYPE: u16 = 0x88b5;

/// Opens a raw packet socket bound to interface `name`, with a receive timeout.
fn packet_socket(name: &str) -> Option<i32> {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return None;
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sockaddr_ll is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Some(fd)
}

/// In the calling thread's private network namespace: starts the guest's `virtio-net` action with `net` (whose
/// MAC must be 52:54:00:12:34:56), answers its frame on interface `ifname` and checks the guest got the answer.
/// `prepare` runs on the command before it starts (e.g. to pass a descriptor).
fn exchange_frames(ifname: &str, net: &str, prepare: impl FnOnce(&mut std::process::Command)) {
    no_ipv6();
    let kernel = guest("report.bzImage");
    let mut cmd = atrium();
    cmd.args(["--kernel", &kernel, "--cmdline", "action=virtio-net"])
        .args(["--net", net])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    prepare(&mut cmd);
    let child = cmd.spawn().unwrap();
    // Wait for the tap to appear, then answer the guest's frame with one of our own.
    let mut fd = None;
    for _ in 0..3000 {
        fd = packet_socket(ifname);
        if fd.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let fd = fd.expect("the tap never appeared");
    let mut buf = [0u8; 2048];
    let mut got = None;
    for _ in 0..60 {
        // SAFETY: `buf` is a writable buffer of the given length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && u16::from_be_bytes([buf[12], buf[13]]) == ETHERTYPE {
            got = Some(buf[..n as usize].to_vec());
            break;
        }
    }
    let Some(frame) = got else {
        let run = wait_bounded(child, GUEST_LIMIT);
        panic!("no frame from the guest: {run:?}");
    };
    assert_eq!(
        &frame[6..12],
        &[0x52, 0x54, 0, 0x12, 0x34, 0x56],
        "source MAC is the configured one"
    );
    assert!(
        frame.windows(15).any(|w| w == b"atrium-net-test"),
        "payload missing"
    );
    let mut reply = Vec::new();
    reply.extend_from_slice(&frame[6..12]);
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(b"reply-from-the-host-side-of-the-tap");
    reply.resize(64, 0);
    // SAFETY: `reply` is a readable buffer of the given length.
    let sent = unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(sent, reply.len() as isize);
    // SAFETY: closing our own socket.
    unsafe { libc::close(fd) };
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(run.line("net: mac="), "52:54:00:12:34:56");
    let line = run.line("net: tx=");
    assert!(line.starts_with("ok rx=64 ethertype=0x88b5"), "{line}");
}

#[test]
fn virtio_net_frames_cross_a_tap_in_a_private_namespace() {
    if !kvm_available() {
        return;
    }
    let handle = std::thread::spawn(|| {
        if !enter_private_netns() {
            return;
        }
        exchange_frames("atrnet0", "tap=atrnet0,mac=52:54:00:12:34:56", |_| {});
    });
    handle.join().expect("network test thread");
}

/// No IPv6 in this namespace, so the kernel sends no neighbour/router solicitations that would reach the guest before
/// the test's frame.
fn no_ipv6() {
    for knob in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
        let _ = std::fs::write(path, "1");
    }
}

/// Opens a tap queue the way a management daemon would (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) and brings it up.
fn open_tap(name: &str) -> std::fs::File {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let up = std::process::Command::new("ip")
        .args(["link", "set", name, "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "ip link set {name} up");
    tun
}

#[test]
fn virtio_net_on_a_tap_descriptor_passed_by_the_parent() {
    if !kvm_available() {
        return;
    }
    let handle = std::thread::spawn(|| {
        if !enter_private_netns() {
            return;
        }
        no_ipv6();
        let tap = open_tap("fdtap0");
        use std::os::fd::AsRawFd;
        let raw = tap.as_raw_fd();
        exchange_frames("fdtap0", "fd=3,mac=52:54:00:12:34:56", |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls: dup2 puts the tap at descriptor 3 (without
            // close-on-exec) for atrium to take over.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 onto itself keeps close-on-exec set; then clear it instead.
                    let rc = if raw == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(raw, 3)
                    };
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        });
        drop(tap);
    });
    handle.join().expect("network test thread");
}

#[test]
fn a_descriptor_that_is_not_open_is_refused() {
    if !kvm_available() {
        return;
    }
    let run = run_atrium(&["--net", "fd=97"], GUEST_LIMIT);
    assert_eq!(run.code(), 1, "{run:?}");
    assert!(
        run.stderr.contains("descriptor 97 is not open"),
        "{}",
        run.stderr
    );
}

#[test]
fn virtio_console_carries_output_and_input() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-console");
    let serial = dir.join("serial.log");
    let kernel = guest("report.bzImage");
    let mut child = atrium()
        .args(["--kernel", &kernel, "--cmdline", "action=virtio-console"])
        .args([
            "--serial",
            &format!("file={}", serial.display()),
            "--console",
            "tty",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed-into-hvc0").unwrap();
    drop(stdin);
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    // The console's output is the VMM's stdout; the serial port went to the file.
    assert_eq!(run.serial.trim_end(), "hello from virtio-console");
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(log.contains("console: tx=ok"), "{log}");
    assert!(log.contains("console: rx=typed-into-hvc0"), "{log}");
}

#[test]
fn serial_and_console_cannot_share_the_terminal() {
    let run = run_atrium(&["--console", "tty"], GUEST_LIMIT);
    assert_eq!(run.code(), 1, "{run:?}");
    assert!(
        run.stderr.contains("cannot share the terminal"),
        "{}",
        run.stderr
    );
}
