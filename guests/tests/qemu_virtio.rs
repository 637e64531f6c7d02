//! The report guest's PCI and virtio-pci drivers against QEMU's reference devices (q35 and i440fx machines, KVM).
//!
//! Each test boots the PVH report guest with `action=...,debug-exit=0` and checks the lines the guest prints
//! (grammar in `guests/asm/pci.inc`, `virtio.inc` and `virtio_*.inc`). The tests are skipped, loudly, when
//! `qemu-system-x86_64` or `/dev/kvm` is missing. The vsock test also needs the rust-vmm vhost-user backend
//! `vhost-device-vsock` (on `PATH`, or named by `VHOST_DEVICE_VSOCK`) and is skipped, loudly, without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// QEMU's exit status for `debug-exit=0`: (0 << 1) | 1.
const DEBUG_EXIT_0: i32 = 1;
/// Upper bound on one guest run in seconds; a run normally takes a few.
const RUN_LIMIT_SECONDS: u64 = 120;
/// `timeout`'s exit status when the limit was reached.
const TIMED_OUT: i32 = 124;
const SECTOR0: [u8; 16] = *b"ATRIUM-SECTOR-0!";

fn qemu_available() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(kvm && qemu) {
        eprintln!("SKIPPED: needs {QEMU} (apt-get install qemu-system-x86) and /dev/kvm");
    }
    kvm && qemu
}

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("atrium-guests-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Scratch(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A 1 MiB raw disk whose sector 0 starts with [`SECTOR0`].
fn disk(name: &str) -> Scratch {
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(&SECTOR0);
    Scratch::new(name, &bytes)
}

/// What the guest writes to sectors 1..=8 of the virtio-blk device with index `dev`.
fn pattern(dev: usize) -> Vec<u8> {
    (0..4096)
        .map(|i| ((i * 7 + 13 + 31 * dev) & 0xff) as u8)
        .collect()
}

struct Run {
    code: Option<i32>,
    serial: String,
}

impl Run {
    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .collect()
    }

    fn line(&self, prefix: &str) -> &str {
        let lines = self.lines(prefix);
        assert_eq!(lines.len(), 1, "one `{prefix}` line in:\n{}", self.serial);
        lines[0]
    }

    fn has(&self, line: &str) -> bool {
        self.serial
            .lines()
            .any(|l| l.trim_end_matches('\r') == line)
    }
}

/// Boots the report guest with `append` on a machine with `devices`; the serial console is QEMU's stdout.
/// coreutils `timeout` bounds the run (exit status 124 when it had to stop QEMU).
fn run(machine: &str, append: &str, devices: &[&str]) -> Run {
    let kernel = guests::path(guests::REPORT_PVH_FILE);
    let output = Command::new("timeout")
        .arg(RUN_LIMIT_SECONDS.to_string())
        .arg(QEMU)
        .args(["-accel", "kvm", "-M", machine, "-m", "256", "-smp", "2"])
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", append])
        .args(devices)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let run = Run {
        code: output.status.code(),
        serial: String::from_utf8_lossy(&output.stdout).into_owned(),
    };
    assert_ne!(
        run.code,
        Some(TIMED_OUT),
        "the guest did not finish within {RUN_LIMIT_SECONDS} s:\n{}",
        run.serial
    );
    run
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

fn number(line: &str, key: &str) -> u64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} in `{line}`"))
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn pci_scan_lists_bus_0_through_ecam() {
    if !qemu_available() {
        return;
    }
    let d0 = disk("scan.raw");
    let drive = format!("file={},if=none,id=d0,format=raw", d0.arg());
    let run = run(
        "q35",
        "action=pci-scan,debug-exit=0",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
            "-device",
            "virtio-rng-pci,disable-legacy=on",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    // q35's MCFG puts ECAM at 0xb0000000.
    assert!(
        run.has("pci: access=ecam base=0xb0000000"),
        "{}",
        run.serial
    );
    let functions = run.lines("pci: 00:");
    assert_eq!(
        run.line("pci: count=").parse::<usize>().unwrap(),
        functions.len()
    );
    assert!(functions
        .iter()
        .any(|l| l.starts_with("00.0 8086:29c0 class=06.00 ")));
    // Function 0x1f is multi-function on q35: 1f.0, 1f.2, 1f.3.
    assert!(functions
        .iter()
        .any(|l| l.starts_with("1f.2 8086:2922 class=01.06 ")));
    for (id, class) in [("1af4:1042", "01.00"), ("1af4:1044", "00.ff")] {
        let line = functions
            .iter()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} in {functions:?}"));
        assert!(line.contains(&format!("class={class} ")), "{line}");
        // The modern virtio BAR (BAR 4) is 64-bit: its upper half (BAR 5) shows as `-`.
        let bars: Vec<&str> = field(line, "bars").split(',').collect();
        assert_eq!(bars.len(), 6, "{line}");
        assert!(bars[4].starts_with("0x") && bars[5] == "-", "{line}");
    }
}

