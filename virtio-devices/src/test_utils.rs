//! Helpers shared by the unit tests: guest memory, descriptors and an interrupt recorder.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{GuestAddress, GuestMemoryAtomic};

use crate::device::{GuestMemory, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Size of the test guest's memory.
pub(crate) const MEM_SIZE: usize = 0x100_0000;

/// A guest with `MEM_SIZE` bytes of RAM at 0.
pub(crate) fn guest_memory() -> GuestMemory {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// A descriptor that continues to `next`.
pub(crate) fn desc(addr: u64, len: u32, writable: bool, next: Option<u16>) -> RawDescriptor {
    let mut flags = 0;
    if writable {
        flags |= VRING_DESC_F_WRITE;
    }
    if next.is_some() {
        flags |= VRING_DESC_F_NEXT;
    }
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        flags as u16,
        next.unwrap_or(0),
    ))
}

/// What a device reported through its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reported {
    Interrupt(VirtioInterruptType),
    NeedsReset,
}

/// A [`VirtioInterrupt`] that forwards everything to a channel.
pub(crate) struct RecordingInterrupt(Mutex<Sender<Reported>>);

impl RecordingInterrupt {
    pub(crate) fn new() -> (Self, Receiver<Reported>) {
        let (tx, rx) = channel();
        (Self(Mutex::new(tx)), rx)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let _ = self.0.lock().unwrap().send(Reported::Interrupt(kind));
        Ok(())
    }

    fn set_needs_reset(&self) {
        let _ = self.0.lock().unwrap().send(Reported::NeedsReset);
    }
}

/// Waits for the next report from a device thread. The deadline only guards against a hung test.
pub(crate) fn next_report(rx: &Receiver<Reported>) -> Reported {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the device thread reported nothing")
}

/// xorshift64: small, deterministic, no extra crates.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// One of `choices`.
    pub(crate) fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[(self.next() % choices.len() as u64) as usize]
    }
}

/// Fills a 16-entry queue with random descriptors (loops, indirect tables, addresses in and far outside RAM, odd
/// lengths, both directions) and random available-ring heads. Buffers mostly land in `0x10_0000..0x10_4000`.
pub(crate) fn hostile_queue(
    vq: &virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>,
    rng: &mut XorShift,
) {
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;

    for index in 0..16u16 {
        let addr = match rng.next() % 6 {
            0 => rng.next(),
            1 => MEM_SIZE as u64 - rng.next() % 64,
            _ => 0x10_0000 + rng.next() % 0x4000,
        };
        let len = rng.pick(&[0u32, 1, 8, 15, 16, 17, 512, 513, 1024, 4096, u32::MAX]);
        let mut flags = 0u16;
        if !rng.next().is_multiple_of(3) {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if rng.next().is_multiple_of(2) {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if rng.next().is_multiple_of(10) {
            flags |= VRING_DESC_F_INDIRECT as u16;
        }
        let next = (rng.next() % 20) as u16;
        vq.desc_table()
            .store(
                index,
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }
    let count = 1 + rng.next() % 4;
    for slot in 0..count {
        let head = (rng.next() % 18) as u16;
        vq.avail().ring().ref_at(slot as usize).unwrap().store(head);
    }
    vq.avail().idx().store(count as u16);
}
