//! QEMU's firmware configuration interface (fw_cfg): how SeaBIOS and OVMF learn about the machine.
//!
//! The device holds a table of read-only items, each a byte string under a 16-bit key. Standard items sit at fixed
//! keys below [`FW_CFG_FILE_FIRST`]; named files (`etc/e820`, `bootorder`, the ACPI tables ...) get keys from
//! [`FW_CFG_FILE_FIRST`] upward and are listed in the file directory item [`FW_CFG_FILE_DIR`].
//!
//! Registers, as offsets from the base (port 0x510 on a PC, [`FW_CFG_PORT`]; the range is [`FW_CFG_PORT_LEN`] long):
//!
//! | offset | width | use |
//! |---|---|---|
//! | 0 | 16-bit write, little-endian | selector: picks an item and rewinds its read offset |
//! | 1 | 8-bit read | data: the next byte of the selected item (0 past its end) |
//! | 4 | 32-bit write, big-endian | DMA address, high half |
//! | 8 | 32-bit write, big-endian | DMA address, low half; writing it runs the transfer |
//!
//! A 64-bit big-endian write at offset 4 sets the whole DMA address and runs the transfer too. Reading offsets
//! 4..12 returns the DMA signature `"QEMU CFG"`. Accesses of other widths read as zero and are ignored on write.
//!
//! Selector bit 14 (the write channel) is ignored and bit 15 (architecture-local items such as 0x8000) is part of
//! the key. Selecting a key that holds no item is allowed; the data then reads as zero.
//!
//! The device is read-only: writes to the data register are ignored (as QEMU has done since 2.4), and DMA write
//! requests are validated (the item is selected, the range fits in it, the guest buffer is readable) and then
//! accepted but discarded, so firmware that writes (OVMF stops dead on a DMA error) keeps running. Nothing in
//! Atrium consumes guest-written items yet.
//!
//! The DMA transfer itself is in [`dma`]; the files SeaBIOS reads are built in [`boot_files`] and the ACPI
//! linker/loader script in [`acpi_loader`].

pub mod acpi_loader;
pub mod boot_files;
mod dma;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::bus::BusDevice;

pub use acpi_loader::{AcpiBlob, AcpiLoader};
pub use boot_files::{BootDevice, E820Entry};

/// The standard I/O port base of fw_cfg on a PC.
pub const FW_CFG_PORT: u16 = 0x510;
/// Length of the port range (selector, data, DMA address high and low).
pub const FW_CFG_PORT_LEN: u64 = 0xc;

/// Item key: the signature `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Item key: the feature bitmap (le32).
pub const FW_CFG_ID: u16 = 0x0001;
/// Item key: RAM size in bytes (le64).
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
/// Item key: no graphical console (le16).
pub const FW_CFG_NOGRAPHIC: u16 = 0x0004;
/// Item key: number of boot CPUs (le16).
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
/// Item key: show the boot menu (le16).
pub const FW_CFG_BOOT_MENU: u16 = 0x000e;
/// Item key: maximum number of CPUs, hotpluggable ones included (le16).
pub const FW_CFG_MAX_CPUS: u16 = 0x000f;
/// Item key: the file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
/// Key of the first named file.
pub const FW_CFG_FILE_FIRST: u16 = 0x0020;

/// Feature bit in [`FW_CFG_ID`]: the traditional selector/data interface.
pub const FW_CFG_FEATURE_TRADITIONAL: u32 = 1 << 0;
/// Feature bit in [`FW_CFG_ID`]: the DMA interface.
pub const FW_CFG_FEATURE_DMA: u32 = 1 << 1;

/// Longest file name in bytes; the directory stores it NUL-terminated in 56 bytes.
pub const FW_CFG_MAX_NAME_LEN: usize = 55;
/// Most files the device holds: their keys run from [`FW_CFG_FILE_FIRST`] to 0x3fff, the highest key below the
/// write-channel bit.
pub const FW_CFG_MAX_FILES: usize = (KEY_MASK - FW_CFG_FILE_FIRST + 1) as usize;

