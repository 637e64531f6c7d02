use super::*;
use crate::bar::PciBarConfiguration;
use crate::configuration::{
    PciClassCode, PciConfiguration, PciHeader, BAR0_REG, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
};
use crate::device::{PciBarBusDevice, PciDevice, PciDeviceHandle};

/// A device with a 4 KiB memory BAR 0 and a 32-port I/O BAR 1, each backed by scratch bytes.
struct TestDevice {
    config: PciConfiguration,
    memory: Vec<u8>,
    ports: Vec<u8>,
}

impl TestDevice {
    fn handle() -> Arc<Mutex<TestDevice>> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x10f0,
            revision_id: 2,
            class_code: PciClassCode::OTHER,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x10f0,
            multi_function: false,
            interrupt_pin: None,
        })
        .unwrap();
        config
            .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
            .unwrap();
        config
            .add_pci_bar(&PciBarConfiguration::io(1, 0xc000, 0x20))
            .unwrap();
        Arc::new(Mutex::new(TestDevice {
            config,
            memory: vec![0; 0x1000],
            ports: vec![0; 0x20],
        }))
    }

    fn region(&mut self, bar: usize, offset: u64, len: usize) -> Option<&mut [u8]> {
        let backing = match bar {
            0 => &mut self.memory,
            1 => &mut self.ports,
            _ => return None,
        };
        let start = usize::try_from(offset).ok()?;
        backing.get_mut(start..start.checked_add(len)?)
    }
}

impl PciDevice for TestDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.region(bar, offset, data.len()) {
            Some(region) => data.copy_from_slice(region),
            None => data.fill(0xff),
        }
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(region) = self.region(bar, offset, data.len()) {
            region.copy_from_slice(data);
        }
    }
}

#[derive(Default)]
struct RecordingMover {
    moves: Mutex<Vec<(u64, u64, u64, PciBarRegionType)>>,
    fail: Mutex<bool>,
}

impl BarMover for RecordingMover {
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        len: u64,
        region: PciBarRegionType,
    ) -> Result<(), String> {
        if *self.fail.lock().unwrap() {
            return Err("range is busy".to_string());
        }
        self.moves
            .lock()
            .unwrap()
            .push((old_base, new_base, len, region));
        Ok(())
    }
}

struct Rig {
    bus: Arc<Mutex<PciBus>>,
    mover: Arc<RecordingMover>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    device: Arc<Mutex<TestDevice>>,
}

/// A bus with the test device in slot 3, and both access mechanisms on it.
fn rig() -> Rig {
    let bus = Arc::new(Mutex::new(PciBus::new()));
    let device = TestDevice::handle();
    let handle: PciDeviceHandle = device.clone();
    assert_eq!(bus.lock().unwrap().add_device(Some(3), handle), Ok(3));
    let mover = Arc::new(RecordingMover::default());
    Rig {
        io: PciConfigIo::new(bus.clone(), mover.clone()),
        ecam: PciConfigMmio::new(bus.clone(), mover.clone(), 0),
        bus,
        mover,
        device,
    }
}

fn config_address(bus: u8, device: u8, function: u8, register: u8) -> u32 {
    0x8000_0000
        | u32::from(bus) << 16
        | u32::from(device) << 11
        | u32::from(function) << 8
        | u32::from(register)
}

fn io_read(io: &mut PciConfigIo, address: u32, port_offset: u64, len: usize) -> u64 {
    io.write(0, &address.to_le_bytes());
    let mut data = vec![0; len];
    io.read(DATA_PORT_OFFSET + port_offset, &mut data);
    data.iter()
        .rev()
        .fold(0, |acc, &byte| acc << 8 | u64::from(byte))
}

fn io_write32(io: &mut PciConfigIo, address: u32, value: u32) {
    io.write(0, &address.to_le_bytes());
    io.write(DATA_PORT_OFFSET, &value.to_le_bytes());
}

