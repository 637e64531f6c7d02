//! Assembles and links the in-tree test guests and boot-sector test disks (GNU as via `gcc`, `ld`, `objcopy`)
//! into `OUT_DIR`, and refuses to build a guest whose code uses instructions this project's guests must avoid
//! (x87/SSE/MMX, `int3`, `cmpxchg16b`, `xsave`/`xrstor`), checked on `objdump -d` output.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How an image is produced from its linked ELF.
#[derive(Clone, Copy)]
enum Output {
    /// The linked ELF is the image (ELF vmlinux, PVH).
    Elf,
    /// A raw binary of the linked ELF is the image (bzImage).
    Binary,
}

/// One guest image: its entry source, linker script and output file name.
struct Guest {
    source: &'static str,
    script: &'static str,
    file: &'static str,
    output: Output,
}

const GUESTS: &[Guest] = &[
    Guest {
        source: "demo_bzimage.S",
        script: "bzimage.ld",
        file: "demo.bzImage",
        output: Output::Binary,
    },
    Guest {
        source: "report_bzimage.S",
        script: "bzimage.ld",
        file: "report.bzImage",
        output: Output::Binary,
    },
    Guest {
        source: "report_elf.S",
        script: "elf.ld",
        file: "report.elf",
        output: Output::Elf,
    },
    Guest {
        source: "report_pvh.S",
        script: "pvh.ld",
        file: "report.pvh",
        output: Output::Elf,
    },
];

/// One boot-sector test disk: `bootdisk.S` assembled with its identity letter and boot signature choice.
struct Disk {
    id: u8,
    bootable: bool,
    file: &'static str,
}

const DISKS: &[Disk] = &[
    Disk {
        id: b'A',
        bootable: true,
        file: "boot-a.img",
    },
    Disk {
        id: b'B',
        bootable: true,
        file: "boot-b.img",
    },
    Disk {
        id: b'N',
        bootable: false,
        file: "nonbootable.img",
    },
];

/// Disassembly text that means the guest would fault on a host whose KVM emulates guest code.
const FORBIDDEN: &[&str] = &[
    "%xmm",
    "%ymm",
    "%zmm",
    "%mm",
    "%st",
    "fninit",
    "fnstcw",
    "fwait",
    "int3",
    "cmpxchg16b",
    "xsave",
    "xrstor",
    "fxsave",
    "fxrstor",
    "ldmxcsr",
    "stmxcsr",
    "emms",
];

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let asm = manifest.join("asm");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", asm.display());

    for guest in GUESTS {
        build(guest, &asm, &out);
    }
    for disk in DISKS {
        build_disk(disk, &asm, &out);
    }
}

/// Assembles one variant of the boot-sector disk and writes its raw image (sector 0 first) to `out`.
fn build_disk(disk: &Disk, asm: &Path, out: &Path) {
    let stem = disk.file.trim_end_matches(".img");
    let object = out.join(format!("{stem}.o"));
    let linked = out.join(format!("{stem}.elf"));
    run(Command::new("gcc")
        .arg("-c")
        .arg("-Wa,--fatal-warnings")
        .arg(format!("-Wa,--defsym,DISK_ID={}", disk.id))
        .arg(format!("-Wa,--defsym,BOOTABLE={}", u8::from(disk.bootable)))
        .arg("-o")
        .arg(&object)
        .arg(asm.join("bootdisk.S")));
    check_instructions(&object);
    run(Command::new("ld")
        .arg("-T")
        .arg(asm.join("bootdisk.ld"))
        .args(["-nostdlib", "-static", "--build-id=none"])
        .args(["--no-warn-rwx-segments", "--fatal-warnings"])
        .arg("-o")
        .arg(&linked)
        .arg(&object));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&linked)
        .arg(out.join(disk.file)));
}

fn build(guest: &Guest, asm: &Path, out: &Path) {
    let stem = guest.source.trim_end_matches(".S");
    let object = out.join(format!("{stem}.o"));
    let linked = out.join(format!("{stem}.elf"));
    let image = out.join(guest.file);

    run(Command::new("gcc")
        .arg("-c")
        .arg("-Wa,--fatal-warnings")
        .arg("-I")
        .arg(asm)
        .arg("-o")
        .arg(&object)
        .arg(asm.join(guest.source)));
    check_instructions(&object);

    // `-L` must come before `-T`: the scripts INCLUDE their shared parts from the asm directory.
    run(Command::new("ld")
        .arg("-L")
        .arg(asm)
        .arg("-T")
        .arg(asm.join(guest.script))
        .args([
            "-nostdlib",
            "-static",
            "-z",
            "max-page-size=0x1000",
            "--build-id=none",
        ])
        .args(["--no-warn-rwx-segments", "--fatal-warnings"])
        .arg("-o")
        .arg(&linked)
        .arg(&object));

    match guest.output {
        Output::Elf => {
            std::fs::copy(&linked, &image).unwrap_or_else(|e| {
                panic!(
                    "cannot copy {} to {}: {e}",
                    linked.display(),
                    image.display()
                )
            });
        }
        Output::Binary => run(Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&linked)
            .arg(&image)),
    }
}

/// Disassembles every code section of `object` in its own mode (sections named `*16` are real mode, `*32`
/// protected mode, the rest long mode) and fails the build on any forbidden instruction.
fn check_instructions(object: &Path) {
    let headers = output(Command::new("objdump").arg("-h").arg(object));
    let lines: Vec<&str> = headers.lines().collect();
    let mut offending = Vec::new();
    for pair in lines.windows(2) {
        let mut fields = pair[0].split_whitespace();
        let (Some(index), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        if index.parse::<u32>().is_err() || !pair[1].contains("CODE") {
            continue;
        }
        let mode = if name.ends_with("16") {
            "i8086"
        } else if name.ends_with("32") {
            "i386"
        } else {
            "x86-64"
        };
        let listing = output(
            Command::new("objdump")
                .args(["-d", "-M", mode, "-j", name])
                .arg(object),
        );
        for line in listing.lines() {
            // Only the instruction text (after the address and the encoding bytes) counts.
            let text = line.splitn(3, '\t').nth(2).unwrap_or("");
            if FORBIDDEN.iter().any(|bad| text.contains(bad)) {
                offending.push(format!("{name}: {}", line.trim()));
            }
        }
    }
    if !offending.is_empty() {
        panic!(
            "{} uses instructions the guests must not (x87/SSE/MMX, int3, cmpxchg16b, xsave): KVM without VT-x \
             emulates guest code and fails on them; rewrite with integer instructions:\n{}",
            object.display(),
            offending.join("\n")
        );
    }
}

fn run(command: &mut Command) {
    output(command);
}

fn output(command: &mut Command) -> String {
    let program = command.get_program().to_string_lossy().into_owned();
    let result = command.output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` to build the test guests: {e}; install gcc and binutils (apt-get install gcc)")
    });
    if !result.status.success() {
        panic!(
            "`{program}` failed while building the test guests ({}):\n{}{}",
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    String::from_utf8_lossy(&result.stdout).into_owned()
}
