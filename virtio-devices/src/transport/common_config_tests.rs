use vm_memory::GuestAddress;

use super::*;
use crate::transport::interrupt::VIRTIO_MSI_NO_VECTOR;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn write(common: &mut CommonConfig, offset: u64, value: u64, len: usize) -> WriteEffect {
    let vectors = InterruptVectors::new(2, 3);
    common.write(offset, &value.to_le_bytes()[..len], &vectors, &memory())
}

fn read(common: &CommonConfig, offset: u64, len: usize) -> u64 {
    let vectors = InterruptVectors::new(2, 3);
    let mut data = vec![0xaa; len];
    common.read(offset, &mut data, 0x1_0000_0002, &vectors, false);
    let mut bytes = [0u8; 8];
    bytes[..len].copy_from_slice(&data);
    u64::from_le_bytes(bytes)
}

#[test]
fn accesses_must_match_field_widths() {
    assert_eq!(
        decode(0x00, 4),
        Some((Field::DeviceFeatureSelect, Part::Whole))
    );
    assert_eq!(decode(0x14, 1), Some((Field::DeviceStatus, Part::Whole)));
    assert_eq!(decode(0x20, 8), Some((Field::QueueDesc, Part::Whole)));
    assert_eq!(decode(0x20, 4), Some((Field::QueueDesc, Part::Low)));
    assert_eq!(decode(0x24, 4), Some((Field::QueueDesc, Part::High)));
    assert_eq!(decode(0x34, 4), Some((Field::QueueDevice, Part::High)));
    for (offset, len) in [
        (0x00, 2),
        (0x01, 1),
        (0x14, 2),
        (0x22, 2),
        (0x38, 4),
        (0x10, 4),
        (0x24, 8),
    ] {
        assert_eq!(decode(offset, len), None, "offset {offset:#x} len {len}");
    }
    assert_eq!(decode(u64::MAX, 8), None);
}

#[test]
fn feature_words_follow_their_select_registers() {
    let mut common = CommonConfig::new(&[16, 8]);
    assert_eq!(read(&common, 0x04, 4), 2);
    write(&mut common, 0x00, 1, 4);
    assert_eq!(read(&common, 0x04, 4), 1);
    write(&mut common, 0x00, 7, 4);
    assert_eq!(read(&common, 0x04, 4), 0);
    write(&mut common, 0x0c, 0xdead, 4);
    write(&mut common, 0x08, 1, 4);
    write(&mut common, 0x0c, 1, 4);
    assert_eq!(common.driver_features(), 0x1_0000_dead);
    assert_eq!(read(&common, 0x0c, 4), 1);
    write(&mut common, 0x08, 2, 4);
    write(&mut common, 0x0c, 0xffff_ffff, 4);
    assert_eq!(common.driver_features(), 0x1_0000_dead);
    // Frozen after FEATURES_OK.
    common.set_device_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    write(&mut common, 0x08, 0, 4);
    write(&mut common, 0x0c, 0, 4);
    assert_eq!(common.driver_features(), 0x1_0000_dead);
}

#[test]
fn read_only_fields_ignore_writes() {
    let mut common = CommonConfig::new(&[16, 8]);
    assert_eq!(write(&mut common, 0x12, 9, 2), WriteEffect::None);
    assert_eq!(read(&common, 0x12, 2), 2);
    write(&mut common, 0x15, 9, 1);
    assert_eq!(read(&common, 0x15, 1), 0);
    write(&mut common, 0x16, 1, 2);
    write(&mut common, 0x1e, 9, 2);
    assert_eq!(read(&common, 0x1e, 2), 1);
}

#[test]
fn status_writes_are_handed_to_the_transport() {
    let mut common = CommonConfig::new(&[16]);
    assert_eq!(write(&mut common, 0x14, 3, 1), WriteEffect::Status(3));
    // The status register is not changed by the write itself.
    assert_eq!(common.device_status(), 0);
}

