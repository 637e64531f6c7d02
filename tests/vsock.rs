//! virtio-vsock end to end: the in-tree guest's vsock driver against Atrium's Unix-socket host side, both ways.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn guest_connects_to_a_host_unix_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("vsock-connect");
    let socket = dir.join("vm.vsock");
    // The guest's connection to host port 5000 arrives at <socket>_5000.
    let listener = UnixListener::bind(format!("{}_5000", socket.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(GUEST_LIMIT)).unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        conn.write_all(b"hello from the host\n").unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        line
    });
    let kernel = guest("report.bzImage");
    let spec = format!("cid=3,socket={}", socket.display());
    let run = run_atrium(
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "action=vsock-connect=5000",
            "--vsock",
            &spec,
        ],
        GUEST_LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        run.line("vsock: cid=3 connect=5000 result="),
        "ok reply=hello from the host"
    );
    assert_eq!(host.join().unwrap(), "hello from the guest over vsock\n");
    assert!(!socket.exists(), "the vsock socket was not removed at exit");
}

#[test]
fn host_connects_to_a_guest_port() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("vsock-listen");
    let socket = dir.join("vm.vsock");
    let kernel = guest("report.bzImage");
    let spec = format!("cid=7,socket={}", socket.display());
    let child = atrium()
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "action=vsock-listen=1234",
            "--vsock",
            &spec,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Connect once the VMM listens; the guest may not be listening yet, so retry a refused CONNECT.
    let mut answer = String::new();
    for _ in 0..300 {
        let Ok(mut conn) = UnixStream::connect(&socket) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        conn.set_read_timeout(Some(GUEST_LIMIT)).unwrap();
        conn.write_all(b"CONNECT 1234\n").unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut ok = String::new();
        if reader.read_line(&mut ok).unwrap_or(0) == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert!(ok.starts_with("OK "), "{ok}");
        conn.write_all(b"ping from the host\n").unwrap();
        reader.read_line(&mut answer).unwrap();
        break;
    }
    assert_eq!(answer, "echo:ping from the host\n");
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    let line = run.line("vsock: listen=1234 peer=");
    assert!(line.starts_with("2:"), "{line}");
    assert!(line.ends_with("got=ping from the host"), "{line}");
}
