//! Shared harness for the integration tests: runs the `atrium` binary on a guest and collects what it printed.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `atrium` binary under test.
pub fn atrium() -> Command {
    Command::new(env!("CARGO_BIN_EXE_atrium"))
}

/// Whether /dev/kvm is usable. Under CI (CI=true) its absence fails the test; elsewhere the test is skipped loudly.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/dev/kvm is required for this test under CI");
        }
        eprintln!("SKIPPED: /dev/kvm is not available");
    }
    ok
}

/// A finished run of the VMM.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything the guest wrote to the serial port (the VMM's stdout).
    pub serial: String,
    /// The VMM's stderr.
    pub stderr: String,
}

impl Run {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("atrium was killed: {self:?}"))
    }

    /// Lines of serial output that start with `prefix`, with the prefix removed.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .map(|s| s.to_string())
            .collect()
    }

    /// The single serial line starting with `prefix` (panics unless exactly one).
    pub fn line(&self, prefix: &str) -> String {
        let lines = self.lines(prefix);
        assert_eq!(
            lines.len(),
            1,
            "expected one '{prefix}' line in:\n{}\nstderr:\n{}",
            self.serial,
            self.stderr
        );
        lines[0].clone()
    }
}

/// Waits for `child` at most `limit` (a safety bound, not an assertion about speed); kills it and panics past that.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Run {
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for atrium") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!(
                "atrium did not finish within {limit:?}\nserial:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let serial = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Run {
        status,
        serial,
        stderr,
    }
}

/// Runs `atrium` with `args`, serial on stdout, stdin empty, bounded by `limit`.
pub fn run_atrium(args: &[&str], limit: Duration) -> Run {
    let child = atrium()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start atrium");
    wait_bounded(child, limit)
}

/// A fresh directory under the target dir for one test's files.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Path of a built guest image as a string.
pub fn guest(name: &str) -> String {
    guests::path(name).display().to_string()
}

/// Generous bound for small in-tree guests (they finish in milliseconds; this only guards against hangs).
pub const GUEST_LIMIT: Duration = Duration::from_secs(60);

/// The BSP's `smp: <k>/<n> cpus up` summary line (without the prefix).
pub fn smp_summary(run: &Run) -> String {
    let lines: Vec<String> = run
        .lines("smp: ")
        .into_iter()
        .filter(|l| l.ends_with("cpus up"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one smp summary in:\n{}",
        run.serial
    );
    lines[0].clone()
}

/// Reads `out` into `seen` until the text so far contains `needle` (panics if the output ends first).
pub fn read_until(out: &mut impl std::io::Read, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let n = out.read(&mut buf).expect("read guest output");
        assert!(
            n > 0,
            "output ended before '{needle}': {}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Moves the calling thread into a new, private network namespace (processes it starts inherit it). Returns false
/// (after a loud skip message) where that is not allowed; under CI that is a failure.
pub fn enter_private_netns() -> bool {
    // SAFETY: unshare only changes this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot create a network namespace under CI: {e}");
    }
    eprintln!("SKIPPED: cannot create a network namespace: {e}");
    false
}
