//! Byte sizes as people write them (`512M`, `1G`, `64KiB`, `1048576`), one
//! parser for the command line and the configuration. Suffixes are binary
//! (K = 1024), with an optional `i` and `B`.

/// Parses a positive byte size.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let lower = s.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    let shift = match unit.trim() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(format!("`{s}` is not a size like 512M, 2G or 1048576")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512M, 2G or 1048576"))?;
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` must be a positive size below 16 EiB"));
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "positive, finite and below u64::MAX (checked above); whole bytes intended"
    )]
    Ok(bytes as u64)
}

/// Serde: a size as an integer or a string (`memory_bytes = "512M"`).
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// Serde: an optional size.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_people_write() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "M", "-1M", "0", "12X", "1e400", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("x").unwrap_err().contains("512M"));
    }
}
