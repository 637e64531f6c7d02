//! The PC CMOS: an MC146818-style real-time clock plus 128 bytes of battery-backed RAM.
//!
//! Ports (offsets from the base, 0x70 on a PC): offset 0 is the index register (bit 7 is the NMI mask on real
//! hardware and is ignored here), offset 1 reads or writes the byte the index selects. A wider access is split into
//! byte accesses at consecutive offsets, as on the ISA bus.
//!
//! The clock registers 0x00-0x09 (except the alarm bytes 0x01, 0x03, 0x05) and the century byte 0x32 are computed
//! from the host's time in UTC on every read, formatted as register B asks (BCD or binary, 12 or 24 hours); the
//! guest cannot set the clock (its writes there are ignored) and no RTC interrupts are generated. Everything else
//! is guest-writable RAM that belongs to the device state, so the VMM can keep it across a guest reboot.

use crate::bus::BusDevice;
use crate::host_time::{self, DateTime};

/// Bytes of CMOS RAM, clock registers included.
pub const CMOS_SIZE: usize = 128;

// Clock registers.
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: update-in-progress, always clear here (the clock is read straight from the host).
const REG_A_UIP: u8 = 0x80;
/// Register A after reset: 32.768 kHz time base, 1.024 kHz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B bit 1: 24-hour mode (clear: 12-hour mode with bit 7 of the hour meaning PM).
const REG_B_24H: u8 = 0x02;
/// Register B bit 2: binary fields (clear: BCD).
const REG_B_BINARY: u8 = 0x04;
/// Register B after reset: 24-hour, BCD.
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register D bit 7: the RAM and time are valid (battery good).
const REG_D_VALID: u8 = 0x80;
/// Hour byte bit 7 in 12-hour mode.
const HOUR_PM: u8 = 0x80;

// Memory-size fields firmware reads.
const BASE_MEM_LO: usize = 0x15;
const BASE_MEM_KIB: u64 = 640;
const EXT_MEM_LO: usize = 0x17;
const EXT_MEM2_LO: usize = 0x30;
const CHECKSUM_HI: usize = 0x2e;
const HIGH_MEM_LO: usize = 0x34;
const MEM_ABOVE_4G: usize = 0x5b;

/// Boot sequence fields (Bochs/QEMU layout): third device in the high nibble, floppy-signature check off in bit 0.
const BOOT_FLAG1: usize = 0x38;
/// First boot device in the low nibble, second in the high nibble.
const BOOT_FLAG2: usize = 0x3d;

/// A device class in the CMOS boot sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CmosBootDevice {
    /// The first floppy drive.
    Floppy = 1,
    /// The first hard disk.
    HardDisk = 2,
    /// The first CD-ROM drive.
    CdRom = 3,
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Unit of the memory-above-16-MiB and memory-above-4-GiB fields.
const UNIT_64K: u64 = 64 * KIB;

/// The CMOS contents: what a snapshot or a guest reboot keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmosState {
    /// The index register (0..=127).
    pub index: u8,
    /// All 128 bytes. The computed clock bytes and registers C and D are stored but not read back.
    pub data: [u8; CMOS_SIZE],
}

/// Where the clock comes from (the host, or a fixed time in tests).
type Clock = fn() -> Option<DateTime>;

/// The CMOS RTC and NVRAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    data: [u8; CMOS_SIZE],
    clock: Clock,
}

impl Cmos {
    /// Creates the CMOS of a machine with `mem_below_4g` bytes of RAM below 4 GiB (counted from address 0) and
    /// `mem_above_4g` bytes above 4 GiB, filling in the memory-size fields firmware reads.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut data = [0u8; CMOS_SIZE];
        data[usize::from(REG_A)] = REG_A_DEFAULT;
        data[usize::from(REG_B)] = REG_B_DEFAULT;
        data[usize::from(REG_D)] = REG_D_VALID;

        put_le(&mut data, BASE_MEM_LO, BASE_MEM_KIB, 2);
        let extended_kib = mem_below_4g.saturating_sub(MIB) / KIB;
        put_le(&mut data, EXT_MEM_LO, extended_kib, 2);
        put_le(&mut data, EXT_MEM2_LO, extended_kib, 2);
        put_le(
            &mut data,
            HIGH_MEM_LO,
            mem_below_4g.saturating_sub(16 * MIB) / UNIT_64K,
            2,
        );
        put_le(&mut data, MEM_ABOVE_4G, mem_above_4g / UNIT_64K, 3);

        // The classic AT checksum over 0x10..=0x2d, stored big-endian at 0x2e.
        let sum: u16 = data[0x10..CHECKSUM_HI].iter().map(|&b| u16::from(b)).sum();
        data[CHECKSUM_HI..CHECKSUM_HI + 2].copy_from_slice(&sum.to_be_bytes());

