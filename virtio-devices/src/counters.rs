//! Per-device statistics: monotonic counters that a device's threads bump as requests complete and that the VMM
//! reads at any time.
//!
//! A device owns its counter set behind an `Arc` and gives a clone to the worker it starts on each activation, so
//! the counters count over the device's whole life: a driver reset stops the worker but leaves them as they are.
//! [`VirtioDevice::counters`](crate::VirtioDevice::counters) hands out the same `Arc`, so reading them is a few
//! atomic loads and never waits for the device, its thread or its transport's lock.
//!
//! Counters are bumped before the chain they count reaches the used ring, so once the driver sees a request
//! complete, the counters include it. They wrap at 2^64.
//!
//! The names follow Cloud Hypervisor's `vm.counters` where it has the same counter.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::block::RequestType;

/// One monotonic counter. Relaxed ordering: each counter is a statistic on its own and orders nothing else.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A device's counters, readable from any thread without a lock.
pub trait DeviceCounters: Send + Sync {
    /// Every counter of the device as (name, value), always the same names in the same order.
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

/// Declares a counter set: a struct of [`Counter`]s whose field names are the counter names.
macro_rules! counter_set {
    ($(#[$meta:meta])* $set:ident { $($(#[$field_meta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub(crate) struct $set {
            $($(#[$field_meta])* pub(crate) $field: Counter,)*
        }

        impl DeviceCounters for $set {
            fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.get()),)*]
            }
        }
    };
}

counter_set! {
    /// virtio-blk. A request counts once it has its status; GET_ID requests only count when they fail.
    BlockCounters {
        /// Bytes read from the disk into guest buffers by successful IN requests.
        read_bytes,
        /// Bytes written to the disk by successful OUT requests.
        write_bytes,
        /// Successful IN requests.
        read_ops,
        /// Successful OUT requests.
        write_ops,
        /// Successful FLUSH requests.
        flush_ops,
        /// Successful DISCARD requests.
        discard_ops,
        /// Successful WRITE_ZEROES requests.
        write_zeroes_ops,
        /// Requests that failed: an error status (IOERR, UNSUPP), or a chain too malformed to carry one.
        errors,
    }
}

impl BlockCounters {
    /// Counts a request of type `kind` with `data_len` data bytes that finished with status OK (`ok`) or not.
    pub(crate) fn request(&self, kind: RequestType, data_len: u64, ok: bool) {
        if !ok {
            self.errors.inc();
            return;
        }
        match kind {
            RequestType::In => {
                self.read_ops.inc();
                self.read_bytes.add(data_len);
            }
            RequestType::Out => {
                self.write_ops.inc();
                self.write_bytes.add(data_len);
            }
            RequestType::Flush => self.flush_ops.inc(),
            RequestType::Discard => self.discard_ops.inc(),
            RequestType::WriteZeroes => self.write_zeroes_ops.inc(),
            RequestType::GetId => {}
            // Never OK, but if it were, it moved nothing.
            RequestType::Unsupported(_) => {}
        }
    }
}

counter_set! {
    /// virtio-net. Bytes are Ethernet frame bytes, without the virtio-net header.
    NetCounters {
        /// Bytes of the frames delivered to the guest.
        rx_bytes,
        /// Frames delivered to the guest.
        rx_frames,
        /// Bytes of the frames the guest sent that the tap took.
        tx_bytes,
        /// Frames the guest sent that the tap took.
        tx_frames,
        /// Frames from the tap the guest never got: unusable size, offloads it did not negotiate, no buffer that
        /// could hold them, a malformed receive chain.
        rx_dropped,
        /// Transmit chains that sent nothing: malformed or refused, or the tap did not take the frame.
        tx_dropped,
    }
}

counter_set! {
    /// virtio-rng.
    RngCounters {
        /// Random bytes written into guest buffers.
        bytes,
    }
}

counter_set! {
    /// virtio-console.
    ConsoleCounters {
        /// Input bytes delivered into the guest's receive buffers.
        rx_bytes,
        /// Output bytes the guest sent (transmit queue and emergency writes).
        tx_bytes,
    }
}

counter_set! {
    /// virtio-vsock. Bytes are stream payload bytes, without packet headers.
    VsockCounters {
        /// Payload bytes delivered to the guest.
        rx_bytes,
        /// Payload bytes the guest sent that a connection took.
        tx_bytes,
        /// Connections established, in either direction.
        connections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_lists_its_counters_in_declaration_order() {
        let counters = ConsoleCounters::default();
        counters.tx_bytes.add(5);
        counters.tx_bytes.inc();
        counters.rx_bytes.add(2);
        assert_eq!(counters.snapshot(), [("rx_bytes", 2), ("tx_bytes", 6)]);
    }

    #[test]
    fn counters_wrap_instead_of_panicking() {
        let counter = Counter::default();
        counter.add(u64::MAX);
        counter.add(2);
        assert_eq!(counter.get(), 1);
    }

    #[test]
    fn block_requests_count_by_type_and_outcome() {
        let counters = BlockCounters::default();
        counters.request(RequestType::In, 4096, true);
        counters.request(RequestType::In, 512, true);
        counters.request(RequestType::Out, 1024, true);
        counters.request(RequestType::Out, 1024, false);
        counters.request(RequestType::Flush, 0, true);
        counters.request(RequestType::Discard, 16, true);
        counters.request(RequestType::WriteZeroes, 32, true);
        counters.request(RequestType::GetId, 20, true);
        counters.request(RequestType::Unsupported(99), 0, false);
        assert_eq!(
            counters.snapshot(),
            [
                ("read_bytes", 4608),
                ("write_bytes", 1024),
                ("read_ops", 2),
                ("write_ops", 1),
                ("flush_ops", 1),
                ("discard_ops", 1),
                ("write_zeroes_ops", 1),
                ("errors", 2),
            ]
        );
    }
}
