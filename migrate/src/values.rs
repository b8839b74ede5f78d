//! Command-line values, parsed the same way by every command: durations, bit rates and
//! lists of named values. Each returns a message saying what was wrong, never panics.

use std::time::Duration;

/// Parses `12ms`, `50us`, `2s`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let scale = match unit {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        _ => return Err(format!("bad duration unit in {s:?} (s, ms, us, ns)")),
    };
    if !v.is_finite() || v < 0.0 || v * scale > 3.6e12 {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_nanos((v * scale) as u64))
}

/// Parses `10G`, `800M`, `2.5Gbit`, `0` (bits per second).
pub fn parse_bits(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad bandwidth {s:?}"))?;
    let scale = match unit.trim_end_matches("bit").trim_end_matches("bps") {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        _ => return Err(format!("bad bandwidth unit in {s:?} (K, M, G bits/s)")),
    };
    if !v.is_finite() || v < 0.0 || v * scale > 1e13 {
        return Err(format!("bandwidth {s:?} out of range"));
    }
    Ok((v * scale) as u64)
}

/// Parses a size in bytes (`4K`, `8M`, `1G`, `4096`), saying what is wrong with a bad one in
/// words of sizes (the library's parser speaks of RAM layouts).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    pagehint::layout::parse_size(s).map_err(|e| match e {
        pagehint::layout::LayoutError::Parse(m) => m,
        e => e.to_string(),
    })
}

/// Parses every entry of a comma-separated option; an empty list is an error.
pub fn parse_list<T: std::str::FromStr<Err = String>>(
    what: &str,
    v: &[String],
) -> Result<Vec<T>, String> {
    if v.is_empty() {
        return Err(format!("--{what} needs at least one entry"));
    }
    v.iter()
        .map(|s| s.parse().map_err(|e| format!("--{what}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_bits("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_bits("2.5Gbit").unwrap(), 2_500_000_000);
        assert_eq!(parse_bits("800M").unwrap(), 800_000_000);
        assert!(parse_bits("10T").is_err());
        assert_eq!(parse_bytes("8M").unwrap(), 8 << 20);
        let e = parse_bytes("1X").unwrap_err();
        assert_eq!(e, "unknown size suffix in `1X`");
        #[derive(Debug, PartialEq)]
        struct Mode(String);
        impl std::str::FromStr for Mode {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    "vanilla" | "preempt-hint" => Ok(Self(s.into())),
                    _ => Err(format!("unknown mode {s:?}")),
                }
            }
        }
        let modes: Vec<Mode> =
            parse_list("modes", &["vanilla".into(), "preempt-hint".into()]).unwrap();
        assert_eq!(modes.len(), 2);
        assert!(parse_list::<Mode>("modes", &[]).is_err());
        let e = parse_list::<Mode>("modes", &["fast".into()]).unwrap_err();
        assert!(e.contains("--modes") && e.contains("fast"), "{e}");
    }
}
