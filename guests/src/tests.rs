//! Structural checks of the built images: the facts a loader relies on, read back from the bytes.

use super::*;

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::io::Cursor;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const LOAD_ADDRESS: u64 = 0x10_0000;
const SETUP_SIZE: usize = 1024;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The first instructions of every entry point: `cli; cld`.
const ENTRY_PROLOGUE: [u8; 2] = [0xfa, 0xfc];

fn check_bzimage(image: &[u8]) {
    assert!(
        image.len() > SETUP_SIZE + 0x200,
        "image too short: {} bytes",
        image.len()
    );
    assert_eq!(image[0x1f1], 1, "setup_sects");
    assert_eq!(u16_at(image, 0x1fe), 0xaa55, "boot_flag");
    assert_eq!(image[0x200], 0xeb, "jump instruction at 0x200");
    assert_eq!(&image[0x202..0x206], b"HdrS", "header magic");
    assert!(u16_at(image, 0x206) >= 0x020c, "boot protocol version");
    assert_eq!(image[0x211] & 0x01, 0x01, "loadflags LOADED_HIGH");
    assert_eq!(u32_at(image, 0x214), LOAD_ADDRESS as u32, "code32_start");
    assert_eq!(u32_at(image, 0x22c), 0x7fff_ffff, "initrd_addr_max");
    let alignment = u32_at(image, 0x230);
    assert!(
        alignment.is_power_of_two() && LOAD_ADDRESS.is_multiple_of(u64::from(alignment)),
        "kernel_alignment"
    );
    assert_eq!(image[0x234], 0, "relocatable_kernel");
    assert_eq!(
        u16_at(image, 0x236) & 0x0001,
        0x0001,
        "xloadflags XLF_KERNEL_64"
    );
    assert!(u32_at(image, 0x238) >= 255, "cmdline_size");
    assert_eq!(u64_at(image, 0x258), LOAD_ADDRESS, "pref_address");

    let protected = image.len() - SETUP_SIZE;
    assert_eq!(
        u32_at(image, 0x1f4) as usize,
        protected.div_ceil(16),
        "syssize"
    );
    assert!(
        u32_at(image, 0x260) as usize >= protected,
        "init_size covers the image"
    );
    assert!(
        u32_at(image, 0x260).is_multiple_of(4096),
        "init_size is page aligned"
    );

    // kernel_version points (relative to 0x200) at a NUL-terminated string inside the setup.
    let version = u16_at(image, 0x20e) as usize + 0x200;
    let text = &image[version..SETUP_SIZE];
    let end = text
        .iter()
        .position(|&b| b == 0)
        .expect("kernel_version string is terminated");
    let printable = |b: &u8| b.is_ascii_graphic() || *b == b' ';
    assert!(
        end > 0 && text[..end].iter().all(printable),
        "kernel_version text"
    );

    // The 64-bit entry sits at load address + 0x200.
    assert_eq!(
        image[SETUP_SIZE + 0x200..SETUP_SIZE + 0x202],
        ENTRY_PROLOGUE,
        "64-bit entry code"
    );
}

struct ProgramHeader {
    kind: u32,
    offset: usize,
    paddr: u64,
    vaddr: u64,
    filesz: usize,
    memsz: usize,
}

/// Checks the ELF header and returns (entry, program headers).
fn parse_elf(image: &[u8]) -> (u64, Vec<ProgramHeader>) {
    assert_eq!(&image[..4], b"\x7fELF", "ELF magic");
    assert_eq!(image[4], 2, "ELFCLASS64");
    assert_eq!(image[5], 1, "little endian");
    assert_eq!(u16_at(image, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(image, 18), 62, "EM_X86_64");
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32) as usize;
    assert!(phoff >= 64, "program headers after the ELF header");
    assert_eq!(u16_at(image, 54), 56, "e_phentsize");
    let count = u16_at(image, 56) as usize;
    let headers = (0..count)
        .map(|i| {
            let p = phoff + i * 56;
            ProgramHeader {
                kind: u32_at(image, p),
                offset: u64_at(image, p + 8) as usize,
                vaddr: u64_at(image, p + 16),
                paddr: u64_at(image, p + 24),
                filesz: u64_at(image, p + 32) as usize,
                memsz: u64_at(image, p + 40) as usize,
            }
        })
        .collect();
    (entry, headers)
}

