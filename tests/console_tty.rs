//! `--serial tty` on a terminal: the terminal goes into raw mode, keys reach the guest, Ctrl-A x quits, and the
//! terminal's mode is restored afterwards. Uses a real pseudo-terminal.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use common::*;

/// Opens a pseudo-terminal pair (master, slave).
fn openpty() -> (File, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two descriptors into the provided integers; the name/termios/winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just created by openpty and are owned by nobody else.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn raw_terminal_passes_keys_and_ctrl_a_x_quits_and_restores_mode() {
    if !kvm_available() {
        return;
    }
    let (mut master, slave) = openpty();
    assert_ne!(
        lflag(&slave) & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let kernel = guest("report.bzImage");
    let mut child = atrium()
        .args(["--kernel", &kernel, "--cmdline", "action=echo"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "atrium-guest: echo");
    // In raw mode a key arrives at once, without a newline; the guest echoes it.
    master.write_all(b"k").unwrap();
    read_until(&mut stdout, &mut seen, "atrium-guest: echo\nk");
    assert_eq!(
        lflag(&slave) & libc::ICANON,
        0,
        "atrium should have put the terminal in raw mode"
    );
    master.write_all(&[0x01, b'x']).unwrap();
    child.stdout = Some(stdout);
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_ne!(
        lflag(&slave) & libc::ICANON,
        0,
        "the terminal mode was not restored"
    );
}
