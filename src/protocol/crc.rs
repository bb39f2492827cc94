//! CRC-16/IBM (CRC-16/ARC): reflected polynomial 0xA001, init 0, no final xor. PURE.
//!
//! The `crc` crate's slice-by-16 tables: measured at twice the speed of a hand-written
//! slice-by-8 on the same machine and run (3.9 vs 1.9 GiB/s on 1 KiB, `cargo bench --bench
//! decode -- crc16`), and the CRC is a large share of a frame's decode cost.

use crc::{Crc, Table, CRC_16_ARC};

static CRC16_IBM: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&CRC_16_ARC);

/// CRC-16/IBM of `data`.
pub fn crc16_ibm(data: &[u8]) -> u16 {
    CRC16_IBM.checksum(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u16 {
        let mut crc = 0u16;
        for &b in data {
            crc ^= b as u16;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xA001
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn check_value() {
        // The catalogue check value of CRC-16/ARC.
        assert_eq!(crc16_ibm(b"123456789"), 0xBB3D);
        assert_eq!(crc16_ibm(b""), 0);
    }

    proptest::proptest! {
        #[test]
        fn sliced_equals_bitwise(data: Vec<u8>) {
            proptest::prop_assert_eq!(crc16_ibm(&data), bitwise(&data));
        }
    }
}
