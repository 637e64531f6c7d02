//! qcow2 images made and checked by `qemu-img`. The tests are skipped (with a note) where qemu-img is missing.

use std::path::Path;
use std::process::Command;

use vmm_sys_util::tempfile::TempFile;

use super::*;
use std::sync::Arc;

use crate::block::{open_disk, Block, BlockOptions, DiskFormat, RawFile};

/// Runs qemu-img; `None` when it is not installed.
fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(output) => Some(output),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            eprintln!("qemu-img not found; skipping this qcow2 test");
            None
        }
        Err(err) => panic!("cannot run qemu-img: {err}"),
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A new empty qcow2 image of `size` (qemu-img syntax, e.g. "4M").
fn create(size: &str) -> Option<TempFile> {
    let image = TempFile::new().unwrap();
    let output = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(image.as_path()),
        size,
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(image)
}

/// `qemu-img check` must find the image clean.
fn check(path: &Path) {
    let output = qemu_img(&["check", "-f", "qcow2", path_str(path)]).unwrap();
    assert!(
        output.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The image's guest-visible contents, as qemu-img sees them.
fn contents(path: &Path) -> Vec<u8> {
    let raw = TempFile::new().unwrap();
    let output = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path_str(path),
        path_str(raw.as_path()),
    ])
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(raw.as_path()).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn writes_land_where_qemu_img_reads_them() {
    let Some(image) = create("4M") else { return };
    let mut expected = vec![0u8; 4 << 20];
    {
        let disk = Qcow2File::open(image.as_path(), false).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        assert!(!disk.is_read_only());
        let mut buf = vec![0xffu8; 4096];
        disk.read_at(&mut buf, 8192).unwrap();
        assert!(
            buf.iter().all(|byte| *byte == 0),
            "a fresh image reads zeroes"
        );
        // Aligned, unaligned across a 64 KiB cluster boundary, and at the very end.
        for (offset, len, seed) in [
            (0usize, 4096usize, 1u8),
            (65536 - 700, 1500, 2),
            ((4 << 20) - 512, 512, 3),
        ] {
            let data = pattern(len, seed);
            disk.write_at(&data, offset as u64).unwrap();
            expected[offset..offset + len].copy_from_slice(&data);
        }
        let mut back = vec![0u8; 1500];
        disk.read_at(&mut back, 65536 - 700).unwrap();
        assert!(back == expected[65536 - 700..65536 + 800]);
        disk.flush().unwrap();
        // Past the end is an error, not zero-fill.
        assert!(disk.read_at(&mut [0u8; 512], 4 << 20).is_err());
        assert!(disk.write_at(&[0u8; 1024], (4 << 20) - 512).is_err());
        // A block device on top of it sees the right capacity.
        let block = Block::new(Arc::new(disk), &BlockOptions::default()).unwrap();
        assert_eq!(block.capacity(), 8192);
    }
    check(image.as_path());
    assert!(
        contents(image.as_path()) == expected,
        "qemu-img reads what was written"
    );
}

#[test]
fn discard_and_write_zeroes_read_back_as_zero() {
    let Some(image) = create("1M") else { return };
    let mut expected = pattern(256 * 1024, 9);
    {
        let disk = Qcow2File::open(image.as_path(), false).unwrap();
        disk.write_at(&expected, 0).unwrap();
        disk.discard(0, 65536).unwrap();
        disk.write_zeroes(65536 + 4096, 4096, false).unwrap();
        disk.write_zeroes(131072, 65536, true).unwrap();
        for range in [0..65536, 69632..73728, 131072..196608] {
            expected[range].fill(0);
        }
        let mut back = vec![0u8; expected.len()];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back == expected);
        disk.flush().unwrap();
    }
    check(image.as_path());
    let mut whole = expected.clone();
    whole.resize(1 << 20, 0);
    assert!(contents(image.as_path()) == whole);
}

#[test]
fn qcow2_images_are_locked_like_raw_ones() {
    let Some(image) = create("1M") else { return };
    let writer = Qcow2File::open(image.as_path(), false).unwrap();
    assert!(matches!(
        Qcow2File::open(image.as_path(), false),
        Err(DiskError::Locked { .. })
    ));
    assert!(matches!(
        RawFile::open(image.as_path(), true),
        Err(DiskError::Locked { .. })
    ));
    drop(writer);
    let reader = Qcow2File::open(image.as_path(), true).unwrap();
    let second = open_disk(image.as_path(), DiskFormat::Qcow2, true).unwrap();
    assert!(reader.is_read_only() && second.is_read_only());
    assert!(reader.write_at(&[1; 512], 0).is_err());
    assert!(matches!(
        Qcow2File::open(image.as_path(), false),
        Err(DiskError::Locked { .. })
    ));
}

#[test]
fn backing_files_and_non_qcow2_files_are_refused() {
    let Some(base) = create("1M") else { return };
    let overlay = TempFile::new().unwrap();
    let output = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(base.as_path()),
        "-F",
        "qcow2",
        path_str(overlay.as_path()),
    ])
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let err = Qcow2File::open(overlay.as_path(), true).unwrap_err();
    assert!(matches!(err, DiskError::Format { .. }), "{err}");
    assert!(err.to_string().contains("denied"), "{err}");
    assert!(
        err.to_string()
            .contains("backing file needs an explicit format=qcow2"),
        "{err}"
    );

    let raw = TempFile::new().unwrap();
    std::fs::write(raw.as_path(), vec![0u8; 65536]).unwrap();
    let err = Qcow2File::open(raw.as_path(), false).unwrap_err();
    assert!(matches!(err, DiskError::Format { .. }), "{err}");
    assert!(err.to_string().contains(path_str(raw.as_path())), "{err}");
}

#[test]
fn disk_formats_parse_from_their_names() {
    assert_eq!("raw".parse::<DiskFormat>(), Ok(DiskFormat::Raw));
    assert_eq!("qcow2".parse::<DiskFormat>(), Ok(DiskFormat::Qcow2));
    assert!("vmdk"
        .parse::<DiskFormat>()
        .unwrap_err()
        .contains("raw or qcow2"));
}
