use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pci::{PciCapabilityId, MSIX_ENABLE};
use virtio_queue::{Queue, QueueT};

use super::*;
use crate::device::{ActivateError, VirtioInterrupt};
use crate::test_utils::guest_memory;
use crate::transport::interrupt::VIRTIO_MSI_NO_VECTOR;

const BAR: u64 = 0x1_0000_0000;
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;
const ACK: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;

// Common configuration offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// What the mock device saw.
#[derive(Default)]
struct MockLog {
    activations: Mutex<Vec<Vec<(usize, u16, bool)>>>,
    resets: AtomicUsize,
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    acked: Mutex<u64>,
    config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

struct MockDevice {
    max_sizes: Vec<u16>,
    features: u64,
    acked: u64,
    fail_activation: bool,
    events: Option<Vec<(usize, EventFd)>>,
    log: Arc<MockLog>,
}

impl MockDevice {
    fn new(max_sizes: &[u16]) -> (Self, Arc<MockLog>) {
        let log = Arc::new(MockLog::default());
        (
            Self {
                max_sizes: max_sizes.to_vec(),
                features: FEATURES,
                acked: 0,
                fail_activation: false,
                events: None,
                log: log.clone(),
            },
            log,
        )
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Block
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        *self.log.acked.lock().unwrap() = features;
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&[0x11, 0x22, 0x33, 0x44, 0x55], offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .config_writes
            .lock()
            .unwrap()
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::BadQueues("mock refuses".into()));
        }
        self.log.activations.lock().unwrap().push(
            queues
                .iter()
                .map(|(index, queue, _)| (*index, queue.size(), queue.event_idx_enabled()))
                .collect(),
        );
        *self.log.interrupt.lock().unwrap() = Some(interrupt);
        self.events = Some(
            queues
                .into_iter()
                .map(|(index, _, event)| (index, event))
                .collect(),
        );
        Ok(())
    }
    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.log.resets.fetch_add(1, Ordering::Relaxed);
        self.events.take()
    }
}

#[derive(Default)]
struct MsiLog(Mutex<Vec<(u16, u64, u32)>>);

impl MsiDelivery for MsiLog {
    fn deliver(&self, vector: u16, address: u64, data: u32) -> io::Result<()> {
        self.0.lock().unwrap().push((vector, address, data));
        Ok(())
    }
    fn update_route(&self, _: u16, _: u64, _: u32, _: bool) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct IntxLog(Mutex<Vec<bool>>);

impl InterruptLine for IntxLog {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_level(&self, asserted: bool) -> io::Result<()> {
        self.0.lock().unwrap().push(asserted);
        Ok(())
    }
}

struct Harness {
    dev: VirtioPciDevice,
    log: Arc<MockLog>,
    msi: Arc<MsiLog>,
    intx: Arc<IntxLog>,
}

fn harness_with(device: MockDevice, log: Arc<MockLog>) -> Harness {
    let msi = Arc::new(MsiLog::default());
    let intx = Arc::new(IntxLog::default());
    let dev = VirtioPciDevice::new(
        Box::new(device),
        guest_memory(),
        BAR,
        msi.clone(),
        Some(intx.clone()),
    )
    .unwrap();
    Harness {
        dev,
        log,
        msi,
        intx,
    }
}

fn harness(max_sizes: &[u16]) -> Harness {
    let (device, log) = MockDevice::new(max_sizes);
    harness_with(device, log)
}

impl Harness {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = vec![0; len];
        self.dev.read_bar(0, offset, &mut data);
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&data);
        u64::from_le_bytes(bytes)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(DEVICE_STATUS, 1, status.into());
    }

    fn write_features(&mut self, features: u64) {
        self.write(DRIVER_FEATURE_SELECT, 4, 0);
        self.write(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.write(DRIVER_FEATURE_SELECT, 4, 1);
        self.write(DRIVER_FEATURE, 4, features >> 32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(ACK);
        self.set_status(ACK | DRIVER);
        self.write_features(features);
        self.set_status(ACK | DRIVER | FEATURES_OK);
        self.status()
    }

    fn setup_queue(&mut self, index: u16, size: u16, base: u64) {
        self.write(QUEUE_SELECT, 2, index.into());
        self.write(QUEUE_SIZE, 2, size.into());
        self.write(QUEUE_DESC, 8, base);
        self.write(QUEUE_DRIVER, 8, base + 0x1000);
        self.write(QUEUE_DEVICE, 8, base + 0x2000);
        self.write(QUEUE_ENABLE, 2, 1);
    }

    fn msix_cap_reg(&self) -> usize {
        self.dev
            .config()
            .find_capability(PciCapabilityId::MSIX)
            .unwrap()
            / 4
    }

    fn enable_msix(&mut self) {
        let reg = self.msix_cap_reg();
        self.dev
            .write_config_register(reg, 2, &MSIX_ENABLE.to_le_bytes());
    }

    fn program_vector(&mut self, vector: u64, address: u64, data: u32) {
        let entry = MSIX_TABLE_OFFSET + vector * 16;
        self.write(entry, 8, address);
        self.write(entry + 8, 4, data.into());
        self.write(entry + 12, 4, 0);
    }

    fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.log.interrupt.lock().unwrap().clone().unwrap()
    }
}