fn ecam_offset(bus: u64, device: u64, function: u64, register: u64) -> u64 {
    bus << 20 | device << 15 | function << 12 | register
}

fn ecam_read32(ecam: &mut PciConfigMmio, offset: u64) -> u32 {
    let mut data = [0; 4];
    ecam.read(offset, &mut data);
    u32::from_le_bytes(data)
}

#[test]
fn mechanism1_finds_host_bridge_and_device() {
    let Rig { mut io, .. } = rig();
    assert_eq!(
        io_read(&mut io, config_address(0, 0, 0, 0), 0, 4),
        0x0d57_8086
    );
    assert_eq!(
        io_read(&mut io, config_address(0, 0, 0, 8), 0, 4),
        0x0600_0000
    );
    assert_eq!(
        io_read(&mut io, config_address(0, 3, 0, 0), 0, 4),
        0x10f0_1af4
    );
    // Byte and word reads through 0xCFC..0xCFF.
    let address = config_address(0, 3, 0, 0);
    assert_eq!(io_read(&mut io, address, 0, 2), 0x1af4);
    assert_eq!(io_read(&mut io, address, 2, 2), 0x10f0);
    assert_eq!(io_read(&mut io, address, 1, 1), 0x1a);
    assert_eq!(io_read(&mut io, address, 3, 1), 0x10);
    // Misaligned data port accesses read all-ones.
    assert_eq!(io_read(&mut io, address, 1, 2), 0xffff);
    assert_eq!(io_read(&mut io, address, 2, 4), 0xffff_ffff);
}

#[test]
fn mechanism1_absent_functions_read_all_ones() {
    let Rig { mut io, .. } = rig();
    for address in [
        config_address(0, 1, 0, 0),
        config_address(0, 3, 1, 0),
        config_address(1, 0, 0, 0),
        config_address(0, 31, 7, 0),
    ] {
        assert_eq!(io_read(&mut io, address, 0, 4), 0xffff_ffff, "{address:#x}");
        assert_eq!(io_read(&mut io, address, 0, 2), 0xffff, "{address:#x}");
    }
    // Writes to an absent function go nowhere.
    io_write32(&mut io, config_address(0, 9, 0, 4), 0x7);
}

