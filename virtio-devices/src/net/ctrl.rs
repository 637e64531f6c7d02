//! The control queue. The only command served is VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (with VIRTIO_NET_F_MQ): it
//! attaches the tap queues of the pairs now in use and detaches the others, so the kernel only steers frames to
//! queues the driver reads. Every other command is answered VIRTIO_NET_ERR.
//!
//! A command chain is driver-readable bytes (class, command, data) followed by a device-writable ack byte. A
//! malformed chain gets a used length of 0 and no ack.

use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::{descriptors, ChainError};
use crate::device::GuestMemoryMmap;
use crate::tap::{Tap, TapError};
use crate::worker::ChainHandler;

/// Longest command accepted (class, command and data).
const MAX_COMMAND_LEN: usize = 64;

/// Why a control chain is refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub(super) enum CtrlError {
    /// The chain itself is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Readable and writable descriptors are out of order, or the ack byte is missing.
    #[error("a control chain must be readable command bytes followed by a writable ack byte")]
    Layout,
    /// The command is shorter than its class and command bytes, or too long.
    #[error("a control command of {0} bytes is malformed")]
    Length(usize),
    /// A descriptor points outside guest memory.
    #[error("a control buffer is outside guest memory")]
    OutsideMemory,
}

/// A parsed control chain: the command bytes and where the ack goes.
fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<(Vec<u8>, GuestAddress), CtrlError> {
    let descs = descriptors(chain)?;
    let split = descs
        .iter()
        .position(|desc| desc.is_write_only())
        .ok_or(CtrlError::Layout)?;
    let (readable, writable) = descs.split_at(split);
    if writable.iter().any(|desc| !desc.is_write_only()) || writable[0].len() == 0 {
        return Err(CtrlError::Layout);
    }
    let total: u64 = readable.iter().map(|desc| u64::from(desc.len())).sum();
    if !(2..=MAX_COMMAND_LEN as u64).contains(&total) {
        return Err(CtrlError::Length(
            usize::try_from(total).unwrap_or(usize::MAX),
        ));
    }
    // Lossless: at most MAX_COMMAND_LEN.
    let mut command = Vec::with_capacity(total as usize);
    for desc in readable {
        let start = command.len();
        command.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut command[start..], desc.addr())
            .map_err(|_| CtrlError::OutsideMemory)?;
    }
    let ack = writable[0].addr();
    if !mem.check_range(ack, 1) {
        return Err(CtrlError::OutsideMemory);
    }
    Ok((command, ack))
}

/// Attaches the tap queues of the first `pairs` pairs and detaches the rest.
pub(super) fn set_active_pairs(taps: &[Arc<Tap>], pairs: usize) -> Result<(), TapError> {
    if taps.len() < 2 {
        return Ok(());
    }
    // Attach first so the interface always has a queue.
    for tap in &taps[..pairs.min(taps.len())] {
        tap.set_queue_enabled(true)?;
    }
    for tap in taps.iter().skip(pairs) {
        tap.set_queue_enabled(false)?;
    }
    Ok(())
}

/// Serves the control queue.
pub(super) struct CtrlHandler {
    taps: Vec<Arc<Tap>>,
    /// VIRTIO_NET_F_MQ was negotiated.
    mq: bool,
    active_pairs: usize,
}

impl CtrlHandler {
    /// A handler for a device whose first pair alone is in use.
    pub(super) fn new(taps: Vec<Arc<Tap>>, mq: bool) -> Self {
        Self {
            taps,
            mq,
            active_pairs: 1,
        }
    }

    /// The pairs in use.
    pub(super) fn active_pairs(&self) -> usize {
        self.active_pairs
    }

    fn execute(&mut self, command: &[u8]) -> u32 {
        let (class, cmd, data) = (u32::from(command[0]), u32::from(command[1]), &command[2..]);
        if !(self.mq && class == VIRTIO_NET_CTRL_MQ && cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) {
            tracing::debug!(class, cmd, "unsupported virtio-net control command");
            return VIRTIO_NET_ERR;
        }
        let Ok(raw) = <[u8; 2]>::try_from(data) else {
            tracing::debug!(len = data.len(), "malformed VQ_PAIRS_SET command");
            return VIRTIO_NET_ERR;
        };
        let pairs = usize::from(u16::from_le_bytes(raw));
        if pairs == 0 || pairs > self.taps.len() {
            tracing::debug!(pairs, "VQ_PAIRS_SET out of range");
            return VIRTIO_NET_ERR;
        }
        if let Err(err) = set_active_pairs(&self.taps, pairs) {
            tracing::warn!(%err, "cannot change the tap queues in use");
            // Some queues may have moved: restore what the driver last asked for.
            if let Err(err) = set_active_pairs(&self.taps, self.active_pairs) {
                tracing::warn!(%err, "cannot restore the tap queues in use");
            }
            return VIRTIO_NET_ERR;
        }
        self.active_pairs = pairs;
        VIRTIO_NET_OK
    }
}

