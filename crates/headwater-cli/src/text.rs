//! Small formatting helpers for what `headwater` prints.

use headwater_core::Timestamp;

/// A number rounded to an integer, with thousands separators: `1,234,567`.
pub(crate) fn group(value: f64) -> String {
    let rounded = value.round();
    if !rounded.is_finite() || rounded < 0.0 {
        return format!("{value}");
    }
    let digits = format!("{rounded:.0}");
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A count with thousands separators.
pub(crate) fn count(value: u64) -> String {
    group(value as f64)
}

/// A size in bytes, in the unit that reads best.
pub(crate) fn bytes(value: u64) -> String {
    const KIB: f64 = 1024.0;
    let v = value as f64;
    if v < KIB {
        format!("{value} B")
    } else if v < KIB * KIB {
        format!("{:.1} KiB", v / KIB)
    } else if v < KIB * KIB * KIB {
        format!("{:.1} MiB", v / KIB / KIB)
    } else {
        format!("{:.2} GiB", v / KIB / KIB / KIB)
    }
}

/// A timestamp as `2026-11-27 11:55:24.123456 UTC`.
pub(crate) fn utc(timestamp: Timestamp) -> String {
    let micros = timestamp.unix_micros();
    let secs = micros / 1_000_000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06} UTC",
        day_secs / 3_600,
        day_secs % 3_600 / 60,
        day_secs % 60,
        micros % 1_000_000
    )
}

/// A timestamp as RFC 3339 in UTC with microseconds: `2026-11-27T11:55:24.123456Z`.
pub(crate) fn rfc3339(timestamp: Timestamp) -> String {
    let micros = timestamp.unix_micros();
    let secs = micros / 1_000_000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        day_secs / 3_600,
        day_secs % 3_600 / 60,
        day_secs % 60,
        micros % 1_000_000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        for (value, text) in [
            (0.0, "0"),
            (999.4, "999"),
            (1_000.0, "1,000"),
            (1_234_567.0, "1,234,567"),
            (50_000.0, "50,000"),
        ] {
            assert_eq!(group(value), text, "{value}");
        }
        assert_eq!(count(1_345_895), "1,345,895");
    }

    #[test]
    fn sizes() {
        for (value, text) in [
            (0, "0 B"),
            (1_023, "1023 B"),
            (1_536, "1.5 KiB"),
            (415 * 1024 * 1024 + 900 * 1024, "415.9 MiB"),
            (3 * 1024 * 1024 * 1024, "3.00 GiB"),
        ] {
            assert_eq!(bytes(value), text, "{value}");
        }
    }

    #[test]
    fn timestamps() {
        for (micros, text) in [
            (0, "1970-01-01 00:00:00.000000 UTC"),
            (951_782_400_000_001, "2000-02-29 00:00:00.000001 UTC"),
            (1_795_780_524_123_456, "2026-11-27 11:55:24.123456 UTC"),
        ] {
            assert_eq!(utc(Timestamp::from_unix_micros(micros)), text, "{micros}");
            let rfc = text.replacen(' ', "T", 1).replace(" UTC", "Z");
            assert_eq!(
                rfc3339(Timestamp::from_unix_micros(micros)),
                rfc,
                "{micros}"
            );
        }
    }
}
