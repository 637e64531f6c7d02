//! PCI configuration space through both access mechanisms (ports 0xCF8..0xCFF and ECAM) and BAR accesses, over a bus
//! holding the host bridge and an endpoint with three BARs and MSI-X.
//!
//! After every access: the host bridge and the endpoint keep their identity, the endpoint's BARs stay naturally
//! aligned inside their address space, and the VMM's view of where each BAR is mapped (kept by the mover) matches the
//! configuration space's.

#![no_main]

use std::sync::{Arc, Mutex};

use atrium_fuzz::{value_bytes, AccessSize, NoopMsiDelivery};
use devices::BusDevice;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pci::{
    BarMover, BarReprogramming, MsixCapability, MsixConfig, PciAddress, PciBarBusDevice,
    PciBarConfiguration, PciBarRegionType, PciBus, PciCapabilityId, PciClassCode, PciConfigIo,
    PciConfigMmio, PciConfiguration, PciDevice, PciDeviceHandle, PciHeader, PciInterruptPin,
    CLASS_REG, FIRST_CAPABILITY_OFFSET, IO_SPACE_END, VENDOR_DEVICE_REG,
};

/// Slot of the endpoint.
const ENDPOINT_SLOT: u8 = 3;
/// MSI-X vectors of the endpoint (more than 64, so the PBA has two words).
const VECTORS: u16 = 70;
/// Where the MSI-X PBA starts in BAR 0 (the table is at 0).
const PBA_OFFSET: u64 = 0x800;
/// Moves into the first page are refused, as a VMM refuses a range it cannot map.
const REFUSED_BELOW: u64 = 0x1000;

/// Where an access goes.
#[derive(Arbitrary, Debug)]
enum Target {
    /// Mechanism #1 at port offset `port` from 0xCF8 (0..8 is the device's range; the rest tests bounds).
    Io { port: u8 },
    /// Mechanism #1, after first programming CONFIG_ADDRESS for this function and register.
    IoFunction {
        enable: bool,
        bus: u8,
        device: u8,
        function: u8,
        register: u8,
        byte: u8,
    },
    /// ECAM at a raw window offset (the window is 256 MiB; beyond it tests bounds).
    Ecam { offset: u32 },
    /// ECAM at bus 0, this device and function, and this register byte.
    EcamFunction {
        device: u8,
        function: u8,
        register: u16,
    },
    /// BAR `bar` of the endpoint at `offset` (the bus adapter passes any offset through).
    Bar { bar: u8, offset: u16 },
}

#[derive(Arbitrary, Debug)]
struct Access {
    target: Target,
    size: AccessSize,
    value: u64,
    write: bool,
}

/// The VMM's MMIO and port buses as far as BARs go: where each BAR is mapped.
struct BusModel {
    /// (base, length, is memory) of every mapped BAR.
    regions: Mutex<Vec<(u64, u64, bool)>>,
}

impl BarMover for BusModel {
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        len: u64,
        region: PciBarRegionType,
    ) -> Result<(), String> {
        let mut regions = self.regions.lock().unwrap();
        let memory = region.is_memory();
        let index = regions
            .iter()
            .position(|&(base, size, kind)| base == old_base && size == len && kind == memory)
            .unwrap_or_else(|| {
                panic!("asked to move a BAR from {old_base:#x}+{len:#x}, which is not mapped there")
            });
        let end = new_base
            .checked_add(len)
            .unwrap_or_else(|| panic!("BAR moved to {new_base:#x}+{len:#x} wraps around"));
        let overlaps = regions.iter().enumerate().any(|(i, &(base, size, kind))| {
            i != index && kind == memory && new_base < base + size && base < end
        });
        if new_base < REFUSED_BELOW || overlaps {
            return Err("the range is not available".into());
        }
        regions[index].0 = new_base;
        Ok(())
    }
}

/// An endpoint with a 64-bit BAR 0 holding the MSI-X table and PBA, an I/O BAR 2 and a prefetchable 32-bit BAR 3.
struct Endpoint {
    config: PciConfiguration,
    msix: MsixConfig,
    msix_cap_reg: usize,
}

impl Endpoint {
    fn new() -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1050,
            revision_id: 1,
            class_code: PciClassCode::OTHER,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            multi_function: false,
            interrupt_pin: Some(PciInterruptPin::IntA),
        })
        .unwrap();
        config
            .add_pci_bar(&PciBarConfiguration::memory64(0, 0x1_0000_0000, 0x1000))
            .unwrap();
        config
            .add_pci_bar(&PciBarConfiguration::io(2, 0xc000, 0x20))
            .unwrap();
        config
            .add_pci_bar(&PciBarConfiguration::memory32(3, 0xc000_0000, 0x10_0000).prefetchable())
            .unwrap();
        let cap = MsixCapability::new(VECTORS, 0, 0, 0, PBA_OFFSET as u32).unwrap();
        let msix_cap_reg = config.add_capability(&cap).unwrap() / 4;
        Self {
            config,
            msix: MsixConfig::new(VECTORS, Arc::new(NoopMsiDelivery)).unwrap(),
            msix_cap_reg,
        }
    }
}

