//! Register access sequences against the devices a firmware boot adds, all at once: fw_cfg (populated as for
//! SeaBIOS, with its DMA interface over 1 MiB of guest RAM), the 8259 pair and ELCR, the 8254 PIT and port B, port
//! 0x92, the i8042 with its PS/2 keyboard (IRQ 1 wired to the PIC) and the debug console. Accesses go to the devices
//! directly (any offset, any width) or through a port bus laid out as on a PC; in between come IRQ line changes,
//! interrupt acknowledge cycles, PIT timer expiries (the real timerfd, which must never block) and state round trips,
//! plus the PIC initialisation and PIT programming sequences as single steps so that deep states are reached quickly.
//! The PIT counts on the host clock, so its IRQ 0 goes to a line that drops it: the PIC's inputs then depend on the
//! input alone and a failing input replays.
//!
//! Checked along the way:
//! - fw_cfg: a DMA transfer whose descriptor is in RAM does exactly what a small model of the descriptor says
//!   (status, selector, offset, the bytes it copies); one whose descriptor is not in RAM changes nothing but its
//!   status word; the selector/data ports return the item's bytes then zeros; the signature item reads "QEMU", the
//!   DMA register "QEMU CFG"; the file directory is sorted and matches the items;
//! - PIC: acknowledge() returns `None` exactly while the master is uninitialised, otherwise a vector at one of the
//!   programmed bases whose low bits name the input it put in service (or the spurious IRQ 7 when nothing was
//!   pending); level inputs request exactly while their line is high; read-only ELCR bits stay clear;
//! - PIT: the modes stay 0..=5, the gates follow port B, latched status bytes describe the channel;
//! - port 0x92 asks for one reset per write of bit 0 and never reads it back; the i8042's queue stays bounded and IRQ
//!   1 is high exactly while a byte waits with the keyboard interrupt enabled; the debug console reads 0xe9;
//! - every device's state survives a save/restore round trip.

#![no_main]

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use atrium_fuzz::{value_bytes, AccessSize, NoopLine, NoopPicOutput, NoopPlatformEvents};
use devices::debug_console::{DebugConsole, DEBUG_CONSOLE_RANGE_LEN, DEBUG_CONSOLE_READBACK};
use devices::fw_cfg::{
    AcpiBlob, AcpiLoader, BootDevice, E820Entry, GuestMemoryError, FW_CFG_FILE_DIR, FW_CFG_PORT,
    FW_CFG_PORT_LEN, FW_CFG_SIGNATURE,
};
use devices::i8042::{I8042Ports, I8042, I8042_PORT_LEN, OUTPUT_QUEUE_LEN};
use devices::pic::{PicBusDevices, ELCR_RANGE_LEN, PIC_NUM_IRQS, PIC_RANGE_LEN};
use devices::pit::{PitBusDevices, PitState, PIT_RANGE_LEN, PORT_B_RANGE_LEN};
use devices::port92::{Port92, PORT92_RANGE_LEN};
use devices::{
    pic_bus_devices, pic_irq_line, pit_bus_devices, Bus, BusDevice, FwCfg, GuestMemoryAccess, Pic,
    Pit, PlatformEvents,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Guest RAM, from address 0.
const RAM_SIZE: u64 = 1 << 20;
/// How many files the fw_cfg device holds (see `build_fw_cfg`).
const FW_CFG_FILES: usize = 9;

// fw_cfg DMA control bits and register offsets.
const CTL_ERROR: u32 = 0x01;
const CTL_READ: u32 = 0x02;
const CTL_SKIP: u32 = 0x04;
const CTL_SELECT: u32 = 0x08;
const CTL_WRITE: u32 = 0x10;
const FW_CFG_DATA: u64 = 1;
const FW_CFG_DMA_HIGH: u64 = 4;
const FW_CFG_DMA_LOW: u64 = 8;
/// The selector's write-channel bit, which is not part of the key.
const SELECTOR_WRITE: u16 = 0x4000;

// i8042 bits.
const I8042_OUTPUT_FULL: u8 = 0x01;
const I8042_SYSTEM_FLAG: u8 = 0x04;
const I8042_KBD_INTERRUPT: u8 = 0x01;

/// A device as the bus holds it.
type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Guest RAM as a byte vector; an access that does not fit fails and touches nothing.
struct VecMemory(Mutex<Vec<u8>>);

impl VecMemory {
    fn new() -> Arc<Self> {
        Arc::new(VecMemory(Mutex::new(vec![0; RAM_SIZE as usize])))
    }

    /// The byte range `[addr, addr + len)` if it lies in RAM.
    fn range(addr: u64, len: u64) -> Option<Range<usize>> {
        let end = addr.checked_add(len)?;
        (end <= RAM_SIZE).then_some(addr as usize..end as usize)
    }

    fn bytes(&self, range: Range<usize>) -> Vec<u8> {
        self.0.lock().unwrap()[range].to_vec()
    }

    /// Stores `data` at `addr` if all of it fits; returns whether it did.
    fn put(&self, addr: u64, data: &[u8]) -> bool {
        GuestMemoryAccess::write(self, addr, data).is_ok()
    }
}

impl GuestMemoryAccess for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let range = Self::range(addr, buf.len() as u64).ok_or(GuestMemoryError)?;
        buf.copy_from_slice(&self.0.lock().unwrap()[range]);
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        let range = Self::range(addr, buf.len() as u64).ok_or(GuestMemoryError)?;
        self.0.lock().unwrap()[range].copy_from_slice(buf);
        Ok(())
    }
}

