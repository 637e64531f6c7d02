//! `virtio_devices::Request::parse` over descriptor chains a hostile driver builds: loops, chains running past the
//! queue, indirect tables (nested, misaligned, aliasing the ring), buffers straddling the end of guest memory or far
//! outside it, and arbitrary flags and headers.
//!
//! A request the parser accepts must be servable without further checks: every buffer and the status byte are in
//! guest memory and the lengths fit the request type.

#![no_main]

use atrium_fuzz::hostile_queue::QueueInput;
use libfuzzer_sys::fuzz_target;
use virtio_devices::{GuestMemoryMmap, Request, RequestType, DISCARD_SEGMENT_SIZE, SECTOR_SIZE};
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryBackend;

fn check_accepted(request: &Request, mem: &GuestMemoryMmap) {
    assert!(mem.check_range(request.status, 1), "{request:?}");
    let mut total = 0u64;
    for segment in &request.data {
        assert!(segment.len > 0, "{request:?}");
        assert!(
            mem.check_range(segment.addr, segment.len as usize),
            "{request:?}"
        );
        total += u64::from(segment.len);
    }
    assert_eq!(total, request.data_len, "{request:?}");
    match request.request_type {
        RequestType::In | RequestType::Out => {
            assert!(request.data_len.is_multiple_of(SECTOR_SIZE), "{request:?}");
            assert!(
                request
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|offset| offset.checked_add(request.data_len))
                    .is_some(),
                "{request:?}"
            );
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            assert!(request.data_len > 0, "{request:?}");
            assert!(
                request.data_len.is_multiple_of(DISCARD_SEGMENT_SIZE),
                "{request:?}"
            );
        }
        RequestType::GetId => assert!(request.data_len > 0, "{request:?}"),
        RequestType::Flush | RequestType::Unsupported(_) => {
            assert!(request.data.is_empty(), "{request:?}")
        }
    }
}

fuzz_target!(|input: QueueInput| {
    let (mem, mut queue) = input.build();

    // An available index more than a queue ahead is refused as a whole.
    let Ok(chains) = queue.iter(&mem) else {
        return;
    };
    for chain in chains {
        match Request::parse(chain, &mem) {
            Ok(request) => check_accepted(&request, &mem),
            Err(err) => {
                if let Some(status) = err.status() {
                    assert!(mem.check_range(status, 1), "{err:?}");
                }
            }
        }
    }
});