#[test]
fn unavailable_queues_read_zero_and_drop_writes() {
    let mut common = CommonConfig::new(&[16, 8]);
    write(&mut common, 0x16, 2, 2);
    assert_eq!(read(&common, 0x16, 2), 2);
    for offset in [0x18, 0x1a, 0x1c, 0x1e] {
        assert_eq!(read(&common, offset, 2), 0);
    }
    assert_eq!(write(&mut common, 0x18, 4, 2), WriteEffect::None);
    assert_eq!(write(&mut common, 0x1c, 1, 2), WriteEffect::None);
    write(&mut common, 0x20, 0x1000, 8);
    assert_eq!(read(&common, 0x20, 8), 0);
    write(&mut common, 0x16, 0xffff, 2);
    assert_eq!(read(&common, 0x18, 2), 0);
}

#[test]
fn queue_sizes_must_be_powers_of_two_within_the_maximum() {
    let mut common = CommonConfig::new(&[16, 8]);
    assert_eq!(read(&common, 0x18, 2), 16);
    assert_eq!(write(&mut common, 0x18, 4, 2), WriteEffect::None);
    assert_eq!(read(&common, 0x18, 2), 4);
    for bad in [0u64, 3, 32, 0xffff] {
        let effect = write(&mut common, 0x18, bad, 2);
        assert!(
            matches!(
                effect,
                WriteEffect::NeedsReset(QueueConfigError::Size { index: 0, .. })
            ),
            "size {bad}: {effect:?}"
        );
        assert_eq!(read(&common, 0x18, 2), 4);
    }
}

#[test]
fn ring_addresses_accept_halves_and_whole_writes() {
    let mut common = CommonConfig::new(&[16]);
    write(&mut common, 0x20, 0x1234_5000, 4);
    write(&mut common, 0x24, 0x1, 4);
    assert_eq!(read(&common, 0x20, 8), 0x1_1234_5000);
    assert_eq!(read(&common, 0x24, 4), 0x1);
    write(&mut common, 0x28, 0xabcd_0000_2000, 8);
    assert_eq!(read(&common, 0x28, 4), 0x2000);
    assert_eq!(read(&common, 0x2c, 4), 0xabcd);
}

#[test]
fn enabling_checks_alignment_and_memory() {
    let mem = memory();
    let vectors = InterruptVectors::new(1, 2);
    let setup = |desc: u64, driver: u64, device: u64| {
        let mut common = CommonConfig::new(&[16]);
        for (offset, value) in [(0x20, desc), (0x28, driver), (0x30, device)] {
            common.write(offset, &value.to_le_bytes(), &vectors, &mem);
        }
        let effect = common.write(0x1c, &1u16.to_le_bytes(), &vectors, &mem);
        (common, effect)
    };
    let (common, effect) = setup(0x1000, 0x2000, 0x3000);
    assert_eq!(effect, WriteEffect::None);
    assert!(common.queues()[0].enabled());
    // Registers are frozen once enabled.
    let (mut common, _) = setup(0x1000, 0x2000, 0x3000);
    common.write(0x20, &0x8000u64.to_le_bytes(), &vectors, &mem);
    assert_eq!(read(&common, 0x20, 8), 0x1000);

    let (common, effect) = setup(0x1008, 0x2000, 0x3000);
    assert!(matches!(
        effect,
        WriteEffect::NeedsReset(QueueConfigError::Misaligned { align: 16, .. })
    ));
    assert!(!common.queues()[0].enabled());
    let (_, effect) = setup(0x1000, 0x2001, 0x3000);
    assert!(matches!(
        effect,
        WriteEffect::NeedsReset(QueueConfigError::Misaligned { align: 2, .. })
    ));
    let (_, effect) = setup(0x1000, 0x2000, 0x3002);
    assert!(matches!(
        effect,
        WriteEffect::NeedsReset(QueueConfigError::Misaligned { align: 4, .. })
    ));
    // The used ring runs past the end of RAM.
    let (_, effect) = setup(0x1000, 0x2000, 0x10_0000 - 0x40);
    assert!(matches!(
        effect,
        WriteEffect::NeedsReset(QueueConfigError::OutsideMemory {
            ring: "used ring",
            ..
        })
    ));
    // Addresses that wrap around the address space.
    let (_, effect) = setup(u64::MAX - 0xf, 0x2000, 0x3000);
    assert!(matches!(
        effect,
        WriteEffect::NeedsReset(QueueConfigError::OutsideMemory { .. })
    ));
    // A queue_enable write other than 1 is dropped.
    let mut common = CommonConfig::new(&[16]);
    assert_eq!(
        common.write(0x1c, &0u16.to_le_bytes(), &vectors, &mem),
        WriteEffect::None
    );
    assert!(!common.queues()[0].enabled());
}

