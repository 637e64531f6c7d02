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
