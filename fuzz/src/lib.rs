//! Helpers the fuzz targets share: access sizes as a guest picks them, and interrupt sinks that accept everything.

use libfuzzer_sys::arbitrary::{self, Arbitrary};

/// The width of one guest access: the valid ones and the ones a hostile guest (or a buggy bus) may still produce.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessSize {
    /// A byte.
    One,
    /// A word.
    Two,
    /// A dword.
    Four,
    /// A qword.
    Eight,
    /// An empty access.
    Zero,
    /// Three bytes.
    Three,
    /// Sixteen bytes.
    Sixteen,
}

impl AccessSize {
    /// The access length in bytes.
    pub fn len(self) -> usize {
        match self {
            Self::One => 1,
            Self::Two => 2,
            Self::Four => 4,
            Self::Eight => 8,
            Self::Zero => 0,
            Self::Three => 3,
            Self::Sixteen => 16,
        }
    }

    /// Whether the access is empty.
    pub fn is_empty(self) -> bool {
        self == Self::Zero
    }
}

/// `len` bytes of `value` in little-endian order, repeating it past 8 bytes.
pub fn value_bytes(value: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (value >> ((i % 8) * 8)) as u8).collect()
}

/// The little-endian value of up to 8 bytes.
pub fn bytes_value(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .take(8)
        .enumerate()
        .fold(0, |value, (i, byte)| value | u64::from(*byte) << (i * 8))
}

/// An MSI-X delivery that drops every message and route.
pub struct NoopMsiDelivery;

impl pci::MsiDelivery for NoopMsiDelivery {
    fn deliver(&self, _vector: u16, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }

    fn update_route(
        &self,
        _vector: u16,
        _address: u64,
        _data: u32,
        _masked: bool,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line connected to nothing.
pub struct NoopLine;

impl devices::InterruptLine for NoopLine {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_level(&self, _asserted: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// An MSI sender connected to nothing.
pub struct NoopMsiSender;

impl devices::MsiSender for NoopMsiSender {
    fn send_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A PIC output connected to nothing: no vCPU is kicked.
pub struct NoopPicOutput;

impl devices::PicOutput for NoopPicOutput {
    fn interrupt_requested(&self) {}
}

/// Platform events that go nowhere: power-off, reset and debug-exit requests are dropped.
pub struct NoopPlatformEvents;

impl devices::PlatformEvents for NoopPlatformEvents {
    fn power_off(&self) {}

    fn reset(&self) {}

    fn debug_exit(&self, _code: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trip() {
        assert_eq!(value_bytes(0x0102_0304, 4), [4, 3, 2, 1]);
        assert_eq!(value_bytes(0x0102, 3), [2, 1, 0]);
        assert_eq!(value_bytes(0xff, 9)[8], 0xff);
        assert_eq!(bytes_value(&[4, 3, 2, 1]), 0x0102_0304);
        assert_eq!(bytes_value(&[]), 0);
    }
}