/// The virtio capabilities as (cfg_type, bar, offset, length, extra dword).
fn virtio_caps(config: &PciConfiguration) -> Vec<(u8, u8, u32, u32, u32)> {
    let dword = |offset: usize| config.read_reg(offset / 4);
    config
        .capabilities()
        .into_iter()
        .filter(|(id, _)| *id == PciCapabilityId::VENDOR_SPECIFIC)
        .map(|(_, offset)| {
            let cap_len = config.byte(offset + 2);
            let extra = if cap_len > 16 { dword(offset + 16) } else { 0 };
            (
                config.byte(offset + 3),
                config.byte(offset + 4),
                dword(offset + 8),
                dword(offset + 12),
                extra,
            )
        })
        .collect()
}

#[test]
fn identity_and_capabilities_describe_a_modern_virtio_device() {
    let h = harness(&[16, 16]);
    let config = h.dev.config();
    assert_eq!(config.vendor_id(), 0x1af4);
    assert_eq!(config.device_id(), 0x1042);
    assert_eq!(config.read_reg(2) & 0xff, 1, "revision 1");
    assert_eq!(config.read_reg(11), 0x0040_1af4);
    assert_eq!(config.interrupt_pin(), 1);
    let bar = config.bar_region(0).unwrap();
    assert_eq!((bar.base, bar.len), (BAR, VIRTIO_PCI_BAR_SIZE));
    assert!(bar.region_type.is_64bit());
    assert_eq!(
        virtio_caps(config),
        vec![
            (1, 0, 0x0000, 0x38, 0),
            (3, 0, 0x1000, 1, 0),
            (4, 0, 0x2000, 0x1000, 0),
            (2, 0, 0x3000, 8, 4),
            (5, 0, 0, 0, 0),
        ]
    );
    let msix = config.find_capability(PciCapabilityId::MSIX).unwrap();
    // Three vectors (N-1 encoded), table and PBA in BAR 0.
    assert_eq!(config.read_reg(msix / 4) >> 16, 2);
    assert_eq!(config.read_reg(msix / 4 + 1), 0x4000);
    assert_eq!(config.read_reg(msix / 4 + 2), 0x5000);
}

#[test]
fn invalid_devices_are_refused() {
    let build = |device: MockDevice| {
        VirtioPciDevice::new(
            Box::new(device),
            guest_memory(),
            BAR,
            Arc::new(MsiLog::default()),
            None,
        )
    };
    let (device, _) = MockDevice::new(&[]);
    assert!(matches!(build(device), Err(VirtioPciError::QueueCount(0))));
    let (device, _) = MockDevice::new(&vec![16; MAX_QUEUES + 1]);
    assert!(matches!(build(device), Err(VirtioPciError::QueueCount(_))));
    let (device, _) = MockDevice::new(&[16, 12]);
    assert!(matches!(
        build(device),
        Err(VirtioPciError::QueueSize { index: 1, size: 12 })
    ));
    let (mut device, _) = MockDevice::new(&[16]);
    device.features = 1;
    assert!(matches!(build(device), Err(VirtioPciError::NotModern)));
    let (device, _) = MockDevice::new(&[16]);
    assert!(matches!(
        VirtioPciDevice::new(
            Box::new(device),
            guest_memory(),
            0x1234,
            Arc::new(MsiLog::default()),
            None
        ),
        Err(VirtioPciError::Configuration(_))
    ));
    let (device, _) = MockDevice::new(&vec![16; MAX_QUEUES]);
    let dev = build(device).unwrap();
    assert_eq!(dev.config().interrupt_pin(), 0);
}

