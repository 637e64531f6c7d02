//! The driver side of a split virtqueue, for device tests that post many chains over time (virtio-queue's mock
//! queue places its used ring over the end of its available ring, which is fine for a handful of chains only).

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::device::GuestMemory;

/// A buffer of a chain: (guest address, length, device-writable).
pub(crate) type Buf = (u64, u32, bool);

/// A split virtqueue whose rings live at a given guest address, driven like a driver would.
pub(crate) struct DriverQueue {
    mem: GuestMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// Rings for a queue of `size` entries starting at `base` (descriptor table, then the available ring, then
    /// the used ring), all zeroed.
    pub(crate) fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        let zeroes = vec![0u8; (end - base) as usize];
        mem.memory()
            .write_slice(&zeroes, GuestAddress(base))
            .unwrap();
        Self {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's view of the queue, ready.
    pub(crate) fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// Writes a chain of `bufs` into the descriptor table (wrapping around it) and makes it available. Returns
    /// its head index.
    pub(crate) fn add(&mut self, bufs: &[Buf]) -> u16 {
        let mem = self.mem.memory();
        let head = self.next_desc;
        for (i, (addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = 0u16;
            if *writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&self.next_desc.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(index)))
                .unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The used ring's index.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mem
            .memory()
            .read_obj(GuestAddress(self.used + 2))
            .unwrap()
    }

    /// Used element `n` (counting from the start): (head, length).
    pub(crate) fn used(&self, n: u16) -> (u32, u32) {
        let slot = u64::from(n % self.size);
        let mem = self.mem.memory();
        let addr = self.used + 4 + 8 * slot;
        (
            mem.read_obj(GuestAddress(addr)).unwrap(),
            mem.read_obj(GuestAddress(addr + 4)).unwrap(),
        )
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub(crate) fn used_flags(&self) -> u16 {
        self.mem.memory().read_obj(GuestAddress(self.used)).unwrap()
    }

    /// `avail_event`, written by the device with VIRTIO_F_EVENT_IDX.
    pub(crate) fn avail_event(&self) -> u16 {
        let addr = self.used + 4 + 8 * u64::from(self.size);
        self.mem.memory().read_obj(GuestAddress(addr)).unwrap()
    }
}
