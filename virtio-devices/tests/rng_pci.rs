//! virtio-rng behind the virtio-pci transport, driven the way a guest driver does: through BAR 0 and the
//! configuration space, with queues in guest memory and MSI-X interrupts.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pci::{MsiDelivery, PciCapabilityId, PciDevice, MSIX_ENABLE};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE};
use virtio_devices::{
    GuestMemoryMmap, Rng, RngSource, VirtioPciDevice, COMMON_FEATURES, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

const BAR: u64 = 0xc000_0000;

struct ChannelMsi(Mutex<Sender<(u16, u64, u32)>>);

impl MsiDelivery for ChannelMsi {
    fn deliver(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        let _ = self.0.lock().unwrap().send((vector, address, data));
        Ok(())
    }
    fn update_route(&self, _: u16, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

fn write(dev: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
    dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

fn read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    dev.read_bar(0, offset, &mut bytes[..len]);
    u64::from_le_bytes(bytes)
}

/// The deadline only guards against a hung test.
fn next_msi(rx: &Receiver<(u16, u64, u32)>) -> (u16, u64, u32) {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no MSI arrived")
}

/// The features the test driver accepts: all but VIRTIO_RING_F_EVENT_IDX, because the mock queue's used ring
/// overlaps the available ring's `used_event` word.
const DRIVER_FEATURES: u64 = COMMON_FEATURES & !(1 << VIRTIO_RING_F_EVENT_IDX);

/// Brings the device up with MSI-X (vector 0: config, vector 1: queue 0) and one 16-entry queue at 0.
fn bring_up(dev: &mut VirtioPciDevice, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    let msix = dev.config().find_capability(PciCapabilityId::MSIX).unwrap();
    dev.write_config_register(msix / 4, 2, &MSIX_ENABLE.to_le_bytes());
    for (vector, data) in [(0u64, 0x40u64), (1, 0x41)] {
        write(dev, MSIX_TABLE_OFFSET + vector * 16, 8, 0xfee0_0000);
        write(dev, MSIX_TABLE_OFFSET + vector * 16 + 8, 4, data);
        write(dev, MSIX_TABLE_OFFSET + vector * 16 + 12, 4, 0);
    }
    write(dev, 0x14, 1, 1);
    write(dev, 0x14, 1, 3);
    write(dev, 0x08, 4, 0);
    write(dev, 0x0c, 4, DRIVER_FEATURES & 0xffff_ffff);
    write(dev, 0x08, 4, 1);
    write(dev, 0x0c, 4, DRIVER_FEATURES >> 32);
    write(dev, 0x14, 1, 0xb);
    assert_eq!(read(dev, 0x14, 1), 0xb);
    write(dev, 0x10, 2, 0);
    write(dev, 0x16, 2, 0);
    write(dev, 0x18, 2, 16);
    write(dev, 0x1a, 2, 1);
    write(dev, 0x20, 8, vq.desc_table_addr().0);
    write(dev, 0x28, 8, vq.avail_addr().0);
    write(dev, 0x30, 8, vq.used_addr().0);
    write(dev, 0x1c, 2, 1);
    write(dev, 0x14, 1, 0xf);
    assert!(dev.is_active());
}

fn setup() -> (
    VirtioPciDevice,
    GuestMemoryAtomic<GuestMemoryMmap>,
    Receiver<(u16, u64, u32)>,
) {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    );
    let (tx, rx) = channel();
    let dev = VirtioPciDevice::new(
        Box::new(Rng::new(&RngSource::Getrandom).unwrap()),
        mem.clone(),
        BAR,
        Arc::new(ChannelMsi(Mutex::new(tx))),
        None,
    )
    .unwrap();
    (dev, mem, rx)
}

#[test]
fn a_driver_gets_random_bytes_and_an_msix_interrupt() {
    let (mut dev, mem, rx) = setup();
    assert_eq!(dev.config().device_id(), 0x1044);
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    bring_up(&mut dev, &vq);

    let events = dev.ioeventfds(BAR).unwrap();
    assert_eq!(events[0].1, BAR + NOTIFY_OFFSET);
    let buffer = RawDescriptor::from(Descriptor::new(
        0x10_0000,
        128,
        VRING_DESC_F_WRITE as u16,
        0,
    ));
    vq.add_desc_chains(&[buffer], 0).unwrap();
    // The doorbell through the BAR (the slow path); KVM would signal the same event directly.
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    assert_eq!(next_msi(&rx), (1, 0xfee0_0000, 0x41));
    assert_eq!(vq.used().idx().load(), 1);
    let used = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 128));
    let mut bytes = [0u8; 128];
    guard
        .read_slice(&mut bytes, GuestAddress(0x10_0000))
        .unwrap();
    assert!(bytes.iter().any(|byte| *byte != 0));

    // The fast path: the ioeventfd the VMM would register.
    vq.add_desc_chains(&[buffer], 1).unwrap();
    events[0].0.write(1).unwrap();
    assert_eq!(next_msi(&rx), (1, 0xfee0_0000, 0x41));
    assert_eq!(vq.used().idx().load(), 2);

    write(&mut dev, 0x14, 1, 0);
    assert!(!dev.is_active());
    assert_eq!(read(&mut dev, 0x14, 1), 0);
}

#[test]
fn a_corrupt_ring_asks_for_a_reset_through_the_config_vector() {
    let (mut dev, mem, rx) = setup();
    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    bring_up(&mut dev, &vq);
    // The driver claims 100 new chains in a 16-entry ring.
    vq.avail().idx().store(100);
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    assert_eq!(next_msi(&rx), (0, 0xfee0_0000, 0x40));
    assert_eq!(read(&mut dev, 0x14, 1), 0x4f);
    // The driver resets and starts over.
    write(&mut dev, 0x14, 1, 0);
    assert_eq!(read(&mut dev, 0x14, 1), 0);
    vq.avail().idx().store(0);
    vq.used().idx().store(0);
    bring_up(&mut dev, &vq);
    let buffer = RawDescriptor::from(Descriptor::new(0x10_0000, 8, VRING_DESC_F_WRITE as u16, 0));
    vq.add_desc_chains(&[buffer], 0).unwrap();
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    assert_eq!(next_msi(&rx), (1, 0xfee0_0000, 0x41));
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 8);
}