#[test]
fn features_are_negotiated_through_the_select_registers() {
    let mut h = harness(&[16]);
    h.write(DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(h.read(DEVICE_FEATURE, 4), FEATURES & 0xffff_ffff);
    h.write(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(h.read(DEVICE_FEATURE, 4), FEATURES >> 32);
    h.write(DEVICE_FEATURE_SELECT, 4, 2);
    assert_eq!(h.read(DEVICE_FEATURE, 4), 0);
    let wanted = (1 << VIRTIO_F_VERSION_1) | 0b100;
    assert_eq!(h.negotiate(wanted), ACK | DRIVER | FEATURES_OK);
    assert_eq!(*h.log.acked.lock().unwrap(), wanted);
    assert_eq!(h.dev.state().device.acked_features, wanted);
}

#[test]
fn features_ok_is_refused_without_version_1_or_with_unoffered_bits() {
    let mut h = harness(&[16]);
    assert_eq!(h.negotiate(0b1), ACK | DRIVER);
    assert_eq!(*h.log.acked.lock().unwrap(), 0);
    // The driver cannot go on to DRIVER_OK either.
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(h.status(), ACK | DRIVER);
    assert!(!h.dev.is_active());

    let mut h = harness(&[16]);
    assert_eq!(h.negotiate((1 << VIRTIO_F_VERSION_1) | 0b10), ACK | DRIVER);
    // Once it fixes its features it can proceed.
    h.write_features(1 << VIRTIO_F_VERSION_1);
    h.set_status(ACK | DRIVER | FEATURES_OK);
    assert_eq!(h.status(), ACK | DRIVER | FEATURES_OK);
}

#[test]
fn out_of_order_status_writes_are_ignored() {
    let mut h = harness(&[16]);
    h.set_status(DRIVER);
    assert_eq!(h.status(), 0);
    h.set_status(ACK);
    h.set_status(ACK | FEATURES_OK);
    assert_eq!(h.status(), ACK);
    h.set_status(ACK | DRIVER);
    h.set_status(ACK | DRIVER | DRIVER_OK);
    assert_eq!(h.status(), ACK | DRIVER);
    h.set_status(ACK);
    assert_eq!(h.status(), ACK | DRIVER);
    assert!(h.log.activations.lock().unwrap().is_empty());
}

#[test]
fn driver_ok_activates_the_enabled_queues() {
    let mut h = harness(&[16, 32, 8]);
    h.negotiate(FEATURES);
    h.setup_queue(0, 8, 0x10_0000);
    h.setup_queue(2, 8, 0x20_0000);
    assert!(!h.dev.is_active());
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(h.dev.is_active());
    assert_eq!(h.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        *h.log.activations.lock().unwrap(),
        vec![vec![(0, 8, true), (2, 8, true)]]
    );
    // Writing DRIVER_OK again does not activate twice.
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(h.log.activations.lock().unwrap().len(), 1);
    // Queue registers are frozen now.
    h.write(QUEUE_SELECT, 2, 1);
    h.write(QUEUE_SIZE, 2, 4);
    assert_eq!(h.read(QUEUE_SIZE, 2), 32);
}

#[test]
fn event_idx_follows_the_negotiated_features() {
    let mut h = harness(&[16]);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        *h.log.activations.lock().unwrap(),
        vec![vec![(0, 16, false)]]
    );
}

#[test]
fn writing_zero_resets_device_queues_and_vectors() {
    let mut h = harness(&[16, 16]);
    h.negotiate(FEATURES);
    h.write(MSIX_CONFIG, 2, 0);
    h.setup_queue(1, 4, 0x10_0000);
    h.write(QUEUE_MSIX_VECTOR, 2, 2);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(h.dev.is_active());
    h.set_status(0);
    assert!(!h.dev.is_active());
    assert_eq!(h.log.resets.load(Ordering::Relaxed), 1);
    assert_eq!(*h.log.acked.lock().unwrap(), 0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.read(MSIX_CONFIG, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    h.write(QUEUE_SELECT, 2, 1);
    assert_eq!(h.read(QUEUE_SIZE, 2), 16);
    assert_eq!(h.read(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.read(QUEUE_DESC, 8), 0);
    assert_eq!(
        h.read(QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    h.write(DRIVER_FEATURE_SELECT, 4, 0);
    assert_eq!(h.read(DRIVER_FEATURE, 4), 0);
    // A new negotiation works.
    assert_eq!(h.negotiate(FEATURES), ACK | DRIVER | FEATURES_OK);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(h.log.activations.lock().unwrap().len(), 2);
}

#[test]
fn invalid_queue_configuration_sets_needs_reset() {
    let mut h = harness(&[16]);
    h.negotiate(FEATURES);
    h.write(QUEUE_SIZE, 2, 5);
    assert_eq!(h.status(), ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    assert_eq!(h.read(QUEUE_SIZE, 2), 16);
    // The bit survives status writes and clears only on reset.
    h.set_status(ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
    h.set_status(0);
    assert_eq!(h.status(), 0);

    // A queue with rings outside guest memory is not enabled.
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0xf000_0000);
    assert_eq!(h.read(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
    // No interrupt before DRIVER_OK.
    assert!(h.msi.0.lock().unwrap().is_empty());
    assert!(h.intx.0.lock().unwrap().is_empty());
}

#[test]
fn a_failed_activation_sets_needs_reset_and_tells_the_driver() {
    let (mut device, log) = MockDevice::new(&[16]);
    device.fail_activation = true;
    let mut h = harness_with(device, log);
    h.enable_msix();
    h.program_vector(0, 0xfee0_0000, 0x41);
    h.write(MSIX_CONFIG, 2, 0);
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!h.dev.is_active());
    assert_eq!(
        h.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    assert_eq!(*h.msi.0.lock().unwrap(), vec![(0, 0xfee0_0000, 0x41)]);
}

#[test]
fn queue_and_config_interrupts_use_their_msix_vectors() {
    let mut h = harness(&[16, 16]);
    h.enable_msix();
    h.program_vector(0, 0xfee0_0000, 0x30);
    h.program_vector(1, 0xfee0_1000, 0x31);
    h.program_vector(2, 0xfee0_2000, 0x32);
    h.negotiate(FEATURES);
    h.write(MSIX_CONFIG, 2, 2);
    assert_eq!(h.read(MSIX_CONFIG, 2), 2);
    h.write(MSIX_CONFIG, 2, 3);
    assert_eq!(h.read(MSIX_CONFIG, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    h.write(MSIX_CONFIG, 2, 2);
    h.setup_queue(0, 16, 0x10_0000);
    h.write(QUEUE_MSIX_VECTOR, 2, 1);
    h.setup_queue(1, 16, 0x20_0000);
    h.write(QUEUE_MSIX_VECTOR, 2, 0);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let interrupt = h.interrupt();
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
    interrupt.trigger(VirtioInterruptType::Config).unwrap();
    // A queue that does not exist has no vector.
    interrupt.trigger(VirtioInterruptType::Queue(7)).unwrap();
    assert_eq!(
        *h.msi.0.lock().unwrap(),
        vec![
            (1, 0xfee0_1000, 0x31),
            (0, 0xfee0_0000, 0x30),
            (2, 0xfee0_2000, 0x32)
        ]
    );
    // With MSI-X on, INTx stays quiet; only the configuration bit reaches the ISR.
    assert!(h.intx.0.lock().unwrap().is_empty());
    assert_eq!(h.read(ISR_OFFSET, 1), 2);
    // A masked vector is held pending and sent on unmask.
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(h.msi.0.lock().unwrap().len(), 3);
    assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0b10);
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(h.msi.0.lock().unwrap().len(), 4);
    // A source without a vector raises nothing.
    h.write(QUEUE_SELECT, 2, 0);
    h.write(QUEUE_MSIX_VECTOR, 2, u64::from(VIRTIO_MSI_NO_VECTOR));
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(h.msi.0.lock().unwrap().len(), 4);
}

#[test]
fn without_msix_interrupts_set_the_isr_and_hold_intx_until_it_is_read() {
    let mut h = harness(&[16]);
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let interrupt = h.interrupt();
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    interrupt.trigger(VirtioInterruptType::Config).unwrap();
    // The line is a level: asserted once, held for both causes.
    assert_eq!(*h.intx.0.lock().unwrap(), vec![true]);
    assert_eq!(h.read(ISR_OFFSET, 1), 3);
    assert_eq!(*h.intx.0.lock().unwrap(), vec![true, false]);
    // Read to clear.
    assert_eq!(h.read(ISR_OFFSET, 1), 0);
    assert_eq!(h.intx.0.lock().unwrap().len(), 2);
    assert!(h.msi.0.lock().unwrap().is_empty());
}

impl Harness {
    fn write_command(&mut self, command: u16) {
        self.dev
            .write_config_register(COMMAND_STATUS_REG, 0, &command.to_le_bytes());
    }

    fn intx_levels(&self) -> Vec<bool> {
        std::mem::take(&mut *self.intx.0.lock().unwrap())
    }
}

#[test]
fn the_interrupt_disable_bit_keeps_intx_released_until_cleared() {
    let mut h = harness(&[16]);
    assert_eq!(h.dev.config().interrupt_pin(), 1, "INTA#");
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let interrupt = h.interrupt();
    h.write_command(COMMAND_INTERRUPT_DISABLE | 0x6);
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert!(h.intx_levels().is_empty(), "asserted while disabled");
    // Clearing the bit with the interrupt still pending asserts the line; setting it again releases it.
    h.write_command(0x6);
    assert_eq!(h.intx_levels(), [true]);
    h.write_command(COMMAND_INTERRUPT_DISABLE | 0x6);
    assert_eq!(h.intx_levels(), [false]);
    // The ISR still tells the driver; reading it clears the pending interrupt, so re-enabling asserts nothing.
    assert_eq!(h.read(ISR_OFFSET, 1), 1);
    h.write_command(0x6);
    assert!(h.intx_levels().is_empty());
    interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(h.intx_levels(), [true]);
    // A device reset releases the line.
    h.set_status(0);
    assert_eq!(h.intx_levels(), [false]);
    assert_eq!(h.read(ISR_OFFSET, 1), 0);
}

#[test]
fn enabling_msix_releases_a_pending_intx() {
    let mut h = harness(&[16]);
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    h.interrupt()
        .trigger(VirtioInterruptType::Queue(0))
        .unwrap();
    assert_eq!(h.intx_levels(), [true]);
    h.enable_msix();
    assert_eq!(h.intx_levels(), [false]);
    let reg = h.msix_cap_reg();
    h.dev.write_config_register(reg, 2, &0u16.to_le_bytes());
    assert_eq!(h.intx_levels(), [true]);
}

#[test]
fn without_an_intx_line_the_function_has_no_interrupt_pin() {
    let (device, _log) = MockDevice::new(&[16]);
    let msi = Arc::new(MsiLog::default());
    let dev = VirtioPciDevice::new(Box::new(device), guest_memory(), BAR, msi, None).unwrap();
    assert_eq!(dev.config().interrupt_pin(), 0);
}

#[test]
fn a_device_asking_for_reset_sets_the_status_bit_and_interrupts() {
    let mut h = harness(&[16]);
    h.negotiate(FEATURES);
    h.setup_queue(0, 16, 0x10_0000);
    h.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    h.interrupt().set_needs_reset();
    assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(h.read(ISR_OFFSET, 1), 2);
    h.set_status(0);
    assert_eq!(h.status(), 0);
}

#[test]
fn doorbells_signal_the_queue_events() {
    let mut h = harness(&[16, 16, 16]);
    let events = h.dev.ioeventfds(0xd000_0000).unwrap();
    let addresses: Vec<u64> = events.iter().map(|(_, addr)| *addr).collect();
    assert_eq!(addresses, vec![0xd000_3000, 0xd000_3004, 0xd000_3008]);
    h.write(QUEUE_SELECT, 2, 2);
    assert_eq!(h.read(QUEUE_NOTIFY_OFF, 2), 2);
    h.write(NOTIFY_OFFSET + 8, 2, 2);
    h.write(NOTIFY_OFFSET + 8, 4, 2);
    assert_eq!(events[2].0.read().unwrap(), 2);
    // Misaligned doorbells and doorbells of queues that do not exist are dropped.
    h.write(NOTIFY_OFFSET + 2, 2, 0);
    h.write(NOTIFY_OFFSET + 12, 2, 3);
    h.write(NOTIFY_OFFSET + 0xffc, 4, 3);
    for (event, _) in &events {
        assert!(event.read().is_err(), "no pending notification");
    }
    // Doorbells read as zero.
    assert_eq!(h.read(NOTIFY_OFFSET, 2), 0);
}

#[test]
fn reset_drops_stale_notifications() {
    let mut h = harness(&[16]);
    let events = h.dev.ioeventfds(BAR).unwrap();
    h.write(NOTIFY_OFFSET, 2, 0);
    h.set_status(0);
    assert!(events[0].0.read().is_err());
}

#[test]
fn device_config_goes_to_the_device_and_generation_counts_changes() {
    let mut h = harness(&[16]);
    assert_eq!(h.read(DEVICE_CONFIG_OFFSET, 4), 0x4433_2211);
    assert_eq!(h.read(DEVICE_CONFIG_OFFSET + 4, 2), 0x55);
    h.write(DEVICE_CONFIG_OFFSET + 1, 1, 0x99);
    assert_eq!(*h.log.config_writes.lock().unwrap(), vec![(1, vec![0x99])]);
    assert_eq!(h.read(CONFIG_GENERATION, 1), 0);
    h.dev.config_changed();
    assert_eq!(h.read(CONFIG_GENERATION, 1), 1);
    // Before DRIVER_OK there is nobody to interrupt.
    assert!(h.intx.0.lock().unwrap().is_empty());
    assert_eq!(h.read(NUM_QUEUES, 2), 1);
}

#[test]
fn the_pci_configuration_window_reaches_the_bar() {
    let mut h = harness(&[16]);
    let cap = h
        .dev
        .config()
        .capabilities()
        .into_iter()
        .filter(|(id, _)| *id == PciCapabilityId::VENDOR_SPECIFIC)
        .map(|(_, offset)| offset)
        .find(|offset| h.dev.config().byte(offset + 3) == 5)
        .unwrap();
    let reg = cap / 4;
    // Write the status register (1 byte at 0x14) through the window.
    h.dev
        .write_config_register(reg + 2, 0, &(DEVICE_STATUS as u32).to_le_bytes());
    h.dev.write_config_register(reg + 3, 0, &1u32.to_le_bytes());
    h.dev.write_config_register(reg + 4, 0, &[ACK]);
    assert_eq!(h.status(), ACK);
    assert_eq!(h.dev.read_config_register(reg + 4) & 0xff, u32::from(ACK));
    // Read num_queues (2 bytes).
    h.dev
        .write_config_register(reg + 2, 0, &(NUM_QUEUES as u32).to_le_bytes());
    h.dev.write_config_register(reg + 3, 0, &2u32.to_le_bytes());
    assert_eq!(h.dev.read_config_register(reg + 4), 1);
    // An invalid length or a BAR other than 0 does nothing.
    h.dev
        .write_config_register(reg + 2, 0, &(DEVICE_STATUS as u32).to_le_bytes());
    h.dev.write_config_register(reg + 3, 0, &3u32.to_le_bytes());
    h.dev.write_config_register(reg + 4, 0, &[0]);
    assert_eq!(h.status(), ACK);
    h.dev.write_config_register(reg + 3, 0, &1u32.to_le_bytes());
    h.dev.write_config_register(reg + 1, 0, &[2, 0, 0, 0]);
    assert_eq!(h.dev.config().byte(cap + 4), 2);
    h.dev.write_config_register(reg + 4, 0, &[0]);
    assert_eq!(h.status(), ACK);
}

#[test]
fn msix_control_writes_reach_the_table() {
    let mut h = harness(&[16]);
    h.program_vector(1, 0xfee0_0000, 0x55);
    assert_eq!(h.read(MSIX_TABLE_OFFSET + 16, 4), 0xfee0_0000);
    assert_eq!(h.read(MSIX_TABLE_OFFSET + 24, 4), 0x55);
    h.enable_msix();
    assert!(lock_msix(&h.dev.msix).enabled());
    let state = h.dev.state();
    let json = serde_json::to_string(&state).unwrap();
    let back: VirtioPciDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
}

#[test]
fn hostile_bar_and_config_accesses_do_not_panic() {
    let mut h = harness(&[16, 8]);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let choice = next();
        let offset = match choice % 5 {
            0 => next() % 0x40,
            1 => next() % VIRTIO_PCI_BAR_SIZE,
            2 => next(),
            3 => {
                COMMON_CONFIG_OFFSET
                    + [0x14, 0x16, 0x18, 0x1c, 0x20, 0x28, 0x30][(next() % 7) as usize]
            }
            _ => NOTIFY_OFFSET + next() % 0x20,
        };
        let len = [0usize, 1, 2, 3, 4, 8, 16][(next() % 7) as usize];
        let value = next().to_le_bytes().repeat(2);
        if choice & 0x100 == 0 {
            h.dev
                .write_bar((next() % 3) as usize, offset, &value[..len]);
        } else {
            let mut data = vec![0; len];
            h.dev.read_bar((next() % 3) as usize, offset, &mut data);
        }
        if choice % 97 == 0 {
            let reg = (next() % 80) as usize;
            h.dev
                .write_config_register(reg, next() % 4, &value[..len.min(4)]);
            h.dev.read_config_register(reg);
        }
    }
    // The identity survived.
    assert_eq!(h.dev.config().vendor_id(), 0x1af4);
    assert_eq!(h.dev.config().device_id(), 0x1042);
}