/// Counts reset requests; drops the other events.
#[derive(Default)]
struct ResetCounter(AtomicUsize);

impl ResetCounter {
    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl PlatformEvents for ResetCounter {
    fn power_off(&self) {}

    fn reset(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn debug_exit(&self, _code: u8) {}
}

/// fw_cfg with the items a firmware boot gives it: CPUs, RAM, the boot CPU count file, the memory map, a boot order,
/// the serial console, the boot-failure wait, an architecture-local item and a small ACPI table set with its
/// linker/loader script (pointers into the tables, checksums over both blobs).
fn build_fw_cfg(mem: Arc<VecMemory>) -> FwCfg {
    let mut fw = FwCfg::new(mem);
    fw.set_cpus(2, 4);
    fw.set_ram_size(RAM_SIZE);
    fw.set_nographic(true);
    fw.set_boot_menu(false);
    fw.set_item(0x8003, vec![0x5a; 7]).unwrap();
    fw.add_file("etc/boot-cpus", 2u16.to_le_bytes().to_vec())
        .unwrap();
    fw.add_e820(&[
        E820Entry {
            addr: 0,
            size: 0x9fc00,
            kind: 1,
        },
        E820Entry {
            addr: 0x9fc00,
            size: RAM_SIZE - 0x9fc00,
            kind: 2,
        },
    ])
    .unwrap();
    fw.add_boot_order(&[
        BootDevice::VirtioBlk {
            slot: 4,
            function: 0,
        },
        BootDevice::VirtioBlk {
            slot: 5,
            function: 1,
        },
        BootDevice::Path("HALT".to_owned()),
    ])
    .unwrap();
    fw.add_sercon_port(0x3f8).unwrap();
    fw.add_boot_fail_wait(1000).unwrap();
    fw.add_file("etc/empty", Vec::new()).unwrap();

    // An RSDP pointing (32- and 64-bit) at an XSDT at offset 0 of the tables, whose one entry points at offset 64.
    let mut rsdp = vec![0u8; 36];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[15] = 2;
    rsdp[20] = 36;
    let mut tables = vec![0u8; 128];
    tables[..4].copy_from_slice(b"XSDT");
    tables[4] = 44;
    tables[36] = 64;
    tables[64..68].copy_from_slice(b"FACP");
    tables[68] = 64;
    let mut loader = AcpiLoader::new(tables, rsdp).unwrap();
    loader
        .add_pointer(AcpiBlob::Rsdp, 16, 4, AcpiBlob::Tables)
        .unwrap();
    loader
        .add_pointer(AcpiBlob::Rsdp, 24, 8, AcpiBlob::Tables)
        .unwrap();
    loader
        .add_pointer(AcpiBlob::Tables, 36, 8, AcpiBlob::Tables)
        .unwrap();
    loader.add_checksum(AcpiBlob::Tables, 73, 64, 64).unwrap();
    loader.add_checksum(AcpiBlob::Tables, 9, 0, 44).unwrap();
    loader.add_checksum(AcpiBlob::Rsdp, 8, 0, 20).unwrap();
    loader.add_checksum(AcpiBlob::Rsdp, 32, 0, 36).unwrap();
    fw.add_acpi(&loader).unwrap();
    fw
}

/// A device, addressed directly (offsets relative to its own base, as the bus would pass them).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    FwCfg,
    PicMaster,
    PicSlave,
    Elcr,
    PitCounters,
    PortB,
    Port92,
    /// The i8042's data port as a one-port device.
    KbdData,
    /// The i8042's status/command port as a one-port device.
    KbdCommand,
    /// The i8042 itself, as its five-port range.
    I8042,
    DebugConsole,
}

/// A port range on the PC port map.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum PortBase {
    PicMaster,
    PicSlave,
    Pit,
    KbdData,
    PortB,
    KbdCommand,
    Port92,
    DebugConsole,
    Elcr,
    FwCfg,
}

