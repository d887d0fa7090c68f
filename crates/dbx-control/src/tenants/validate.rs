//! Checks of every value a tenant command is given, before anything touches the database;
//! each error names the command-line flag the value came from, and says what is accepted.

use std::time::Duration;

use super::{invalid, TenantError};

/// Longest accepted `--expires`: 100 years, far beyond any sensible key lifetime.
pub(super) const MAX_EXPIRY: Duration = Duration::from_secs(100 * 366 * 86_400);

fn starts_alnum(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// An organization code: 1 to 50 ASCII letters, digits, `-` or `_`, starting with a letter or digit.
pub fn validate_code(flag: &'static str, code: &str) -> Result<(), TenantError> {
    let ok = (1..=50).contains(&code.len())
        && starts_alnum(code)
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            flag,
            format!("{code:?} must be 1 to 50 letters, digits, '-' or '_', starting with a letter or digit"),
        ))
    }
}

/// Free text (names, types, models): not blank, at most `max` characters, no control characters.
pub fn validate_text(flag: &'static str, value: &str, max: usize) -> Result<(), TenantError> {
    if value.trim().is_empty() {
        return Err(invalid(flag, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(invalid(flag, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(flag, "must not contain control characters"));
    }
    Ok(())
}

/// An aircraft registration number: 1 to 20 ASCII letters, digits or dashes, starting with a
/// letter or digit — the rule of `dbx_aviation.register_aircraft` (auto-registration).
pub fn validate_registration(registration: &str) -> Result<(), TenantError> {
    let ok = (1..=20).contains(&registration.len())
        && starts_alnum(registration)
        && registration
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--registration",
            format!(
                "{registration:?} must be 1 to 20 letters, digits or dashes, starting with a letter or digit (e.g. N123AB, G-ABCD)"
            ),
        ))
    }
}

/// A key label: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit.
pub fn validate_label(label: &str) -> Result<(), TenantError> {
    let ok = (1..=64).contains(&label.len())
        && starts_alnum(label)
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--label",
            format!("{label:?} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
        ))
    }
}

/// `data_retention_days`: 1 to 36 500.
pub fn validate_retention_days(days: i32) -> Result<(), TenantError> {
    if (1..=36_500).contains(&days) {
        Ok(())
    } else {
        Err(invalid(
            "--retention-days",
            format!("{days} must be between 1 and 36500 days"),
        ))
    }
}

/// `ingest_points_per_sec`: positive (use `--unlimited` for no limit).
pub fn validate_points_per_sec(rate: i32) -> Result<(), TenantError> {
    if rate > 0 {
        Ok(())
    } else {
        Err(invalid(
            "--points-per-sec",
            format!("{rate} must be a positive number of points per second (--unlimited removes the limit)"),
        ))
    }
}

/// Parses a duration such as `30d`, `12h`, `90m`, `45s` or `2w` (a positive whole number and a
/// unit); `flag` names the flag in the error.
pub fn parse_duration(flag: &'static str, text: &str) -> Result<Duration, TenantError> {
    let bad = || {
        invalid(
            flag,
            format!("{text:?} is not a duration: use a positive whole number and a unit: s, m, h, d or w (e.g. 30d, 12h, 90m)"),
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    let d = n
        .checked_mul(secs_per)
        .map(Duration::from_secs)
        .filter(|d| *d <= MAX_EXPIRY)
        .ok_or_else(|| invalid(flag, format!("{text:?} is longer than 100 years")))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(
            parse_duration("--expires", "30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("--expires", "12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(
            parse_duration("--expires", "90m").unwrap(),
            Duration::from_secs(90 * 60)
        );
        assert_eq!(
            parse_duration("--expires", "45s").unwrap(),
            Duration::from_secs(45)
        );
        assert_eq!(
            parse_duration("--expires", "2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "-1d",
            "1.5d",
            "30x",
            "30 days",
            "99999999999999999999d",
        ] {
            let e = parse_duration("--expires", bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid --expires: "),
                "{bad:?}: {e}"
            );
        }
        assert!(parse_duration("--expires", "40000d")
            .unwrap_err()
            .to_string()
            .contains("100 years"));
    }

    #[test]
    fn registrations_follow_register_aircraft() {
        for ok in ["N123AB", "G-ABCD", "9H-XYZ", "A", "ABCDEFGHIJ0123456789"] {
            validate_registration(ok).unwrap();
        }
        for bad in [
            "",
            "-ABC",
            "N 123",
            "N123_AB",
            "ABCDEFGHIJ01234567890",
            "Ñ123",
        ] {
            let e = validate_registration(bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid --registration: "),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn codes_labels_and_numbers_are_checked() {
        validate_code("--code", "ACME-1_x").unwrap();
        assert!(validate_code("--code", "").is_err());
        assert!(validate_code("--code", "_x").is_err());
        assert!(validate_code("--code", &"A".repeat(51)).is_err());
        validate_label("rot-2024.05_a").unwrap();
        assert!(validate_label("has space").is_err());
        assert!(validate_label(&"k".repeat(65)).is_err());
        assert!(validate_retention_days(0).is_err());
        assert!(validate_retention_days(36_501).is_err());
        validate_retention_days(30).unwrap();
        let e = validate_points_per_sec(0).unwrap_err().to_string();
        assert!(e.starts_with("invalid --points-per-sec"), "{e}");
        assert!(validate_text("--name", "  ", 10).is_err());
        assert!(validate_text("--name", "a\nb", 10).is_err());
        assert!(validate_text("--name", "abcdefghijk", 10).is_err());
        validate_text("--name", "Zürich Air", 10).unwrap();
    }
}
