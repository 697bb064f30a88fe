//! Durations and times on the command line, as kubectl reads them: `90s`, `5m`, `1h30m`,
//! `2d`, or plain seconds (`60`, what earlier versions took); a sunset is a duration from
//! now or an RFC 3339 time.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

const UNITS: [(char, u64); 4] = [('s', 1), ('m', 60), ('h', 3600), ('d', 86400)];

/// `90s`, `5m`, `1h30m`, `2d`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "{text:?} is not a duration: use seconds or a number with s, m, h or d (90s, 5m, 1h30m)"
        )
    };
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut last_unit = usize::MAX;
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        // Units in decreasing order, each once: `1h30m`, not `30m1h` nor `1m1m`.
        let unit = UNITS
            .iter()
            .position(|(name, _)| *name == c)
            .filter(|unit| last_unit == usize::MAX || *unit < last_unit)
            .ok_or_else(invalid)?;
        let value: u64 = number.parse().map_err(|_| invalid())?;
        total = value
            .checked_mul(UNITS[unit].1)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(invalid)?;
        number.clear();
        last_unit = unit;
    }
    if !number.is_empty() || last_unit == usize::MAX {
        return Err(invalid());
    }
    Ok(Duration::from_secs(total))
}

/// A positive duration (a connection age, a sunset from now).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than 0 seconds"));
    }
    Ok(duration)
}

/// When a client is deleted: at a time, or after a duration from when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sunset {
    At(Timestamp),
    After(Duration),
}

/// An RFC 3339 time (`2026-12-24T18:00:00Z`) or a duration from now (`8h`, `30d`).
pub fn parse_sunset(text: &str) -> Result<Sunset, String> {
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(Sunset::At(at));
    }
    parse_positive_duration(text)
        .map(Sunset::After)
        .map_err(|_| {
            format!(
                "{text:?} is neither an RFC 3339 time (2026-12-24T18:00:00Z) nor a duration (8h, 30d)"
            )
        })
}

impl Sunset {
    /// The time, whole seconds, as the CRD's `sunset` holds it (RFC 3339).
    pub fn at(self, now: Timestamp) -> Result<String, String> {
        let at = match self {
            Sunset::At(at) => at,
            Sunset::After(duration) => SignedDuration::try_from(duration)
                .ok()
                .and_then(|duration| now.checked_add(duration).ok())
                .ok_or_else(|| format!("--sunset {}s from now is too far", duration.as_secs()))?,
        };
        let whole = Timestamp::from_second(at.as_second()).expect("a valid timestamp's seconds");
        Ok(whole.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectls_and_plain_seconds_still_work() {
        for (text, seconds) in [
            ("60", 60),
            ("0", 0),
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("2d", 172_800),
            ("1d2h3m4s", 93_784),
            (" 10s ", 10),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for bad in [
            "",
            "s",
            "5x",
            "-5s",
            "1.5h",
            "30m1h",
            "1m1m",
            "h5",
            "5m3",
            "99999999999999999999s",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("90s, 5m"), "{bad:?}: {error}");
        }
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn a_sunset_is_a_time_or_a_duration_from_now() {
        let now: Timestamp = "2026-12-07T15:00:00.75Z".parse().unwrap();
        assert_eq!(
            parse_sunset("8h").unwrap().at(now).unwrap(),
            "2026-12-07T23:00:00Z"
        );
        assert_eq!(
            parse_sunset("2026-12-24T18:00:00+01:00")
                .unwrap()
                .at(now)
                .unwrap(),
            "2026-12-24T17:00:00Z"
        );
        assert!(parse_sunset("tomorrow").unwrap_err().contains("RFC 3339"));
        assert!(parse_sunset("0s").is_err());
    }
}
