//! The host's wall-clock time, broken down into calendar fields (UTC).

/// A calendar date and time of day, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DateTime {
    /// Full year, e.g. 2024.
    pub year: u32,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0 (Sunday)..=6 (Saturday).
    pub weekday: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=60 (60 only during a leap second).
    pub second: u8,
}

/// Reads the host's real-time clock, or `None` if the host cannot give it (logged).
pub(crate) fn utc_now() -> Option<DateTime> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec that outlives the call; clock_gettime writes only into it.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    if ret != 0 {
        tracing::warn!(
            "cannot read the host clock: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `libc::tm` is a plain C struct of integers (and, on glibc, a pointer), for which all-zero bytes are a
    // valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned values owned by this frame; gmtime_r is the reentrant
    // variant and writes only into `tm`.
    let out = unsafe { libc::gmtime_r(&now.tv_sec, &mut tm) };
    if out.is_null() {
        tracing::warn!("cannot convert the host time {} to a UTC date", now.tv_sec);
        return None;
    }
    from_tm(&tm)
}

/// Converts C calendar fields, checking every one is in range.
fn from_tm(tm: &libc::tm) -> Option<DateTime> {
    let field = |v: libc::c_int, lo: libc::c_int, hi: libc::c_int| -> Option<u8> {
        if (lo..=hi).contains(&v) {
            u8::try_from(v).ok()
        } else {
            None
        }
    };
    let date = DateTime {
        year: u32::try_from(tm.tm_year.checked_add(1900)?).ok()?,
        month: field(tm.tm_mon, 0, 11)? + 1,
        day: field(tm.tm_mday, 1, 31)?,
        weekday: field(tm.tm_wday, 0, 6)?,
        hour: field(tm.tm_hour, 0, 23)?,
        minute: field(tm.tm_min, 0, 59)?,
        second: field(tm.tm_sec, 0, 60)?,
    };
    if date.year > 9999 {
        tracing::warn!("host year {} does not fit a CMOS clock", date.year);
        return None;
    }
    Some(date)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_a_plausible_date() {
        let now = utc_now().unwrap();
        assert!((2020..2200).contains(&now.year), "{now:?}");
        assert!((1..=12).contains(&now.month));
        assert!((1..=31).contains(&now.day));
        assert!(now.weekday <= 6 && now.hour <= 23 && now.minute <= 59 && now.second <= 60);
    }

    #[test]
    fn rejects_out_of_range_fields() {
        // SAFETY: all-zero bytes are a valid `libc::tm`.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        tm.tm_year = 124;
        tm.tm_mday = 1;
        assert_eq!(from_tm(&tm).map(|d| (d.year, d.month)), Some((2024, 1)));
        tm.tm_hour = 24;
        assert_eq!(from_tm(&tm), None);
        tm.tm_hour = 0;
        tm.tm_year = -2000;
        assert_eq!(from_tm(&tm), None);
    }
}
