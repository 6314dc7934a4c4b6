//! Byte sizes as people write them in job files and on the command line ("20GiB", "512MiB", "24G").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A number of bytes. Parses binary (`KiB`, `MiB`, `GiB`, `TiB`, and the bare `K`/`M`/`G`/`T`
/// that Slurm and nvidia-smi users write for them) and decimal (`KB`, `MB`, `GB`, `TB`) units.
/// Displays in the largest binary unit that keeps it readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn gib(n: u64) -> Self {
        ByteSize(n * GIB)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * MIB)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
    /// Size in GiB as a float, for tables.
    pub fn as_gib_f64(self) -> f64 {
        self.0 as f64 / GIB as f64
    }
}

/// Why a byte size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (write e.g. \"20GiB\", \"512MiB\" or \"24G\")")]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err("missing number"));
        }
        let value: f64 = num.parse().map_err(|_| err("not a number"))?;
        let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => KIB,
            "m" | "mib" => MIB,
            "g" | "gib" => GIB,
            "t" | "tib" => TIB,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(err("unknown unit")),
        };
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(err("too large"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let (value, unit) = if b >= TIB {
            (b as f64 / TIB as f64, "TiB")
        } else if b >= GIB {
            (b as f64 / GIB as f64, "GiB")
        } else if b >= MIB {
            (b as f64 / MIB as f64, "MiB")
        } else if b >= KIB {
            (b as f64 / KIB as f64, "KiB")
        } else {
            return write!(f, "{b}B");
        };
        if (value - value.round()).abs() < 0.005 {
            write!(f, "{}{unit}", value.round() as u64)
        } else {
            write!(f, "{value:.1}{unit}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"20GiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_bare_units() {
        assert_eq!("20GiB".parse::<ByteSize>().unwrap(), ByteSize::gib(20));
        assert_eq!("24G".parse::<ByteSize>().unwrap(), ByteSize::gib(24));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap(), ByteSize(3 * GIB / 2));
        assert_eq!(
            "80GB".parse::<ByteSize>().unwrap(),
            ByteSize(80_000_000_000)
        );
        assert_eq!("1024".parse::<ByteSize>().unwrap(), ByteSize(1024));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        let e = "twenty".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("missing number"), "{e}");
        let e = "20 parsecs".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        assert!("1e400G".parse::<ByteSize>().is_err());
    }

    #[test]
    fn displays_readably() {
        assert_eq!(ByteSize::gib(24).to_string(), "24GiB");
        assert_eq!(ByteSize(3 * GIB / 2).to_string(), "1.5GiB");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}

/// A duration written as people write them ("30s", "5m", "1h 30m"); serialised the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub std::time::Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        HumanDuration(std::time::Duration::from_secs(s))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?}: {e} (write e.g. \"30s\", \"5m\", \"1h\")")
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration::secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(HumanDuration::secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn parses_and_prints_durations() {
        assert_eq!(
            "30s".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(30)
        );
        assert_eq!(
            "1h 30m".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(5400)
        );
        assert_eq!(HumanDuration::secs(90).to_string(), "1m 30s");
        assert!(
            "soon"
                .parse::<HumanDuration>()
                .unwrap_err()
                .contains("invalid duration")
        );
    }
}
