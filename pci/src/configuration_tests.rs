use super::*;

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision_id: 0x01,
        class_code: PciClassCode::new(0x02, 0x00, 0x00),
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0001,
        multi_function: false,
        interrupt_pin: Some(PciInterruptPin::IntA),
    }
}

fn config() -> PciConfiguration {
    PciConfiguration::new(&header()).unwrap()
}

fn write32(config: &mut PciConfiguration, reg: usize, value: u32) -> Vec<BarReprogramming> {
    config.write_config_register(reg, 0, &value.to_le_bytes())
}

fn enable_decoding(config: &mut PciConfiguration) -> Vec<BarReprogramming> {
    write32(
        config,
        COMMAND_STATUS_REG,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE),
    )
}

struct RawCapability {
    id: u8,
    body: Vec<u8>,
    writable: Vec<u8>,
}

impl PciCapability for RawCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId(self.id)
    }
    fn body(&self) -> Vec<u8> {
        self.body.clone()
    }
    fn writable_bits(&self) -> Vec<u8> {
        self.writable.clone()
    }
}

fn capability(id: u8, body_len: usize) -> RawCapability {
    RawCapability {
        id,
        body: (0..body_len).map(|i| i as u8 + 1).collect(),
        writable: Vec::new(),
    }
}

#[test]
fn header_defaults() {
    let config = config();
    assert_eq!(config.read_reg(VENDOR_DEVICE_REG), 0x1041_1af4);
    assert_eq!(config.vendor_id(), 0x1af4);
    assert_eq!(config.device_id(), 0x1041);
    assert_eq!(config.read_reg(COMMAND_STATUS_REG), 0);
    assert_eq!(config.read_reg(CLASS_REG), 0x0200_0001);
    assert_eq!(config.class_code(), PciClassCode::new(0x02, 0, 0));
    assert_eq!(config.header_type(), 0);
    assert_eq!(config.read_reg(SUBSYSTEM_REG), 0x0001_1af4);
    assert_eq!(config.interrupt_pin(), 1);
    assert_eq!(config.interrupt_line(), 0);
    assert_eq!(config.read_reg(CAPABILITY_POINTER_REG), 0);
    for bar in 0..NUM_BARS {
        assert_eq!(config.read_reg(BAR0_REG + bar), 0);
    }
    assert!(config.bar_regions().is_empty());
    assert!(config.capabilities().is_empty());
}

#[test]
fn multi_function_and_no_pin() {
    let config = PciConfiguration::new(&PciHeader {
        multi_function: true,
        interrupt_pin: None,
        ..header()
    })
    .unwrap();
    assert_eq!(config.header_type(), 0x80);
    assert_eq!(config.interrupt_pin(), 0);
}

#[test]
fn vendor_ffff_is_rejected() {
    let err = PciConfiguration::new(&PciHeader {
        vendor_id: 0xffff,
        ..header()
    })
    .unwrap_err();
    assert_eq!(err, ConfigurationError::InvalidVendorId);
}

#[test]
fn identity_registers_are_read_only() {
    let mut config = config();
    for reg in [
        VENDOR_DEVICE_REG,
        CLASS_REG,
        SUBSYSTEM_REG,
        CAPABILITY_POINTER_REG,
        12,
    ] {
        let before = config.read_reg(reg);
        write32(&mut config, reg, 0xdead_beef);
        assert_eq!(config.read_reg(reg), before, "register {reg} changed");
    }
    // The header type byte and BIST stay; cache line size is writable.
    write32(&mut config, HEADER_TYPE_REG, 0xffff_ffff);
    assert_eq!(config.read_reg(HEADER_TYPE_REG), 0x0000_00ff);
}

