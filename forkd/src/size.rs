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

/// Serde: a size held in a `usize` (`max_frame_bytes = "1M"`).
pub fn deserialize_usize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = deserialize(d)?;
    usize::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too large")))
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

    /// Every size key of the configuration takes `512M`-style strings.
    #[test]
    fn every_size_in_the_config_takes_suffixes() {
        let c = crate::Config::from_toml(
            "max_frame_bytes = \"1M\"\n[network]\nbandwidth = \"10M\"\n\
             [limits.default]\nmemory_bytes = \"512M\"\noutput_bytes = \"2M\"\n\
             scratch_bytes = \"128M\"\nfile_size_bytes = \"32M\"\n\
             [limits.max]\nmemory_bytes = \"1G\"\n",
        )
        .unwrap();
        assert_eq!(c.max_frame_bytes, 1 << 20);
        assert_eq!(c.network.bandwidth, Some(10 << 20));
        let d = c.limits.default;
        assert_eq!(
            (
                d.memory_bytes,
                d.output_bytes,
                d.scratch_bytes,
                d.file_size_bytes
            ),
            (512 << 20, 2 << 20, 128 << 20, 32 << 20)
        );
        assert_eq!(c.limits.max.memory_bytes, 1 << 30);
        let e = crate::Config::from_toml("max_frame_bytes = \"12X\"").unwrap_err();
        assert!(e.to_string().contains("is not a size like 512M"), "{e}");
    }
}
