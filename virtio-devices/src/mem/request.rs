//! The virtio-mem request queue's wire format (virtio 1.2 §5.15.6).
//!
//! A request is 24 bytes in driver-readable buffers: `type` (le16), 6 bytes of padding, then for PLUG, UNPLUG and
//! STATE the first block's guest address (le64), the number of blocks (le16) and 6 more bytes of padding (UNPLUG_ALL
//! ignores them). The response is 10 bytes written to the first device-writable buffer: `type` (le16), 6 bytes of
//! padding and, for STATE, the blocks' state (le16). Device-writable buffers must follow all driver-readable ones.
//!
//! [`MemRequest::parse`] is a pure function of the chain and guest memory. It checks the layout and that every
//! buffer it reads or will write is in guest RAM; whether the block range makes sense is the block map's business
//! (`blocks.rs`), since that depends on the device's state. Errors found once the response buffer is known carry its
//! address, so the device can still answer VIRTIO_MEM_RESP_ERROR; a chain without a usable response buffer can only
//! be returned with a used length of 0.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::{descriptors, ChainError};
use crate::device::GuestMemoryMmap;

/// Size of a request.
pub const VIRTIO_MEM_REQUEST_SIZE: usize = 24;
/// Size of a response.
pub const VIRTIO_MEM_RESPONSE_SIZE: usize = 10;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;

const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;

const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;

/// A run of blocks as a request names it: the guest address of the first block and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRange {
    /// Guest physical address of the first block.
    pub addr: u64,
    /// Number of blocks.
    pub nb_blocks: u16,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemRequest {
    /// Plug these blocks.
    Plug(BlockRange),
    /// Unplug these blocks.
    Unplug(BlockRange),
    /// Unplug every block.
    UnplugAll,
    /// Report whether these blocks are plugged.
    State(BlockRange),
    /// A request type this device does not know.
    Unsupported(u16),
}

impl MemRequest {
    /// Decodes the 24 request bytes (padding ignored).
    pub fn decode(bytes: &[u8; VIRTIO_MEM_REQUEST_SIZE]) -> Self {
        let request_type = u16::from_le_bytes([bytes[0], bytes[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        let range = BlockRange {
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16::from_le_bytes([bytes[16], bytes[17]]),
        };
        match request_type {
            REQ_PLUG => Self::Plug(range),
            REQ_UNPLUG => Self::Unplug(range),
            REQ_UNPLUG_ALL => Self::UnplugAll,
            REQ_STATE => Self::State(range),
            other => Self::Unsupported(other),
        }
    }

    /// Parses the request in `chain` and finds its response buffer.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<ParsedRequest, MemRequestError> {
        let descs = descriptors(chain).map_err(|err| MemRequestError {
            kind: MemRequestErrorKind::Chain(err),
            response: None,
        })?;
        let readable = descs
            .iter()
            .position(|desc| desc.is_write_only())
            .unwrap_or(descs.len());
        let (request_descs, writable) = descs.split_at(readable);
        let Some(first_writable) = writable.first() else {
            return Err(MemRequestError::framing(
                MemRequestErrorKind::NoResponseBuffer,
            ));
        };
        if (first_writable.len() as usize) < VIRTIO_MEM_RESPONSE_SIZE {
            return Err(MemRequestError::framing(
                MemRequestErrorKind::ResponseTooShort(first_writable.len()),
            ));
        }
        if !mem.check_range(first_writable.addr(), VIRTIO_MEM_RESPONSE_SIZE) {
            return Err(MemRequestError::framing(
                MemRequestErrorKind::OutsideMemory {
                    addr: first_writable.addr().0,
                    len: first_writable.len(),
                },
            ));
        }
        let response = first_writable.addr();
        let fail = |kind| MemRequestError {
            kind,
            response: Some(response),
        };
        if writable.iter().any(|desc| !desc.is_write_only()) {
            return Err(fail(MemRequestErrorKind::ReadableAfterWritable));
        }
        let mut bytes = [0u8; VIRTIO_MEM_REQUEST_SIZE];
        let mut filled = 0usize;
        for desc in request_descs {
            if filled == VIRTIO_MEM_REQUEST_SIZE {
                break;
            }
            let take = (desc.len() as usize).min(VIRTIO_MEM_REQUEST_SIZE - filled);
            if take == 0 {
                continue;
            }
            mem.read_slice(&mut bytes[filled..filled + take], desc.addr())
                .map_err(|_| {
                    fail(MemRequestErrorKind::OutsideMemory {
                        addr: desc.addr().0,
                        len: desc.len(),
                    })
                })?;
            filled += take;
        }
        if filled < VIRTIO_MEM_REQUEST_SIZE {
            return Err(fail(MemRequestErrorKind::RequestTooShort(filled)));
        }
        Ok(ParsedRequest {
            request: Self::decode(&bytes),
            response,
        })
    }
}

/// A request and where its response goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedRequest {
    /// The request.
    pub request: MemRequest,
    /// The first device-writable buffer, at least [`VIRTIO_MEM_RESPONSE_SIZE`] bytes in guest RAM.
    pub response: GuestAddress,
}

/// What is wrong with a request's chain.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum MemRequestErrorKind {
    /// The chain itself is broken.
    #[error("{0}")]
    Chain(ChainError),
    /// No device-writable buffer.
    #[error("the request has no device-writable buffer for the response")]
    NoResponseBuffer,
    /// The first device-writable buffer is too short for a response.
    #[error("the response buffer is {0} bytes; it must hold 10")]
    ResponseTooShort(u32),
    /// A buffer is not (entirely) in guest RAM.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A driver-readable descriptor follows a device-writable one.
    #[error("a driver-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 24 driver-readable bytes.
    #[error("the request is {0} bytes; it must be 24")]
    RequestTooShort(usize),
}

