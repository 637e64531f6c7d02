use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestAddressSpace;

use super::*;
use crate::test_utils::{desc, guest_memory, MEM_SIZE};

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

/// Writes a request header at `addr`.
fn header_at(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(addr)).unwrap();
}

/// Parses the chain `descs` with a header of `request_type`/`sector` at `HEADER`.
fn parse(request_type: u32, sector: u64, descs: &[RawDescriptor]) -> Result<Request, RequestError> {
    let mem = guest_memory();
    let guard = mem.memory();
    header_at(&guard, HEADER, request_type, sector);
    let vq = MockSplitQueue::new(&*guard, 16);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.iter(&*guard).unwrap().next().unwrap();
    Request::parse(chain, &guard)
}

fn segment(addr: u64, len: u32) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
    }
}

fn kind(result: Result<Request, RequestError>) -> (RequestErrorKind, Option<GuestAddress>) {
    let err = result.unwrap_err();
    (err.kind(), err.status())
}

#[test]
fn a_read_has_header_writable_data_and_status() {
    let request = parse(
        VIRTIO_BLK_T_IN,
        7,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 1024, true, Some(2)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(
        request,
        Request {
            request_type: RequestType::In,
            sector: 7,
            data: vec![segment(DATA, 1024)],
            data_len: 1024,
            status: GuestAddress(STATUS),
        }
    );
}

#[test]
fn a_write_has_readable_data() {
    let request = parse(
        VIRTIO_BLK_T_OUT,
        1,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 512, false, Some(2)),
            desc(DATA + 0x1000, 1024, false, Some(3)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(request.request_type, RequestType::Out);
    assert_eq!(
        request.data,
        vec![segment(DATA, 512), segment(DATA + 0x1000, 1024)]
    );
    assert_eq!(request.data_len, 1536);
}

#[test]
fn any_layout_splits_merged_descriptors() {
    // Header and data in one readable descriptor, status alone.
    let request = parse(
        VIRTIO_BLK_T_OUT,
        0,
        &[
            desc(HEADER, 16 + 512, false, Some(1)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(request.data, vec![segment(HEADER + 16, 512)]);
    // Header split in two; data and status in one writable descriptor.
    let request = parse(
        VIRTIO_BLK_T_IN,
        3,
        &[
            desc(HEADER, 8, false, Some(1)),
            desc(HEADER + 8, 8, false, Some(2)),
            desc(DATA, 513, true, None),
        ],
    )
    .unwrap();
    assert_eq!(request.sector, 3);
    assert_eq!(request.data, vec![segment(DATA, 512)]);
    assert_eq!(request.status, GuestAddress(DATA + 512));
    // Zero-length descriptors are ignored.
    let request = parse(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 0, false, Some(2)),
            desc(STATUS, 1, true, Some(3)),
            desc(DATA, 0, true, None),
        ],
    )
    .unwrap();
    assert_eq!(request.request_type, RequestType::Flush);
    assert!(request.data.is_empty());
    assert_eq!(request.status, GuestAddress(STATUS));
}

#[test]
fn other_request_types() {
    let flush = parse(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(STATUS, 1, true, None),
        ],
    );
    assert_eq!(flush.unwrap().request_type, RequestType::Flush);
    let id = parse(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 20, true, Some(2)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!((id.request_type, id.data_len), (RequestType::GetId, 20));
    let discard = parse(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 32, false, Some(2)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(
        (discard.request_type, discard.data_len),
        (RequestType::Discard, 32)
    );
    let zeroes = parse(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 16, false, Some(2)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(zeroes.request_type, RequestType::WriteZeroes);
    // Unknown types parse, whatever their data, so the device can answer UNSUPP.
    let unknown = parse(
        0x1234,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(DATA, 3, true, Some(2)),
            desc(STATUS, 1, true, None),
        ],
    )
    .unwrap();
    assert_eq!(unknown.request_type, RequestType::Unsupported(0x1234));
    assert!(unknown.data.is_empty());
}

#[test]
fn chains_without_a_usable_status_cannot_be_answered() {
    // No device-writable descriptor at all.
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, false, None)
            ]
        )),
        (RequestErrorKind::NoStatus, None)
    );
    // The last descriptor (the status) is driver-readable.
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, true, Some(2)),
                desc(STATUS, 1, false, None)
            ],
        )),
        (RequestErrorKind::ReadableAfterWritable, None)
    );
    // Only zero-length writable descriptors.
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_FLUSH,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 0, true, None)
            ]
        )),
        (RequestErrorKind::NoStatus, None)
    );
    // The status byte is outside guest memory.
    let (err, status) = kind(parse(
        VIRTIO_BLK_T_FLUSH,
        0,
        &[
            desc(HEADER, 16, false, Some(1)),
            desc(MEM_SIZE as u64, 1, true, None),
        ],
    ));
    assert!(
        matches!(err, RequestErrorKind::OutsideMemory { .. }),
        "{err}"
    );
    assert_eq!(status, None);
    // A looping chain.
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 1, true, Some(0))
            ],
        )),
        (RequestErrorKind::Chain(ChainError::Truncated), None)
    );
}