/// Selector bit 14: the guest intends to write. Not part of the key.
const SELECTOR_WRITE: u16 = 0x4000;
/// Selector bit 15: an architecture-local item. Part of the key.
const SELECTOR_ARCH_LOCAL: u16 = 0x8000;
/// Key bits below the two flags.
const KEY_MASK: u16 = 0x3fff;

/// The signature item's contents.
const SIGNATURE: &[u8; 4] = b"QEMU";
/// What a read of the DMA address register returns: `"QEMU CFG"`, big-endian.
const DMA_SIGNATURE: &[u8; 8] = b"QEMU CFG";
/// Bytes of one file directory entry: be32 size, be16 select, be16 reserved, 56 bytes of name.
const FILE_DIR_ENTRY_LEN: usize = 64;
/// Bytes of a file name field in the directory.
const FILE_NAME_FIELD: usize = FW_CFG_MAX_NAME_LEN + 1;

// Register offsets.
const REG_SELECTOR: u64 = 0;
const REG_DATA: u64 = 1;
const REG_DMA_HIGH: u64 = 4;
const REG_DMA_LOW: u64 = 8;

/// The guest could not be read or written at an address (it is not RAM, or the range runs off the end of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the guest-physical range is not backed by guest RAM; check the address and length the guest gave")]
pub struct GuestMemoryError;

/// Access to guest RAM for DMA, so this crate stays free of any particular guest-memory implementation.
///
/// The VMM implements it over its `vm-memory` mapping. Both methods must fail, touching nothing, when any byte of
/// `[addr, addr + buf.len())` is not guest RAM.
pub trait GuestMemoryAccess: Send + Sync {
    /// Fills `buf` from guest-physical `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Stores `buf` at guest-physical `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError>;
}

/// Errors configuring the device's items.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name that is empty, too long or has a NUL byte.
    #[error(
        "fw_cfg file name {name:?} is invalid; use 1 to {FW_CFG_MAX_NAME_LEN} bytes without NUL characters"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A file with the same name exists.
    #[error("fw_cfg already has a file named {name:?}; give each file a unique name")]
    DuplicateFile {
        /// The repeated name.
        name: String,
    },
    /// Every file key is taken.
    #[error("fw_cfg holds its maximum of {FW_CFG_MAX_FILES} files; add fewer files")]
    TooManyFiles,
    /// An item longer than the 32-bit size fields can describe.
    #[error("fw_cfg item of {len} bytes is larger than 4 GiB - 1; shrink it")]
    ItemTooLarge {
        /// Length of the rejected item.
        len: usize,
    },
    /// `set_item` was given a key that is not a plain fixed item.
    #[error(
        "fw_cfg key {key:#06x} cannot be set directly; use a key below {FW_CFG_FILE_FIRST:#x} other than the \
         signature, ID and file directory, or an architecture-local key 0x8000..=0xbfff, and add_file for files"
    )]
    ReservedKey {
        /// The rejected key.
        key: u16,
    },
    /// Bad input to a file builder (e820, boot order, ACPI loader).
    #[error("{0}")]
    InvalidFile(String),
}

/// The guest-visible register state: what a snapshot or a guest reboot keeps (the items are configuration and are
/// rebuilt by the VMM).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FwCfgState {
    /// The key last selected (write-channel bit cleared).
    pub selector: u16,
    /// Read offset in the selected item.
    pub offset: u32,
    /// High half of the DMA address, as last written.
    pub dma_address_high: u32,
}

/// The fw_cfg device.
pub struct FwCfg {
    mem: Arc<dyn GuestMemoryAccess>,
    /// Every item by key (write-channel bit clear), files included, the directory not.
    items: BTreeMap<u16, Vec<u8>>,
    /// File keys by name; keys are handed out in the order files are added.
    files: BTreeMap<String, u16>,
    /// The directory item, built when first read after a file was added.
    file_dir: OnceCell<Vec<u8>>,
    selector: u16,
    offset: u32,
    dma_address_high: u32,
}