impl ChainHandler for CtrlHandler {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (command, ack) = match parse(chain, mem) {
            Ok(parsed) => parsed,
            Err(err) => {
                tracing::debug!(%err, "skipping a virtio-net control chain");
                return 0;
            }
        };
        // Lossless: the ack values are 0 and 1.
        let status = self.execute(&command) as u8;
        match mem.write_obj(status, ack) {
            Ok(()) => 1,
            Err(err) => {
                tracing::debug!(%err, "cannot write a virtio-net control ack");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestAddressSpace;

    use super::*;
    use crate::test_utils::{desc, guest_memory, MEM_SIZE};

    fn parse_chain(descs: &[RawDescriptor], command: &[u8]) -> Result<Vec<u8>, CtrlError> {
        let mem = guest_memory();
        let guard = mem.memory();
        guard.write_slice(command, GuestAddress(0x10_0000)).unwrap();
        let vq = MockSplitQueue::new(&*guard, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&*guard).unwrap().next().unwrap();
        parse(chain, &guard).map(|(command, ack)| {
            assert_eq!(ack, GuestAddress(0x20_0000));
            command
        })
    }

    #[test]
    fn command_and_ack_are_found() {
        let command = parse_chain(
            &[
                desc(0x10_0000, 2, false, Some(1)),
                desc(0x10_0002, 2, false, Some(2)),
                desc(0x20_0000, 1, true, None),
            ],
            &[4, 0, 2, 0],
        )
        .unwrap();
        assert_eq!(command, vec![4, 0, 2, 0]);
    }

    #[test]
    fn malformed_control_chains_are_refused() {
        let cases: Vec<(Vec<RawDescriptor>, CtrlError)> = vec![
            // No ack.
            (vec![desc(0x10_0000, 4, false, None)], CtrlError::Layout),
            // Readable after writable.
            (
                vec![
                    desc(0x10_0000, 4, false, Some(1)),
                    desc(0x20_0000, 1, true, Some(2)),
                    desc(0x10_0000, 4, false, None),
                ],
                CtrlError::Layout,
            ),
            // An empty ack buffer.
            (
                vec![
                    desc(0x10_0000, 4, false, Some(1)),
                    desc(0x20_0000, 0, true, None),
                ],
                CtrlError::Layout,
            ),
            // Too short, too long.
            (
                vec![
                    desc(0x10_0000, 1, false, Some(1)),
                    desc(0x20_0000, 1, true, None),
                ],
                CtrlError::Length(1),
            ),
            (
                vec![
                    desc(0x10_0000, 4096, false, Some(1)),
                    desc(0x20_0000, 1, true, None),
                ],
                CtrlError::Length(4096),
            ),
            // Outside memory.
            (
                vec![
                    desc(MEM_SIZE as u64 - 1, 4, false, Some(1)),
                    desc(0x20_0000, 1, true, None),
                ],
                CtrlError::OutsideMemory,
            ),
            (
                vec![
                    desc(0x10_0000, 4, false, Some(1)),
                    desc(MEM_SIZE as u64, 1, true, None),
                ],
                CtrlError::OutsideMemory,
            ),
        ];
        for (descs, expected) in cases {
            let result = parse_chain(&descs, &[4, 0, 1, 0]);
            assert_eq!(result, Err(expected), "{descs:?}");
        }
    }

    #[test]
    fn commands_other_than_pairs_set_are_refused() {
        let mut handler = CtrlHandler::new(Vec::new(), true);
        // CTRL_RX promiscuous, MAC table, announce: not offered.
        for command in [&[0u8, 0, 1][..], &[1, 0, 0, 0], &[3, 0], &[4, 1, 0, 0]] {
            assert_eq!(handler.execute(command), VIRTIO_NET_ERR, "{command:?}");
        }
        // Pairs out of range (there are no taps here), or a malformed count.
        assert_eq!(handler.execute(&[4, 0, 0, 0]), VIRTIO_NET_ERR);
        assert_eq!(handler.execute(&[4, 0, 1, 0]), VIRTIO_NET_ERR);
        assert_eq!(handler.execute(&[4, 0, 1]), VIRTIO_NET_ERR);
        // Without MQ negotiated even a valid command is refused.
        let mut no_mq = CtrlHandler::new(Vec::new(), false);
        assert_eq!(no_mq.execute(&[4, 0, 1, 0]), VIRTIO_NET_ERR);
        assert_eq!(handler.active_pairs(), 1);
    }
}
