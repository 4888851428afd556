//! Snapshot names, sizes, durations and times as users type them.

use crate::error::{Error, Result};

/// 1–128 characters of `A-Z a-z 0-9 . _ - + : @`, not starting with `-` or `.`; `origin` is the
/// live volume's name.
pub fn validate(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-+:@".contains(c);
    if name.is_empty() {
        return Err(Error::Invalid(
            "a snapshot name must not be empty; use 1 to 128 characters".into(),
        ));
    }
    if name.len() > 128 {
        // The first characters are enough to recognise it; the line stays readable.
        let head: String = name.chars().take(24).collect();
        return Err(Error::Invalid(format!(
            "snapshot name '{head}...' is {} bytes long; use 1 to 128 characters",
            name.len()
        )));
    }
    if let Some(bad) = name.chars().find(|c| !ok_char(*c)) {
        return Err(Error::Invalid(format!(
            "snapshot name '{name}' contains '{bad}'; use only letters, digits and . _ - + : @"
        )));
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err(Error::Invalid(format!(
            "snapshot name '{name}' must not start with '-' or '.'"
        )));
    }
    if name == "origin" {
        return Err(Error::Invalid(
            "'origin' is reserved for the live volume; pick another snapshot name".into(),
        ));
    }
    Ok(())
}

/// A snapshot label, from `--label KEY=VALUE` or from a control client: a key of 1–64
/// characters of `A-Z a-z 0-9 . _ - /`, a value of at most 256 bytes and no control character.
/// The snapshot record keeps each string in at most 64 KiB (docs/FORMAT.md); these bounds keep
/// labels far below that. `Err` is the message, starting with "label".
pub fn validate_label(key: &str, value: &str) -> std::result::Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    if !key_ok {
        return Err(format!(
            "label key '{key}' must be 1-64 characters of A-Z a-z 0-9 . _ - /"
        ));
    }
    if value.len() > 256 || value.chars().any(|c| c.is_control()) {
        return Err(format!(
            "label value for '{key}' must be at most 256 printable characters"
        ));
    }
    Ok(())
}

/// `4096`, `4K`, `4KiB`, `1M`, `1MiB`, `2G`... (binary units; `B` optional).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        Error::Invalid(format!(
            "'{s}' is not a size; write it like 4096, 4K, 4KiB, 1M or 1MiB"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// `90m`, `12h`, `7d`, `2w`, `30s` → seconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    let t = s.trim();
    // The unit is the last character, which need not be one byte ("3€" is not a duration).
    let unit = t.chars().next_back()?;
    let num = &t[..t.len() - unit.len_utf8()];
    let n: i64 = num.parse().ok().filter(|n| *n > 0)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        'w' => 7 * 86400,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `--expires WHEN`: an RFC 3339 time or a duration from `now`; must lie in the future.
pub fn parse_expiry(s: &str, now: i64) -> Result<i64> {
    let at = if let Some(d) = parse_duration(s) {
        now.checked_add(d)
    } else {
        chrono::DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.timestamp())
    };
    let at = at.ok_or_else(|| {
        Error::Invalid(format!(
            "--expires '{s}' is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor a duration (90m, 12h, 7d, 2w)"
        ))
    })?;
    if at <= now {
        return Err(Error::Invalid(format!(
            "--expires '{s}' is in the past; give a future time or a duration"
        )));
    }
    Ok(at)
}

/// Unix seconds → RFC 3339 in UTC.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rules() {
        for ok in ["a", "daily-2026.11.22", "x+y:z@w_1", &"n".repeat(128)] {
            validate(ok).unwrap();
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "origin",
            &"n".repeat(129),
            "é",
        ] {
            assert!(validate(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn labels_follow_the_documented_rules() {
        validate_label("period", "daily").unwrap();
        validate_label("a/b.c_d-e", &"v".repeat(256)).unwrap();
        for (k, v) in [
            ("", "v"),
            ("a b", "v"),
            (&"k".repeat(65) as &str, "v"),
            ("k", &"v".repeat(257) as &str),
            ("k", "line\nbreak"),
        ] {
            assert!(validate_label(k, v).is_err(), "{k}={v} accepted");
        }
    }

    #[test]
    fn sizes_accept_the_documented_spellings() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        for bad in ["", "K", "4X", "-4K", "99999999999999999999", "4 K K"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn expiry_takes_durations_and_times_and_refuses_the_past() {
        let now = 1_800_000_000;
        assert_eq!(parse_expiry("90m", now).unwrap(), now + 5400);
        assert_eq!(parse_expiry("2w", now).unwrap(), now + 14 * 86400);
        assert!(parse_expiry("2030-01-01T00:00:00Z", now).is_ok());
        assert!(parse_expiry("2020-01-01T00:00:00Z", now).is_err());
        assert!(parse_expiry("soon", now).is_err());
        assert!(parse_expiry("0h", now).is_err());
        // Found by the config fuzz target: a last character of several bytes panicked.
        for bad in ["3€", "€", "1é", "h", ""] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