impl FwCfg {
    /// Creates the device with the signature, the feature bitmap (traditional and DMA) and an empty file
    /// directory; DMA reaches guest RAM through `mem`.
    pub fn new(mem: Arc<dyn GuestMemoryAccess>) -> Self {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, SIGNATURE.to_vec());
        items.insert(
            FW_CFG_ID,
            (FW_CFG_FEATURE_TRADITIONAL | FW_CFG_FEATURE_DMA)
                .to_le_bytes()
                .to_vec(),
        );
        FwCfg {
            mem,
            items,
            files: BTreeMap::new(),
            file_dir: OnceCell::new(),
            selector: 0,
            offset: 0,
            dma_address_high: 0,
        }
    }

    /// Sets a fixed item (for example [`FW_CFG_NOGRAPHIC`] or an architecture-local key), replacing any earlier value.
    ///
    /// The signature, ID and file directory are maintained by the device, and file keys belong to
    /// [`FwCfg::add_file`]; those keys, and keys with the write-channel bit, are refused.
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let index = key & KEY_MASK;
        let reserved = key & SELECTOR_WRITE != 0
            || matches!(index, FW_CFG_SIGNATURE | FW_CFG_ID | FW_CFG_FILE_DIR)
                && key & SELECTOR_ARCH_LOCAL == 0
            || index >= FW_CFG_FILE_FIRST && key & SELECTOR_ARCH_LOCAL == 0;
        if reserved {
            return Err(FwCfgError::ReservedKey { key });
        }
        check_size(&data)?;
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds a named file and returns its key.
    ///
    /// Keys are handed out in the order files are added, from [`FW_CFG_FILE_FIRST`]; the directory lists the files
    /// sorted by name, as firmware expects.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() > FW_CFG_MAX_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::InvalidName {
                name: name.to_owned(),
            });
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::DuplicateFile {
                name: name.to_owned(),
            });
        }
        check_size(&data)?;
        let key = u16::try_from(self.files.len())
            .ok()
            .and_then(|i| FW_CFG_FILE_FIRST.checked_add(i))
            .filter(|&k| k <= KEY_MASK)
            .ok_or(FwCfgError::TooManyFiles)?;
        self.items.insert(key, data);
        self.files.insert(name.to_owned(), key);
        self.file_dir.take();
        Ok(key)
    }

    /// The key of the file called `name`, if there is one.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        self.files.get(name).copied()
    }

    /// The contents of the item at `key` (write-channel bit ignored).
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.lookup(key & !SELECTOR_WRITE)
    }

    /// Sets [`FW_CFG_NB_CPUS`] to `boot` and [`FW_CFG_MAX_CPUS`] to `max`.
    pub fn set_cpus(&mut self, boot: u16, max: u16) {
        self.items
            .insert(FW_CFG_NB_CPUS, boot.to_le_bytes().to_vec());
        self.items
            .insert(FW_CFG_MAX_CPUS, max.to_le_bytes().to_vec());
    }

    /// Sets [`FW_CFG_RAM_SIZE`]: the guest's RAM in bytes.
    pub fn set_ram_size(&mut self, bytes: u64) {
        self.items
            .insert(FW_CFG_RAM_SIZE, bytes.to_le_bytes().to_vec());
    }

    /// Sets [`FW_CFG_NOGRAPHIC`]: whether the guest has no graphical console.
    pub fn set_nographic(&mut self, nographic: bool) {
        self.items.insert(
            FW_CFG_NOGRAPHIC,
            u16::from(nographic).to_le_bytes().to_vec(),
        );
    }

    /// Sets [`FW_CFG_BOOT_MENU`]: whether firmware offers a boot menu.
    pub fn set_boot_menu(&mut self, enabled: bool) {
        self.items
            .insert(FW_CFG_BOOT_MENU, u16::from(enabled).to_le_bytes().to_vec());
    }

    /// The current register state.
    pub fn state(&self) -> FwCfgState {
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            dma_address_high: self.dma_address_high,
        }
    }

    /// Restores saved register state.
    pub fn set_state(&mut self, state: &FwCfgState) {
        self.selector = state.selector & !SELECTOR_WRITE;
        self.offset = state.offset;
        self.dma_address_high = state.dma_address_high;
    }

    /// The item at `key` (write-channel bit clear).
    fn lookup(&self, key: u16) -> Option<&[u8]> {
        if key == FW_CFG_FILE_DIR {
            return Some(self.file_dir.get_or_init(|| self.build_file_dir()));
        }
        self.items.get(&key).map(Vec::as_slice)
    }

    /// Builds the directory item: be32 count, then one entry per file sorted by name (byte order).
    fn build_file_dir(&self) -> Vec<u8> {
        let mut dir = Vec::with_capacity(4 + self.files.len() * FILE_DIR_ENTRY_LEN);
        // At most FW_CFG_MAX_FILES entries, which fits in 32 bits.
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        // A `String` map iterates in byte order of the names.
        for (name, &key) in &self.files {
            // `add_file` keeps every item below 4 GiB.
            let size = self.items.get(&key).map_or(0, |d| d.len() as u32);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut field = [0u8; FILE_NAME_FIELD];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        dir
    }

    /// Selects the item at `selector` and rewinds the read offset.
    fn select(&mut self, selector: u16) {
        self.selector = selector & !SELECTOR_WRITE;
        self.offset = 0;
    }

    /// The selected item, if the selected key holds one.
    fn selected(&self) -> Option<&[u8]> {
        self.lookup(self.selector)
    }

    /// Reads the next byte of the selected item, or 0 past its end.
    fn read_data_byte(&mut self) -> u8 {
        let offset = self.offset as usize;
        match self.selected().and_then(|item| item.get(offset)).copied() {
            Some(byte) => {
                self.offset = self.offset.saturating_add(1);
                byte
            }
            None => 0,
        }
    }
}

