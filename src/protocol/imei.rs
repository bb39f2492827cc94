//! The IMEI login handshake: 2-byte big-endian length, ASCII digits; 1-byte reply. PURE.

use std::fmt;

/// A device identity: the 15 decimal digits of its IMEI, kept as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Imei(u64);

/// Reply to a login that is accepted.
pub const LOGIN_ACCEPT: u8 = 0x01;
/// Reply to a login that is refused (bad IMEI or refused by the device policy).
pub const LOGIN_REJECT: u8 = 0x00;
/// Longest login length field accepted as a login at all; longer is garbage, not a device.
pub const MAX_LOGIN_LEN: u16 = 32;

impl Imei {
    /// Largest value a 15-digit IMEI can have.
    pub const MAX: u64 = 999_999_999_999_999;

    /// Exactly 15 ASCII digits.
    pub fn from_ascii(digits: &[u8]) -> Option<Imei> {
        if digits.len() != 15 {
            return None;
        }
        let mut v: u64 = 0;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (d - b'0') as u64;
        }
        Some(Imei(v))
    }

    /// From a number of at most 15 digits.
    pub fn new(v: u64) -> Option<Imei> {
        (v <= Self::MAX).then_some(Imei(v))
    }

    /// The IMEI as a number (what the database stores).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The 15 ASCII digits.
    pub fn to_ascii(self) -> [u8; 15] {
        let mut out = [b'0'; 15];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out
    }

    /// The 8-byte IMEI field of Codec 14/15: the digits as hex nibbles, left padded with 0
    /// (`352093081452251` -> `03 52 09 30 81 45 22 51`).
    pub fn to_bcd_field(self) -> [u8; 8] {
        let d = self.to_ascii();
        let mut nibbles = [0u8; 16];
        for (i, &c) in d.iter().enumerate() {
            nibbles[i + 1] = c - b'0';
        }
        let mut out = [0u8; 8];
        for i in 0..8 {
            out[i] = (nibbles[2 * i] << 4) | nibbles[2 * i + 1];
        }
        out
    }

    /// Parses the 8-byte IMEI field of Codec 14/15; every nibble must be a decimal digit.
    pub fn from_bcd_field(field: &[u8; 8]) -> Option<Imei> {
        let mut v: u64 = 0;
        for &b in field {
            let (hi, lo) = (b >> 4, b & 0x0f);
            if hi > 9 || lo > 9 {
                return None;
            }
            v = v * 100 + (hi as u64) * 10 + lo as u64;
        }
        Imei::new(v)
    }
}

impl fmt::Display for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:015}", self.0)
    }
}

/// Appends a login message for `imei` (what a device sends first).
pub fn encode_login(imei: Imei, out: &mut Vec<u8>) {
    out.extend_from_slice(&15u16.to_be_bytes());
    out.extend_from_slice(&imei.to_ascii());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_round_trip_keeps_leading_zeros() {
        let i = Imei::from_ascii(b"012345678901234").unwrap();
        assert_eq!(i.as_u64(), 12345678901234);
        assert_eq!(&i.to_ascii(), b"012345678901234");
        assert_eq!(i.to_string(), "012345678901234");
    }

    #[test]
    fn rejects_wrong_length_and_non_digits() {
        assert!(Imei::from_ascii(b"35630704244101").is_none());
        assert!(Imei::from_ascii(b"3563070424410133").is_none());
        assert!(Imei::from_ascii(b"35630704244101x").is_none());
    }

    #[test]
    fn bcd_field() {
        let i = Imei::from_ascii(b"352093081452251").unwrap();
        assert_eq!(
            i.to_bcd_field(),
            [0x03, 0x52, 0x09, 0x30, 0x81, 0x45, 0x22, 0x51]
        );
        assert_eq!(Imei::from_bcd_field(&i.to_bcd_field()), Some(i));
        assert_eq!(Imei::from_bcd_field(&[0x0a, 0, 0, 0, 0, 0, 0, 0]), None);
    }
}