/// A request that cannot be parsed, and where to answer it if the chain has a response buffer.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("invalid virtio-mem request: {kind}")]
pub struct MemRequestError {
    kind: MemRequestErrorKind,
    response: Option<GuestAddress>,
}

impl MemRequestError {
    fn framing(kind: MemRequestErrorKind) -> Self {
        Self {
            kind,
            response: None,
        }
    }

    /// What is wrong.
    pub fn kind(&self) -> MemRequestErrorKind {
        self.kind
    }

    /// The response buffer to write VIRTIO_MEM_RESP_ERROR to, when the chain has a usable one.
    pub fn response(&self) -> Option<GuestAddress> {
        self.response
    }
}

/// Whether a run of blocks is plugged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Every block is plugged.
    Plugged,
    /// No block is plugged.
    Unplugged,
    /// Some are.
    Mixed,
}

/// The device's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemResponse {
    /// Done (PLUG, UNPLUG, UNPLUG_ALL).
    Ack,
    /// Done, with the blocks' state (STATE).
    AckState(BlockState),
    /// Refused: plugging would exceed the requested size.
    Nack,
    /// Cannot be done now (the host could not release the memory); the driver may retry.
    Busy,
    /// The request is invalid.
    Error,
}

impl MemResponse {
    /// The 10 response bytes.
    pub fn encode(self) -> [u8; VIRTIO_MEM_RESPONSE_SIZE] {
        let (response_type, state) = match self {
            Self::Ack => (RESP_ACK, 0),
            Self::AckState(BlockState::Plugged) => (RESP_ACK, STATE_PLUGGED),
            Self::AckState(BlockState::Unplugged) => (RESP_ACK, STATE_UNPLUGGED),
            Self::AckState(BlockState::Mixed) => (RESP_ACK, STATE_MIXED),
            Self::Nack => (RESP_NACK, 0),
            Self::Busy => (RESP_BUSY, 0),
            Self::Error => (RESP_ERROR, 0),
        };
        let mut bytes = [0u8; VIRTIO_MEM_RESPONSE_SIZE];
        bytes[..2].copy_from_slice(&response_type.to_le_bytes());
        bytes[8..].copy_from_slice(&state.to_le_bytes());
        bytes
    }
}