#[test]
fn command_has_only_its_writable_bits() {
    let mut config = config();
    write32(&mut config, COMMAND_STATUS_REG, 0x0000_ffff);
    assert_eq!(config.command(), 0x0547);
    assert_eq!(config.status(), 0);
    config.write_config_register(COMMAND_STATUS_REG, 0, &[0x00, 0x00]);
    assert_eq!(config.command(), 0);
    config.write_config_register(COMMAND_STATUS_REG, 0, &[COMMAND_BUS_MASTER as u8]);
    assert_eq!(config.command(), COMMAND_BUS_MASTER);
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut config = config();
    config.registers[COMMAND_STATUS_REG] |=
        0xf900 << 16 | u32::from(STATUS_CAPABILITIES_LIST) << 16;
    // Writing zeros leaves them; writing one clears only that bit; the capability bit is read-only.
    config.write_config_register(COMMAND_STATUS_REG, 2, &[0, 0]);
    assert_eq!(config.status(), 0xf910);
    config.write_config_register(COMMAND_STATUS_REG, 2, &0x8000u16.to_le_bytes());
    assert_eq!(config.status(), 0x7910);
    config.write_config_register(COMMAND_STATUS_REG, 3, &[0xff]);
    assert_eq!(config.status(), 0x0010);
    config.write_config_register(COMMAND_STATUS_REG, 2, &[0xff]);
    assert_eq!(config.status(), 0x0010);
}

#[test]
fn interrupt_line_is_writable_pin_is_not() {
    let mut config = config();
    config.write_config_register(INTERRUPT_REG, 0, &[0x0b]);
    config.write_config_register(INTERRUPT_REG, 1, &[0x04]);
    assert_eq!(config.interrupt_line(), 0x0b);
    assert_eq!(config.interrupt_pin(), 1);
    config.set_interrupt_line(5);
    assert_eq!(config.read_reg(INTERRUPT_REG), 0x0105);
}

#[test]
fn invalid_accesses_are_dropped() {
    let mut config = config();
    let before = config.state();
    for (offset, len) in [
        (0, 0),
        (0, 3),
        (0, 8),
        (0, 16),
        (1, 2),
        (3, 2),
        (2, 4),
        (4, 1),
        (u64::MAX, 1),
    ] {
        let data = vec![0xff; len];
        assert!(config
            .write_config_register(COMMAND_STATUS_REG, offset, &data)
            .is_empty());
        assert!(config
            .write_config_register(INTERRUPT_REG, offset, &data)
            .is_empty());
    }
    assert!(config
        .write_config_register(NUM_CONFIGURATION_REGISTERS, 0, &[0xff; 4])
        .is_empty());
    assert!(config
        .write_config_register(usize::MAX, 0, &[0xff; 4])
        .is_empty());
    assert_eq!(config.state(), before);
    assert_eq!(config.read_reg(NUM_CONFIGURATION_REGISTERS), u32::MAX);
    assert_eq!(config.read_reg(usize::MAX), u32::MAX);
    assert_eq!(config.byte(CONFIGURATION_SPACE_SIZE), 0xff);
}

#[test]
fn access_mask_shapes() {
    assert_eq!(access_mask(0, 4), Some(u32::MAX));
    assert_eq!(access_mask(2, 2), Some(0xffff_0000));
    assert_eq!(access_mask(3, 1), Some(0xff00_0000));
    assert_eq!(access_mask(1, 2), None);
    assert_eq!(access_mask(0, 3), None);
    assert_eq!(access_mask(4, 1), None);
}

#[test]
fn bar_size_probe_32bit() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    assert_eq!(config.read_reg(BAR0_REG), 0xc000_0000);
    write32(&mut config, BAR0_REG, 0xffff_ffff);
    assert_eq!(config.read_reg(BAR0_REG), 0xffff_f000);
    write32(&mut config, BAR0_REG, 0xc000_0000);
    assert_eq!(config.read_reg(BAR0_REG), 0xc000_0000);
}

#[test]
fn bar_size_probe_64bit_prefetchable() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(2, 0x1_0000_0000, 0x4000).prefetchable())
        .unwrap();
    assert_eq!(config.read_reg(BAR0_REG + 2), 0x0000_000c);
    assert_eq!(config.read_reg(BAR0_REG + 3), 0x0000_0001);
    write32(&mut config, BAR0_REG + 2, 0xffff_ffff);
    write32(&mut config, BAR0_REG + 3, 0xffff_ffff);
    assert_eq!(config.read_reg(BAR0_REG + 2), 0xffff_c00c);
    assert_eq!(config.read_reg(BAR0_REG + 3), 0xffff_ffff);
    let size = !(u64::from(config.read_reg(BAR0_REG + 3)) << 32
        | u64::from(config.read_reg(BAR0_REG + 2) & !0xf))
        + 1;
    assert_eq!(size, 0x4000);
}