impl PciDevice for Endpoint {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogramming> {
        let moved = self.config.write_config_register(reg, offset, data);
        if reg == self.msix_cap_reg {
            self.msix
                .set_message_control((self.config.read_reg(reg) >> 16) as u16);
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset) {
            (0, PBA_OFFSET..) => self.msix.read_pba(offset - PBA_OFFSET, data),
            (0, _) => self.msix.read_table(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (0, PBA_OFFSET..) => self.msix.write_pba(offset - PBA_OFFSET, data),
            (0, _) => self.msix.write_table(offset, data),
            _ => {}
        }
    }
}

struct Platform {
    bus: Arc<Mutex<PciBus>>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    endpoint: PciDeviceHandle,
    model: Arc<BusModel>,
}

impl Platform {
    fn new() -> Self {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let endpoint: PciDeviceHandle = Arc::new(Mutex::new(Endpoint::new()));
        let regions = endpoint
            .lock()
            .unwrap()
            .bars()
            .iter()
            .map(|bar| (bar.base, bar.len, bar.region_type.is_memory()))
            .collect();
        let model = Arc::new(BusModel {
            regions: Mutex::new(regions),
        });
        bus.lock()
            .unwrap()
            .add_device(Some(ENDPOINT_SLOT), endpoint.clone())
            .unwrap();
        Self {
            io: PciConfigIo::new(bus.clone(), model.clone()),
            ecam: PciConfigMmio::new(bus.clone(), model.clone(), 255),
            bus,
            endpoint,
            model,
        }
    }

    fn access(&mut self, access: &Access) {
        let mut data = value_bytes(access.value, access.size.len());
        let (device, offset): (&mut dyn BusDevice, u64) = match access.target {
            Target::Io { port } => (&mut self.io, u64::from(port)),
            Target::IoFunction {
                enable,
                bus,
                device,
                function,
                register,
                byte,
            } => {
                let address = u32::from(enable) << 31
                    | u32::from(bus) << 16
                    | u32::from(device % 32) << 11
                    | u32::from(function % 8) << 8
                    | u32::from(register);
                self.io.write(0, &address.to_le_bytes());
                (&mut self.io, 4 + u64::from(byte % 4))
            }
            Target::Ecam { offset } => (&mut self.ecam, u64::from(offset)),
            Target::EcamFunction {
                device,
                function,
                register,
            } => {
                let offset = u64::from(device % 32) << 15
                    | u64::from(function % 8) << 12
                    | u64::from(register % 4096);
                (&mut self.ecam, offset)
            }
            Target::Bar { bar, offset } => {
                let mut adapter = PciBarBusDevice::new(self.endpoint.clone(), usize::from(bar % 8));
                if access.write {
                    adapter.write(u64::from(offset), &data);
                } else {
                    adapter.read(u64::from(offset), &mut data);
                }
                return;
            }
        };
        if access.write {
            device.write(offset, &data);
        } else {
            device.read(offset, &mut data);
        }
    }

    /// Reads a dword of `slot`'s configuration space through ECAM.
    fn ecam_dword(&mut self, slot: u8, reg: usize) -> u32 {
        let mut data = [0u8; 4];
        self.ecam
            .read(u64::from(slot) << 15 | (reg as u64 * 4), &mut data);
        u32::from_le_bytes(data)
    }

    fn check(&mut self) {
        // The host bridge: 8086:0d57, class 06/00, type-0 header, no BARs, no capabilities.
        assert_eq!(self.ecam_dword(0, VENDOR_DEVICE_REG), 0x0d57_8086);
        assert_eq!(self.ecam_dword(0, CLASS_REG), 0x0600_0000);
        assert_eq!(self.ecam_dword(0, 3) >> 16 & 0xff, 0);
        for reg in 4..10 {
            assert_eq!(self.ecam_dword(0, reg), 0, "host bridge BAR register {reg}");
        }
        assert_eq!(self.ecam_dword(0, 13), 0);
        // Empty slots and other functions read all-ones.
        assert_eq!(self.ecam_dword(1, VENDOR_DEVICE_REG), u32::MAX);
        let bus = self.bus.lock().unwrap();
        assert!(bus
            .function(PciAddress::new(0, ENDPOINT_SLOT, 1).unwrap())
            .is_none());
        drop(bus);

        let endpoint = self.endpoint.lock().unwrap();
        let config = endpoint.config();
        assert_eq!(config.read_reg(VENDOR_DEVICE_REG), 0x1050_1af4);
        assert_eq!(config.read_reg(CLASS_REG), 0xff00_0001);
        assert_eq!(config.header_type(), 0);
        assert_eq!(config.interrupt_pin(), 1);
        assert_eq!(
            config.capabilities(),
            vec![(PciCapabilityId::MSIX, FIRST_CAPABILITY_OFFSET)]
        );
        let bars = config.bar_regions();
        assert_eq!(bars.len(), 3);
        let regions = self.model.regions.lock().unwrap();
        for bar in bars {
            assert_eq!(bar.base % bar.len, 0, "{bar:?}");
            match bar.region_type {
                PciBarRegionType::IoRegion => assert!(bar.base + bar.len <= IO_SPACE_END),
                PciBarRegionType::Memory32BitRegion => assert!(bar.base + bar.len <= 1 << 32),
                PciBarRegionType::Memory64BitRegion => {}
            }
            assert!(
                regions.contains(&(bar.base, bar.len, bar.region_type.is_memory())),
                "BAR {bar:?} is not where the VMM mapped it: {regions:?}"
            );
        }
    }
}

fuzz_target!(|accesses: Vec<Access>| {
    let mut platform = Platform::new();
    for access in &accesses {
        platform.access(access);
        platform.check();
    }
});