#[test]
fn virtio_blk_writes_reads_and_refuses_writes_when_read_only() {
    if !qemu_available() {
        return;
    }
    let d0 = disk("rw0.raw");
    let d1 = disk("ro1.raw");
    let d2 = disk("rw2.raw");
    let drive0 = format!("file={},if=none,id=d0,format=raw", d0.arg());
    let drive1 = format!("file={},if=none,id=d1,format=raw,readonly=on", d1.arg());
    let drive2 = format!("file={},if=none,id=d2,format=raw", d2.arg());
    let run = run(
        "q35",
        "action=virtio-blk,debug-exit=0",
        &[
            "-drive",
            &drive0,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,serial=SER123",
            "-drive",
            &drive1,
            "-device",
            "virtio-blk-pci,drive=d1,disable-legacy=on",
            "-drive",
            &drive2,
            "-device",
            "virtio-blk-pci,drive=d2,disable-legacy=on,serial=abcdefghijklmnopqrstuvwxyz",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    let sector0: String = SECTOR0.iter().map(|b| format!("{b:02x}")).collect();

    let opened = run.lines("virtio: blk ");
    assert_eq!(opened.len(), 3, "{}", run.serial);
    for line in &opened {
        assert!(line.ends_with(" msix=per-queue"), "{line}");
        // VERSION_1 and FLUSH always; RO only for the read-only disk.
        let features =
            u64::from_str_radix(field(line, "features").trim_start_matches("0x"), 16).unwrap();
        assert_eq!(features & !(1 << 5), (1 << 32) | (1 << 9), "{line}");
    }

    for (dev, serial) in [(0, "SER123"), (1, ""), (2, "abcdefghijklmnopqrst")] {
        let p = format!("blk: {dev} ");
        assert!(
            run.has(&format!("{p}capacity=2048 serial={serial}")),
            "{}",
            run.serial
        );
        assert!(run.has(&format!("{p}sector0={sector0}")), "{}", run.serial);
        assert!(run.has(&format!("{p}flush=0")), "{}", run.serial);
    }
    for dev in [0, 2] {
        let line = run
            .lines(&format!("blk: {dev} write="))
            .first()
            .map(|l| format!("write={l}"))
            .unwrap();
        assert!(line.starts_with("write=0 read=0 verify=ok irq="), "{line}");
        assert!(
            number(&line, "irq") >= 2,
            "an MSI-X interrupt per request: {line}"
        );
    }
    assert!(run.has("blk: 1 readonly"), "{}", run.serial);
    let refused = format!("write={}", run.line("blk: 1 write="));
    assert!(refused.starts_with("write=1 refused=yes irq="), "{refused}");

    // The host sees the documented pattern in sectors 1..=8 of each writable disk, and nothing on the other.
    let on_disk = |d: &Scratch| std::fs::read(&d.0).unwrap()[512..512 + 4096].to_vec();
    assert_eq!(on_disk(&d0), pattern(0));
    assert_eq!(on_disk(&d2), pattern(2));
    assert_eq!(on_disk(&d1), vec![0u8; 4096]);
}

/// The `event-idx` item under QEMU's devices, which implement VIRTIO_RING_F_EVENT_IDX: the reference for the counts
/// the guest reports (tests/event_idx.rs holds Atrium's devices to the same ones).
#[test]
fn event_idx_gives_one_interrupt_per_batch_and_leaves_out_needless_notifies() {
    if !qemu_available() {
        return;
    }
    let d0 = disk("event-idx.raw");
    let drive0 = format!("file={},if=none,id=d0,format=raw", d0.arg());
    let run = run(
        "q35",
        "action=event-idx,virtio-blk,virtio-rng,debug-exit=0",
        &[
            "-drive",
            &drive0,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
            "-device",
            "virtio-rng-pci,disable-legacy=on",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    let opened = run.lines("virtio: ");
    assert_eq!(opened.len(), 2, "{}", run.serial);
    for line in &opened {
        let features =
            u64::from_str_radix(field(line, "features").trim_start_matches("0x"), 16).unwrap();
        assert_ne!(features & (1 << 29), 0, "EVENT_IDX: {line}");
    }
    // Each request alone in flight gets one interrupt; four chains under one notify get one once all are used;
    // a notify with nothing new is left out; every batch found avail_event moved on; no interrupt came early.
    assert!(
        run.has("blk: 0 write=0 read=0 verify=ok irq=2"),
        "{}",
        run.serial
    );
    assert!(
        run.has("blk: 0 burst=4 used=4 kicks=1 skipped=1 irqs=1 verify=ok"),
        "{}",
        run.serial
    );
    assert!(
        run.has("event-idx: blk 0 kicks=6 skipped=1 irqs=6 early=0 ok"),
        "{}",
        run.serial
    );
    let rng = format!("bytes={}", run.line("rng: bytes="));
    assert_eq!(number(&rng, "bytes"), 64, "{rng}");
    assert_eq!(number(&rng, "irq"), 1, "{rng}");
    assert!(
        run.has("event-idx: rng 0 kicks=1 skipped=0 irqs=1 early=0 ok"),
        "{}",
        run.serial
    );
    assert_eq!(std::fs::read(&d0.0).unwrap()[512..512 + 4096], pattern(0));
}

#[test]
fn virtio_rng_console_and_net_move_data_both_ways() {
    if !qemu_available() {
        return;
    }
    // The console's host side: echo everything back with a prefix.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(RUN_LIMIT_SECONDS)))
            .unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
            stream.write_all(b"echo:").unwrap();
            stream.write_all(&buf[..n]).unwrap();
        }
        received
    });
    // The network's host side: a UDP socket netdev sending to itself, so every frame comes back.
    let udp = free_udp_port();
    let chardev = format!("socket,id=c0,host=127.0.0.1,port={port}");
    let netdev = format!("socket,id=n0,udp=127.0.0.1:{udp},localaddr=127.0.0.1:{udp}");
    let run = run(
        "q35",
        "action=virtio-rng,virtio-console,virtio-net,debug-exit=0",
        &[
            "-device",
            "virtio-rng-pci,disable-legacy=on",
            "-device",
            "virtio-serial-pci,disable-legacy=on",
            "-chardev",
            &chardev,
            "-device",
            "virtconsole,chardev=c0",
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:ab:cd:ef",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);

    let rng = format!("bytes={}", run.line("rng: bytes="));
    assert_eq!(number(&rng, "bytes"), 64, "{rng}");
    // 64 random bytes with fewer than 48 non-zero ones: odds below 1e-60.
    assert!(number(&rng, "nonzero") >= 48, "{rng}");
    assert!(number(&rng, "irq") >= 1, "{rng}");

    let tx = format!("tx={}", run.line("console: tx="));
    assert!(tx.starts_with("tx=ok irq="), "{tx}");
    // Control bytes print as '?': the echoed newline.
    assert!(
        run.has("console: rx=echo:hello from virtio-console?"),
        "{}",
        run.serial
    );
    assert_eq!(echo.join().unwrap(), b"hello from virtio-console\n");

    assert!(run.has("net: mac=52:54:00:ab:cd:ef"), "{}", run.serial);
    let net = format!("tx={}", run.line("net: tx="));
    assert!(
        net.starts_with("tx=ok rx=60 ethertype=0x88b5 irq="),
        "{net}"
    );
    assert!(number(&net, "irq") >= 2, "{net}");
}

#[test]
fn malformed_requests_are_reported_and_the_device_recovers() {
    if !qemu_available() {
        return;
    }
    let d0 = disk("bad.raw");
    let drive = format!("file={},if=none,id=d0,format=raw", d0.arg());
    let run = run(
        "q35",
        "action=virtio-bad=all,virtio-bad=badtype,virtio-bad=bogus,debug-exit=0",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    let kinds: Vec<&str> = run
        .lines("bad: ")
        .into_iter()
        .filter(|l| l.contains(" used_len="))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["loop", "oob", "toolong", "nostatus", "rostatus", "badtype", "badtype"]
    );
    // QEMU refuses the broken chains by setting DEVICE_NEEDS_RESET; the guest resets the device each time.
    for kind in ["loop", "toolong", "nostatus", "rostatus"] {
        assert!(
            run.has(&format!(
                "bad: {kind} used_len=none status=none device_status=0x4f"
            )),
            "{}",
            run.serial
        );
    }
    assert_eq!(run.lines("bad: reset").len(), 4, "{}", run.serial);
    // An unknown request type completes with VIRTIO_BLK_S_UNSUPP.
    assert_eq!(
        run.lines("bad: badtype used_len=1 status=2 device_status=0xf")
            .len(),
        2
    );
    assert_eq!(run.lines("bad: recovered=ok").len(), 2, "{}", run.serial);
    assert!(run.has("bad: unknown kind bogus"), "{}", run.serial);
}

#[test]
fn port_io_polling_and_high_bars_work_too() {
    if !qemu_available() {
        return;
    }
    // i440fx has no MCFG: configuration mechanism #1. Without MSI-X the queue is polled.
    let d0 = disk("pc.raw");
    let drive = format!("file={},if=none,id=d0,format=raw", d0.arg());
    let pc = run(
        "pc",
        "action=pci-scan,virtio-blk,debug-exit=0",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,vectors=0",
        ],
    );
    assert_eq!(pc.code, Some(DEBUG_EXIT_0), "{}", pc.serial);
    assert!(pc.has("pci: access=io"), "{}", pc.serial);
    assert!(
        pc.lines("pci: 00:00.0 8086:1237 ").len() == 1,
        "{}",
        pc.serial
    );
    assert!(
        pc.line("virtio: blk 0 ").ends_with(" msix=off"),
        "{}",
        pc.serial
    );
    assert!(
        pc.has("blk: 0 write=0 read=0 verify=ok irq=0"),
        "{}",
        pc.serial
    );

    // A 2 GiB BAR pushes the firmware's 64-bit BARs above 4 GiB, beyond the boot page tables.
    let d1 = disk("high.raw");
    let drive = format!("file={},if=none,id=d0,format=raw", d1.arg());
    let high = run(
        "q35",
        "action=pci-scan,virtio-blk,debug-exit=0",
        &[
            "-object",
            "memory-backend-ram,id=hm,size=2G",
            "-device",
            "ivshmem-plain,memdev=hm",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
    );
    assert_eq!(high.code, Some(DEBUG_EXIT_0), "{}", high.serial);
    let blk = high
        .lines("pci: 00:")
        .into_iter()
        .find(|l| l.contains("1af4:1042"))
        .unwrap();
    let bar4 = field(blk, "bars").split(',').nth(4).unwrap();
    let bar4 = u64::from_str_radix(bar4.trim_start_matches("0x"), 16).unwrap();
    assert!(bar4 >= 1 << 32, "{blk}");
    let rw = format!("write={}", high.line("blk: 0 write="));
    assert!(rw.starts_with("write=0 read=0 verify=ok irq="), "{rw}");
    assert!(number(&rw, "irq") >= 2, "{rw}");
    assert_eq!(
        std::fs::read(Path::new(&d1.0)).unwrap()[512..512 + 4096],
        pattern(0)[..]
    );
}

#[test]
fn vsock_actions_without_a_device_say_so_and_check_the_port() {
    if !qemu_available() {
        return;
    }
    let run = run(
        "q35",
        "action=vsock-connect=1234,vsock-listen=80x,vsock-connect=4294967295,vsock-listen=,debug-exit=0",
        &[],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    assert_eq!(run.lines("vsock: none").len(), 1, "{}", run.serial);
    assert_eq!(
        run.lines("vsock: bad port (want 0..4294967294)").len(),
        3,
        "{}",
        run.serial
    );
}

#[test]
fn virtio_mem_plugs_what_qemus_device_requests() {
    if !qemu_available() {
        return;
    }
    // A later -m replaces the first; maxmem leaves room for the 512 MiB device region above RAM.
    let run = run(
        "q35",
        "action=virtio-mem,virtio-mem=0,debug-exit=0",
        &[
            "-m",
            "256,maxmem=1G",
            "-object",
            "memory-backend-ram,id=vmem0,size=512M",
            "-device",
            "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=128M,block-size=2M",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);
    let ready = run.line("virtio-mem: region=0x");
    assert!(
        ready.ends_with(" size=0x20000000 block=0x200000 requested=128 MiB"),
        "{}",
        run.serial
    );
    assert!(
        run.has("virtio-mem: plugged=128 MiB requested=128 MiB ok"),
        "{}",
        run.serial
    );
    assert!(
        run.has("virtio-mem: bad count (want 1..1000)"),
        "{}",
        run.serial
    );
}

/// The vhost-user vsock backend, if installed.
fn vhost_device_vsock() -> Option<PathBuf> {
    let program = std::env::var_os("VHOST_DEVICE_VSOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("vhost-device-vsock"));
    let found = Command::new(&program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "SKIPPED: needs vhost-device-vsock (cargo install vhost-device-vsock, or set VHOST_DEVICE_VSOCK)"
        );
    }
    found.then_some(program)
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads one line (through the newline) from a byte stream.
fn read_line(stream: &mut impl Read) -> Vec<u8> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap_or(0) == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    line
}

/// Connects to the guest's vsock `port` through the backend's hybrid socket (`CONNECT <port>\n`, answered
/// `OK <host port>\n`), trying again until the guest listens: before that the connection is refused or reset.
fn connect_to_guest(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(RUN_LIMIT_SECONDS);
    loop {
        assert!(
            Instant::now() < deadline,
            "the guest never accepted vsock port {port}"
        );
        if let Ok(mut stream) = UnixStream::connect(uds) {
            stream
                .set_read_timeout(Some(Duration::from_secs(RUN_LIMIT_SECONDS)))
                .unwrap();
            if stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .is_ok()
                && read_line(&mut stream).starts_with(b"OK ")
            {
                return stream;
            }
        }
        // Polling interval between attempts, not a timed assertion.
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vsock_listens_echoes_and_connects_through_a_vhost_user_device() {
    if !qemu_available() {
        return;
    }
    let Some(backend) = vhost_device_vsock() else {
        return;
    };
    let dir = ScratchDir(std::env::temp_dir().join(format!("atrium-vsock-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let vhost = dir.0.join("vhost.sock");
    let uds = dir.0.join("vm.vsock");

    // The host side of `vsock-connect=1234`: the backend connects to `<uds>_1234`; reply with one line.
    let listener = UnixListener::bind(dir.0.join("vm.vsock_1234")).unwrap();
    let host_server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(RUN_LIMIT_SECONDS)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut hello = String::new();
        reader.read_line(&mut hello).unwrap();
        let mut stream = reader.into_inner();
        stream.write_all(b"hello guest, from the host\n").unwrap();
        // The guest shuts the connection down: end of stream.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        (hello, rest)
    });

    let _backend = Killed(
        Command::new(backend)
            .args(["--guest-cid", "5", "--socket"])
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !vhost.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(RUN_LIMIT_SECONDS),
            "no backend socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The host side of `vsock-listen=5000`: one line, echoed back.
    let uds_client = uds.clone();
    let host_client = std::thread::spawn(move || {
        let mut stream = connect_to_guest(&uds_client, 5000);
        stream.write_all(b"ping from the host\n").unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).unwrap();
        echoed
    });

    let chardev = format!("socket,id=vc,path={}", vhost.display());
    let run = run(
        "q35",
        "action=vsock-listen=5000,vsock-connect=1234,debug-exit=0",
        &[
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-vsock-pci,chardev=vc",
        ],
    );
    assert_eq!(run.code, Some(DEBUG_EXIT_0), "{}", run.serial);

    let listen = run.line("vsock: listen=5000 peer=");
    assert!(listen.starts_with("2:"), "{listen}");
    assert!(listen.ends_with(" got=ping from the host"), "{listen}");
    assert_eq!(host_client.join().unwrap(), b"echo:ping from the host\n");

    assert!(
        run.has("vsock: cid=5 connect=1234 result=ok reply=hello guest, from the host"),
        "{}",
        run.serial
    );
    let (hello, rest) = host_server.join().unwrap();
    assert_eq!(hello, "hello from the guest over vsock\n");
    assert!(rest.is_empty(), "{rest:?}");
}
