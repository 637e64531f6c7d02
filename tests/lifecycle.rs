//! How a VM ends: power-off, reset (reboot in place or --no-reboot), triple fault, emulation failure, debug-exit,
//! and SIGTERM/SIGINT.

mod common;

use std::process::Stdio;

use common::*;

fn report(action: &str, extra: &[&str]) -> Run {
    let kernel = guest("report.bzImage");
    let cmdline = format!("action={action}");
    let mut args = vec!["--kernel", kernel.as_str(), "--cmdline", cmdline.as_str()];
    args.extend_from_slice(extra);
    run_atrium(&args, GUEST_LIMIT)
}

#[test]
fn acpi_poweroff_exits_zero() {
    if !kvm_available() {
        return;
    }
    let run = report("poweroff", &[]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.serial.contains("atrium-guest: poweroff"));
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

fn reboots_in_place(method: &str, extra: &[&str]) {
    if !kvm_available() {
        return;
    }
    let run = report(&format!("reset-{method}"), extra);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        run.lines("atrium-guest: format=").len(),
        2,
        "expected two boots:\n{}",
        run.serial
    );
    assert_eq!(
        run.lines("atrium-guest: reset via ").len(),
        1,
        "{}",
        run.serial
    );
    assert_eq!(
        run.lines("atrium-guest: second boot").len(),
        1,
        "{}",
        run.serial
    );
}

#[test]
fn i8042_reset_reboots_in_place() {
    reboots_in_place("i8042", &[]);
}

#[test]
fn acpi_reset_reboots_in_place() {
    reboots_in_place("acpi", &[]);
}

#[test]
fn triple_fault_reboots_when_asked() {
    if !kvm_available() {
        return;
    }
    let run = report("triple-fault", &["--triple-fault", "reboot"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        run.lines("atrium-guest: second boot").len(),
        1,
        "{}",
        run.serial
    );
}

#[test]
fn no_reboot_exits_on_reset() {
    if !kvm_available() {
        return;
    }
    let run = report("reset-i8042", &["--no-reboot"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        run.lines("atrium-guest: format=").len(),
        1,
        "{}",
        run.serial
    );
    assert!(run.lines("atrium-guest: second boot").is_empty());
}

#[test]
fn triple_fault_is_a_documented_crash() {
    if !kvm_available() {
        return;
    }
    let run = report("triple-fault", &[]);
    assert_eq!(run.code(), 3, "{run:?}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("atrium: the guest triple-faulted on vCPU 0"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rip="),
        "registers missing: {}",
        run.stderr
    );
}

#[test]
fn emulation_failure_is_a_documented_crash() {
    if !kvm_available() {
        return;
    }
    let run = report("emulation-failure", &[]);
    assert_eq!(run.code(), 4, "{run:?}");
    assert!(run.serial.contains("atrium-guest: emulation-failure"));
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("atrium: the guest crashed on vCPU 0:"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rip="),
        "registers missing: {}",
        run.stderr
    );
}

#[test]
fn debug_exit_sets_the_exit_code() {
    if !kvm_available() {
        return;
    }
    let run = report("debug-exit=42", &["--debug-exit"]);
    assert_eq!(run.code(), 42, "{run:?}");
}

#[test]
fn debug_exit_port_is_absent_unless_enabled() {
    if !kvm_available() {
        return;
    }
    // Without --debug-exit the write is unclaimed; the guest then falls through to power-off.
    let run = report("debug-exit=42", &[]);
    assert_eq!(run.code(), 0, "{run:?}");
}

fn stops_on_signal(signal: i32) {
    if !kvm_available() {
        return;
    }
    let kernel = guest("report.bzImage");
    let mut child = atrium()
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "action=halt",
            "--cpus",
            "boot=2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the guest says it is halting, by reading its serial output.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "atrium-guest: halting");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.stdout = Some(stdout);
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    stops_on_signal(libc::SIGTERM);
}

#[test]
fn sigint_stops_the_vm_cleanly() {
    stops_on_signal(libc::SIGINT);
}

#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    let kernel = guest("report.bzImage");
    let mut child = atrium()
        .args(["--kernel", &kernel, "--cmdline", "action=echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping-atrium q").unwrap();
    drop(stdin);
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    let after = run
        .serial
        .split("atrium-guest: echo")
        .nth(1)
        .unwrap_or_default();
    assert!(
        after.contains("ping-atrium"),
        "echo missing: {}",
        run.serial
    );
}

#[test]
fn serial_file_backend_captures_output() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("serial-file");
    let out = dir.join("serial.log");
    let spec = format!("file={}", out.display());
    let run = report("poweroff", &["--serial", &spec]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(
        run.serial.is_empty(),
        "stdout should be silent: {}",
        run.serial
    );
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(log.contains("atrium-guest: poweroff"), "{log}");
}

#[test]
fn serial_off_still_boots() {
    if !kvm_available() {
        return;
    }
    let run = report("poweroff", &["--serial", "off"]);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.serial.is_empty());
}

#[test]
fn serial_socket_backend_serves_a_client() {
    if !kvm_available() {
        return;
    }
    use std::io::{Read, Write};
    let dir = scratch_dir("serial-socket");
    let sock = dir.join("serial.sock");
    let kernel = guest("report.bzImage");
    let spec = format!("socket={}", sock.display());
    let child = atrium()
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "action=echo",
            "--serial",
            &spec,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tries = 0;
    let mut client = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) => {
                tries += 1;
                assert!(tries < 3000, "serial socket never appeared");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    };
    // Bytes sent by the client reach the guest's UART; the guest echoes them, and 'q' powers it off.
    client.write_all(b"via-socket q").unwrap();
    let mut out = String::new();
    let _ = client.read_to_string(&mut out);
    let run = wait_bounded(child, GUEST_LIMIT);
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(
        out.contains("via-socket"),
        "echo missing from the socket: {out}"
    );
    assert!(!sock.exists(), "the socket file was not removed at exit");
}
