//! virtio-blk behind the virtio-pci transport: a guest-driver-style write then read of a raw image, checked on the
//! host, with INTx/ISR interrupts (MSI-X left off).

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::InterruptLine;
use pci::{MsiDelivery, PciDevice};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_devices::{
    Block, BlockOptions, GuestMemoryMmap, RawFile, VirtioPciDevice, DEVICE_CONFIG_OFFSET,
    ISR_OFFSET, NOTIFY_OFFSET,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

struct NoMsi;

impl MsiDelivery for NoMsi {
    fn deliver(&self, _: u16, _: u64, _: u32) -> std::io::Result<()> {
        panic!("MSI-X is disabled in this test");
    }
    fn update_route(&self, _: u16, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// INTx as an event the test can block on.
struct EventLine(EventFd, Mutex<bool>);

impl InterruptLine for EventLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        *self.1.lock().unwrap() = asserted;
        if asserted {
            self.0.write(1)?;
        }
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

/// A three-descriptor request whose descriptors sit at table indices `first`, `first + 1` and `first + 2`.
fn chain(
    request_type: u32,
    sector: u64,
    data_len: u32,
    first: u16,
    mem: &GuestMemoryMmap,
) -> [RawDescriptor; 3] {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(0x10_0000)).unwrap();
    let data_flags = if request_type == VIRTIO_BLK_T_IN {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    [
        RawDescriptor::from(Descriptor::new(
            0x10_0000,
            16,
            VRING_DESC_F_NEXT as u16,
            first + 1,
        )),
        RawDescriptor::from(Descriptor::new(
            0x20_0000,
            data_len,
            (data_flags | VRING_DESC_F_NEXT) as u16,
            first + 2,
        )),
        RawDescriptor::from(Descriptor::new(0x30_0000, 1, VRING_DESC_F_WRITE as u16, 0)),
    ]
}

#[test]
fn a_driver_writes_and_reads_back_a_raw_image() {
    let image = TempFile::new().unwrap();
    image.as_file().write_all(&vec![0u8; 1 << 20]).unwrap();
    let disk = Arc::new(RawFile::open(image.as_path(), false).unwrap());
    let block = Block::new(
        disk,
        &BlockOptions {
            serial: "e2e".into(),
            ..BlockOptions::default()
        },
    )
    .unwrap();
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    );
    let line = Arc::new(EventLine(EventFd::new(0).unwrap(), Mutex::new(false)));
    let mut dev = VirtioPciDevice::new(
        Box::new(block),
        mem.clone(),
        0xc000_0000,
        Arc::new(NoMsi),
        Some(line.clone()),
    )
    .unwrap();
    assert_eq!(dev.config().device_id(), 0x1042);
    // Capacity: 2048 sectors.
    assert_eq!(read(&mut dev, DEVICE_CONFIG_OFFSET, 8), 2048);

    let guard = mem.memory();
    let vq = MockSplitQueue::new(&*guard, 16);
    let features = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
    write(&mut dev, 0x14, 1, 1);
    write(&mut dev, 0x14, 1, 3);
    write(&mut dev, 0x08, 4, 0);
    write(&mut dev, 0x0c, 4, features & 0xffff_ffff);
    write(&mut dev, 0x08, 4, 1);
    write(&mut dev, 0x0c, 4, features >> 32);
    write(&mut dev, 0x14, 1, 0xb);
    assert_eq!(read(&mut dev, 0x14, 1), 0xb);
    write(&mut dev, 0x16, 2, 0);
    write(&mut dev, 0x18, 2, 16);
    write(&mut dev, 0x20, 8, vq.desc_table_addr().0);
    write(&mut dev, 0x28, 8, vq.avail_addr().0);
    write(&mut dev, 0x30, 8, vq.used_addr().0);
    write(&mut dev, 0x1c, 2, 1);
    write(&mut dev, 0x14, 1, 0xf);
    assert!(dev.is_active());

    // Write 4 KiB at sector 100.
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    guard.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
    vq.add_desc_chains(&chain(VIRTIO_BLK_T_OUT, 100, 4096, 0, &guard), 0)
        .unwrap();
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    line.0.read().unwrap();
    assert!(*line.1.lock().unwrap());
    assert_eq!(read(&mut dev, ISR_OFFSET, 1), 1);
    assert!(!*line.1.lock().unwrap(), "reading the ISR releases INTx");
    assert_eq!(guard.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    let host = std::fs::read(image.as_path()).unwrap();
    assert!(
        host[51200..51200 + 4096] == data[..],
        "the write reached the image"
    );

    // Read it back into a cleared buffer.
    guard
        .write_slice(&[0u8; 4096], GuestAddress(0x20_0000))
        .unwrap();
    vq.add_desc_chains(&chain(VIRTIO_BLK_T_IN, 100, 4096, 3, &guard), 3)
        .unwrap();
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    line.0.read().unwrap();
    assert_eq!(read(&mut dev, ISR_OFFSET, 1), 1);
    let mut back = vec![0u8; 4096];
    guard
        .read_slice(&mut back, GuestAddress(0x20_0000))
        .unwrap();
    assert!(back == data, "the read returned what was written");
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 4097);

    write(&mut dev, 0x14, 1, 0);
    assert!(!dev.is_active());
}
