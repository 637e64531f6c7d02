//! `virtio_devices::VirtioPciDevice` with a virtio-rng device behind it, driven through BAR 0 (common configuration,
//! ISR, device configuration, doorbells, MSI-X), the other BARs and the PCI configuration space (including the
//! PCI-configuration-access capability), over 1 MiB of guest memory.
//!
//! Queue addresses may point anywhere. A `DriverInit` step runs the whole driver handshake with fuzzed values so the
//! fuzzer reaches DRIVER_OK quickly; `Post` then puts descriptor chains in front of the device's worker thread and
//! rings the doorbell (the worker serves them asynchronously, as it does for a real guest).
//!
//! After every step: the function keeps its identity, the status byte only holds bits the driver can set (plus
//! DEVICE_NEEDS_RESET), follows the handshake order, and the device only runs with DRIVER_OK set.

#![no_main]

use std::sync::Arc;

use atrium_fuzz::{value_bytes, AccessSize, NoopLine, NoopMsiDelivery};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pci::{PciDevice, VENDOR_DEVICE_REG};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_devices::{
    GuestMemoryMmap, Rng, RngSource, VirtioPciDevice, COMMON_CONFIG_OFFSET, COMMON_FEATURES,
    NOTIFY_OFFSET, VIRTIO_PCI_BAR_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

/// Guest RAM: 1 MiB at 0.
const MEM_SIZE: u64 = 0x10_0000;
/// Where BAR 0 starts.
const BAR_BASE: u64 = 0x1_0000_0000;

// Common configuration registers (virtio 1.2 §4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const FAILED: u8 = 0x80;

/// A guest address for a ring or buffer.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum GuestAddr {
    /// A page of guest RAM (aligned for every ring).
    Page(u8),
    /// Inside guest RAM (any alignment).
    Ram(u32),
    /// Anywhere.
    Raw(u64),
}

impl GuestAddr {
    fn resolve(self) -> u64 {
        match self {
            Self::Page(page) => u64::from(page) * 0x1000 % MEM_SIZE,
            Self::Ram(offset) => u64::from(offset) % MEM_SIZE,
            Self::Raw(addr) => addr,
        }
    }
}

/// The features a driver accepts.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Features {
    /// VIRTIO_F_VERSION_1 and a subset of what the device offers, as a correct driver does.
    Offered(u64),
    /// Anything.
    Raw(u64),
}

