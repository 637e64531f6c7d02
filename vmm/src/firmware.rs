//! Booting through firmware (`--firmware`): the image mapped read-only so that it ends at 4 GiB (where the vCPU's
//! reset vector points), its last 256 KiB copied into the legacy BIOS area below 1 MiB (already "shadowed": RAM the
//! firmware may write; see `arch::layout::BIOS_ALIAS_END`), and the fw_cfg items QEMU-compatible firmware (SeaBIOS, OVMF) reads to learn the machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arch::layout::{BIOS_ALIAS_END, BIOS_ALIAS_SIZE, FIRMWARE_END, FIRMWARE_MAX_SIZE};
use devices::fw_cfg::{AcpiBlob, AcpiLoader, BootDevice, E820Entry, GuestMemoryError};
use devices::{FwCfg, FwCfgError, GuestMemoryAccess};
use hypervisor::Vm;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::memory::{MemoryError, MemoryManager};

/// Smallest firmware image accepted.
const FIRMWARE_MIN_SIZE: u64 = 64 << 10;
/// Firmware images are whole pages.
const FIRMWARE_ALIGN: u64 = 4 << 10;
/// The port of COM1, for SeaBIOS's serial console (`etc/sercon-port`).
pub const SERCON_PORT: u16 = 0x3f8;