#[test]
fn mechanism1_address_register() {
    let Rig { mut io, .. } = rig();
    // Reserved bits 30:24 and 1:0 read back as zero.
    io.write(0, &0xffff_ffffu32.to_le_bytes());
    let mut data = [0; 4];
    io.read(0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
    // The Linux probe: a byte write to 0xCFB must not disturb CONFIG_ADDRESS.
    io.write(0, &0x8000_0000u32.to_le_bytes());
    io.write(3, &[0x01]);
    io.read(0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    let mut byte = [0; 1];
    io.read(0, &mut byte);
    assert_eq!(byte, [0xff]);
    let mut word = [0; 2];
    io.read(2, &mut word);
    assert_eq!(word, [0xff; 2]);
    // Without the enable bit the data port reads all-ones and drops writes.
    assert_eq!(io_read(&mut io, 0x0000_0000, 0, 4), 0xffff_ffff);
    io.write(0, &0u32.to_le_bytes());
    io.write(DATA_PORT_OFFSET, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(
        io_read(&mut io, config_address(0, 0, 0, 0), 0, 4),
        0x0d57_8086
    );
}

#[test]
fn mechanism1_writes_reach_the_device() {
    let Rig { mut io, device, .. } = rig();
    let address = config_address(0, 3, 0, 0x3c);
    io.write(0, &address.to_le_bytes());
    io.write(DATA_PORT_OFFSET, &[0x0a]);
    assert_eq!(device.lock().unwrap().config().interrupt_line(), 0x0a);
    // A word write at 0xCFE lands in the upper half of the register.
    io.write(0, &config_address(0, 3, 0, 4).to_le_bytes());
    io.write(DATA_PORT_OFFSET + 2, &0xffffu16.to_le_bytes());
    io.write(DATA_PORT_OFFSET, &0x0007u16.to_le_bytes());
    assert_eq!(device.lock().unwrap().config().command(), 0x0007);
    assert_eq!(device.lock().unwrap().config().status(), 0);
}

#[test]
fn bar_probe_and_move_through_mechanism1() {
    let Rig {
        mut io,
        mover,
        device,
        ..
    } = rig();
    let bar0 = config_address(0, 3, 0, (BAR0_REG * 4) as u8);
    let bar1 = config_address(0, 3, 0, (BAR0_REG * 4 + 4) as u8);
    io_write32(&mut io, bar0, 0xffff_ffff);
    assert_eq!(io_read(&mut io, bar0, 0, 4), 0xffff_f000);
    io_write32(&mut io, bar1, 0xffff_ffff);
    assert_eq!(io_read(&mut io, bar1, 0, 4), 0xffff_ffe1);
    io_write32(&mut io, bar0, 0xd000_0000);
    io_write32(&mut io, bar1, 0xe000);
    assert!(mover.moves.lock().unwrap().is_empty(), "decoding is off");
    let command = config_address(0, 3, 0, 4);
    io_write32(
        &mut io,
        command,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE),
    );
    assert_eq!(
        *mover.moves.lock().unwrap(),
        vec![
            (
                0xc000_0000,
                0xd000_0000,
                0x1000,
                PciBarRegionType::Memory32BitRegion
            ),
            (0xc000, 0xe000, 0x20, PciBarRegionType::IoRegion),
        ]
    );
    let bars = device.lock().unwrap().bars();
    assert_eq!((bars[0].base, bars[1].base), (0xd000_0000, 0xe000));
}

#[test]
fn failed_move_is_reverted_and_retried() {
    let Rig {
        mut ecam,
        mover,
        device,
        ..
    } = rig();
    let command = ecam_offset(0, 3, 0, 4);
    ecam.write(command, &u32::from(COMMAND_MEMORY_SPACE).to_le_bytes());
    *mover.fail.lock().unwrap() = true;
    let bar0 = ecam_offset(0, 3, 0, (BAR0_REG * 4) as u64);
    ecam.write(bar0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(device.lock().unwrap().bars()[0].base, 0xc000_0000);
    // The guest still reads what it wrote; the next write retries the move.
    assert_eq!(ecam_read32(&mut ecam, bar0), 0xd000_0000);
    *mover.fail.lock().unwrap() = false;
    ecam.write(bar0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(
        *mover.moves.lock().unwrap(),
        vec![(
            0xc000_0000,
            0xd000_0000,
            0x1000,
            PciBarRegionType::Memory32BitRegion
        )]
    );
    assert_eq!(device.lock().unwrap().bars()[0].base, 0xd000_0000);
}

#[test]
fn ecam_addressing() {
    let Rig { mut ecam, bus, .. } = rig();
    assert_eq!(ecam.window_size(), ECAM_BUS_SIZE);
    assert_eq!(ecam_read32(&mut ecam, ecam_offset(0, 0, 0, 0)), 0x0d57_8086);
    assert_eq!(ecam_read32(&mut ecam, ecam_offset(0, 3, 0, 0)), 0x10f0_1af4);
    assert_eq!(
        ecam_read32(&mut ecam, ecam_offset(0, 3, 0, 0x2c)),
        0x10f0_1af4
    );
    let mut word = [0; 2];
    ecam.read(ecam_offset(0, 3, 0, 2), &mut word);
    assert_eq!(u16::from_le_bytes(word), 0x10f0);
    let mut byte = [0; 1];
    ecam.read(ecam_offset(0, 3, 0, 8), &mut byte);
    assert_eq!(byte, [2]);
    // The extended space exists (and reads zero) on present functions.
    assert_eq!(ecam_read32(&mut ecam, ecam_offset(0, 3, 0, 0xffc)), 0);
    for offset in [
        ecam_offset(0, 1, 0, 0),
        ecam_offset(0, 3, 1, 0),
        ecam_offset(0, 31, 7, 0),
        ecam_offset(1, 0, 0, 0),
        u64::MAX - 3,
    ] {
        assert_eq!(ecam_read32(&mut ecam, offset), 0xffff_ffff, "{offset:#x}");
    }
    // A full-size window decodes other buses (all absent).
    let mut full = PciConfigMmio::new(bus, Arc::new(RecordingMover::default()), 255);
    assert_eq!(full.window_size(), 256 << 20);
    assert_eq!(ecam_read32(&mut full, ecam_offset(0, 0, 0, 0)), 0x0d57_8086);
    assert_eq!(
        ecam_read32(&mut full, ecam_offset(255, 31, 7, 0)),
        0xffff_ffff
    );
}

#[test]
fn removed_device_reads_all_ones() {
    let Rig {
        mut ecam,
        mut io,
        bus,
        ..
    } = rig();
    let removed = bus.lock().unwrap().remove_device(3).unwrap();
    assert_eq!(removed.lock().unwrap().config().vendor_id(), 0x1af4);
    assert_eq!(ecam_read32(&mut ecam, ecam_offset(0, 3, 0, 0)), 0xffff_ffff);
    assert_eq!(
        io_read(&mut io, config_address(0, 3, 0, 0), 0, 4),
        0xffff_ffff
    );
    assert_eq!(bus.lock().unwrap().add_device(None, removed), Ok(1));
    assert_eq!(ecam_read32(&mut ecam, ecam_offset(0, 1, 0, 0)), 0x10f0_1af4);
}

#[test]
fn bar_adapter_routes_to_the_device() {
    let Rig { device, .. } = rig();
    let handle: PciDeviceHandle = device.clone();
    let mut bar0 = PciBarBusDevice::new(handle.clone(), 0);
    let mut bar1 = PciBarBusDevice::new(handle.clone(), 1);
    assert_eq!((bar0.bar(), bar1.bar()), (0, 1));
    bar0.write(0x10, &[1, 2, 3, 4]);
    bar1.write(0x1f, &[9]);
    let mut data = [0; 4];
    bar0.read(0x10, &mut data);
    assert_eq!(data, [1, 2, 3, 4]);
    assert_eq!(device.lock().unwrap().ports[0x1f], 9);
    // Out-of-range accesses are the device's to refuse.
    bar0.read(0xffe, &mut data);
    assert_eq!(data, [0xff; 4]);
    let mut bar9 = PciBarBusDevice::new(handle, 9);
    bar9.read(0, &mut data);
    assert_eq!(data, [0xff; 4]);
}

#[derive(Default)]
struct CountingEvents {
    resets: std::sync::atomic::AtomicUsize,
}

impl devices::PlatformEvents for CountingEvents {
    fn power_off(&self) {}
    fn reset(&self) {
        self.resets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn debug_exit(&self, _code: u8) {}
}

#[test]
fn a_byte_write_to_0xcf9_with_the_reset_cpu_bit_resets_and_others_do_not() {
    let events = Arc::new(CountingEvents::default());
    let mut rig = rig();
    rig.io =
        PciConfigIo::new(rig.bus.clone(), rig.mover.clone()).with_reset_control(events.clone());
    let resets = || events.resets.load(std::sync::atomic::Ordering::SeqCst);
    // Firmware's sequence: select a hard reset (0x02), then reset the CPU (0x06).
    rig.io.write(1, &[0x02]);
    assert_eq!(resets(), 0);
    rig.io.write(1, &[0x06]);
    assert_eq!(resets(), 1);
    // Word and dword accesses there are not the reset register.
    rig.io.write(0, &[0x04, 0x04, 0x04, 0x04]);
    rig.io.write(1, &[0x04, 0x04]);
    assert_eq!(resets(), 1);
    // Without a reset control the byte is dropped.
    let mut plain = PciConfigIo::new(rig.bus.clone(), rig.mover.clone());
    plain.write(1, &[0x06]);
    assert_eq!(resets(), 1);
}
