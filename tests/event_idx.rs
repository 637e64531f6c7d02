//! VIRTIO_RING_F_EVENT_IDX end to end on /dev/kvm. After the `event-idx` action item the in-tree guest negotiates
//! it, sets `used_event` to the last buffer it makes available (one interrupt once that one is used) and notifies
//! only when the device's `avail_event` asks for it (vring_need_event). The guest counts the notifies it wrote and
//! left out and the interrupts it took, including any that arrived before the used index reached `used_event`
//! (grammar in `guests/asm/virtio.inc` and `virtio_blk.inc`); the tests hold those counts to the protocol.

mod common;

use std::process::Command;

use common::*;

const SECTOR: usize = 512;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The guest's pattern for device 0: sectors 1..=8, byte i = (i * 7 + 13) & 0xff.
fn pattern() -> Vec<u8> {
    (0..4096).map(|i| ((i * 7 + 13) & 0xff) as u8).collect()
}

fn field(line: &str, key: &str) -> String {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
        .to_string()
}

/// Runs `virtio-blk,virtio-rng` after `settings` (e.g. `event-idx`) on one disk and an entropy device.
fn run_guest(settings: &str, disk_spec: &str) -> Run {
    let kernel = guest("report.bzImage");
    let cmdline = format!("action={settings},virtio-blk,virtio-rng");
    let run = run_atrium(
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            &cmdline,
            "--disk",
            disk_spec,
            "--rng",
        ],
        GUEST_LIMIT,
    );
    assert_eq!(run.code(), 0, "{run:?}");
    run
}

/// What the driver side of every EVENT_IDX run must show, whatever the interrupt mode: the feature negotiated, the
/// data checks passed, and the notifies the protocol calls for. Returns the `event-idx:` lines' `irqs` for the disk
/// and the entropy device.
fn assert_event_idx_driver_side(run: &Run) -> (u32, u32) {
    let opened = run.lines("virtio: ");
    assert_eq!(opened.len(), 2, "{}", run.serial);
    for line in &opened {
        let features = field(line, "features");
        let features = u64::from_str_radix(features.trim_start_matches("0x"), 16).unwrap();
        assert_ne!(
            features & VIRTIO_RING_F_EVENT_IDX,
            0,
            "EVENT_IDX not negotiated: {line}"
        );
    }
    let rw = run.line("blk: 0 write=");
    assert!(rw.starts_with("0 read=0 verify=ok irq="), "{rw}");
    // Four chains made available, then one notify: the device was idle with avail_event at the old index, so the
    // notify is written; a second notify with nothing new is left out.
    let burst = run.line("blk: 0 burst=");
    assert!(
        burst.starts_with("4 used=4 kicks=1 skipped=1 irqs=") && burst.ends_with(" verify=ok"),
        "{}",
        run.serial
    );
    // The device's life: GET_ID, write, read, the burst, sector 0, flush. Every batch found avail_event moved on
    // (the device re-armed it after serving the previous one), so each was notified.
    let blk = run.line("event-idx: blk 0 ");
    assert!(blk.starts_with("kicks=6 skipped=1 "), "{}", run.serial);
    assert_eq!(run.line("blk: 0 flush="), "0");
    let rng = run.line("rng: bytes=");
    assert!(rng.starts_with("64 "), "{rng}");
    let rng_line = run.line("event-idx: rng 0 ");
    assert!(rng_line.starts_with("kicks=1 skipped=0 "), "{rng_line}");
    (
        field(&blk, "irqs").parse().unwrap(),
        field(&rng_line, "irqs").parse().unwrap(),
    )
}

/// With MSI-X every trigger is one message, so the interrupt counts are exact: one per batch, none early.
fn assert_event_idx_protocol_msix(run: &Run) {
    assert_event_idx_driver_side(run);
    // Two requests, each alone in flight: an interrupt for each, no more.
    assert_eq!(run.line("blk: 0 write="), "0 read=0 verify=ok irq=2");
    // Four chains under one notify: one interrupt, once all four are used.
    assert_eq!(
        run.line("blk: 0 burst="),
        "4 used=4 kicks=1 skipped=1 irqs=1 verify=ok"
    );
    // Six batches, six interrupts, none before the used index reached used_event.
    assert_eq!(
        run.line("event-idx: blk 0 "),
        "kicks=6 skipped=1 irqs=6 early=0 ok",
        "{}",
        run.serial
    );
    assert!(run.line("rng: bytes=").ends_with(" irq=1"));
    assert_eq!(
        run.line("event-idx: rng 0 "),
        "kicks=1 skipped=0 irqs=1 early=0 ok",
        "{}",
        run.serial
    );
}

/// A 1 MiB raw disk whose sector 0 starts with `EVENT-IDX-SECTOR`; its `--disk` value.
fn raw_disk(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(name);
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(b"EVENT-IDX-SECTOR");
    std::fs::write(&path, &bytes).unwrap();
    let spec = format!("path={}", path.display());
    (path, spec)
}

fn assert_disk_data(run: &Run, path: &std::path::Path) {
    let sector0: String = b"EVENT-IDX-SECTOR"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(run.line("blk: 0 sector0="), sector0);
    let on_disk = std::fs::read(path).unwrap();
    assert_eq!(&on_disk[SECTOR..SECTOR + 4096], pattern().as_slice());
}

#[test]
fn event_idx_gives_one_interrupt_per_batch_and_leaves_out_needless_notifies() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-event-idx");
    let (path, spec) = raw_disk(&dir, "d.raw");
    let run = run_guest("event-idx", &spec);
    assert_event_idx_protocol_msix(&run);
    assert_disk_data(&run, &path);
}

#[test]
fn event_idx_over_intx() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-event-idx-intx");
    let (path, spec) = raw_disk(&dir, "d.raw");
    let run = run_guest("intx,event-idx", &spec);
    let (blk_irqs, rng_irqs) = assert_event_idx_driver_side(&run);
    assert_disk_data(&run, &path);
    // A level-triggered line may be delivered again after the EOI (the `intx:` line's unclaimed count), so only
    // the lower bound is the protocol's here: interrupts came, and both lines count the same ones.
    assert!(blk_irqs >= 1 && rng_irqs >= 1, "{}", run.serial);
    let intx = run.line("intx: blk 0 ");
    assert_eq!(field(&intx, "irqs"), blk_irqs.to_string(), "{intx}");
    let intx = run.line("intx: rng 0 ");
    assert_eq!(field(&intx, "irqs"), rng_irqs.to_string(), "{intx}");
}

#[test]
fn event_idx_on_the_synchronous_path_of_a_qcow2_disk() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("virtio-event-idx-qcow2");
    let img = dir.join("disk.qcow2").display().to_string();
    let created = match Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &img, "4M"])
        .output()
    {
        Ok(out) => out,
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("qemu-img is required under CI")
        }
        Err(_) => {
            eprintln!("SKIPPED: qemu-img not installed");
            return;
        }
    };
    assert!(created.status.success(), "{created:?}");
    let run = run_guest("event-idx", &format!("path={img},format=qcow2"));
    assert_event_idx_protocol_msix(&run);
    assert_eq!(run.line("blk: 0 sector0="), "0".repeat(32));
}
