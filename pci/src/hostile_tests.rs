//! Guest-hostile input: random offsets, sizes and values against every guest-reachable entry point. Nothing may panic
//! and the read-only identity of every function must survive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::BusDevice;

use crate::*;

/// xorshift64: small, deterministic, no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// An offset that is usually near interesting places but sometimes anywhere.
    fn offset(&mut self, span: u64) -> u64 {
        match self.next() % 8 {
            0 => self.next(),
            1 => u64::MAX - self.next() % 16,
            _ => self.next() % span,
        }
    }

    /// A size from the valid ones and the hostile ones (0, 3, 5..8, 16).
    fn len(&mut self) -> usize {
        [0, 1, 2, 3, 4, 4, 4, 5, 8, 8, 16][(self.next() % 11) as usize]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let fill = self.next();
        (0..len)
            .map(|i| match fill % 3 {
                0 => 0xff,
                1 => 0,
                _ => (fill >> (i % 8 * 8)) as u8,
            })
            .collect()
    }
}

/// Counts deliveries.
#[derive(Default)]
struct CountingDelivery(AtomicUsize);

impl MsiDelivery for CountingDelivery {
    fn deliver(&self, _vector: u16, _address: u64, _data: u32) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn update_route(
        &self,
        _vector: u16,
        _address: u64,
        _data: u32,
        _masked: bool,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Accepts every move except ones into the first page, to exercise both paths, and counts them.
#[derive(Default)]
struct PickyMover {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl BarMover for PickyMover {
    fn move_bar(
        &self,
        _old: u64,
        new_base: u64,
        _len: u64,
        _region: PciBarRegionType,
    ) -> Result<(), String> {
        if new_base < 0x1000 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err("refusing to map over the first page".to_string())
        } else {
            self.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

const TABLE_OFFSET: u64 = 0;
const PBA_OFFSET: u64 = 0x800;

/// An MSI-X device the way issue 3's devices will be built: table and PBA in BAR 0, message control forwarded.
struct MsixDevice {
    config: PciConfiguration,
    msix: MsixConfig,
    msix_cap_reg: usize,
}

impl MsixDevice {
    fn new(delivery: Arc<CountingDelivery>) -> Self {
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
        let cap = MsixCapability::new(70, 0, TABLE_OFFSET as u32, 0, PBA_OFFSET as u32).unwrap();
        let offset = config.add_capability(&cap).unwrap();
        Self {
            config,
            msix: MsixConfig::new(70, delivery).unwrap(),
            msix_cap_reg: offset / 4,
        }
    }
}

impl PciDevice for MsixDevice {
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
            (0, _) => self.msix.read_table(offset - TABLE_OFFSET, data),
            _ => data.fill(0xff),
        }
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (0, PBA_OFFSET..) => self.msix.write_pba(offset - PBA_OFFSET, data),
            (0, _) => self.msix.write_table(offset - TABLE_OFFSET, data),
            _ => {}
        }
    }
}

fn check_identity(device: &MsixDevice) {
    let config = device.config();
    assert_eq!(config.read_reg(VENDOR_DEVICE_REG), 0x1050_1af4);
    assert_eq!(config.read_reg(CLASS_REG), 0xff00_0001);
    assert_eq!(config.header_type(), 0);
    assert_eq!(config.interrupt_pin(), 1);
    assert_eq!(
        config.capabilities(),
        vec![(PciCapabilityId::MSIX, FIRST_CAPABILITY_OFFSET)]
    );
    assert_eq!(
        config.read_reg(device.msix_cap_reg) & 0x3fff_ffff,
        0x0045_0011
    );
    let bars = config.bar_regions();
    assert_eq!(bars.len(), 3);
    for bar in bars {
        assert_eq!(bar.base % bar.len, 0, "{bar:?}");
        if bar.region_type == PciBarRegionType::IoRegion {
            assert!(bar.base + bar.len <= IO_SPACE_END, "{bar:?}");
        }
        if bar.region_type == PciBarRegionType::Memory32BitRegion {
            assert!(bar.base + bar.len <= 1 << 32, "{bar:?}");
        }
    }
    for vector in 0..70 {
        let entry = device.msix.entry(vector).unwrap();
        assert_eq!(entry.vector_ctl & !1, 0);
        assert_eq!(entry.msg_addr_lo & 3, 0);
    }
}

#[test]
fn configuration_space_survives_random_accesses() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut device = MsixDevice::new(Arc::default());
    for _ in 0..50_000 {
        let reg = match rng.next() % 4 {
            0 => rng.next() as usize,
            1 => (rng.next() % 16) as usize,
            _ => (rng.next() % NUM_CONFIGURATION_REGISTERS as u64 + 8) as usize,
        };
        let offset = rng.offset(8);
        let len = rng.len();
        let data = rng.bytes(len);
        let _ = device.write_config_register(reg, offset, &data);
        let _ = device.read_config_register(reg);
        let _ = device.config().byte(rng.next() as usize);
        let _ = device.config().bar_region(rng.next() as usize);
    }
    check_identity(&device);
}

#[test]
fn msix_table_and_pba_survive_random_accesses() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let delivery = Arc::new(CountingDelivery::default());
    let mut device = MsixDevice::new(delivery.clone());
    let mut pending = 0;
    for i in 0..50_000u32 {
        let bar = if rng.next().is_multiple_of(8) {
            rng.next() as usize
        } else {
            0
        };
        let offset = rng.offset(0x1000);
        let len = rng.len();
        let data = rng.bytes(len);
        device.write_bar(bar, offset, &data);
        let mut out = vec![0; len];
        device.read_bar(bar, offset, &mut out);
        if i % 64 == 0 {
            let control = (rng.next() as u16) & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
            device.msix.set_message_control(control);
        }
        if let Ok(MsixTrigger::Pending) = device.msix.trigger(rng.next() as u16 % 80) {
            pending += 1;
        }
    }
    check_identity(&device);
    // The run reached both the delivery and the pending paths.
    assert!(delivery.0.load(Ordering::Relaxed) > 0);
    assert!(pending > 0);
}