#[test]
fn bar_size_probe_64bit_larger_than_4g() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(
            0,
            0x4_0000_0000,
            0x2_0000_0000,
        ))
        .unwrap();
    write32(&mut config, BAR0_REG, 0xffff_ffff);
    write32(&mut config, BAR0_REG + 1, 0xffff_ffff);
    assert_eq!(config.read_reg(BAR0_REG), 0x0000_0004);
    assert_eq!(config.read_reg(BAR0_REG + 1), 0xffff_fffe);
}

#[test]
fn bar_size_probe_io() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::io(5, 0xc040, 0x20))
        .unwrap();
    assert_eq!(config.read_reg(BAR0_REG + 5), 0xc041);
    write32(&mut config, BAR0_REG + 5, 0xffff_ffff);
    assert_eq!(config.read_reg(BAR0_REG + 5), 0xffff_ffe1);
}

#[test]
fn unimplemented_bars_read_zero_after_probe() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    for bar in 1..NUM_BARS {
        write32(&mut config, BAR0_REG + bar, 0xffff_ffff);
        assert_eq!(config.read_reg(BAR0_REG + bar), 0);
    }
}

#[test]
fn add_bar_validation() {
    let mut config = config();
    let cases = [
        (
            PciBarConfiguration::memory32(6, 0, 0x1000),
            ConfigurationError::BarIndexOutOfRange(6),
        ),
        (
            PciBarConfiguration::memory32(usize::MAX, 0, 0x1000),
            ConfigurationError::BarIndexOutOfRange(usize::MAX),
        ),
        (
            PciBarConfiguration::memory64(5, 0, 0x1000),
            ConfigurationError::BarIndexOutOfRange(5),
        ),
        (
            PciBarConfiguration::memory32(0, 0, 0x1800),
            ConfigurationError::BarSizeInvalid {
                index: 0,
                size: 0x1800,
            },
        ),
        (
            PciBarConfiguration::memory32(0, 0, 8),
            ConfigurationError::BarSizeInvalid { index: 0, size: 8 },
        ),
        (
            PciBarConfiguration::memory32(0, 0, 0),
            ConfigurationError::BarSizeInvalid { index: 0, size: 0 },
        ),
        (
            PciBarConfiguration::io(0, 0, 2),
            ConfigurationError::BarSizeInvalid { index: 0, size: 2 },
        ),
        (
            PciBarConfiguration::memory32(0, 0, 1 << 32),
            ConfigurationError::BarSizeInvalid {
                index: 0,
                size: 1 << 32,
            },
        ),
        (
            PciBarConfiguration::memory32(0, 0xc000_0800, 0x1000),
            ConfigurationError::BarAddressMisaligned {
                index: 0,
                addr: 0xc000_0800,
                size: 0x1000,
            },
        ),
        (
            PciBarConfiguration::memory32(0, 0x1_0000_0000, 0x1000),
            ConfigurationError::BarAddressOutOfRange {
                index: 0,
                addr: 0x1_0000_0000,
                size: 0x1000,
            },
        ),
        (
            PciBarConfiguration::io(0, 0x1_0000, 0x100),
            ConfigurationError::BarAddressOutOfRange {
                index: 0,
                addr: 0x1_0000,
                size: 0x100,
            },
        ),
        (
            PciBarConfiguration::memory64(0, u64::MAX - 0xfff, 0x1000),
            ConfigurationError::BarAddressOutOfRange {
                index: 0,
                addr: u64::MAX - 0xfff,
                size: 0x1000,
            },
        ),
        (
            PciBarConfiguration::io(0, 0xc000, 0x20).prefetchable(),
            ConfigurationError::PrefetchableIo(0),
        ),
    ];
    for (bar, expected) in cases {
        assert_eq!(config.add_pci_bar(&bar), Err(expected), "{bar:?}");
    }
    assert!(config.bar_regions().is_empty());

    config
        .add_pci_bar(&PciBarConfiguration::memory64(1, 0x1_0000_0000, 0x1000))
        .unwrap();
    assert_eq!(
        config.add_pci_bar(&PciBarConfiguration::memory32(1, 0xc000_0000, 0x1000)),
        Err(ConfigurationError::BarInUse(1))
    );
    assert_eq!(
        config.add_pci_bar(&PciBarConfiguration::memory32(2, 0xc000_0000, 0x1000)),
        Err(ConfigurationError::BarInUse(2))
    );
    assert_eq!(
        config.add_pci_bar(&PciBarConfiguration::memory64(0, 0x2_0000_0000, 0x1000)),
        Err(ConfigurationError::BarInUse(0))
    );
    config
        .add_pci_bar(&PciBarConfiguration::memory32(3, 0xc000_0000, 0x1000))
        .unwrap();
    assert_eq!(
        config.bar_regions(),
        vec![
            PciBarRegion {
                index: 1,
                base: 0x1_0000_0000,
                len: 0x1000,
                region_type: PciBarRegionType::Memory64BitRegion,
                prefetchable: false,
            },
            PciBarRegion {
                index: 3,
                base: 0xc000_0000,
                len: 0x1000,
                region_type: PciBarRegionType::Memory32BitRegion,
                prefetchable: false,
            },
        ]
    );
    assert_eq!(config.bar_region(2), None);
    assert_eq!(config.bar_region(usize::MAX), None);
}

