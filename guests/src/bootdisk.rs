//! Boot-sector test disks for firmware (BIOS) boot tests, built from `guests/asm/bootdisk.S`.
//!
//! Each disk is a raw 1 MiB image. A bootable one prints its lines through INT 10h teletype output (which SeaBIOS
//! sends to the serial port when fw_cfg `etc/sercon-port` names it), reads its sector 1 through INT 13h and runs
//! the code there, then writes `0x34` (`SLP_EN | SLP_TYP=5`) to the ACPI sleep control register at port `0x600`
//! and halts if the machine is still running. The grammar, including the failure lines, is at the top of
//! `guests/asm/bootdisk.S`.

use std::path::PathBuf;

/// The line every bootable disk prints last, right before it powers the machine off.
pub const BOOT_DONE_LINE: &str = "atrium-boot: done";

/// One of the boot-sector test disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDisk {
    /// Bootable; identifies itself as `disk A`.
    A,
    /// Bootable; identifies itself as `disk B`, so a test with two disks can tell which one booted.
    B,
    /// A valid disk without the `0x55 0xAA` boot signature, which a BIOS must refuse to boot (SeaBIOS prints
    /// `Boot failed: not a bootable disk`). Its sector 0 holds the same code with identity `N`, so a BIOS that
    /// ran it anyway would print `atrium-boot: disk N`.
    NonBootable,
}

impl BootDisk {
    /// Every disk.
    pub const ALL: [BootDisk; 3] = [BootDisk::A, BootDisk::B, BootDisk::NonBootable];

    /// File name of the image in the build directory.
    pub fn file(self) -> &'static str {
        match self {
            BootDisk::A => "boot-a.img",
            BootDisk::B => "boot-b.img",
            BootDisk::NonBootable => "nonbootable.img",
        }
    }

    /// Absolute path of the raw image, for `--disk path=<path>`. Tests share the file: open it read-only (or
    /// copy it), since the disks never write and two VMs cannot both lock it for writing.
    pub fn path(self) -> PathBuf {
        crate::path(self.file())
    }

    /// The lines (without their `\r\n`) the disk prints, in order, when a BIOS that has the INT 13h extensions
    /// boots it as drive `0x80` (as SeaBIOS does with the disk it boots); none for [`BootDisk::NonBootable`].
    pub fn boot_lines(self) -> &'static [&'static str] {
        match self {
            BootDisk::A => &[
                "atrium-boot: disk A",
                "atrium-boot: sector 0 from drive 0x80",
                "atrium-boot: read sector 1 with ah=42h",
                "atrium-boot: sector 1 says hello from disk A",
                BOOT_DONE_LINE,
            ],
            BootDisk::B => &[
                "atrium-boot: disk B",
                "atrium-boot: sector 0 from drive 0x80",
                "atrium-boot: read sector 1 with ah=42h",
                "atrium-boot: sector 1 says hello from disk B",
                BOOT_DONE_LINE,
            ],
            BootDisk::NonBootable => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTOR: usize = 512;

    fn image(disk: BootDisk) -> Vec<u8> {
        std::fs::read(disk.path()).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn images_are_whole_sectors_with_a_full_bios_cylinder() {
        for disk in BootDisk::ALL {
            let bytes = image(disk);
            assert_eq!(bytes.len(), 1 << 20, "{disk:?}");
            // SeaBIOS's default geometry: 16 heads x 63 sectors per cylinder.
            assert!(bytes.len() / SECTOR >= 16 * 63, "{disk:?}");
        }
    }

    #[test]
    fn only_bootable_disks_carry_the_boot_signature() {
        for disk in BootDisk::ALL {
            let bytes = image(disk);
            let signature = &bytes[510..512];
            match disk {
                BootDisk::NonBootable => assert_eq!(signature, [0, 0]),
                _ => assert_eq!(signature, [0x55, 0xaa], "{disk:?}"),
            }
            // The MBR partition table is empty.
            assert!(bytes[446..510].iter().all(|&b| b == 0), "{disk:?}");
        }
    }

    #[test]
    fn each_disk_carries_its_identity_in_sector_0_and_its_marker_in_sector_1() {
        for (disk, id) in [
            (BootDisk::A, b'A'),
            (BootDisk::B, b'B'),
            (BootDisk::NonBootable, b'N'),
        ] {
            let bytes = image(disk);
            let mut identity = b"atrium-boot: disk ".to_vec();
            identity.extend_from_slice(&[id, b'\r', b'\n']);
            assert!(contains(&bytes[..SECTOR], &identity), "{disk:?}");
            // Sector 1 starts with the marker word sector 0 checks, and holds the line its code prints.
            assert_eq!(&bytes[SECTOR..SECTOR + 2], b"S1", "{disk:?}");
            let mut says = b"atrium-boot: sector 1 says hello from disk ".to_vec();
            says.extend_from_slice(&[id, b'\r', b'\n']);
            assert!(contains(&bytes[SECTOR..2 * SECTOR], &says), "{disk:?}");
            assert!(!contains(&bytes[..SECTOR], &says), "{disk:?}");
            assert!(bytes[2 * SECTOR..].iter().all(|&b| b == 0), "{disk:?}");
        }
    }

    #[test]
    fn boot_lines_name_the_disk_and_end_with_done() {
        for (disk, id) in [(BootDisk::A, 'A'), (BootDisk::B, 'B')] {
            let lines = disk.boot_lines();
            assert_eq!(
                lines.first(),
                Some(&format!("atrium-boot: disk {id}").as_str())
            );
            assert_eq!(lines.last(), Some(&BOOT_DONE_LINE));
            assert!(lines.iter().all(|l| l.starts_with("atrium-boot: ")));
        }
        assert!(BootDisk::NonBootable.boot_lines().is_empty());
    }
}
