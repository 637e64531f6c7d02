//! The fw_cfg files SeaBIOS reads to boot: the memory map, the boot order, the retry delay and the serial console.
//!
//! Boot order paths: SeaBIOS finds the priority of a PCI disk by matching the glob `/pci@i0cf8/*@<slot>[,<fn>]`
//! (slot and function in hex) against the start of each `bootorder` line, up to a `/`. Atrium writes the full path
//! QEMU writes for a virtio-blk-pci disk, `/pci@i0cf8/scsi@<slot>[,<fn>]/disk@0,0`: SeaBIOS's glob matches it, and
//! OVMF, which translates these OpenFirmware paths into UEFI device paths, recognises exactly this form for
//! virtio-blk (a bare `*` would not mean anything to it).

use super::{FwCfg, FwCfgError};

/// File name of the memory map.
pub const FILE_E820: &str = "etc/e820";
/// File name of the boot order.
pub const FILE_BOOTORDER: &str = "bootorder";
/// File name of the boot retry delay.
pub const FILE_BOOT_FAIL_WAIT: &str = "etc/boot-fail-wait";
/// File name of the serial console port.
pub const FILE_SERCON_PORT: &str = "etc/sercon-port";

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// e820 type: ACPI tables, reclaimable after boot.
pub const E820_ACPI: u32 = 3;
/// e820 type: ACPI non-volatile storage.
pub const E820_NVS: u32 = 4;

/// Bytes of one `etc/e820` entry: le64 address, le64 length, le32 type.
pub const E820_ENTRY_LEN: usize = 20;
/// Highest PCI slot number on bus 0.
const MAX_PCI_SLOT: u8 = 31;
/// Highest PCI function number.
const MAX_PCI_FUNCTION: u8 = 7;

/// One memory map range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Range type ([`E820_RAM`], [`E820_RESERVED`], ...).
    pub kind: u32,
}

/// A device firmware may boot from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootDevice {
    /// A virtio-blk-pci disk on PCI bus 0.
    VirtioBlk {
        /// PCI slot (device number), 0..=31.
        slot: u8,
        /// PCI function, 0..=7.
        function: u8,
    },
    /// An OpenFirmware device path written as given (one line, no NUL).
    Path(String),
}

impl BootDevice {
    /// The OpenFirmware device path of this device, as it goes into `bootorder`.
    pub fn path(&self) -> Result<String, FwCfgError> {
        match self {
            BootDevice::VirtioBlk { slot, function } => {
                if *slot > MAX_PCI_SLOT || *function > MAX_PCI_FUNCTION {
                    return Err(FwCfgError::InvalidFile(format!(
                        "boot device at PCI slot {slot} function {function} does not exist; use slot 0-31 and \
                         function 0-7"
                    )));
                }
                let function = if *function == 0 {
                    String::new()
                } else {
                    format!(",{function:x}")
                };
                Ok(format!("/pci@i0cf8/scsi@{slot:x}{function}/disk@0,0"))
            }
            BootDevice::Path(path) => {
                if path.is_empty() || path.contains(['\n', '\0']) {
                    return Err(FwCfgError::InvalidFile(format!(
                        "boot device path {path:?} is not one non-empty line; remove newlines and NULs"
                    )));
                }
                Ok(path.clone())
            }
        }
    }
}

/// Encodes the `etc/e820` file: the entries back to back, little-endian.
pub fn e820_bytes(entries: &[E820Entry]) -> Result<Vec<u8>, FwCfgError> {
    let mut out = Vec::with_capacity(entries.len() * E820_ENTRY_LEN);
    for e in entries {
        if e.size == 0 || e.addr.checked_add(e.size - 1).is_none() {
            return Err(FwCfgError::InvalidFile(format!(
                "e820 range {:#x}+{:#x} is empty or runs past the 64-bit address space; fix the memory map",
                e.addr, e.size
            )));
        }
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.kind.to_le_bytes());
    }
    Ok(out)
}

/// Encodes the `bootorder` file: one path per line, NUL-terminated.
pub fn boot_order_bytes(devices: &[BootDevice]) -> Result<Vec<u8>, FwCfgError> {
    if devices.is_empty() {
        return Err(FwCfgError::InvalidFile(
            "the boot order is empty; list at least one device or leave the file out".to_owned(),
        ));
    }
    let paths = devices
        .iter()
        .map(BootDevice::path)
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = paths.join("\n").into_bytes();
    out.push(0);
    Ok(out)
}

impl FwCfg {
    /// Adds `etc/e820`, the memory map SeaBIOS hands to the guest. Returns the file's key.
    pub fn add_e820(&mut self, entries: &[E820Entry]) -> Result<u16, FwCfgError> {
        let data = e820_bytes(entries)?;
        self.add_file(FILE_E820, data)
    }