#[test]
fn reprogramming_32bit_with_decoding_on() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    assert!(enable_decoding(&mut config).is_empty());
    let moved = write32(&mut config, BAR0_REG, 0xd000_0000);
    assert_eq!(
        moved,
        vec![BarReprogramming {
            bar: 0,
            old_base: 0xc000_0000,
            new_base: 0xd000_0000,
            len: 0x1000,
            region_type: PciBarRegionType::Memory32BitRegion,
        }]
    );
    assert_eq!(config.bar_region(0).unwrap().base, 0xd000_0000);
    // Writing the same address again moves nothing.
    assert!(write32(&mut config, BAR0_REG, 0xd000_0000).is_empty());
}

#[test]
fn size_probe_with_decoding_on_is_not_a_move() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    enable_decoding(&mut config);
    assert!(write32(&mut config, BAR0_REG, 0xffff_ffff).is_empty());
    assert!(write32(&mut config, BAR0_REG, 0xc000_0000).is_empty());
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_0000);
}

#[test]
fn reprogramming_waits_for_decoding() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    config
        .add_pci_bar(&PciBarConfiguration::io(1, 0xc000, 0x40))
        .unwrap();
    assert!(write32(&mut config, BAR0_REG, 0xe000_0000).is_empty());
    assert!(write32(&mut config, BAR0_REG + 1, 0xd000).is_empty());
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_0000);
    // Turning on memory decoding moves only the memory BAR; then I/O moves the I/O BAR.
    let moved = write32(
        &mut config,
        COMMAND_STATUS_REG,
        u32::from(COMMAND_MEMORY_SPACE),
    );
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].bar, moved[0].old_base, moved[0].new_base),
        (0, 0xc000_0000, 0xe000_0000)
    );
    let moved = enable_decoding(&mut config);
    assert_eq!(
        moved,
        vec![BarReprogramming {
            bar: 1,
            old_base: 0xc000,
            new_base: 0xd000,
            len: 0x40,
            region_type: PciBarRegionType::IoRegion,
        }]
    );
    // Rewriting COMMAND with decoding already on reports nothing.
    assert!(enable_decoding(&mut config).is_empty());
}

#[test]
fn reprogramming_64bit_low_then_high() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(0, 0xc000_0000, 0x10_0000))
        .unwrap();
    enable_decoding(&mut config);
    // The low half alone is not a complete base.
    assert!(write32(&mut config, BAR0_REG, 0xe000_0000).is_empty());
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_0000);
    let moved = write32(&mut config, BAR0_REG + 1, 0x1);
    assert_eq!(
        moved,
        vec![BarReprogramming {
            bar: 0,
            old_base: 0xc000_0000,
            new_base: 0x1_e000_0000,
            len: 0x10_0000,
            region_type: PciBarRegionType::Memory64BitRegion,
        }]
    );
    // Only the high half changes.
    let moved = write32(&mut config, BAR0_REG + 1, 0x2);
    assert_eq!(
        (moved[0].old_base, moved[0].new_base),
        (0x1_e000_0000, 0x2_e000_0000)
    );
    // The full probe sequence (low, restore, high, restore) moves nothing.
    for (reg, value) in [
        (0, 0xffff_ffff),
        (0, 0xe000_0000),
        (1, 0xffff_ffff),
        (1, 0x2),
    ] {
        assert!(write32(&mut config, BAR0_REG + reg, value).is_empty());
    }
    assert_eq!(config.bar_region(0).unwrap().base, 0x2_e000_0000);
}

