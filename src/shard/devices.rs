//! The devices a shard owns: who is connected on which connection, and per-device counters.
//! Runs on a shard (plain `HashMap`, no locks): only the owning shard ever touches an IMEI.

use std::collections::HashMap;
use std::os::fd::RawFd;

use crate::protocol::Imei;

/// One owned device.
#[derive(Debug, Default)]
pub struct Device {
    /// The connection serving it now (None: not connected).
    pub conn: Option<(u64, RawFd)>,
    pub connects: u64,
    pub frames: u64,
    pub records: u64,
    /// Milliseconds since the Unix epoch of the last frame.
    pub last_seen_ms: u64,
}

/// IMEI -> device, for the IMEIs this shard owns.
#[derive(Debug, Default)]
pub struct DeviceTable {
    devices: HashMap<Imei, Device>,
}

impl DeviceTable {
    /// Records that `conn` now serves `imei`; returns the connection it replaces, if any.
    pub fn attach(&mut self, imei: Imei, conn: (u64, RawFd)) -> Option<(u64, RawFd)> {
        let d = self.devices.entry(imei).or_default();
        d.connects += 1;
        d.conn.replace(conn)
    }

    /// Records that connection `conn_id` no longer serves `imei` (unless it was replaced).
    pub fn detach(&mut self, imei: Imei, conn_id: u64) {
        if let Some(d) = self.devices.get_mut(&imei) {
            if d.conn.is_some_and(|(id, _)| id == conn_id) {
                d.conn = None;
            }
        }
    }

    /// Counts a stored frame.
    pub fn stored(&mut self, imei: Imei, records: u32, now_ms: u64) {
        let d = self.devices.entry(imei).or_default();
        d.frames += 1;
        d.records += records as u64;
        d.last_seen_ms = now_ms;
    }

    pub fn get(&self, imei: Imei) -> Option<&Device> {
        self.devices.get(&imei)
    }
}