    /// Adds `bootorder`, the devices to boot from, most preferred first. Returns the file's key.
    pub fn add_boot_order(&mut self, devices: &[BootDevice]) -> Result<u16, FwCfgError> {
        let data = boot_order_bytes(devices)?;
        self.add_file(FILE_BOOTORDER, data)
    }

    /// Adds `etc/boot-fail-wait`: milliseconds SeaBIOS waits before rebooting when nothing boots (le32;
    /// `u32::MAX` means never reboot). Returns the file's key.
    pub fn add_boot_fail_wait(&mut self, millis: u32) -> Result<u16, FwCfgError> {
        self.add_file(FILE_BOOT_FAIL_WAIT, millis.to_le_bytes().to_vec())
    }

    /// Adds `etc/sercon-port`: the I/O port of the UART SeaBIOS mirrors its text console to (le16, 0x3f8 for
    /// COM1). Returns the file's key.
    pub fn add_sercon_port(&mut self, port: u16) -> Result<u16, FwCfgError> {
        self.add_file(FILE_SERCON_PORT, port.to_le_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn device() -> FwCfg {
        FwCfg::new(TestMemory::new(0x100))
    }

    #[test]
    fn e820_encoding() {
        let entries = [
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0x9fc00,
                size: 0x60400,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820_RAM,
            },
        ];
        let bytes = e820_bytes(&entries).unwrap();
        assert_eq!(bytes.len(), 3 * E820_ENTRY_LEN);
        #[rustfmt::skip]
        let second: [u8; 20] = [
            0x00, 0xfc, 0x09, 0, 0, 0, 0, 0,
            0x00, 0x04, 0x06, 0, 0, 0, 0, 0,
            2, 0, 0, 0,
        ];
        assert_eq!(bytes[20..40], second);
        assert_eq!(bytes[40..48], [0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(bytes[48..56], [0, 0, 0, 0x40, 0, 0, 0, 0]);

        let mut fw = device();
        let key = fw.add_e820(&entries).unwrap();
        assert_eq!(read_item(&mut fw, key, 60), bytes);
        assert_eq!(fw.file_key(FILE_E820), Some(key));
    }

    #[test]
    fn e820_rejects_empty_and_wrapping_ranges() {
        let empty = E820Entry {
            addr: 0x1000,
            size: 0,
            kind: E820_RAM,
        };
        let wraps = E820Entry {
            addr: u64::MAX,
            size: 2,
            kind: E820_RAM,
        };
        for bad in [empty, wraps] {
            let err = e820_bytes(&[bad]).unwrap_err();
            assert!(err.to_string().contains("e820"), "{err}");
        }
        let top = E820Entry {
            addr: u64::MAX,
            size: 1,
            kind: E820_RESERVED,
        };
        assert_eq!(e820_bytes(&[top]).unwrap().len(), E820_ENTRY_LEN);
    }

    #[test]
    fn boot_order_paths() {
        let devices = [
            BootDevice::VirtioBlk {
                slot: 4,
                function: 0,
            },
            BootDevice::VirtioBlk {
                slot: 0x1f,
                function: 2,
            },
            BootDevice::Path("HALT".to_owned()),
        ];
        let mut fw = device();
        let key = fw.add_boot_order(&devices).unwrap();
        let expected = b"/pci@i0cf8/scsi@4/disk@0,0\n/pci@i0cf8/scsi@1f,2/disk@0,0\nHALT\0";
        assert_eq!(fw.item(key).unwrap(), expected);
        assert_eq!(fw.file_key(FILE_BOOTORDER), Some(key));
    }

    #[test]
    fn boot_order_rejects_bad_devices() {
        for bad in [
            BootDevice::VirtioBlk {
                slot: 32,
                function: 0,
            },
            BootDevice::VirtioBlk {
                slot: 1,
                function: 8,
            },
            BootDevice::Path(String::new()),
            BootDevice::Path("/a\n/b".to_owned()),
            BootDevice::Path("/a\0".to_owned()),
        ] {
            assert!(matches!(
                boot_order_bytes(&[bad]),
                Err(FwCfgError::InvalidFile(_))
            ));
        }
        assert!(boot_order_bytes(&[]).is_err());
    }

    #[test]
    fn integer_files() {
        let mut fw = device();
        let wait = fw.add_boot_fail_wait(5000).unwrap();
        let port = fw.add_sercon_port(0x3f8).unwrap();
        assert_eq!(read_item(&mut fw, wait, 4), 5000u32.to_le_bytes());
        assert_eq!(read_item(&mut fw, port, 2), [0xf8, 0x03]);
        assert_eq!(fw.file_key(FILE_SERCON_PORT), Some(port));
        assert_eq!(fw.file_key(FILE_BOOT_FAIL_WAIT), Some(wait));
        // Each file can be added once.
        assert!(matches!(
            fw.add_sercon_port(0x2f8),
            Err(FwCfgError::DuplicateFile { .. })
        ));
    }
}
