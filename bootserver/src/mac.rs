//! Ethernet MAC addresses as used in DHCP, URLs and the boot-mode store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected six hex bytes separated by ':' or '-')")]
pub struct ParseMacError(pub String);

impl MacAddr {
    /// The MAC from a DHCP `chaddr` field, if it is an Ethernet address.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 6] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    /// The MAC written with dashes (`52-54-00-12-34-56`), the form used in URLs.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }

    /// True for the broadcast and multicast addresses, which no NIC owns.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_colon_and_dash_forms_and_prints_lowercase() {
        let a: MacAddr = "52:54:00:AB:cd:01".parse().expect("colon form");
        let b: MacAddr = "52-54-00-ab-cd-01".parse().expect("dash form");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(a.dashed(), "52-54-00-ab-cd-01");
    }

    #[test]
    fn rejects_malformed_macs() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
            "525400abcd01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} should be refused");
        }
    }
}
