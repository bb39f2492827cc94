//! CRC-16/IBM (CRC-16/ARC): reflected polynomial 0xA001, init 0, no final xor. PURE.
//!
//! Slicing-by-8: eight 256-entry tables built at compile time let the loop consume eight bytes
//! per step with independent table look-ups, which is what keeps the CRC from dominating the
//! decode cost (a byte-at-a-time loop is serial on the previous result).

const fn build_tables() -> [[u16; 256]; 8] {
    let mut t = [[0u16; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u16; 256]; 8] = build_tables();

/// CRC-16/IBM of `data`.
pub fn crc16_ibm(data: &[u8]) -> u16 {
    let t = &TABLES;
    let mut crc: u16 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let x = crc ^ u16::from_le_bytes([c[0], c[1]]);
        crc = t[7][(x & 0xff) as usize]
            ^ t[6][(x >> 8) as usize]
            ^ t[5][c[2] as usize]
            ^ t[4][c[3] as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u16) & 0xff) as usize];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u16 {
        let mut crc = 0u16;
        for &b in data {
            crc ^= b as u16;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
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