        Cmos {
            index: 0,
            data,
            clock: host_time::utc_now,
        }
    }

    /// Rebuilds a CMOS from saved state.
    pub fn from_state(state: &CmosState) -> Self {
        let mut cmos = Cmos::new(0, 0);
        cmos.set_state(state);
        cmos
    }

    /// The current state.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            data: self.data,
        }
    }

    /// Restores saved state exactly (memory-size fields included), normalising the bits the guest cannot set.
    pub fn set_state(&mut self, state: &CmosState) {
        self.index = state.index & 0x7f;
        self.data = state.data;
        self.data[usize::from(REG_A)] &= !REG_A_UIP;
    }

    /// Sets the boot sequence a BIOS follows when it has no boot order list of its own: up to three devices, first
    /// choice first, in the Bochs/QEMU layout SeaBIOS reads (first and second in 0x3d, third in the high nibble of
    /// 0x38, whose bit 0 set skips the floppy boot-signature check). Devices past the third are ignored.
    pub fn set_boot_sequence(&mut self, devices: &[CmosBootDevice]) {
        let code = |i: usize| devices.get(i).map_or(0, |d| *d as u8);
        self.data[BOOT_FLAG2] = code(1) << 4 | code(0);
        self.data[BOOT_FLAG1] = (self.data[BOOT_FLAG1] & 0x0f) | code(2) << 4;
    }

    /// The 128 bytes of CMOS RAM as the guest left them (what real hardware keeps on its battery).
    pub fn nvram(&self) -> [u8; CMOS_SIZE] {
        self.data
    }

    /// Reads the byte at `index`.
    fn read_register(&self, index: u8) -> u8 {
        match index {
            REG_A => self.data[usize::from(REG_A)] & !REG_A_UIP,
            REG_C => 0,
            REG_D => REG_D_VALID,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => match (self.clock)() {
                Some(now) => self.clock_field(index, &now),
                None => self.data[usize::from(index)],
            },
            _ => self.data[usize::from(index & 0x7f)],
        }
    }

    /// Formats one clock register for `now`, as register B asks.
    fn clock_field(&self, index: u8, now: &DateTime) -> u8 {
        let mode = self.data[usize::from(REG_B)];
        let encode = |v: u8| {
            if mode & REG_B_BINARY != 0 {
                v
            } else {
                to_bcd(v)
            }
        };
        // Every year `host_time` returns is at most 9999, so both halves fit a byte.
        let year_lo = u8::try_from(now.year % 100).unwrap_or(0);
        let century = u8::try_from(now.year / 100).unwrap_or(99);
        match index {
            REG_SECONDS => encode(now.second.min(59)),
            REG_MINUTES => encode(now.minute),
            REG_HOURS if mode & REG_B_24H != 0 => encode(now.hour),
            REG_HOURS => {
                let h12 = match now.hour % 12 {
                    0 => 12,
                    h => h,
                };
                encode(h12) | if now.hour >= 12 { HOUR_PM } else { 0 }
            }
            // The RTC counts weekdays from 1 (Sunday).
            REG_WEEKDAY => encode(now.weekday + 1),
            REG_DAY => encode(now.day),
            REG_MONTH => encode(now.month),
            REG_YEAR => encode(year_lo),
            _ => encode(century),
        }
    }

    /// Writes `value` to the byte at `index`.
    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_A => self.data[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_C | REG_D => {}
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                tracing::debug!("CMOS: ignoring a write of {value:#x} to clock register {index:#x} (the clock follows the host)");
            }
            _ => self.data[usize::from(index & 0x7f)] = value,
        }
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            // Bit 7 disables NMIs on a real PC; it is not part of the index.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            self.write_byte(offset.saturating_add(i as u64), byte);
        }
    }
}

/// Stores the low `len` bytes of `value` little-endian at `at`, saturating at the largest value that fits.
fn put_le(data: &mut [u8; CMOS_SIZE], at: usize, value: u64, len: usize) {
    let max = (1u64 << (8 * len)) - 1;
    let bytes = value.min(max).to_le_bytes();
    data[at..at + len].copy_from_slice(&bytes[..len]);
}