#[test]
fn malformed_requests_with_a_status_report_it() {
    let status = Some(GuestAddress(STATUS));
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HEADER, 8, false, Some(1)), desc(STATUS, 1, true, None)]
        )),
        (RequestErrorKind::HeaderTooShort(8), status)
    );
    assert_eq!(
        kind(parse(VIRTIO_BLK_T_IN, 0, &[desc(STATUS, 1, true, None)])),
        (RequestErrorKind::HeaderTooShort(0), status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, false, Some(2)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (RequestErrorKind::WrongDirection, status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 512, true, Some(2)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (RequestErrorKind::WrongDirection, status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 100, false, Some(2)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (RequestErrorKind::NotSectorMultiple(100), status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            u64::MAX / 512,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 1024, true, Some(2)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (
            RequestErrorKind::SectorOverflow {
                sector: u64::MAX / 512,
                len: 1024
            },
            status
        )
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (
            RequestErrorKind::SectorOverflow {
                sector: u64::MAX,
                len: 0
            },
            status
        )
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_DISCARD,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(DATA, 24, false, Some(2)),
                desc(STATUS, 1, true, None)
            ],
        )),
        (RequestErrorKind::BadRangeList(24), status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 1, true, None)
            ]
        )),
        (RequestErrorKind::BadRangeList(0), status)
    );
    assert_eq!(
        kind(parse(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(STATUS, 1, true, None)
            ]
        )),
        (RequestErrorKind::NoIdBuffer, status)
    );
    // Data outside guest memory, or wrapping around the address space.
    for addr in [MEM_SIZE as u64 - 256, u64::MAX - 255] {
        let (err, reported) = kind(parse(
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HEADER, 16, false, Some(1)),
                desc(addr, 512, true, Some(2)),
                desc(STATUS, 1, true, None),
            ],
        ));
        assert!(
            matches!(err, RequestErrorKind::OutsideMemory { .. }),
            "{err}"
        );
        assert_eq!(reported, status);
    }
    // The header itself outside memory.
    let (err, _) = kind(parse(
        VIRTIO_BLK_T_IN,
        0,
        &[
            desc(u64::MAX - 7, 16, false, Some(1)),
            desc(STATUS, 1, true, None),
        ],
    ));
    assert!(
        matches!(err, RequestErrorKind::OutsideMemory { .. }),
        "{err}"
    );
}

#[test]
fn errors_read_as_one_line() {
    let err = parse(
        VIRTIO_BLK_T_IN,
        0,
        &[desc(HEADER, 8, false, Some(1)), desc(STATUS, 1, true, None)],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid virtio-blk request: the request header is 8 bytes; it must be 16"
    );
}

#[test]
fn split_helpers_handle_edges() {
    let segments = [segment(0x1000, 10), segment(0x2000, 0), segment(0x3000, 10)];
    let (front, rest) = split_front(&segments, 12).unwrap();
    assert_eq!(front, vec![segment(0x1000, 10), segment(0x3000, 2)]);
    assert_eq!(rest, vec![segment(0x3002, 8)]);
    assert!(split_front(&segments, 21).is_none());
    let (front, rest) = split_front(&segments, 0).unwrap();
    assert!(front.is_empty());
    assert_eq!(rest.len(), 3);
    let (before, status) = split_last_byte(&segments).unwrap();
    assert_eq!(status, GuestAddress(0x3009));
    assert_eq!(
        before,
        vec![segment(0x1000, 10), segment(0x2000, 0), segment(0x3000, 9)]
    );
    assert!(split_last_byte(&[segment(0x1000, 0)]).is_none());
    assert!(split_last_byte(&[segment(u64::MAX, 2)]).is_none());
}