#[test]
fn reprogramming_64bit_with_decoding_off_reports_on_enable() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(0, 0x1_0000_0000, 0x1000))
        .unwrap();
    write32(&mut config, BAR0_REG, 0x8000_0000);
    write32(&mut config, BAR0_REG + 1, 0x3);
    let moved = enable_decoding(&mut config);
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].old_base, moved[0].new_base),
        (0x1_0000_0000, 0x3_8000_0000)
    );
}

#[test]
fn reprogramming_with_byte_writes() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    enable_decoding(&mut config);
    assert!(config.write_config_register(BAR0_REG, 1, &[0x20]).len() == 1);
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_2000);
}

#[test]
fn io_bar_outside_port_space_is_not_moved() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::io(0, 0xc000, 0x100))
        .unwrap();
    enable_decoding(&mut config);
    assert!(write32(&mut config, BAR0_REG, 0x0001_0000).is_empty());
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000);
    assert_eq!(write32(&mut config, BAR0_REG, 0xff00).len(), 1);
}

#[test]
fn revert_restores_mapped_base_and_retries() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory32(0, 0xc000_0000, 0x1000))
        .unwrap();
    enable_decoding(&mut config);
    let moved = write32(&mut config, BAR0_REG, 0xd000_0000);
    config.revert_bar_reprogramming(&moved[0]);
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_0000);
    // Reverting twice, or a stale move, changes nothing.
    config.revert_bar_reprogramming(&moved[0]);
    config.revert_bar_reprogramming(&BarReprogramming { bar: 9, ..moved[0] });
    assert_eq!(config.bar_region(0).unwrap().base, 0xc000_0000);
    assert_eq!(write32(&mut config, BAR0_REG, 0xd000_0000), moved);
}

#[test]
fn capability_chain_layout() {
    let mut config = config();
    assert_eq!(config.add_capability(&capability(0x09, 3)).unwrap(), 0x40);
    // 5 bytes used: the next one starts at the next dword.
    assert_eq!(config.add_capability(&capability(0x11, 10)).unwrap(), 0x48);
    assert_eq!(config.add_capability(&capability(0x01, 6)).unwrap(), 0x54);
    assert_eq!(
        config.status() & STATUS_CAPABILITIES_LIST,
        STATUS_CAPABILITIES_LIST
    );
    assert_eq!(config.byte(0x34), 0x40);
    assert_eq!([config.byte(0x40), config.byte(0x41)], [0x09, 0x48]);
    assert_eq!(
        [config.byte(0x42), config.byte(0x43), config.byte(0x44)],
        [1, 2, 3]
    );
    assert_eq!([config.byte(0x48), config.byte(0x49)], [0x11, 0x54]);
    assert_eq!([config.byte(0x54), config.byte(0x55)], [0x01, 0x00]);
    assert_eq!(
        config.capabilities(),
        vec![
            (PciCapabilityId::VENDOR_SPECIFIC, 0x40),
            (PciCapabilityId::MSIX, 0x48),
            (PciCapabilityId::POWER_MANAGEMENT, 0x54)
        ]
    );
    assert_eq!(config.find_capability(PciCapabilityId::MSIX), Some(0x48));
    assert_eq!(config.find_capability(PciCapabilityId::MSI), None);
    // The chain is read-only to the guest.
    write32(&mut config, 0x40 / 4, 0);
    write32(&mut config, CAPABILITY_POINTER_REG, 0);
    assert_eq!(config.capabilities().len(), 3);
}

#[test]
fn capability_chain_is_bounded_by_standard_space() {
    let mut config = config();
    // 0x40..0x100 is 192 bytes: a 192-byte capability fits exactly, then nothing more.
    assert_eq!(config.add_capability(&capability(0x09, 190)).unwrap(), 0x40);
    assert_eq!(
        config.add_capability(&capability(0x09, 0)),
        Err(ConfigurationError::CapabilitySpaceFull {
            needed: 2,
            available: 0
        })
    );
    let mut config = self::config();
    assert_eq!(
        config.add_capability(&capability(0x09, 191)),
        Err(ConfigurationError::CapabilitySpaceFull {
            needed: 193,
            available: 192
        })
    );
    // Fill with small capabilities: exactly 48 dword-sized ones fit.
    for i in 0..48 {
        assert_eq!(
            config.add_capability(&capability(0x09, 2)).unwrap(),
            0x40 + 4 * i
        );
    }
    assert!(config.add_capability(&capability(0x09, 0)).is_err());
    assert_eq!(config.capabilities().len(), 48);
    assert_eq!(config.byte(0xfd), 0);
}