/// Encodes 0..=99 as two BCD digits.
fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    fn write(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, &[index]);
        cmos.write(1, &[value]);
    }

    fn from_bcd(v: u8) -> u8 {
        (v >> 4) * 10 + (v & 0xf)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date.
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    fn unix_seconds(t: &DateTime) -> i64 {
        days_from_civil(t.year.into(), t.month.into(), t.day.into()) * 86_400
            + i64::from(t.hour) * 3600
            + i64::from(t.minute) * 60
            + i64::from(t.second)
    }

    /// Reads the clock the way an OS does: until two consecutive reads agree.
    fn read_clock(cmos: &mut Cmos, decode: fn(u8) -> u8) -> DateTime {
        let once = |cmos: &mut Cmos| {
            let regs: Vec<u8> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]
                .iter()
                .map(|&r| read(cmos, r))
                .collect();
            DateTime {
                second: decode(regs[0]),
                minute: decode(regs[1]),
                hour: decode(regs[2]),
                weekday: decode(regs[3]) - 1,
                day: decode(regs[4]),
                month: decode(regs[5]),
                year: u32::from(decode(regs[7])) * 100 + u32::from(decode(regs[6])),
            }
        };
        let mut prev = once(cmos);
        loop {
            let next = once(cmos);
            if next == prev {
                return next;
            }
            prev = next;
        }
    }

    fn check_against_host(cmos: &mut Cmos, decode: fn(u8) -> u8) {
        let before = host_time::utc_now().unwrap();
        let rtc = read_clock(cmos, decode);
        let after = host_time::utc_now().unwrap();
        let t = unix_seconds(&rtc);
        assert!(
            unix_seconds(&before) <= t && t <= unix_seconds(&after),
            "{before:?} <= {rtc:?} <= {after:?}"
        );
        // 1970-01-01 was a Thursday (weekday 4).
        assert_eq!(
            i64::from(rtc.weekday),
            (days_from_civil(rtc.year.into(), rtc.month.into(), rtc.day.into()) + 4).rem_euclid(7)
        );
    }

    #[test]
    fn bcd_clock_matches_the_host() {
        let mut cmos = Cmos::new(GIB, 0);
        assert_eq!(read(&mut cmos, REG_B), 0x02);
        check_against_host(&mut cmos, from_bcd);
    }

    #[test]
    fn binary_clock_matches_the_host() {
        let mut cmos = Cmos::new(GIB, 0);
        write(&mut cmos, REG_B, REG_B_24H | REG_B_BINARY);
        check_against_host(&mut cmos, |v| v);
    }

    fn fixed_cmos(clock: Clock) -> Cmos {
        let mut cmos = Cmos::new(GIB, 0);
        cmos.clock = clock;
        cmos
    }

    fn afternoon() -> Option<DateTime> {
        Some(DateTime {
            year: 2031,
            month: 12,
            day: 25,
            weekday: 4,
            hour: 13,
            minute: 7,
            second: 59,
        })
    }

    fn midnight() -> Option<DateTime> {
        Some(DateTime {
            hour: 0,
            ..afternoon()?
        })
    }

    #[test]
    fn formats_fields_per_register_b() {
        let mut cmos = fixed_cmos(afternoon);
        let regs = |cmos: &mut Cmos| {
            [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| read(cmos, r))
        };
        // BCD, 24 hours.
        assert_eq!(
            regs(&mut cmos),
            [0x59, 0x07, 0x13, 0x05, 0x25, 0x12, 0x31, 0x20]
        );
        // BCD, 12 hours: 13:00 is 1 PM.
        write(&mut cmos, REG_B, 0);
        assert_eq!(read(&mut cmos, REG_HOURS), 0x81);
        // Binary, 12 hours.
        write(&mut cmos, REG_B, REG_B_BINARY);
        assert_eq!(regs(&mut cmos), [59, 7, 0x81, 5, 25, 12, 31, 20]);
        // Binary, 24 hours.
        write(&mut cmos, REG_B, REG_B_BINARY | REG_B_24H);
        assert_eq!(read(&mut cmos, REG_HOURS), 13);

        let mut cmos = fixed_cmos(midnight);
        write(&mut cmos, REG_B, 0);
        // Midnight is 12 AM.
        assert_eq!(read(&mut cmos, REG_HOURS), 0x12);
    }

    #[test]
    fn clock_writes_are_ignored_and_status_registers_fixed() {
        let mut cmos = fixed_cmos(afternoon);
        write(&mut cmos, REG_SECONDS, 0x01);
        write(&mut cmos, REG_CENTURY, 0x19);
        assert_eq!(read(&mut cmos, REG_SECONDS), 0x59);
        assert_eq!(read(&mut cmos, REG_CENTURY), 0x20);
        assert_eq!(read(&mut cmos, REG_A), 0x26);
        write(&mut cmos, REG_A, 0xa6);
        assert_eq!(read(&mut cmos, REG_A), 0x26, "UIP is never set");
        write(&mut cmos, REG_C, 0xff);
        write(&mut cmos, REG_D, 0);
        assert_eq!(read(&mut cmos, REG_C), 0);
        assert_eq!(read(&mut cmos, REG_D), 0x80);
        // The alarm bytes are plain storage.
        write(&mut cmos, 0x01, 0x42);
        assert_eq!(read(&mut cmos, 0x01), 0x42);
    }

    #[test]
    fn boot_sequence_uses_the_bochs_layout() {
        let mut cmos = Cmos::new(128 * MIB, 0);
        cmos.set_boot_sequence(&[CmosBootDevice::HardDisk]);
        assert_eq!(read(&mut cmos, 0x3d), 0x02);
        assert_eq!(read(&mut cmos, 0x38), 0x00);
        cmos.set_boot_sequence(&[
            CmosBootDevice::CdRom,
            CmosBootDevice::HardDisk,
            CmosBootDevice::Floppy,
            CmosBootDevice::HardDisk,
        ]);
        assert_eq!(read(&mut cmos, 0x3d), 0x23);
        assert_eq!(read(&mut cmos, 0x38), 0x10);
    }

    #[test]
    fn memory_fields() {
        let mut cmos = Cmos::new(2 * GIB, 3 * GIB);
        let word =
            |cmos: &mut Cmos, lo: u8| u16::from_le_bytes([read(cmos, lo), read(cmos, lo + 1)]);
        assert_eq!(word(&mut cmos, 0x15), 640);
        // Above 1 MiB in KiB: capped.
        assert_eq!(word(&mut cmos, 0x17), 0xffff);
        assert_eq!(word(&mut cmos, 0x30), 0xffff);
        // Above 16 MiB in 64 KiB units.
        assert_eq!(
            word(&mut cmos, 0x34),
            ((2 * GIB - 16 * MIB) / UNIT_64K) as u16
        );
        let above = u32::from_le_bytes([
            read(&mut cmos, 0x5b),
            read(&mut cmos, 0x5c),
            read(&mut cmos, 0x5d),
            0,
        ]);
        assert_eq!(u64::from(above), 3 * GIB / UNIT_64K);

        let mut small = Cmos::new(32 * MIB, 0);
        assert_eq!(word(&mut small, 0x17), 31 * 1024);
        assert_eq!(word(&mut small, 0x30), 31 * 1024);
        assert_eq!(word(&mut small, 0x34), 256);
        assert_eq!(read(&mut small, 0x5b), 0);

        // Less than 16 MiB and huge amounts above 4 GiB saturate rather than wrap.
        let mut odd = Cmos::new(8 * MIB, u64::MAX);
        assert_eq!(word(&mut odd, 0x34), 0);
        assert_eq!(
            [
                read(&mut odd, 0x5b),
                read(&mut odd, 0x5c),
                read(&mut odd, 0x5d)
            ],
            [0xff; 3]
        );

        // Checksum over 0x10..=0x2d.
        let sum: u16 = (0x10..0x2e).map(|i| u16::from(read(&mut small, i))).sum();
        assert_eq!(word(&mut small, 0x2e), sum.swap_bytes());
    }

    #[test]
    fn index_masks_the_nmi_bit() {
        let mut cmos = Cmos::new(GIB, 0);
        cmos.write(0, &[0x80 | 0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(read(&mut cmos, 0x40), 0xab);
        cmos.write(0, &[0xc0]);
        let mut b = [0u8];
        cmos.read(0, &mut b);
        assert_eq!(b, [0x40]);
        cmos.read(1, &mut b);
        assert_eq!(b, [0xab]);
    }

    #[test]
    fn word_access_splits_into_index_and_data() {
        let mut cmos = Cmos::new(GIB, 0);
        // outw 0x70 with 0x55_3c: index 0x3c, data 0x55.
        cmos.write(0, &[0x3c, 0x55]);
        assert_eq!(read(&mut cmos, 0x3c), 0x55);
    }

    #[test]
    fn nvram_round_trips_through_state() {
        let mut cmos = Cmos::new(GIB, GIB);
        for i in 0x38..0x40u8 {
            write(&mut cmos, i, i ^ 0xa5);
        }
        write(&mut cmos, REG_B, REG_B_BINARY | REG_B_24H);
        let state = cmos.state();
        assert_eq!(state.data, cmos.nvram());

        let mut rebooted = Cmos::new(GIB, GIB);
        rebooted.set_state(&state);
        assert_eq!(rebooted.state(), state);
        for i in 0x38..0x40u8 {
            assert_eq!(read(&mut rebooted, i), i ^ 0xa5);
        }
        assert_eq!(read(&mut rebooted, REG_B), REG_B_BINARY | REG_B_24H);
        assert_eq!(Cmos::from_state(&state).state(), rebooted.state());

        // A bad saved index is masked rather than trusted.
        let bad = CmosState {
            index: 0xff,
            ..state
        };
        assert_eq!(Cmos::from_state(&bad).state().index, 0x7f);
    }
}