/// The single PT_LOAD: at physical and virtual 1 MiB, containing `entry`. Returns it.
fn check_load_segment(image: &[u8], entry: u64, headers: &[ProgramHeader]) -> usize {
    let loads: Vec<&ProgramHeader> = headers.iter().filter(|h| h.kind == 1).collect();
    assert_eq!(loads.len(), 1, "exactly one PT_LOAD");
    let load = loads[0];
    assert_eq!(load.paddr, LOAD_ADDRESS, "p_paddr");
    assert_eq!(load.vaddr, LOAD_ADDRESS, "p_vaddr");
    assert!(
        load.filesz <= load.memsz && load.offset + load.filesz <= image.len(),
        "segment sizes"
    );
    assert!(
        entry >= LOAD_ADDRESS && entry < LOAD_ADDRESS + load.filesz as u64,
        "entry inside the segment"
    );
    let entry_offset = load.offset + (entry - LOAD_ADDRESS) as usize;
    assert_eq!(
        image[entry_offset..entry_offset + 2],
        ENTRY_PROLOGUE,
        "entry code"
    );
    load.offset
}

/// The Xen PHYS32_ENTRY addresses found in the PT_NOTE segments.
fn xen_entries(image: &[u8], headers: &[ProgramHeader]) -> Vec<u64> {
    let mut found = Vec::new();
    for note in headers.iter().filter(|h| h.kind == 4) {
        let mut at = note.offset;
        while at + 12 <= note.offset + note.filesz {
            let namesz = u32_at(image, at) as usize;
            let descsz = u32_at(image, at + 4) as usize;
            let kind = u32_at(image, at + 8);
            let name = &image[at + 12..at + 12 + namesz];
            let desc = at + 12 + namesz.next_multiple_of(4);
            if kind == 18 && name == b"Xen\0" {
                assert!(
                    descsz >= 4,
                    "PHYS32_ENTRY descriptor holds a 32-bit address"
                );
                let address = if descsz >= 8 {
                    u64_at(image, desc)
                } else {
                    u64::from(u32_at(image, desc))
                };
                found.push(address);
            }
            at = desc + descsz.next_multiple_of(4);
        }
    }
    found
}

#[test]
fn demo_is_a_bzimage_with_a_64bit_entry() {
    check_bzimage(DEMO);
}

#[test]
fn report_bzimage_is_a_bzimage_with_a_64bit_entry() {
    check_bzimage(REPORT_BZIMAGE);
}

#[test]
fn report_elf_is_a_vmlinux_entered_in_long_mode() {
    let (entry, headers) = parse_elf(REPORT_ELF);
    check_load_segment(REPORT_ELF, entry, &headers);
    assert!(
        xen_entries(REPORT_ELF, &headers).is_empty(),
        "no PVH note: the VMM must use the 64-bit entry"
    );
}

#[test]
fn report_pvh_has_the_xen_entry_note() {
    let (entry, headers) = parse_elf(REPORT_PVH);
    check_load_segment(REPORT_PVH, entry, &headers);
    let entries = xen_entries(REPORT_PVH, &headers);
    assert_eq!(
        entries,
        vec![entry],
        "one PHYS32_ENTRY note, naming the ELF entry"
    );
    assert!(entry < 1 << 32, "the PVH entry is a 32-bit address");
}

#[test]
fn linux_loader_accepts_the_bzimages() {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    for image in [DEMO, REPORT_BZIMAGE] {
        let loaded = BzImage::load(
            &memory,
            None,
            &mut Cursor::new(image),
            Some(GuestAddress(LOAD_ADDRESS)),
        )
        .unwrap();
        assert_eq!(loaded.kernel_load, GuestAddress(LOAD_ADDRESS));
        assert_eq!(
            loaded.kernel_end,
            LOAD_ADDRESS + (image.len() - SETUP_SIZE) as u64
        );
        let header = loaded.setup_header.unwrap();
        assert_eq!({ header.xloadflags } & 1, 1);
    }
}

#[test]
fn linux_loader_finds_the_right_entry_in_each_elf() {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let highmem = Some(GuestAddress(LOAD_ADDRESS));

    let elf = Elf::load(&memory, None, &mut Cursor::new(REPORT_ELF), highmem).unwrap();
    assert!(
        !matches!(elf.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)),
        "{:?}",
        elf.pvh_boot_cap
    );
    assert_eq!(elf.kernel_load.0, parse_elf(REPORT_ELF).0);

    let pvh = Elf::load(&memory, None, &mut Cursor::new(REPORT_PVH), highmem).unwrap();
    assert_eq!(
        pvh.pvh_boot_cap,
        PvhBootCapability::PvhEntryPresent(GuestAddress(parse_elf(REPORT_PVH).0))
    );
}

#[test]
fn paths_name_the_embedded_files() {
    for (name, bytes) in [
        (DEMO_FILE, DEMO),
        (REPORT_BZIMAGE_FILE, REPORT_BZIMAGE),
        (REPORT_ELF_FILE, REPORT_ELF),
        (REPORT_PVH_FILE, REPORT_PVH),
    ] {
        let file = path(name);
        assert!(file.is_absolute(), "{} is absolute", file.display());
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{name}");
    }
    assert!(!path("no-such-guest").exists());
}