#[test]
fn access_mechanisms_survive_random_accesses() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let bus = Arc::new(Mutex::new(PciBus::new()));
    let device = Arc::new(Mutex::new(MsixDevice::new(Arc::default())));
    let handle: PciDeviceHandle = device.clone();
    bus.lock()
        .unwrap()
        .add_device(None, handle.clone())
        .unwrap();
    let mover = Arc::new(PickyMover::default());
    let mut io = PciConfigIo::new(bus.clone(), mover.clone());
    let mut ecam = PciConfigMmio::new(bus.clone(), mover.clone(), 0);
    let mut bar = PciBarBusDevice::new(handle, 0);
    for _ in 0..50_000 {
        let len = rng.len();
        let data = rng.bytes(len);
        let mut out = vec![0; len];
        match rng.next() % 5 {
            0 => {
                // Aim CONFIG_ADDRESS at slot 0 or 1, mostly at the header, sometimes anywhere.
                let address = match rng.next() % 4 {
                    0 => rng.next() as u32,
                    1 => 0x8000_0000 | ((rng.next() as u32 % 2) << 11) | (rng.next() as u32 % 256),
                    _ => 0x8000_0800 | (rng.next() as u32 % 0x40),
                };
                io.write(0, &address.to_le_bytes());
            }
            1 => {
                let offset = rng.offset(PCI_CONFIG_IO_PORT_SIZE + 2);
                io.write(offset, &data);
                io.read(offset, &mut out);
            }
            2 | 3 => {
                let offset = match rng.next() % 3 {
                    0 => (1 << 15) | (rng.next() % 0x40),
                    1 => ((rng.next() % 2) << 15) | (rng.next() % 0x1000),
                    _ => rng.offset(2 * ECAM_BUS_SIZE),
                };
                ecam.write(offset, &data);
                ecam.read(offset, &mut out);
            }
            _ => {
                let offset = rng.offset(0x1000);
                bar.write(offset, &data);
                bar.read(offset, &mut out);
            }
        }
    }
    check_identity(&device.lock().unwrap());
    // The run moved BARs, and had moves refused.
    assert!(mover.accepted.load(Ordering::Relaxed) > 0);
    assert!(mover.refused.load(Ordering::Relaxed) > 0);
    // The host bridge kept its identity too.
    let mut vendor = [0; 4];
    ecam.read(0, &mut vendor);
    assert_eq!(u32::from_le_bytes(vendor), 0x0d57_8086);
}
