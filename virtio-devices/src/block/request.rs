//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2 §5.2.6).
//!
//! A request is a 16-byte header (`type`, `reserved`, `sector`) in driver-readable buffers, the data, and a one-byte
//! status in the last device-writable byte. Drivers may split or merge these across descriptors as they like
//! (VIRTIO_F_ANY_LAYOUT is implied by virtio 1.x), so the parser works on byte ranges: the header is the first 16
//! readable bytes, the status the last writable byte, the data everything in between. Device-writable descriptors
//! must follow all driver-readable ones.
//!
//! [`Request::parse`] is a pure function of the chain and guest memory; it checks everything that does not depend on
//! the disk (layout, lengths, direction, that every buffer is in guest RAM, that the sector range does not overflow)
//! and reads nothing but the header. Errors found once the status byte is known carry its address, so the device can
//! still answer VIRTIO_BLK_S_IOERR; a chain without a usable status byte can only be returned with length 0.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::{descriptors, ChainError};
use crate::device::GuestMemoryMmap;

/// Size of a sector, the unit of `sector` and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header.
pub const REQUEST_HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes range (`sector`, `num_sectors`, `flags`).
pub const DISCARD_SEGMENT_SIZE: u64 = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device serial (20 bytes).
    GetId,
    /// Deallocate ranges (the data is a list of ranges).
    Discard,
    /// Zero ranges (the data is a list of ranges).
    WriteZeroes,
    /// A type this device does not implement.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A contiguous guest buffer (part of one descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What is wrong with a request.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// The chain itself is broken.
    #[error("{0}")]
    Chain(ChainError),
    /// A driver-readable descriptor follows a device-writable one.
    #[error("a driver-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// No device-writable byte for the status.
    #[error("the request has no device-writable status byte")]
    NoStatus,
    /// A buffer is not (entirely) in guest RAM.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer than 16 driver-readable bytes.
    #[error("the request header is {0} bytes; it must be 16")]
    HeaderTooShort(u64),
    /// Data buffers in the wrong direction for the request type (device-writable data on a write, or the reverse).
    #[error("the request has data buffers in the wrong direction for its type")]
    WrongDirection,
    /// Read or write data that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512 bytes")]
    NotSectorMultiple(u64),
    /// The sector range does not fit in 64 bits.
    #[error("sector {sector} with {len} bytes of data overflows the 64-bit byte offset")]
    SectorOverflow {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
    },
    /// A discard or write-zeroes payload that is empty or not a whole number of ranges.
    #[error("range list of {0} bytes is not a non-empty multiple of 16 bytes")]
    BadRangeList(u64),
    /// A GET_ID request without a buffer for the serial.
    #[error("GET_ID without a device-writable buffer for the serial")]
    NoIdBuffer,
}

/// A request that cannot be served, and where to report it if the chain has a status byte.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("invalid virtio-blk request: {kind}")]
pub struct RequestError {
    kind: RequestErrorKind,
    status: Option<GuestAddress>,
}

impl RequestError {
    fn framing(kind: RequestErrorKind) -> Self {
        Self { kind, status: None }
    }

    /// What is wrong.
    pub fn kind(&self) -> RequestErrorKind {
        self.kind
    }

    /// The status byte to write VIRTIO_BLK_S_IOERR to, when the chain has one.
    pub fn status(&self) -> Option<GuestAddress> {
        self.status
    }
}

/// A parsed, validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What the request asks for.
    pub request_type: RequestType,
    /// First sector (in 512-byte units) for reads and writes.
    pub sector: u64,
    /// The data buffers in order: driver-readable for writes, discard and write-zeroes; device-writable for reads
    /// and GET_ID; empty for the others.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Splits `segments` after their first `count` bytes; `None` if they hold fewer.
fn split_front(segments: &[Segment], count: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut front = Vec::new();
    let mut rest = Vec::new();
    let mut needed = count;
    for segment in segments {
        if needed == 0 {
            rest.push(*segment);
            continue;
        }
        let take = u64::from(segment.len).min(needed);
        needed -= take;
        // Lossless: take <= segment.len.
        let take = take as u32;
        if take > 0 {
            front.push(Segment {
                addr: segment.addr,
                len: take,
            });
        }
        if take < segment.len {
            rest.push(Segment {
                addr: segment.addr.checked_add(u64::from(take))?,
                len: segment.len - take,
            });
        }
    }
    (needed == 0).then_some((front, rest))
}