/// Why firmware boot could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The image could not be read.
    #[error("--firmware {}: cannot read it: {source}", path.display())]
    Read {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image has a size no flash has.
    #[error(
        "--firmware {}: {size} bytes; a firmware image is a whole number of 4 KiB pages between 64 KiB and 16 MiB \
         (SeaBIOS's bios-256k.bin is 256 KiB); check that this is a firmware image",
        path.display()
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Mapping the image failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The legacy BIOS area is not RAM.
    #[error("cannot copy the firmware below 1 MiB: {0}; give the guest at least 1 MiB of RAM")]
    BiosArea(String),
    /// An fw_cfg item could not be built.
    #[error("cannot set up fw_cfg for the firmware: {0}")]
    FwCfg(#[from] FwCfgError),
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables for the firmware: {0}")]
    Acpi(#[from] arch::acpi::Error),
}

/// Reads and checks a firmware image.
pub fn load_image(path: &Path) -> Result<Vec<u8>, FirmwareError> {
    let image = std::fs::read(path).map_err(|source| FirmwareError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let size = image.len() as u64;
    if !(FIRMWARE_MIN_SIZE..=FIRMWARE_MAX_SIZE).contains(&size)
        || !size.is_multiple_of(FIRMWARE_ALIGN)
    {
        return Err(FirmwareError::Size {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(image)
}

/// Maps `image` read-only so that it ends at 4 GiB and copies its last 256 KiB (or all of a smaller image) into RAM
/// so that it ends at 1 MiB, as a PC chipset aliases the top of the flash there and firmware shadows it.
pub fn install(
    vm: &Arc<dyn Vm>,
    memory: &mut MemoryManager,
    image: &[u8],
) -> Result<(), FirmwareError> {
    let size = image.len() as u64;
    memory.map_rom(vm, FIRMWARE_END - size, image)?;
    let alias = size.min(BIOS_ALIAS_SIZE);
    // `alias` is at most the image's length, so the slice start is in range.
    let tail = &image[(size - alias) as usize..];
    memory
        .guest_memory()
        .write_slice(tail, GuestAddress(BIOS_ALIAS_END - alias))
        .map_err(|e| FirmwareError::BiosArea(e.to_string()))
}

/// fw_cfg's DMA view of guest RAM.
struct FwCfgMemory(GuestMemoryMmap);

impl GuestMemoryAccess for FwCfgMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        if !self
            .0
            .check_range(GuestAddress(addr), buf.len(), Permissions::Read)
        {
            return Err(GuestMemoryError);
        }
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| GuestMemoryError)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        if !self
            .0
            .check_range(GuestAddress(addr), buf.len(), Permissions::Write)
        {
            return Err(GuestMemoryError);
        }
        self.0
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| GuestMemoryError)
    }
}

/// What the firmware is told about the machine.
pub struct FwCfgSetup {
    /// vCPUs at boot and at most.
    pub cpus: (u32, u32),
    /// RAM below 4 GiB (from 0) and above 4 GiB (from 4 GiB).
    pub ram: (u64, u64),
    /// ACPI memory hotplug slots in the DSDT.
    pub memory_slots: u32,
    /// PCI slots of the disks to boot from, first choice first.
    pub boot_order: Vec<u8>,
    /// The serial port the firmware should use as its console (`None`: no serial console).
    pub serial_port: Option<u16>,
    /// How long the firmware waits before it retries when nothing is bootable.
    pub boot_fail_wait_ms: u32,
}

/// Builds the fw_cfg device with every item the firmware needs: signature, CPU counts, RAM size and map, boot order,
/// serial console, boot-failure wait and Atrium's ACPI tables through the linker/loader.
pub fn fw_cfg(mem: &GuestMemoryMmap, setup: &FwCfgSetup) -> Result<FwCfg, FirmwareError> {
    let (boot_cpus, max_cpus) = setup.cpus;
    let (below_4g, above_4g) = setup.ram;
    let mut fw = FwCfg::new(Arc::new(FwCfgMemory(mem.clone())));
    // CPU counts above u16::MAX cannot occur: the configuration caps vCPUs far lower.
    fw.set_cpus(
        u16::try_from(boot_cpus).unwrap_or(u16::MAX),
        u16::try_from(max_cpus).unwrap_or(u16::MAX),
    );
    fw.set_ram_size(below_4g + above_4g);
    fw.set_nographic(true);
    // SeaBIOS waits until exactly this many CPUs have answered its INIT/SIPI.
    fw.add_file(
        "etc/boot-cpus",
        u16::try_from(boot_cpus)
            .unwrap_or(u16::MAX)
            .to_le_bytes()
            .to_vec(),
    )?;
    // RAM, and the ECAM area reserved so that the OS trusts the MCFG (firmware adds its own reservations).
    let mut e820 = vec![
        E820Entry {
            addr: 0,
            size: below_4g,
            kind: arch::E820_RAM,
        },
        E820Entry {
            addr: arch::layout::PCI_MMCONFIG_START,
            size: arch::layout::PCI_MMCONFIG_SIZE,
            kind: arch::E820_RESERVED,
        },
    ];
    if above_4g > 0 {
        e820.push(E820Entry {
            addr: FIRMWARE_END,
            size: above_4g,
            kind: arch::E820_RAM,
        });
    }
    fw.add_e820(&e820)?;
    if !setup.boot_order.is_empty() {
        let order: Vec<BootDevice> = setup
            .boot_order
            .iter()
            .map(|&slot| BootDevice::VirtioBlk { slot, function: 0 })
            .collect();
        fw.add_boot_order(&order)?;
    }
    if let Some(port) = setup.serial_port {
        fw.add_sercon_port(port)?;
    }
    fw.add_boot_fail_wait(setup.boot_fail_wait_ms)?;

    let tables =
        arch::acpi::loader_tables(boot_cpus, max_cpus, below_4g + above_4g, setup.memory_slots)?;
    let mut loader = AcpiLoader::new(tables.tables, tables.rsdp)?;
    for p in &tables.table_pointers {
        loader.add_pointer(AcpiBlob::Tables, p.offset, p.size, AcpiBlob::Tables)?;
    }
    for p in &tables.rsdp_pointers {
        loader.add_pointer(AcpiBlob::Rsdp, p.offset, p.size, AcpiBlob::Tables)?;
    }
    for c in &tables.table_checksums {
        loader.add_checksum(AcpiBlob::Tables, c.offset, c.start, c.length)?;
    }
    for c in &tables.rsdp_checksums {
        loader.add_checksum(AcpiBlob::Rsdp, c.offset, c.start, c.length)?;
    }
    fw.add_acpi(&loader)?;
    Ok(fw)
}

/// What SeaBIOS prints (on its debug console and screen) when no device could be booted, before it waits the
/// boot-fail time and resets the machine.
const NO_BOOTABLE_DEVICE: &[u8] = b"No bootable device";

/// Whether the firmware has reported that it found nothing to boot (SeaBIOS's message on its debug console). Set
/// by [`WatchedOutput`]; the VMM reads it when the firmware then resets the machine.
#[derive(Clone, Debug, Default)]
pub struct BootWatch(Arc<AtomicBool>);

impl BootWatch {
    /// The firmware said it found no bootable device.
    pub fn no_bootable_device(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The firmware debug console's output: passed on unchanged, and watched for the no-bootable-device message.
pub struct WatchedOutput {
    inner: Box<dyn Write + Send>,
    watch: BootWatch,
    /// The last bytes seen, so that a message split across writes is still found.
    tail: Vec<u8>,
}

impl WatchedOutput {
    /// Wraps `inner`, reporting to `watch`.
    pub fn new(inner: Box<dyn Write + Send>, watch: BootWatch) -> Self {
        WatchedOutput {
            inner,
            watch,
            tail: Vec::new(),
        }
    }
}

impl Write for WatchedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self
            .tail
            .windows(NO_BOOTABLE_DEVICE.len())
            .any(|w| w == NO_BOOTABLE_DEVICE)
        {
            self.watch.0.store(true, Ordering::Relaxed);
        }
        let keep = NO_BOOTABLE_DEVICE.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        // The firmware's log is best effort: a failing sink must not stop the watch.
        if let Err(e) = self.inner.write_all(buf) {
            tracing::debug!("debug console output failed: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, len: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("atrium-fw-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fw.bin");
        std::fs::write(&path, vec![0xa5; len]).unwrap();
        path
    }

    #[test]
    fn images_of_flash_sizes_load_and_others_are_refused() {
        for len in [64 << 10, 128 << 10, 256 << 10, 2 << 20, 16 << 20] {
            assert_eq!(
                load_image(&scratch(&format!("ok{len}"), len))
                    .unwrap()
                    .len(),
                len
            );
        }
        for len in [
            0,
            512,
            (64 << 10) - 4096,
            (256 << 10) + 1,
            (16 << 20) + 4096,
        ] {
            let err = load_image(&scratch(&format!("bad{len}"), len)).unwrap_err();
            assert!(
                err.to_string()
                    .contains("a firmware image is a whole number of 4 KiB pages"),
                "{err}"
            );
        }
        let err = load_image(Path::new("/nonexistent/bios.bin")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("--firmware /nonexistent/bios.bin: cannot read it"));
    }

    #[test]
    fn fw_cfg_carries_the_machine_and_the_acpi_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let fw = fw_cfg(
            &mem,
            &FwCfgSetup {
                cpus: (2, 4),
                ram: (3 << 30, 1 << 30),
                memory_slots: 0,
                boot_order: vec![3, 1],
                serial_port: Some(SERCON_PORT),
                boot_fail_wait_ms: 5000,
            },
        )
        .unwrap();
        let file = |name: &str| fw.item(fw.file_key(name).unwrap()).unwrap().to_vec();
        assert_eq!(file("etc/boot-cpus"), 2u16.to_le_bytes());
        assert_eq!(file("etc/sercon-port"), SERCON_PORT.to_le_bytes());
        assert_eq!(file("etc/boot-fail-wait"), 5000u32.to_le_bytes());
        let order = String::from_utf8(file("bootorder")).unwrap();
        assert!(
            order.starts_with("/pci@i0cf8/scsi@3/disk@0,0\n/pci@i0cf8/scsi@1/disk@0,0"),
            "{order}"
        );
        let e820 = file("etc/e820");
        assert_eq!(e820.len(), 60);
        assert_eq!(&e820[20..28], &0xe000_0000u64.to_le_bytes());
        assert_eq!(&e820[40..48], &(1u64 << 32).to_le_bytes());
        assert_eq!(&file("etc/acpi/tables")[0..4], b"XSDT");
        assert_eq!(&file("etc/acpi/rsdp")[0..8], b"RSD PTR ");
        assert!(!file("etc/table-loader").is_empty());
    }

    #[test]
    fn the_watch_sees_the_message_even_split_across_writes() {
        let watch = BootWatch::default();
        let mut out = WatchedOutput::new(Box::new(std::io::sink()), watch.clone());
        for byte in b"Booting from Hard Disk...\nBoot failed\n" {
            out.write_all(&[*byte]).unwrap();
        }
        assert!(!watch.no_bootable_device());
        out.write_all(b"No boot").unwrap();
        out.write_all(b"able dev").unwrap();
        assert!(!watch.no_bootable_device());
        out.write_all(b"ice.  Retrying in 1 seconds.\n").unwrap();
        assert!(watch.no_bootable_device());
    }
}