#[test]
fn capability_writable_bits_apply() {
    let mut config = config();
    let offset = config
        .add_capability(&RawCapability {
            id: 0x11,
            body: vec![0x07, 0x00, 0xaa, 0xbb],
            writable: vec![0x00, 0xc0],
        })
        .unwrap();
    let reg = offset / 4;
    write32(&mut config, reg, 0xffff_ffff);
    assert_eq!(config.read_reg(reg), 0xc007_0011);
    config.write_config_register(reg, 3, &[0x40]);
    assert_eq!(config.read_reg(reg), 0x4007_0011);
    write32(&mut config, reg + 1, 0);
    assert_eq!(config.read_reg(reg + 1) & 0xffff, 0xbbaa);
}

#[test]
fn capability_walk_survives_corrupt_pointers() {
    let mut config = config();
    config.add_capability(&capability(0x09, 2)).unwrap();
    config.add_capability(&capability(0x09, 2)).unwrap();
    // Point the second capability back at the first: the walk must stop rather than loop.
    config.set_byte(0x45, 0x40);
    assert_eq!(config.capabilities().len(), 2);
    config.set_byte(0x34, 0x10);
    assert!(config.capabilities().is_empty());
}

#[test]
fn state_round_trip() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(0, 0x1_0000_0000, 0x4000))
        .unwrap();
    config
        .add_pci_bar(&PciBarConfiguration::io(2, 0xc000, 0x20))
        .unwrap();
    config.add_capability(&capability(0x09, 6)).unwrap();
    enable_decoding(&mut config);
    write32(&mut config, BAR0_REG, 0xffff_ffff);
    config.set_interrupt_line(11);

    let json = serde_json::to_string(&config.state()).unwrap();
    let state: PciConfigurationState = serde_json::from_str(&json).unwrap();
    let mut restored = PciConfiguration::from_state(&state).unwrap();
    assert_eq!(restored.state(), config.state());
    assert_eq!(restored.read_reg(BAR0_REG), 0xffff_c004);
    // The restored copy keeps moving BARs like the original.
    write32(&mut restored, BAR0_REG, 0);
    assert_eq!(write32(&mut restored, BAR0_REG + 1, 2).len(), 1);
    assert_eq!(restored.capabilities().len(), 1);
}

#[test]
fn invalid_states_are_rejected() {
    let mut config = config();
    config
        .add_pci_bar(&PciBarConfiguration::memory64(0, 0x1_0000_0000, 0x4000))
        .unwrap();
    let good = config.state();

    let mut state = good.clone();
    state.registers.pop();
    assert!(PciConfiguration::from_state(&state).is_err());
    let mut state = good.clone();
    state.bars.push(None);
    assert!(PciConfiguration::from_state(&state).is_err());
    let mut state = good.clone();
    state.registers[0] = 0xffff;
    assert!(PciConfiguration::from_state(&state).is_err());
    let mut state = good.clone();
    state.last_capability = Some((0xf8, 12));
    assert!(PciConfiguration::from_state(&state).is_err());
    let mut state = good.clone();
    state.last_capability = Some((0x10, 4));
    assert!(PciConfiguration::from_state(&state).is_err());
    // A BAR overlapping the high half of the 64-bit BAR.
    let mut state = good.clone();
    state.bars[1] = state.bars[0];
    assert!(PciConfiguration::from_state(&state).is_err());
    let mut state = good.clone();
    if let Some(info) = state.bars[0].as_mut() {
        info.size = 0x3000;
    }
    assert!(PciConfiguration::from_state(&state).is_err());
    // Header masks and writable masks of empty BAR registers are reset rather than trusted.
    let mut state = good;
    state.writable_bits[BAR0_REG + 4] = u32::MAX;
    state.writable_bits[VENDOR_DEVICE_REG] = u32::MAX;
    state.w1c_bits[CLASS_REG] = u32::MAX;
    let mut restored = PciConfiguration::from_state(&state).unwrap();
    write32(&mut restored, BAR0_REG + 4, u32::MAX);
    assert_eq!(restored.read_reg(BAR0_REG + 4), 0);
    write32(&mut restored, VENDOR_DEVICE_REG, 0);
    write32(&mut restored, CLASS_REG, u32::MAX);
    assert_eq!(restored.state(), config.state());
}