/// Splits off the last byte of `segments`; `None` if they are all empty.
fn split_last_byte(segments: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let last = segments.iter().rposition(|segment| segment.len > 0)?;
    let segment = segments[last];
    let status = segment.addr.checked_add(u64::from(segment.len) - 1)?;
    let mut before: Vec<Segment> = segments[..last].to_vec();
    if segment.len > 1 {
        before.push(Segment {
            addr: segment.addr,
            len: segment.len - 1,
        });
    }
    Some((before, status))
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|segment| u64::from(segment.len)).sum()
}

fn check_in_memory(segments: &[Segment], mem: &GuestMemoryMmap) -> Result<(), RequestErrorKind> {
    for segment in segments {
        if segment.len > 0 && !mem.check_range(segment.addr, segment.len as usize) {
            return Err(RequestErrorKind::OutsideMemory {
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        }
    }
    Ok(())
}

impl Request {
    /// Parses and validates the request in `chain`.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, RequestError> {
        let descs = descriptors(chain)
            .map_err(|err| RequestError::framing(RequestErrorKind::Chain(err)))?;
        let first_writable = descs
            .iter()
            .position(|desc| desc.is_write_only())
            .unwrap_or(descs.len());
        if descs[first_writable..]
            .iter()
            .any(|desc| !desc.is_write_only())
        {
            return Err(RequestError::framing(
                RequestErrorKind::ReadableAfterWritable,
            ));
        }
        let to_segment = |desc: &virtio_queue::desc::split::Descriptor| Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let readable: Vec<Segment> = descs[..first_writable].iter().map(to_segment).collect();
        let writable: Vec<Segment> = descs[first_writable..].iter().map(to_segment).collect();
        let (writable, status) = split_last_byte(&writable)
            .ok_or_else(|| RequestError::framing(RequestErrorKind::NoStatus))?;
        if !mem.check_range(status, 1) {
            return Err(RequestError::framing(RequestErrorKind::OutsideMemory {
                addr: status.raw_value(),
                len: 1,
            }));
        }
        Self::parse_body(&readable, &writable, status, mem).map_err(|kind| RequestError {
            kind,
            status: Some(status),
        })
    }

    fn parse_body(
        readable: &[Segment],
        writable: &[Segment],
        status: GuestAddress,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, RequestErrorKind> {
        check_in_memory(readable, mem)?;
        check_in_memory(writable, mem)?;
        let (header_segments, readable_data) = split_front(readable, REQUEST_HEADER_SIZE)
            .ok_or(RequestErrorKind::HeaderTooShort(total_len(readable)))?;
        let mut header = [0u8; REQUEST_HEADER_SIZE as usize];
        let mut filled = 0usize;
        for segment in &header_segments {
            let end = filled + segment.len as usize;
            mem.read_slice(&mut header[filled..end], segment.addr)
                .map_err(|_| RequestErrorKind::OutsideMemory {
                    addr: segment.addr.raw_value(),
                    len: segment.len,
                })?;
            filled = end;
        }
        let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let request_type = RequestType::from_raw(raw_type);

        let data = match request_type {
            RequestType::In | RequestType::GetId => {
                if total_len(&readable_data) > 0 {
                    return Err(RequestErrorKind::WrongDirection);
                }
                writable.to_vec()
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                if total_len(writable) > 0 {
                    return Err(RequestErrorKind::WrongDirection);
                }
                readable_data
            }
            // Flush carries no data; unsupported requests are answered without looking at theirs.
            RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
        };
        let data: Vec<Segment> = data.into_iter().filter(|segment| segment.len > 0).collect();
        let data_len = total_len(&data);
        match request_type {
            RequestType::In | RequestType::Out => {
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestErrorKind::NotSectorMultiple(data_len));
                }
                let overflow = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|offset| offset.checked_add(data_len))
                    .is_none();
                if overflow {
                    return Err(RequestErrorKind::SectorOverflow {
                        sector,
                        len: data_len,
                    });
                }
            }
            RequestType::Discard | RequestType::WriteZeroes
                if data_len == 0 || !data_len.is_multiple_of(DISCARD_SEGMENT_SIZE) =>
            {
                return Err(RequestErrorKind::BadRangeList(data_len));
            }
            RequestType::GetId if data_len == 0 => return Err(RequestErrorKind::NoIdBuffer),
            _ => {}
        }
        Ok(Self {
            request_type,
            sector,
            data,
            data_len,
            status,
        })
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