/// Refuses items whose length does not fit the 32-bit size fields.
fn check_size(data: &[u8]) -> Result<(), FwCfgError> {
    if u32::try_from(data.len()).is_err() {
        return Err(FwCfgError::ItemTooLarge { len: data.len() });
    }
    Ok(())
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (REG_DATA, 1) => data[0] = self.read_data_byte(),
            (REG_DMA_HIGH..=11, _) => {
                // Any width inside the DMA register reads the signature bytes at those offsets.
                for (i, byte) in data.iter_mut().enumerate() {
                    let at = (offset - REG_DMA_HIGH) as usize + i;
                    *byte = DMA_SIGNATURE.get(at).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (REG_SELECTOR, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            (REG_DATA, &[_]) => {
                tracing::debug!(
                    "fw_cfg: ignoring a write to the data register (items are read-only)"
                );
            }
            (REG_DMA_HIGH, &[a, b, c, d]) => {
                self.dma_address_high = u32::from_be_bytes([a, b, c, d])
            }
            (REG_DMA_LOW, &[a, b, c, d]) => {
                let address = u64::from(self.dma_address_high) << 32
                    | u64::from(u32::from_be_bytes([a, b, c, d]));
                self.run_dma(address);
            }
            (REG_DMA_HIGH, &[a, b, c, d, e, f, g, h]) => {
                self.dma_address_high = u32::from_be_bytes([a, b, c, d]);
                self.run_dma(u64::from_be_bytes([a, b, c, d, e, f, g, h]));
            }
            _ => tracing::debug!(
                "fw_cfg: ignoring a {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

impl fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FwCfg")
            .field("items", &self.items.len())
            .field("files", &self.files.len())
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use std::sync::Mutex;

    /// Guest RAM from address 0, `len` bytes long.
    pub struct TestMemory(pub Mutex<Vec<u8>>);

    impl TestMemory {
        pub fn new(len: usize) -> Arc<Self> {
            Arc::new(TestMemory(Mutex::new(vec![0; len])))
        }

        fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, GuestMemoryError> {
            let start = usize::try_from(addr).map_err(|_| GuestMemoryError)?;
            let end = start.checked_add(len).ok_or(GuestMemoryError)?;
            if end > self.0.lock().unwrap().len() {
                return Err(GuestMemoryError);
            }
            Ok(start..end)
        }

        pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let r = self.range(addr, len).unwrap();
            self.0.lock().unwrap()[r].to_vec()
        }

        pub fn put(&self, addr: u64, data: &[u8]) {
            GuestMemoryAccess::write(self, addr, data).unwrap();
        }
    }

    impl GuestMemoryAccess for TestMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
            let r = self.range(addr, buf.len())?;
            buf.copy_from_slice(&self.0.lock().unwrap()[r]);
            Ok(())
        }
        fn write(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
            let r = self.range(addr, buf.len())?;
            self.0.lock().unwrap()[r].copy_from_slice(buf);
            Ok(())
        }
    }

    /// Selects `key` through the selector register and reads `len` bytes through the data register.
    pub fn read_item(fw: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        fw.write(REG_SELECTOR, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                fw.read(REG_DATA, &mut b);
                b[0]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    /// The DMA error bit, as the guest sees it in the control word.
    const CTL_ERROR_BIT: u32 = 1;

    fn device() -> FwCfg {
        FwCfg::new(TestMemory::new(0x1000))
    }

    #[test]
    fn signature_and_features() {
        let mut fw = device();
        assert_eq!(read_item(&mut fw, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut fw, FW_CFG_ID, 4), [3, 0, 0, 0]);
        // Past the end the data register reads zero.
        assert_eq!(read_item(&mut fw, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
    }

    #[test]
    fn standard_items_little_endian() {
        let mut fw = device();
        fw.set_cpus(2, 8);
        fw.set_ram_size(0x1_2345_6789);
        fw.set_nographic(true);
        fw.set_boot_menu(false);
        assert_eq!(read_item(&mut fw, FW_CFG_NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&mut fw, FW_CFG_MAX_CPUS, 2), [8, 0]);
        assert_eq!(
            read_item(&mut fw, FW_CFG_RAM_SIZE, 8),
            0x1_2345_6789u64.to_le_bytes()
        );
        assert_eq!(read_item(&mut fw, FW_CFG_NOGRAPHIC, 2), [1, 0]);
        assert_eq!(read_item(&mut fw, FW_CFG_BOOT_MENU, 2), [0, 0]);
        fw.set_boot_menu(true);
        assert_eq!(read_item(&mut fw, FW_CFG_BOOT_MENU, 2), [1, 0]);
    }

    #[test]
    fn selecting_rewinds_and_unknown_keys_read_zero() {
        let mut fw = device();
        assert_eq!(read_item(&mut fw, FW_CFG_SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&mut fw, FW_CFG_SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&mut fw, 0x0002, 4), [0; 4]);
        assert_eq!(read_item(&mut fw, 0x3fff, 4), [0; 4]);
        // The write-channel bit is not part of the key.
        assert_eq!(read_item(&mut fw, SELECTOR_WRITE, 4), b"QEMU");
        assert_eq!(fw.state().selector, 0);
    }

    #[test]
    fn set_item_refuses_device_and_file_keys() {
        let mut fw = device();
        for key in [
            FW_CFG_SIGNATURE,
            FW_CFG_ID,
            FW_CFG_FILE_DIR,
            FW_CFG_FILE_FIRST,
            0x3fff,
            0x4004,
        ] {
            assert_eq!(
                fw.set_item(key, vec![1]),
                Err(FwCfgError::ReservedKey { key })
            );
        }
        fw.set_item(0x8003, vec![9, 8]).unwrap();
        assert_eq!(read_item(&mut fw, 0x8003, 2), [9, 8]);
        fw.set_item(FW_CFG_NOGRAPHIC, vec![0, 0]).unwrap();
        assert_eq!(read_item(&mut fw, FW_CFG_NOGRAPHIC, 2), [0, 0]);
        let err = fw.set_item(FW_CFG_ID, vec![]).unwrap_err().to_string();
        assert!(err.contains("0x0001") && err.contains("add_file"), "{err}");
    }

    /// Parses the directory into (size, select, name).
    fn parse_dir(dir: &[u8]) -> Vec<(u32, u16, String)> {
        let count = u32::from_be_bytes(dir[..4].try_into().unwrap()) as usize;
        assert_eq!(dir.len(), 4 + count * FILE_DIR_ENTRY_LEN);
        dir[4..]
            .chunks(FILE_DIR_ENTRY_LEN)
            .map(|e| {
                assert_eq!(&e[6..8], [0, 0], "reserved field");
                let name = &e[8..];
                let end = name.iter().position(|&b| b == 0).unwrap();
                (
                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                    u16::from_be_bytes([e[4], e[5]]),
                    String::from_utf8(name[..end].to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn file_directory_is_sorted_with_sizes_and_selectors() {
        let mut fw = device();
        assert_eq!(read_item(&mut fw, FW_CFG_FILE_DIR, 4), [0; 4]);
        let zeta = fw.add_file("zeta", vec![1; 3]).unwrap();
        let alpha = fw.add_file("etc/alpha", vec![2; 300]).unwrap();
        let mid = fw.add_file("bootorder", vec![]).unwrap();
        assert_eq!((zeta, alpha, mid), (0x20, 0x21, 0x22));
        let dir_len = 4 + 3 * FILE_DIR_ENTRY_LEN;
        let dir = read_item(&mut fw, FW_CFG_FILE_DIR, dir_len);
        assert_eq!(
            parse_dir(&dir),
            [
                (0, 0x22, "bootorder".to_owned()),
                (300, 0x21, "etc/alpha".to_owned()),
                (3, 0x20, "zeta".to_owned()),
            ]
        );
        assert_eq!(read_item(&mut fw, alpha, 2), [2, 2]);
        assert_eq!(fw.file_key("zeta"), Some(0x20));
        assert_eq!(fw.file_key("nope"), None);
    }

    #[test]
    fn file_names_are_validated() {
        let mut fw = device();
        let longest = "n".repeat(FW_CFG_MAX_NAME_LEN);
        fw.add_file(&longest, vec![]).unwrap();
        let dir = fw.item(FW_CFG_FILE_DIR).unwrap().to_vec();
        assert_eq!(parse_dir(&dir)[0].2, longest);
        for bad in [
            String::new(),
            "n".repeat(FW_CFG_MAX_NAME_LEN + 1),
            "a\0b".into(),
        ] {
            assert_eq!(
                fw.add_file(&bad, vec![]),
                Err(FwCfgError::InvalidName { name: bad.clone() })
            );
        }
        let err = fw.add_file(&longest, vec![]).unwrap_err();
        assert!(matches!(err, FwCfgError::DuplicateFile { .. }));
        assert!(err.to_string().contains("unique"), "{err}");
    }

    #[test]
    fn file_keys_run_out_at_0x3fff() {
        let mut fw = device();
        for i in 0..FW_CFG_MAX_FILES {
            fw.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(
            fw.file_key(&format!("f{}", FW_CFG_MAX_FILES - 1)),
            Some(0x3fff)
        );
        assert_eq!(
            fw.add_file("one-more", vec![]),
            Err(FwCfgError::TooManyFiles)
        );
        let dir = fw.item(FW_CFG_FILE_DIR).unwrap();
        assert_eq!(&dir[..4], (FW_CFG_MAX_FILES as u32).to_be_bytes());
    }

    #[test]
    fn register_widths_and_dma_signature() {
        let mut fw = device();
        // A one-byte selector write is ignored.
        fw.write(REG_SELECTOR, &[FW_CFG_ID as u8]);
        fw.write(REG_SELECTOR, &FW_CFG_ID.to_le_bytes());
        fw.write(REG_SELECTOR, &[0]);
        let mut wide = [0xffu8; 2];
        fw.read(REG_DATA, &mut wide);
        assert_eq!(wide, [0, 0]);
        // Data writes are ignored and do not move the offset.
        fw.write(REG_DATA, &[0x55]);
        let mut b = [0u8];
        fw.read(REG_DATA, &mut b);
        assert_eq!(b, [3]);
        let mut sig = [0u8; 4];
        fw.read(REG_DMA_HIGH, &mut sig);
        assert_eq!(&sig, b"QEMU");
        fw.read(REG_DMA_LOW, &mut sig);
        assert_eq!(&sig, b" CFG");
        let mut sig8 = [0u8; 8];
        fw.read(REG_DMA_HIGH, &mut sig8);
        assert_eq!(&sig8, b"QEMU CFG");
        fw.read(2, &mut sig);
        assert_eq!(sig, [0; 4]);
    }

    #[test]
    fn state_round_trip() {
        let mut fw = device();
        read_item(&mut fw, FW_CFG_SIGNATURE, 2);
        fw.write(REG_DMA_HIGH, &0x1234u32.to_be_bytes());
        let state = fw.state();
        assert_eq!(
            state,
            FwCfgState {
                selector: 0,
                offset: 2,
                dma_address_high: 0x1234
            }
        );
        let mut other = device();
        other.set_state(&state);
        let mut b = [0u8];
        other.read(REG_DATA, &mut b);
        assert_eq!(b, *b"M");
    }

    #[test]
    fn firmware_sequence_through_the_bus() {
        let bus = crate::Bus::new();
        let fw = Arc::new(std::sync::Mutex::new(device()));
        fw.lock().unwrap().set_cpus(4, 4);
        bus.insert(fw.clone(), u64::from(FW_CFG_PORT), FW_CFG_PORT_LEN)
            .unwrap();
        assert!(bus.write(0x510, &FW_CFG_NB_CPUS.to_le_bytes()));
        let mut cpus = [0u8; 2];
        for b in cpus.iter_mut() {
            let mut one = [0u8];
            assert!(bus.read(0x511, &mut one));
            *b = one[0];
        }
        assert_eq!(u16::from_le_bytes(cpus), 4);
        let mut sig = [0u8; 4];
        assert!(bus.read(0x514, &mut sig));
        assert_eq!(&sig, b"QEMU");
        assert!(!bus.read(0x51c, &mut sig[..1]));
    }

    /// A small xorshift generator: reproducible, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_accesses_never_panic() {
        const MEM: u64 = 0x2000;
        let mem = TestMemory::new(MEM as usize);
        let mut fw = FwCfg::new(mem.clone());
        fw.set_cpus(1, 2);
        fw.add_file("etc/a", vec![0x5a; 300]).unwrap();
        fw.add_file("etc/b", vec![]).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            match rng.below(4) {
                // Any register access of any width, including past the range.
                0 => {
                    let offset = rng.below(16);
                    let mut buf = vec![0u8; rng.below(9) as usize];
                    fw.read(offset, &mut buf);
                }
                1 => {
                    let offset = rng.below(16);
                    let len = rng.below(9) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    fw.write(offset, &data);
                }
                // A DMA descriptor with random fields, placed anywhere (sometimes straddling the end of RAM).
                _ => {
                    let at = rng.below(MEM + 32) & !3;
                    let control = match rng.below(3) {
                        0 => rng.next() as u32,
                        _ => (rng.below(0x30) as u32) << 16 | rng.below(0x20) as u32,
                    };
                    let length = match rng.below(3) {
                        0 => rng.next() as u32,
                        _ => rng.below(0x400) as u32,
                    };
                    let address = match rng.below(3) {
                        0 => rng.next(),
                        _ => rng.below(MEM + 0x100),
                    };
                    let mut d = control.to_be_bytes().to_vec();
                    d.extend_from_slice(&length.to_be_bytes());
                    d.extend_from_slice(&address.to_be_bytes());
                    let in_ram = at + 16 <= MEM;
                    if in_ram {
                        mem.put(at, &d);
                    }
                    fw.write(REG_DMA_HIGH, &0u32.to_be_bytes());
                    fw.write(REG_DMA_LOW, &(at as u32).to_be_bytes());
                    if in_ram {
                        let status = u32::from_be_bytes(mem.bytes(at, 4).try_into().unwrap());
                        assert!(status == 0 || status == CTL_ERROR_BIT, "status {status:#x}");
                    }
                }
            }
            let state = fw.state();
            assert_eq!(state.selector & SELECTOR_WRITE, 0);
            let len = fw.item(state.selector).map_or(0, <[u8]>::len);
            assert!(state.offset as usize <= len, "offset past the item end");
        }
    }
}