impl PortBase {
    fn port(self) -> u16 {
        match self {
            PortBase::PicMaster => 0x20,
            PortBase::PicSlave => 0xa0,
            PortBase::Pit => 0x40,
            PortBase::KbdData => 0x60,
            PortBase::PortB => 0x61,
            PortBase::KbdCommand => 0x64,
            PortBase::Port92 => 0x92,
            PortBase::DebugConsole => 0x402,
            PortBase::Elcr => 0x4d0,
            PortBase::FwCfg => FW_CFG_PORT,
        }
    }
}

/// A guest-physical address: somewhere in RAM, just below its end (so an access can straddle it), or anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Ram(u32),
    BelowEnd(u8),
    Any(u64),
}

impl Addr {
    fn resolve(self) -> u64 {
        match self {
            Addr::Ram(a) => u64::from(a) % RAM_SIZE,
            Addr::BelowEnd(d) => RAM_SIZE - u64::from(d),
            Addr::Any(a) => a,
        }
    }
}

/// How the guest writes the descriptor address to start a DMA transfer.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kick {
    /// High half, then low half (what SeaBIOS and OVMF do).
    Split,
    /// One 64-bit write at the high half.
    Wide,
    /// Only the low half, with whatever high half was written before.
    LowOnly,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A raw access at `offset` from the device's base (the bus only passes in-range offsets; others test bounds).
    Access {
        device: Device,
        offset: u8,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// An access at a far offset.
    FarAccess {
        device: Device,
        offset: u64,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// A port access through the bus, near one of the devices' ranges.
    Port {
        base: PortBase,
        delta: u8,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// fw_cfg: select `key` and read `len` bytes through the data port.
    FwCfgRead { key: u16, len: u8 },
    /// fw_cfg: read and check the whole file directory through the data port.
    FwCfgDirectory,
    /// fw_cfg: put a DMA descriptor at `descriptor` (if it fits in RAM) and start the transfer.
    Dma {
        descriptor: Addr,
        control: u32,
        length: u32,
        address: Addr,
        kick: Kick,
    },
    /// fw_cfg: a well-formed DMA read of the signature, which must succeed.
    DmaSignature { descriptor: u32, buffer: u32 },
    /// PIC: the initialisation sequence a firmware or OS writes (edge, cascade, ICW4), then both masks.
    PicInit {
        master_base: u8,
        slave_base: u8,
        icw4: u8,
        master_mask: u8,
        slave_mask: u8,
    },
    /// PIC: a non-specific EOI to one chip.
    PicEoi { slave: bool },
    /// PIT: a control word for `channel` (low-then-high access), then the count.
    PitProgram { channel: u8, mode: u8, count: u16 },
    /// PIC: set an ISA IRQ's level directly (IRQs past 15 are ignored by the PIC).
    SetIrq { irq: u8, level: bool },
    /// PIC: drive an IRQ through its interrupt line: pulse it, or hold it at a level.
    Line { irq: u8, level: Option<bool> },
    /// PIC: the interrupt acknowledge cycle.
    Acknowledge,
    /// PIT: the timerfd fired (or was polled early).
    Timer,
    /// Save every device's state and restore it.
    RoundTrip,
}

/// The firmware-facing devices and the port bus they sit on.
struct Platform {
    mem: Arc<VecMemory>,
    fw_cfg: Arc<Mutex<FwCfg>>,
    pic: Arc<Pic>,
    pic_ports: PicBusDevices,
    pit: Arc<Mutex<Pit>>,
    pit_ports: PitBusDevices,
    port92: Arc<Mutex<Port92>>,
    port92_resets: Arc<ResetCounter>,
    /// Resets port 0x92 should have asked for.
    expected_resets: usize,
    i8042: Arc<Mutex<I8042>>,
    i8042_ports: I8042Ports,
    debug_console: Arc<Mutex<DebugConsole>>,
    bus: Bus,
}

impl Platform {
    fn new() -> Self {
        let mem = VecMemory::new();
        let fw_cfg = Arc::new(Mutex::new(build_fw_cfg(mem.clone())));
        let pic = Pic::new(Arc::new(NoopPicOutput));
        let pic_ports = pic_bus_devices(&pic);
        let pit = Arc::new(Mutex::new(Pit::new(Arc::new(NoopLine)).unwrap()));
        let pit_ports = pit_bus_devices(&pit);
        let port92_resets = Arc::new(ResetCounter::default());
        let port92 = Arc::new(Mutex::new(Port92::new(port92_resets.clone())));
        let mut i8042 = I8042::new(Arc::new(NoopPlatformEvents));
        i8042.set_irq(Some(pic_irq_line(&pic, 1)));
        let i8042 = Arc::new(Mutex::new(i8042));
        let i8042_ports = I8042::bus_devices(&i8042);
        let debug_console = Arc::new(Mutex::new(DebugConsole::new(Box::new(std::io::sink()))));

        let bus = Bus::new();
        let ranges: [(SharedDevice, u16, u64); 10] = [
            (pic_ports.master.clone(), 0x20, PIC_RANGE_LEN),
            (pic_ports.slave.clone(), 0xa0, PIC_RANGE_LEN),
            (pic_ports.elcr.clone(), 0x4d0, ELCR_RANGE_LEN),
            (pit_ports.counters.clone(), 0x40, PIT_RANGE_LEN),
            (pit_ports.port_b.clone(), 0x61, PORT_B_RANGE_LEN),
            (i8042_ports.data.clone(), 0x60, I8042_PORT_LEN),
            (i8042_ports.command.clone(), 0x64, I8042_PORT_LEN),
            (port92.clone(), 0x92, PORT92_RANGE_LEN),
            (debug_console.clone(), 0x402, DEBUG_CONSOLE_RANGE_LEN),
            (fw_cfg.clone(), FW_CFG_PORT, FW_CFG_PORT_LEN),
        ];
        for (device, port, len) in ranges {
            bus.insert(device, u64::from(port), len).unwrap();
        }
        Platform {
            mem,
            fw_cfg,
            pic,
            pic_ports,
            pit,
            pit_ports,
            port92,
            port92_resets,
            expected_resets: 0,
            i8042,
            i8042_ports,
            debug_console,
            bus,
        }
    }

    fn device(&self, device: Device) -> SharedDevice {
        match device {
            Device::FwCfg => self.fw_cfg.clone(),
            Device::PicMaster => self.pic_ports.master.clone(),
            Device::PicSlave => self.pic_ports.slave.clone(),
            Device::Elcr => self.pic_ports.elcr.clone(),
            Device::PitCounters => self.pit_ports.counters.clone(),
            Device::PortB => self.pit_ports.port_b.clone(),
            Device::Port92 => self.port92.clone(),
            Device::KbdData => self.i8042_ports.data.clone(),
            Device::KbdCommand => self.i8042_ports.command.clone(),
            Device::I8042 => self.i8042.clone(),
            Device::DebugConsole => self.debug_console.clone(),
        }
    }

    fn access(&mut self, device: Device, offset: u64, size: AccessSize, value: u64, write: bool) {
        let mut data = value_bytes(value, size.len());
        let target = self.device(device);
        let mut target = target.lock().unwrap();
        if write {
            if device == Device::Port92 && offset == 0 && data.len() == 1 && data[0] & 1 != 0 {
                self.expected_resets += 1;
            }
            target.write(offset, &data);
            return;
        }
        target.read(offset, &mut data);
        drop(target);
        check_read(device, offset, &data);
    }

    fn port(&mut self, port: u16, size: AccessSize, value: u64, write: bool) {
        let mut data = value_bytes(value, size.len());
        if write {
            if port == 0x92 && data.len() == 1 && data[0] & 1 != 0 {
                self.expected_resets += 1;
            }
            self.bus.write(u64::from(port), &data);
        } else if self.bus.read(u64::from(port), &mut data) && port == 0x402 {
            assert!(data.iter().all(|&b| b == DEBUG_CONSOLE_READBACK));
        }
    }

    /// Selects `key` and reads `len` bytes through fw_cfg's data port; they must be the item's, then zeros.
    fn fw_cfg_read(&mut self, key: u16, len: usize) -> Vec<u8> {
        let mut fw = self.fw_cfg.lock().unwrap();
        fw.write(0, &key.to_le_bytes());
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                let mut b = [0u8];
                fw.read(FW_CFG_DATA, &mut b);
                b[0]
            })
            .collect();
        let item = fw.item(key).unwrap_or_default();
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(b, item.get(i).copied().unwrap_or(0), "byte {i} of {key:#x}");
        }
        let state = fw.state();
        assert_eq!(state.selector, key & !SELECTOR_WRITE);
        assert_eq!(state.offset as usize, len.min(item.len()));
        bytes
    }

    /// Reads the file directory through the data port and checks it against the items.
    fn fw_cfg_directory(&mut self) {
        let count = self.fw_cfg_read(FW_CFG_FILE_DIR, 4);
        let count = u32::from_be_bytes(count.try_into().unwrap()) as usize;
        assert_eq!(count, FW_CFG_FILES);
        let dir = self.fw_cfg_read(FW_CFG_FILE_DIR, 4 + count * 64);
        let fw = self.fw_cfg.lock().unwrap();
        let mut previous: Option<&[u8]> = None;
        for entry in dir[4..].chunks(64) {
            let size = u32::from_be_bytes(entry[..4].try_into().unwrap()) as usize;
            let select = u16::from_be_bytes([entry[4], entry[5]]);
            assert_eq!(&entry[6..8], [0, 0]);
            let field = &entry[8..];
            let end = field.iter().position(|&b| b == 0).unwrap();
            assert!(field[end..].iter().all(|&b| b == 0));
            let name = &field[..end];
            assert!(previous.is_none_or(|p| p < name), "directory not sorted");
            previous = Some(name);
            let name = std::str::from_utf8(name).unwrap();
            assert_eq!(fw.file_key(name), Some(select));
            assert_eq!(fw.item(select).map(<[u8]>::len), Some(size));
        }
    }

    /// Runs a DMA transfer with a descriptor at `descriptor` and checks the outcome against a model of the
    /// descriptor's meaning.
    fn dma(&mut self, descriptor: u64, control: u32, length: u32, address: u64, kick: Kick) {
        let mut raw = control.to_be_bytes().to_vec();
        raw.extend_from_slice(&length.to_be_bytes());
        raw.extend_from_slice(&address.to_be_bytes());
        let placed = self.mem.put(descriptor, &raw);
        let mut fw = self.fw_cfg.lock().unwrap();
        let before = fw.state();
        let high = (descriptor >> 32) as u32;
        let low = descriptor as u32;
        let used = match kick {
            Kick::Split => {
                fw.write(FW_CFG_DMA_HIGH, &high.to_be_bytes());
                fw.write(FW_CFG_DMA_LOW, &low.to_be_bytes());
                descriptor
            }
            Kick::Wide => {
                fw.write(FW_CFG_DMA_HIGH, &descriptor.to_be_bytes());
                descriptor
            }
            Kick::LowOnly => {
                fw.write(FW_CFG_DMA_LOW, &low.to_be_bytes());
                u64::from(before.dma_address_high) << 32 | u64::from(low)
            }
        };
        let after = fw.state();
        if used != descriptor {
            // The device read a descriptor from wherever the stale high half points; only "no panic" applies.
            return;
        }
        let status_word = VecMemory::range(descriptor, 4).map(|r| self.mem.bytes(r));
        if !placed {
            // The descriptor could not be read: nothing changes, and ERROR goes in its status word if that is RAM.
            assert_eq!(
                (after.selector, after.offset),
                (before.selector, before.offset)
            );
            if let Some(status) = status_word {
                assert_eq!(status, CTL_ERROR.to_be_bytes());
            }
            return;
        }

        // The model: select, then one operation, all or nothing.
        let (selector, offset) = if control & CTL_SELECT != 0 {
            ((control >> 16) as u16 & !SELECTOR_WRITE, 0)
        } else {
            (before.selector, before.offset as usize)
        };
        let item = fw.item(selector).unwrap_or_default();
        let length = length as usize;
        let in_item = item.len().saturating_sub(offset).min(length);
        let fits = VecMemory::range(address, length as u64).is_some();
        let operation = control & (CTL_READ | CTL_WRITE | CTL_SKIP);
        let ok = if operation == 0 || length == 0 {
            true
        } else if address.checked_add(length as u64).is_none() {
            false
        } else if control & CTL_READ != 0 {
            fits
        } else if control & CTL_WRITE != 0 {
            fits && in_item == length
        } else {
            true
        };
        let moved = if ok && operation != 0 { in_item } else { 0 };
        assert_eq!(after.selector, selector, "selector after DMA");
        assert_eq!(after.offset as usize, offset + moved, "offset after DMA");
        let expected = if ok { 0 } else { CTL_ERROR };
        assert_eq!(status_word.unwrap(), expected.to_be_bytes(), "DMA status");
        if ok && control & CTL_READ != 0 && length > 0 {
            let copied = address as usize..address as usize + length;
            let status = descriptor as usize..descriptor as usize + 4;
            // The status word is stored last; a buffer over it holds the status there.
            if copied.end <= status.start || status.end <= copied.start {
                let got = self.mem.bytes(copied);
                assert_eq!(&got[..in_item], &item[offset..offset + in_item]);
                assert!(
                    got[in_item..].iter().all(|&b| b == 0),
                    "zeros past the item"
                );
            }
        }
    }

    /// A DMA read of the signature from a descriptor in the low half of RAM into a buffer in the high half.
    fn dma_signature(&mut self, descriptor: u32, buffer: u32) {
        let half = RAM_SIZE / 2;
        let descriptor = u64::from(descriptor) % (half - 16);
        let buffer = half + u64::from(buffer) % (half - 4);
        let control = u32::from(FW_CFG_SIGNATURE) << 16 | CTL_SELECT | CTL_READ;
        self.dma(descriptor, control, 4, buffer, Kick::Split);
        let range = VecMemory::range(buffer, 4).unwrap();
        assert_eq!(self.mem.bytes(range), b"QEMU");
        assert_eq!(self.fw_cfg.lock().unwrap().state().offset, 4);
    }

    /// One interrupt acknowledge cycle, checked against the state before it.
    fn acknowledge(&mut self) {
        let before = self.pic.state();
        let pending = self.pic.has_interrupt();
        let vector = self.pic.acknowledge();
        let after = self.pic.state();
        let (m, s) = (&before.master, &before.slave);
        let Some(vector) = vector else {
            assert!(!m.initialized, "no vector from an initialised PIC");
            return;
        };
        assert!(m.initialized, "a vector from an uninitialised PIC");
        let base = vector & 0xf8;
        let input = vector & 7;
        assert!(
            (base == m.vector_base && input != 2) || base == s.vector_base,
            "vector {vector:#x} is at neither base ({:#x}, {:#x})",
            m.vector_base,
            s.vector_base
        );
        // Acknowledging never takes an interrupt out of service, and puts at most one in per chip.
        for (b, a) in [(m, &after.master), (s, &after.slave)] {
            assert_eq!(b.isr & !a.isr, 0);
            assert!((a.isr & !b.isr).count_ones() <= 1);
            if b.auto_eoi {
                assert_eq!(a.isr, b.isr);
            }
        }
        let new_master = after.master.isr & !m.isr;
        if !pending {
            assert_eq!(vector, m.vector_base | 7, "spurious vector");
            assert_eq!(new_master, 0);
        } else if new_master != 0 {
            let irq = new_master.trailing_zeros() as u8;
            if irq == 2 {
                assert_eq!(base, s.vector_base, "cascade without the slave's vector");
            } else {
                assert_eq!(vector, m.vector_base | irq);
            }
        }
    }

    fn round_trip(&mut self) {
        let pic = self.pic.state();
        self.pic.set_state(&pic);
        assert_eq!(self.pic.state(), pic);

        let mut pit = self.pit.lock().unwrap();
        let saved = pit.state();
        pit.set_state(&saved).unwrap();
        assert_eq!(without_progress(pit.state()), without_progress(saved));
        drop(pit);

        let i8042 = self.i8042.lock().unwrap().state();
        let rebuilt = I8042::from_state(&i8042, Arc::new(NoopPlatformEvents));
        assert_eq!(rebuilt.state(), i8042);

        let port92 = self.port92.lock().unwrap().state();
        assert_eq!(
            Port92::from_state(&port92, Arc::new(NoopPlatformEvents)).state(),
            port92
        );

        let mut fw = self.fw_cfg.lock().unwrap();
        let state = fw.state();
        fw.set_state(&state);
        assert_eq!(fw.state(), state);
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Access {
                device,
                offset,
                size,
                value,
                write,
            } => self.access(device, u64::from(offset), size, value, write),
            Op::FarAccess {
                device,
                offset,
                size,
                value,
                write,
            } => self.access(device, offset, size, value, write),
            Op::Port {
                base,
                delta,
                size,
                value,
                write,
            } => {
                // From two ports below the range to a few past its end.
                let port = base
                    .port()
                    .wrapping_add(u16::from(delta % 16))
                    .wrapping_sub(2);
                self.port(port, size, value, write);
            }
            Op::FwCfgRead { key, len } => {
                self.fw_cfg_read(key, usize::from(len));
            }
            Op::FwCfgDirectory => self.fw_cfg_directory(),
            Op::Dma {
                descriptor,
                control,
                length,
                address,
                kick,
            } => self.dma(
                descriptor.resolve(),
                control,
                length,
                address.resolve(),
                kick,
            ),
            Op::DmaSignature { descriptor, buffer } => self.dma_signature(descriptor, buffer),
            Op::PicInit {
                master_base,
                slave_base,
                icw4,
                master_mask,
                slave_mask,
            } => {
                for (port, value) in [
                    (0x20, 0x11),
                    (0x21, master_base),
                    (0x21, 0x04),
                    (0x21, icw4),
                    (0xa0, 0x11),
                    (0xa1, slave_base),
                    (0xa1, 0x02),
                    (0xa1, icw4),
                    (0x21, master_mask),
                    (0xa1, slave_mask),
                ] {
                    assert!(self.bus.write(port, &[value]));
                }
            }
            Op::PicEoi { slave } => {
                assert!(self.bus.write(if slave { 0xa0 } else { 0x20 }, &[0x20]));
            }
            Op::PitProgram {
                channel,
                mode,
                count,
            } => {
                let [low, high] = count.to_le_bytes();
                let control = (channel % 3) << 6 | 0x30 | (mode & 7) << 1;
                for (port, value) in [
                    (0x43, control),
                    (0x40 + u64::from(channel % 3), low),
                    (0x40 + u64::from(channel % 3), high),
                ] {
                    assert!(self.bus.write(port, &[value]));
                }
            }
            // IRQ 1 belongs to the i8042 (its level is checked after every step).
            Op::SetIrq { irq, .. } | Op::Line { irq, .. } if irq % 20 == 1 => {}
            Op::SetIrq { irq, level } => self.pic.set_irq(irq % 20, level),
            Op::Line { irq, level } => {
                let irq = irq % 20;
                let line = pic_irq_line(&self.pic, irq);
                let result = match level {
                    None => line.trigger(),
                    Some(level) => line.set_level(level),
                };
                assert_eq!(result.is_err(), irq == 2 || irq >= PIC_NUM_IRQS);
            }
            Op::Acknowledge => self.acknowledge(),
            // Non-blocking: an early call finds the timerfd empty and returns.
            Op::Timer => self.pit.lock().unwrap().handle_timer(),
            Op::RoundTrip => self.round_trip(),
        }
    }

    fn check(&mut self) {
        // fw_cfg: the selector never keeps the write bit and the offset stays inside the item; the signature and the
        // DMA signature read right (the register state is put back afterwards).
        {
            let mut fw = self.fw_cfg.lock().unwrap();
            let state = fw.state();
            assert_eq!(state.selector & SELECTOR_WRITE, 0);
            let len = fw.item(state.selector).map_or(0, <[u8]>::len);
            assert!(state.offset as usize <= len, "offset past the item end");
            fw.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
            let mut signature = [0u8; 4];
            for b in &mut signature {
                let mut one = [0u8];
                fw.read(FW_CFG_DATA, &mut one);
                *b = one[0];
            }
            assert_eq!(&signature, b"QEMU");
            let mut dma = [0u8; 8];
            fw.read(FW_CFG_DMA_HIGH, &mut dma);
            assert_eq!(&dma, b"QEMU CFG");
            fw.set_state(&state);
            assert_eq!(fw.state(), state);
        }

        // PIC.
        let pic = self.pic.state();
        for (chip, read_only) in [(&pic.master, 0x07), (&pic.slave, 0x21)] {
            assert_eq!(chip.elcr & read_only, 0, "read-only ELCR bits set");
            assert_eq!(chip.vector_base & 7, 0);
            assert_eq!(
                chip.irr & chip.elcr,
                chip.lines & chip.elcr,
                "a level input's request does not follow its line"
            );
        }
        assert_eq!(pic.master.irr & 4, pic.master.lines & 4, "cascade input");
        if !pic.master.initialized {
            assert!(!self.pic.has_interrupt());
        }
        let mut elcr = [0u8; 2];
        self.pic_ports.elcr.lock().unwrap().read(0, &mut elcr);
        assert_eq!(elcr, [pic.master.elcr, pic.slave.elcr]);

        // i8042, and its IRQ 1 on the PIC.
        let kbd = self.i8042.lock().unwrap().state();
        assert!(kbd.output_queue.len() <= OUTPUT_QUEUE_LEN);
        assert!(kbd.output_queue.is_empty() || kbd.status & I8042_OUTPUT_FULL != 0);
        assert_eq!(
            kbd.status & I8042_SYSTEM_FLAG,
            kbd.command_byte & I8042_SYSTEM_FLAG
        );
        assert!(matches!(kbd.pending_command, None | Some(0x60 | 0xd1)));
        assert!(matches!(
            kbd.keyboard_command,
            None | Some(0xed | 0xf0 | 0xf3)
        ));
        assert_eq!(kbd.output_port & 1, 1, "reset line left low");
        let irq1 =
            kbd.status & I8042_OUTPUT_FULL != 0 && kbd.command_byte & I8042_KBD_INTERRUPT != 0;
        assert_eq!(pic.master.lines & 2 != 0, irq1, "IRQ 1 level");

        // PIT and port B.
        let pit = self.pit.lock().unwrap().state();
        assert_eq!(pit.port_b & 0xf0, 0);
        for (i, channel) in pit.channels.iter().enumerate() {
            assert!(channel.mode <= 5, "mode {}", channel.mode);
            let gate = i != 2 || pit.port_b & 1 != 0;
            assert_eq!(channel.gate, gate, "channel {i} gate");
            if let Some(status) = channel.latched_status {
                assert_eq!((status >> 1) & 7, channel.mode);
                assert_eq!((status >> 4) & 3, channel.access as u8);
                assert_eq!(status & 1 != 0, channel.bcd);
            }
        }
        let mut port_b = [0u8];
        self.pit_ports.port_b.lock().unwrap().read(0, &mut port_b);
        assert_eq!(port_b[0] & 0xcf, pit.port_b, "port B");

        // Port 0x92.
        let port92 = self.port92.lock().unwrap().state();
        assert_eq!(port92.value & 1, 0, "fast reset bit reads back");
        assert_eq!(self.port92_resets.count(), self.expected_resets);
    }
}

