//! Walking a descriptor chain safely.
//!
//! virtio-queue's [`DescriptorChain`] iterator stops silently when a chain loops, runs past the queue size or an
//! indirect table, overflows 4 GiB in total or points outside guest memory. A chain that stopped that way ends with
//! a descriptor that still has the NEXT flag; [`descriptors`] turns that into an error instead of serving a partial
//! chain.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;

use crate::device::GuestMemoryMmap;

/// A descriptor chain that cannot be served.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor could be read.
    #[error("the descriptor chain is empty or its head cannot be read; the driver must post valid descriptors")]
    Empty,
    /// The chain stopped before a descriptor without NEXT.
    #[error("the descriptor chain loops, exceeds the queue size, overflows 4 GiB or leaves guest memory")]
    Truncated,
}

/// All descriptors of a complete chain, in order (indirect tables expanded).
pub(crate) fn descriptors(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<Descriptor>, ChainError> {
    let descriptors: Vec<Descriptor> = chain.collect();
    match descriptors.last() {
        None => Err(ChainError::Empty),
        Some(last) if last.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(descriptors),
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestAddressSpace;

    use super::*;
    use crate::test_utils::{desc, guest_memory};

    fn walk(descs: &[virtio_queue::desc::RawDescriptor]) -> Result<Vec<Descriptor>, ChainError> {
        let mem = guest_memory();
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&*guard).unwrap().next().unwrap();
        descriptors(chain)
    }

    #[test]
    fn complete_chains_are_returned_in_order() {
        let descs = walk(&[
            desc(0x10_0000, 16, false, Some(1)),
            desc(0x20_0000, 1, true, None),
        ])
        .unwrap();
        assert_eq!(descs.len(), 2);
        assert_eq!(descs[0].addr().0, 0x10_0000);
        assert!(descs[1].is_write_only());
    }

    #[test]
    fn loops_and_runaway_chains_are_truncated() {
        // 0 -> 1 -> 0 -> ...
        let looping = walk(&[
            desc(0x10_0000, 16, false, Some(1)),
            desc(0x20_0000, 1, true, Some(0)),
        ]);
        assert_eq!(looping.unwrap_err(), ChainError::Truncated);
        // NEXT points past the queue size.
        let runaway = walk(&[desc(0x10_0000, 16, false, Some(40))]);
        assert_eq!(runaway.unwrap_err(), ChainError::Truncated);
        // More than 4 GiB in total.
        let huge = walk(&[
            desc(0x10_0000, u32::MAX, true, Some(1)),
            desc(0x20_0000, 2, true, None),
        ]);
        assert_eq!(huge.unwrap_err(), ChainError::Truncated);
    }

    #[test]
    fn an_unreadable_indirect_table_is_empty() {
        let indirect = virtio_queue::desc::RawDescriptor::from(Descriptor::new(
            0xffff_0000_0000,
            32,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        assert_eq!(walk(&[indirect]).unwrap_err(), ChainError::Empty);
        // A misaligned indirect table length.
        let bad_len = virtio_queue::desc::RawDescriptor::from(Descriptor::new(
            0x10_0000,
            17,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        assert_eq!(walk(&[bad_len]).unwrap_err(), ChainError::Empty);
    }
}
