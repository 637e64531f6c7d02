//! The control API end to end: a real VMM on /dev/kvm with `--api-socket`, driven by `atrium-remote`, with the
//! in-tree guest playing the guest's side of ACPI hotplug (it reads the GED and the hotplug controllers directly).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use common::*;

/// A VMM with an API socket, whose serial output is read line by line on a thread.
struct Vmm {
    child: Child,
    socket: PathBuf,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Vmm {
    fn start(name: &str, args: &[&str]) -> Vmm {
        let dir = scratch_dir(name);
        let socket = dir.join("api.sock");
        let mut child = atrium()
            .args(["--api-socket", &socket.display().to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start atrium");
        let lines = spawn_reader(child.stdout.take().unwrap());
        let vmm = Vmm {
            child,
            socket,
            lines,
            seen: Vec::new(),
        };
        // The socket exists once the API thread is up.
        let mut tries = 0;
        while !vmm.socket.exists() {
            tries += 1;
            assert!(tries < 3000, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    fn boot_guest(name: &str, actions: &str, extra: &[&str]) -> Vmm {
        let kernel = guest("report.bzImage");
        let cmdline = format!("action={actions}");
        let mut args = vec!["--kernel", kernel.as_str(), "--cmdline", cmdline.as_str()];
        args.extend_from_slice(extra);
        Vmm::start(name, &args)
    }

    /// Waits (bounded) for a serial line starting with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        loop {
            match self.lines.recv_timeout(GUEST_LIMIT) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no '{prefix}' line; serial so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Collects lines until (bounded) one starting with `prefix` shows up, returning all lines since the last call.
    fn lines_until(&mut self, prefix: &str) -> Vec<String> {
        let start = self.seen.len();
        self.wait_line_after(start, prefix);
        self.seen[start..].to_vec()
    }

    fn wait_line_after(&mut self, start: usize, prefix: &str) {
        if self.seen[start..].iter().any(|l| l.starts_with(prefix)) {
            return;
        }
        loop {
            let line = self.lines.recv_timeout(GUEST_LIMIT).unwrap_or_else(|_| {
                panic!("no '{prefix}' line; serial:\n{}", self.seen.join("\n"))
            });
            let hit = line.starts_with(prefix);
            self.seen.push(line);
            if hit {
                return;
            }
        }
    }

    fn remote(&self, args: &[&str]) -> Output {
        remote(&self.socket, args)
    }

    fn remote_ok(&self, args: &[&str]) -> String {
        let out = self.remote(args);
        assert!(out.status.success(), "atrium-remote {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.remote_ok(&all)).expect("JSON output")
    }

    /// Waits for the VMM to exit (bounded) and returns its exit code.
    fn wait_exit(mut self) -> i32 {
        let mut waited = 0;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return status
                    .code()
                    .unwrap_or_else(|| panic!("killed; stderr {err}"));
            }
            waited += 1;
            assert!(waited < 6000, "VMM did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_reader(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

fn remote(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atrium-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run atrium-remote")
}

/// Sends raw bytes as an HTTP request and returns the status code.
fn raw_request(socket: &Path, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    (status, reply)
}

#[test]
fn ping_info_counters_and_shutdown_vmm() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest(
        "api-basic",
        "halt",
        &["--cpus", "boot=2", "--memory", "size=256M"],
    );
    vmm.wait_line("atrium-guest: halting");
    let ping = vmm.json(&["ping"]);
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ping["pid"], vmm.child.id());
    let info = vmm.json(&["info"]);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    let counters = vmm.json(&["counters"]);
    assert!(counters["vmm"].is_object(), "{counters}");
    vmm.remote_ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn create_and_boot_through_the_api() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::start("api-create", &[]);
    assert_eq!(vmm.json(&["info"])["state"], "NotCreated");
    let dir = scratch_dir("api-create-json");
    let config = dir.join("vm.json");
    let body = serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": {"path": guests::path("report.bzImage")}, "initramfs": null, "cmdline": "action=poweroff"},
        "serial": "tty",
        "debug_exit": false,
        "no_reboot": false,
        "triple_fault": "crash",
    });
    std::fs::write(&config, body.to_string()).unwrap();
    vmm.remote_ok(&["create", &config.display().to_string()]);
    assert_eq!(vmm.json(&["info"])["state"], "Created");
    vmm.remote_ok(&["boot"]);
    vmm.wait_line("atrium-guest: poweroff");
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest("api-pause", "tick=20", &[]);
    vmm.wait_line("tick: 3");
    vmm.remote_ok(&["pause"]);
    assert_eq!(vmm.json(&["info"])["state"], "Paused");
    // Drain what was printed before the pause took effect, then nothing more may arrive while paused.
    while let Ok(line) = vmm.lines.recv_timeout(Duration::from_millis(300)) {
        vmm.seen.push(line);
    }
    let last = vmm
        .seen
        .iter()
        .rev()
        .find(|l| l.starts_with("tick: "))
        .cloned()
        .unwrap();
    let paused: u64 = last["tick: ".len()..].parse().unwrap();
    assert!(
        vmm.lines.recv_timeout(Duration::from_millis(500)).is_err(),
        "the guest kept ticking while paused"
    );
    let out = vmm.remote(&["pause"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "pausing twice is a 409: {out:?}"
    );
    vmm.remote_ok(&["resume"]);
    let next = format!("tick: {}", paused + 1);
    vmm.wait_line(&next);
    vmm.remote_ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn power_button_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest("api-power", "hotplug", &[]);
    vmm.wait_line("hotplug: ready");
    vmm.remote_ok(&["power-button"]);
    vmm.wait_line("ged: power button");
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn resize_adds_cpus_that_the_guest_starts() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest("api-resize", "hotplug", &["--cpus", "boot=1,max=4"]);
    vmm.wait_line("hotplug: ready");
    vmm.remote_ok(&["resize", "--cpus", "3"]);
    vmm.wait_line("cpuhp: cpu 1 online");
    vmm.wait_line("cpuhp: cpu 2 online");
    assert_eq!(vmm.json(&["info"])["vcpus"], 3);
    // Beyond max and below boot are refused, and the VM keeps running unchanged.
    for bad in ["5", "0"] {
        let out = vmm.remote(&["resize", "--cpus", bad]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("HTTP 400"),
            "{out:?}"
        );
    }
    assert_eq!(vmm.json(&["info"])["vcpus"], 3);
    // Shrink: the guest offlines and ejects CPU 2, and the VMM stops its thread.
    vmm.remote_ok(&["resize", "--cpus", "2"]);
    vmm.wait_line("cpuhp: cpu 2 ejected");
    let mut tries = 0;
    while vmm.json(&["info"])["vcpus"] != 2 {
        tries += 1;
        assert!(tries < 500, "vCPU 2 was never removed");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn add_disk_then_remove_device_on_a_running_vm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-hotplug-disk");
    let disk = dir.join("hot.raw");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let mut vmm = Vmm::boot_guest("api-hotplug", "hotplug", &[]);
    vmm.wait_line("hotplug: ready");
    let pid = vmm.child.id();
    let (fds_before, threads_before) = (open_fds(pid), threads(pid));

    let spec = format!("path={},id=hot0,serial=HOT", disk.display());
    let added = vmm.remote_ok(&["add-disk", &spec]);
    assert!(added.contains("hot0"), "{added}");
    let lines = vmm.lines_until("blk: 0 flush=");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("pcihp: slot ") && l.ends_with(" up 1af4:1042")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "blk: 0 capacity=4096 serial=HOT"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("blk: 0 write=0 read=0 verify=ok")),
        "{lines:?}"
    );
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(bytes[512], 13, "the guest's pattern is on the host disk");

    // Adding the same id twice, or a missing image, is refused and changes nothing.
    let out = vmm.remote(&["add-disk", &spec]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = vmm.remote(&["add-disk", "path=/nonexistent.raw"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let info = vmm.json(&["info"]);
    assert_eq!(
        info["devices"].as_array().map(|d| d.len()),
        Some(1),
        "{info}"
    );

    // Unknown ids are a 404.
    let out = vmm.remote(&["remove-device", "nosuch"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 404"),
        "{out:?}"
    );

    vmm.remote_ok(&["remove-device", "hot0"]);
    vmm.wait_line("pcihp: slot 1 ejected");
    let mut tries = 0;
    while !vmm.json(&["info"])["devices"]
        .as_array()
        .is_some_and(|d| d.is_empty())
    {
        tries += 1;
        assert!(tries < 500, "the device was never removed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its image, eventfds and device thread are gone.
    assert_eq!(open_fds(pid), fds_before, "file descriptors leaked");
    assert_eq!(threads(pid), threads_before, "threads leaked");
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn bad_requests_get_4xx_and_the_vm_keeps_running() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest("api-bad", "halt", &[]);
    vmm.wait_line("atrium-guest: halting");
    let (status, _) = raw_request(
        &vmm.socket,
        "PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{not json",
    );
    assert_eq!(status, 400);
    let (status, _) = raw_request(
        &vmm.socket,
        "PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 21\r\nConnection: close\r\n\r\n{\"desired_cpus\": 2}  ",
    );
    assert_eq!(status, 400, "unknown fields are refused");
    let (status, _) = raw_request(
        &vmm.socket,
        "GET /api/v1/vm.nosuch HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    let (status, _) = raw_request(
        &vmm.socket,
        "GET /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    let (status, _) = raw_request(
        &vmm.socket,
        "PUT /api/v1/vm.resume HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 409, "resuming a running VM");
    assert_eq!(vmm.json(&["info"])["state"], "Running");
    vmm.remote_ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn fifty_concurrent_requests_leave_the_vm_consistent() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest("api-concurrent", "halt", &["--cpus", "boot=2"]);
    vmm.wait_line("atrium-guest: halting");
    let socket = vmm.socket.clone();
    let workers: Vec<_> = (0..50)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let args: &[&str] = match i % 3 {
                    0 => &["--json", "ping"],
                    1 => &["--json", "info"],
                    _ => &["--json", "counters"],
                };
                remote(&socket, args)
            })
        })
        .collect();
    for w in workers {
        let out = w.join().unwrap();
        assert!(out.status.success(), "{out:?}");
        let _: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    }
    let info = vmm.json(&["info"]);
    assert_eq!(
        (info["state"].clone(), info["vcpus"].clone()),
        ("Running".into(), 2.into())
    );
    vmm.remote_ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0);
}

fn if_exists(name: &str) -> bool {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

#[test]
fn add_net_creates_a_tap_and_remove_device_deletes_it() {
    if !kvm_available() {
        return;
    }
    // A private network namespace for this thread and the VMM it starts.
    let worker = std::thread::spawn(|| {
        if !enter_private_netns() {
            return;
        }
        let mut vmm = Vmm::boot_guest("api-hotplug-net", "hotplug", &[]);
        vmm.wait_line("hotplug: ready");
        let added = vmm.remote_ok(&["add-net", "tap=hpnet0,id=hn0,mac=52:54:00:aa:bb:cc"]);
        assert!(added.contains("hn0"), "{added}");
        vmm.wait_line("pcihp: slot 1 up 1af4:1041");
        assert!(if_exists("hpnet0"), "the tap was not created");
        vmm.remote_ok(&["remove-device", "hn0"]);
        vmm.wait_line("pcihp: slot 1 ejected");
        let mut tries = 0;
        while if_exists("hpnet0") {
            tries += 1;
            assert!(tries < 500, "the tap Atrium created outlived its device");
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm.remote_ok(&["power-button"]);
        assert_eq!(vmm.wait_exit(), 0);
    });
    worker.join().expect("network test thread");
}

#[test]
fn resize_memory_adds_an_acpi_memory_device_the_guest_uses() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest(
        "api-memory",
        "hotplug",
        &["--memory", "size=256M,hotplug_size=512M"],
    );
    vmm.wait_line("hotplug: ready");
    vmm.remote_ok(&["resize", "--memory", "512M"]);
    let line = vmm.wait_line("memhp: slot 0 ");
    assert!(line.ends_with("size=0x10000000 verify=ok"), "{line}");
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 512u64 << 20);
    // Beyond hotplug_size, not in 128 MiB steps, or shrinking: refused, and nothing changes.
    for bad in ["2G", "600M", "256M"] {
        let out = vmm.remote(&["resize", "--memory", bad]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("HTTP 400"),
            "{bad}: {out:?}"
        );
    }
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 512u64 << 20);
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn resize_memory_with_virtio_mem_grows_and_shrinks_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::boot_guest(
        "api-virtio-mem",
        "virtio-mem=3,hotplug",
        &[
            "--memory",
            "size=256M,hotplug_method=virtio-mem,hotplug_size=512M",
        ],
    );
    let ready = vmm.wait_line("virtio-mem: region=");
    assert!(
        ready.ends_with(" size=0x20000000 block=0x200000 requested=0 MiB"),
        "{ready}"
    );
    let info = vmm.json(&["info"]);
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    assert!(
        info["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == "mem0"),
        "{info}"
    );
    // Grow by 256 MiB: the guest plugs 128 blocks and writes into them.
    vmm.remote_ok(&["resize", "--memory", "512M"]);
    let lines = vmm.lines_until("virtio-mem: plugged=");
    assert_eq!(
        lines.last().unwrap(),
        "virtio-mem: plugged=256 MiB requested=256 MiB ok"
    );
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 512u64 << 20);
    // Shrink by 128 MiB: the guest unplugs the last 64 blocks (which kept their data until then).
    vmm.remote_ok(&["resize", "--memory", "384M"]);
    let lines = vmm.lines_until("virtio-mem: plugged=");
    assert_eq!(
        lines.last().unwrap(),
        "virtio-mem: plugged=128 MiB requested=128 MiB ok"
    );
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 384u64 << 20);
    // Grow to the whole region: the blocks given back read as zeroes when plugged again ("ok").
    vmm.remote_ok(&["resize", "--memory", "768M"]);
    let lines = vmm.lines_until("virtio-mem: plugged=");
    assert_eq!(
        lines.last().unwrap(),
        "virtio-mem: plugged=512 MiB requested=512 MiB ok"
    );
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 768u64 << 20);
    // Beyond the region, not whole 2 MiB blocks, below the boot memory: refused, and nothing changes.
    for (bad, why) in [
        ("1G", "raise hotplug_size"),
        ("301M", "block size"),
        ("128M", "below the boot memory"),
    ] {
        let out = vmm.remote(&["resize", "--memory", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("HTTP 400") && stderr.contains(why),
            "{bad}: {out:?}"
        );
    }
    // The device is not hot-removable: memory shrinks through resize.
    let out = vmm.remote(&["remove-device", "mem0"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 409"),
        "{out:?}"
    );
    assert_eq!(vmm.json(&["info"])["memory_actual_size"], 768u64 << 20);
    vmm.wait_line("hotplug: ready");
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn add_vsock_then_remove_it() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-vsock");
    let socket = dir.join("hot.vsock");
    let mut vmm = Vmm::boot_guest("api-vsock-vm", "hotplug", &[]);
    vmm.wait_line("hotplug: ready");
    let spec = format!("cid=5,socket={},id=vs0", socket.display());
    vmm.remote_ok(&["add-vsock", &spec]);
    vmm.wait_line("pcihp: slot 1 up 1af4:1053");
    assert!(socket.exists(), "the host socket is not listening");
    vmm.remote_ok(&["remove-device", "vs0"]);
    vmm.wait_line("pcihp: slot 1 ejected");
    let mut tries = 0;
    while socket.exists() {
        tries += 1;
        assert!(tries < 500, "the vsock socket outlived its device");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}

#[test]
fn boot_devices_cannot_be_removed() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-boot-device");
    let disk = dir.join("boot.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("path={},id=boot0,bootindex=0", disk.display());
    let mut vmm = Vmm::boot_guest("api-boot-device-vm", "halt", &["--disk", &spec]);
    vmm.wait_line("atrium-guest: halting");
    let out = vmm.remote(&["remove-device", "boot0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 409") && stderr.contains("boot device"),
        "{out:?}"
    );
    assert_eq!(
        vmm.json(&["info"])["devices"].as_array().map(|d| d.len()),
        Some(1)
    );
    vmm.remote_ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0);
}

/// `counters` output rows as (device, counter, value).
fn counter_rows(table: &str) -> Vec<(String, String, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [device, name, value] => Some((device.into(), name.into(), value.into())),
                _ => None,
            },
        )
        .collect()
}

#[test]
fn counters_follow_the_guests_io_and_leave_with_the_device() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-counters");
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("path={},id=data0", disk.display());
    let mut vmm = Vmm::boot_guest(
        "api-counters-vm",
        "virtio-blk,virtio-rng,hotplug",
        &["--disk", &spec, "--rng"],
    );
    // Every request is counted before the guest sees it complete, so by now the guest's I/O is all in.
    let lines = vmm.lines_until("hotplug: ready");
    for expected in ["blk: 0 write=0 read=0 verify=ok", "blk: 0 flush=0"] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "{expected}: {lines:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("rng: bytes=64 ")),
        "{lines:?}"
    );

    let counters = vmm.json(&["counters"]);
    // The guest (guests/asm/virtio_blk.inc) writes its 4 KiB pattern at sector 1, reads it back, reads sector 0
    // (512 bytes) and flushes; GET_ID is not a read.
    let disk_counters = &counters["data0"];
    for (name, value) in [
        ("write_bytes", 4096),
        ("write_ops", 1),
        ("read_bytes", 4096 + 512),
        ("read_ops", 2),
        ("flush_ops", 1),
        ("discard_ops", 0),
        ("write_zeroes_ops", 0),
        ("errors", 0),
    ] {
        assert_eq!(disk_counters[name], value, "{name}: {counters}");
    }
    // The guest asks for 64 random bytes (guests/asm/virtio_rng.inc).
    assert_eq!(counters["rng0"]["bytes"], 64, "{counters}");
    assert!(
        counters["vmm"]["unclaimed_port_accesses"].is_u64(),
        "{counters}"
    );

    // The human output lists the same, one counter a row.
    let rows = counter_rows(&vmm.remote_ok(&["counters"]));
    let row = |device: &str, name: &str, value: &str| -> (String, String, String) {
        (device.into(), name.into(), value.into())
    };
    assert!(
        rows.contains(&row("data0", "read_bytes", "4608")),
        "{rows:?}"
    );
    assert!(rows.contains(&row("rng0", "bytes", "64")), "{rows:?}");
    assert!(
        rows.iter()
            .any(|(device, name, _)| device == "vmm" && name == "unclaimed_mmio_accesses"),
        "{rows:?}"
    );

    // Unplugged, the disk's entry goes with it; the others stay.
    vmm.remote_ok(&["remove-device", "data0"]);
    vmm.wait_line("pcihp: slot 1 ejected");
    let mut tries = 0;
    let counters = loop {
        let counters = vmm.json(&["counters"]);
        if counters.get("data0").is_none() {
            break counters;
        }
        tries += 1;
        assert!(tries < 500, "the disk's counters outlived it: {counters}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(counters["rng0"]["bytes"], 64, "{counters}");
    assert!(counters["vmm"].is_object(), "{counters}");
    vmm.remote_ok(&["power-button"]);
    assert_eq!(vmm.wait_exit(), 0);
}