/// A PIT state without the ticks counted, which move on by themselves.
fn without_progress(mut state: PitState) -> PitState {
    for channel in &mut state.channels {
        channel.elapsed = 0;
    }
    state
}

/// Checks what a direct read returned where the answer does not depend on the device's state.
fn check_read(device: Device, offset: u64, data: &[u8]) {
    match device {
        Device::DebugConsole => assert!(data.iter().all(|&b| b == DEBUG_CONSOLE_READBACK)),
        Device::FwCfg => {
            if (4..12).contains(&offset) {
                for (i, &b) in data.iter().enumerate() {
                    let at = (offset - 4) as usize + i;
                    assert_eq!(b, b"QEMU CFG".get(at).copied().unwrap_or(0));
                }
            } else if (offset, data.len()) != (FW_CFG_DATA, 1) {
                assert!(
                    data.iter().all(|&b| b == 0),
                    "fw_cfg {offset:#x} read {data:?}"
                );
            }
        }
        // Single-byte registers: anything wider, or outside the range, reads as zero.
        Device::PicMaster | Device::PicSlave => {
            if data.len() != 1 || offset > 1 {
                assert!(data.iter().all(|&b| b == 0));
            }
        }
        // The control word (offset 3) cannot be read.
        Device::PitCounters => {
            if data.len() != 1 || offset > 2 {
                assert!(data.iter().all(|&b| b == 0));
            }
        }
        Device::PortB | Device::Port92 | Device::KbdData | Device::KbdCommand => {
            if data.len() != 1 || offset != 0 {
                assert!(data.iter().all(|&b| b == 0));
            }
        }
        Device::I8042 => {
            if data.len() != 1 || !(offset == 0 || offset == 4) {
                assert!(data.iter().all(|&b| b == 0));
            }
        }
        Device::Elcr => {
            for (i, &b) in data.iter().enumerate() {
                if offset.saturating_add(i as u64) > 1 {
                    assert_eq!(b, 0, "ELCR byte past the range");
                }
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut platform = Platform::new();
    for op in &ops {
        platform.step(op);
        platform.check();
    }
});