#[test]
fn queues_freeze_after_driver_ok() {
    let mut common = CommonConfig::new(&[16]);
    common.set_device_status(
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    write(&mut common, 0x18, 4, 2);
    assert_eq!(read(&common, 0x18, 2), 16);
}

#[test]
fn msix_vectors_are_checked_against_the_table() {
    let mut common = CommonConfig::new(&[16, 8]);
    let vectors = InterruptVectors::new(2, 3);
    let mem = memory();
    common.write(0x10, &2u16.to_le_bytes(), &vectors, &mem);
    assert_eq!(vectors.config(), 2);
    common.write(0x10, &3u16.to_le_bytes(), &vectors, &mem);
    assert_eq!(vectors.config(), VIRTIO_MSI_NO_VECTOR);
    common.write(0x16, &1u16.to_le_bytes(), &vectors, &mem);
    common.write(0x1a, &0u16.to_le_bytes(), &vectors, &mem);
    assert_eq!(vectors.queue(1), 0);
    assert_eq!(vectors.queue(0), VIRTIO_MSI_NO_VECTOR);
    let mut data = [0u8; 2];
    common.read(0x1a, &mut data, 0, &vectors, false);
    assert_eq!(u16::from_le_bytes(data), 0);
    common.write(0x1a, &0x8000u16.to_le_bytes(), &vectors, &mem);
    assert_eq!(vectors.queue(1), VIRTIO_MSI_NO_VECTOR);
}

#[test]
fn reset_keeps_only_the_generation() {
    let mut common = CommonConfig::new(&[16, 8]);
    write(&mut common, 0x18, 4, 2);
    write(&mut common, 0x16, 1, 2);
    common.set_device_status(STATUS_ACKNOWLEDGE);
    common.bump_config_generation();
    common.reset();
    assert_eq!(read(&common, 0x15, 1), 1);
    assert_eq!(read(&common, 0x16, 2), 0);
    assert_eq!(read(&common, 0x18, 2), 16);
    assert_eq!(common.device_status(), 0);
    assert_eq!(common, {
        let mut fresh = CommonConfig::new(&[16, 8]);
        fresh.bump_config_generation();
        fresh
    });
}

#[test]
fn status_changes_follow_the_initialization_order() {
    const ACK: u8 = STATUS_ACKNOWLEDGE;
    const DRV: u8 = STATUS_DRIVER;
    const FOK: u8 = STATUS_FEATURES_OK;
    const DOK: u8 = STATUS_DRIVER_OK;
    assert_eq!(status_change(ACK | DRV, 0), StatusChange::Reset);
    assert_eq!(
        status_change(0, ACK),
        StatusChange::Advance {
            status: ACK,
            features_ok: false,
            driver_ok: false
        }
    );
    assert_eq!(
        status_change(ACK | DRV, ACK | DRV | FOK),
        StatusChange::Advance {
            status: ACK | DRV | FOK,
            features_ok: true,
            driver_ok: false
        }
    );
    assert_eq!(
        status_change(ACK | DRV | FOK, ACK | DRV | FOK | DOK),
        StatusChange::Advance {
            status: ACK | DRV | FOK | DOK,
            features_ok: false,
            driver_ok: true
        }
    );
    // DEVICE_NEEDS_RESET and unknown bits in the written value are ignored.
    assert_eq!(
        status_change(ACK, ACK | STATUS_NEEDS_RESET | 0x20),
        StatusChange::Advance {
            status: ACK,
            features_ok: false,
            driver_ok: false
        }
    );
    // FAILED can be set at any point.
    assert!(matches!(
        status_change(ACK, ACK | STATUS_FAILED),
        StatusChange::Advance { .. }
    ));
    for (old, written) in [
        (0, DRV),
        (ACK, ACK | FOK),
        (ACK | DRV, ACK | DRV | DOK),
        (ACK | DRV, ACK),
        (ACK | DRV | FOK | DOK, ACK | DRV | DOK),
        (0, STATUS_NEEDS_RESET | DRV),
    ] {
        assert!(
            matches!(status_change(old, written), StatusChange::Invalid(_)),
            "{old:#x} -> {written:#x}"
        );
    }
}