impl Features {
    fn resolve(self) -> u64 {
        match self {
            Self::Offered(bits) => bits & COMMON_FEATURES | 1 << VIRTIO_F_VERSION_1,
            Self::Raw(bits) => bits,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: GuestAddr,
    len: u32,
    flags: u16,
    next: u16,
}

/// What a driver programs during its handshake.
#[derive(Arbitrary, Debug)]
struct Handshake {
    features: Features,
    msix_enable: bool,
    config_vector: u16,
    queue_vector: u16,
    /// The queue size to write; the device's maximum stays when absent.
    queue_size: Option<u16>,
    desc: GuestAddr,
    driver: GuestAddr,
    device: GuestAddr,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// An access anywhere in (and past) BAR 0.
    Bar0 {
        offset: u16,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// An access to the common configuration structure.
    Common {
        offset: u8,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// An access to a BAR the function does not have, or past BAR 0 at a raw offset.
    OtherBar {
        bar: u8,
        offset: u64,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// A configuration-space access (register index past the 4 KiB space too).
    Config {
        reg: u16,
        byte: u8,
        size: AccessSize,
        value: u32,
        write: bool,
    },
    /// A doorbell write for `queue` (only queue 0 exists).
    Doorbell { queue: u16, size: AccessSize },
    /// The full driver handshake: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue 0 setup, DRIVER_OK.
    DriverInit(Handshake),
    /// Writes descriptors and available-ring entries where the last `DriverInit` put the rings, then rings queue
    /// 0's doorbell.
    Post {
        descs: Vec<Desc>,
        heads: Vec<u8>,
        /// The new available index; the number of heads when absent.
        avail_idx: Option<u16>,
    },
    /// Writes bytes into guest memory.
    Memory { addr: u32, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    intx: bool,
    ops: Vec<Op>,
}

struct Driver {
    device: VirtioPciDevice,
    mem: GuestMemoryMmap,
    /// Descriptor table and available ring of the last `DriverInit`.
    rings: Option<(u64, u64)>,
}

impl Driver {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = vec![0u8; len];
        self.device.read_bar(0, offset, &mut data);
        atrium_fuzz::bytes_value(&data)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.device.write_bar(0, offset, &value_bytes(value, len));
    }

    fn write_config(&mut self, offset: u64, len: usize, value: u64) {
        self.write(COMMON_CONFIG_OFFSET + offset, len, value);
    }

    fn access(&mut self, offset: u64, size: AccessSize, value: u64, write: bool) {
        if write {
            self.write(offset, size.len(), value);
        } else {
            self.read(offset, size.len());
        }
    }

    fn driver_init(&mut self, handshake: &Handshake) {
        let features = handshake.features.resolve();
        let (desc, driver) = (handshake.desc.resolve(), handshake.driver.resolve());
        self.write_config(DEVICE_STATUS, 1, 0);
        self.write_config(DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE));
        self.write_config(DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
        for half in 0..2 {
            self.write_config(DEVICE_FEATURE_SELECT, 4, half);
            self.read(COMMON_CONFIG_OFFSET + DEVICE_FEATURE, 4);
        }
        for half in 0..2 {
            self.write_config(DRIVER_FEATURE_SELECT, 4, half);
            self.write_config(DRIVER_FEATURE, 4, features >> (32 * half));
        }
        self.write_config(
            DEVICE_STATUS,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        );
        if handshake.msix_enable {
            // Message control is the upper half of the MSI-X capability's first dword.
            let cap = self
                .device
                .config()
                .find_capability(pci::PciCapabilityId::MSIX)
                .unwrap();
            self.device
                .write_config_register(cap / 4, 2, &pci::MSIX_ENABLE.to_le_bytes());
        }
        self.write_config(MSIX_CONFIG, 2, u64::from(handshake.config_vector));
        self.write_config(QUEUE_SELECT, 2, 0);
        if let Some(size) = handshake.queue_size {
            self.write_config(QUEUE_SIZE, 2, u64::from(size));
        }
        self.write_config(QUEUE_MSIX_VECTOR, 2, u64::from(handshake.queue_vector));
        self.write_config(QUEUE_DESC, 8, desc);
        self.write_config(QUEUE_DRIVER, 8, driver);
        self.write_config(QUEUE_DEVICE, 8, handshake.device.resolve());
        self.write_config(QUEUE_ENABLE, 2, 1);
        self.write_config(
            DEVICE_STATUS,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
        );
        self.rings = Some((desc, driver));
    }

    fn post(&mut self, descs: &[Desc], heads: &[u8], avail_idx: Option<u16>) {
        let Some((table, avail)) = self.rings else {
            return;
        };
        // Writes outside guest memory fail, as the driver's own would; that is the point of some inputs.
        for (i, desc) in descs.iter().enumerate() {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&desc.addr.resolve().to_le_bytes());
            bytes[8..12].copy_from_slice(&desc.len.to_le_bytes());
            bytes[12..14].copy_from_slice(&desc.flags.to_le_bytes());
            bytes[14..16].copy_from_slice(&desc.next.to_le_bytes());
            let _ = self
                .mem
                .write_slice(&bytes, GuestAddress(table.wrapping_add(16 * i as u64)));
        }
        for (i, head) in heads.iter().enumerate() {
            let _ = self.mem.write_obj(
                u16::from(*head),
                GuestAddress(avail.wrapping_add(4 + 2 * i as u64)),
            );
        }
        let avail_idx = avail_idx.unwrap_or(heads.len() as u16);
        let _ = self
            .mem
            .write_obj(avail_idx, GuestAddress(avail.wrapping_add(2)));
        self.write(NOTIFY_OFFSET, 4, 0);
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Bar0 {
                offset,
                size,
                value,
                write,
            } => self.access(u64::from(offset), size, value, write),
            Op::Common {
                offset,
                size,
                value,
                write,
            } => self.access(
                COMMON_CONFIG_OFFSET + u64::from(offset % 0x40),
                size,
                value,
                write,
            ),
            Op::OtherBar {
                bar,
                offset,
                size,
                value,
                write,
            } => {
                let mut data = value_bytes(value, size.len());
                if write {
                    self.device.write_bar(usize::from(bar % 8), offset, &data);
                } else {
                    self.device
                        .read_bar(usize::from(bar % 8), offset, &mut data);
                }
            }
            Op::Config {
                reg,
                byte,
                size,
                value,
                write,
            } => {
                let reg = usize::from(reg % 1100);
                if write {
                    let data = value_bytes(u64::from(value), size.len());
                    self.device
                        .write_config_register(reg, u64::from(byte % 5), &data);
                } else {
                    self.device.read_config_register(reg);
                }
            }
            Op::Doorbell { queue, size } => {
                self.write(NOTIFY_OFFSET + 4 * u64::from(queue), size.len(), 1);
            }
            Op::DriverInit(ref handshake) => self.driver_init(handshake),
            Op::Post {
                ref descs,
                ref heads,
                avail_idx,
            } => self.post(descs, heads, avail_idx),
            Op::Memory { addr, ref bytes } => {
                let _ = self
                    .mem
                    .write_slice(bytes, GuestAddress(u64::from(addr) % MEM_SIZE));
            }
        }
    }

    fn check(&mut self) {
        assert_eq!(
            self.device.config().read_reg(VENDOR_DEVICE_REG),
            0x1044_1af4
        );
        let status = self.device.device_status();
        assert_eq!(
            self.read(COMMON_CONFIG_OFFSET + DEVICE_STATUS, 1),
            u64::from(status)
        );
        assert_eq!(
            status & !(ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED),
            0,
            "status {status:#x}"
        );
        for (bit, needed) in [
            (DRIVER, ACKNOWLEDGE),
            (FEATURES_OK, DRIVER),
            (DRIVER_OK, FEATURES_OK),
        ] {
            assert!(
                status & bit == 0 || status & needed != 0,
                "status {status:#x}"
            );
        }
        assert!(
            !self.device.is_active() || status & DRIVER_OK != 0,
            "running without DRIVER_OK: status {status:#x}"
        );
        assert_eq!(self.read(COMMON_CONFIG_OFFSET + NUM_QUEUES, 2), 1);
        // Reads past the BAR read zero or all-ones, never panic.
        self.read(VIRTIO_PCI_BAR_SIZE - 1, 4);
    }
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let rng = Rng::new(&RngSource::Getrandom).unwrap();
    let intx: Option<Arc<dyn devices::InterruptLine>> = if input.intx {
        Some(Arc::new(NoopLine))
    } else {
        None
    };
    let device = VirtioPciDevice::new(
        Box::new(rng),
        GuestMemoryAtomic::new(mem.clone()),
        BAR_BASE,
        Arc::new(NoopMsiDelivery),
        intx,
    )
    .unwrap();
    let mut driver = Driver {
        device,
        mem,
        rings: None,
    };
    for op in &input.ops {
        driver.step(op);
        driver.check();
    }
    // Dropping the device stops its worker thread.
});
