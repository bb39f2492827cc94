//! The devices a shard owns: who is connected on which connection, and per-device counters.
//! Runs on a shard (plain `HashMap`, no locks): only the owning shard ever touches an IMEI.
//!
//! Bounded by live devices, not by every IMEI ever seen: a TCP device's entry goes with its
//! connection, a UDP-only device's entry expires after the idle timeout
//! ([`DeviceTable::expire`]), and at most `capacity` entries exist (spoofed UDP IMEIs cannot
//! grow it without end; what does not fit is counted, not tracked).

use std::collections::HashMap;
use std::rc::Rc;

use super::ConnCtl;
use crate::protocol::Imei;

/// One owned device.
#[derive(Debug, Default)]
pub struct Device {
    /// The TCP connection serving it now (None: UDP only).
    pub conn: Option<Rc<ConnCtl>>,
    pub frames: u64,
    pub records: u64,
    /// Milliseconds since the Unix epoch of the last stored frame.
    pub last_seen_ms: u64,
}

/// IMEI -> device, for the live devices this shard owns.
#[derive(Debug)]
pub struct DeviceTable {
    devices: HashMap<Imei, Device>,
    capacity: usize,
}

impl DeviceTable {
    pub fn new(capacity: usize) -> DeviceTable {
        DeviceTable {
            devices: HashMap::new(),
            capacity,
        }
    }

    /// Records that `conn` now serves `imei`; returns the connection it replaces, if any. A
    /// connection always gets its entry (connections are capped on their own).
    pub fn attach(&mut self, imei: Imei, conn: Rc<ConnCtl>) -> Option<Rc<ConnCtl>> {
        self.devices.entry(imei).or_default().conn.replace(conn)
    }

    /// Connection `conn_id` no longer serves `imei`: the entry goes (unless it was replaced).
    pub fn detach(&mut self, imei: Imei, conn_id: u64) {
        if self
            .devices
            .get(&imei)
            .is_some_and(|d| d.conn.as_ref().is_some_and(|c| c.id == conn_id))
        {
            self.devices.remove(&imei);
        }
    }

    /// Counts a stored frame; `false` when the device has no entry and the table is full.
    pub fn stored(&mut self, imei: Imei, records: u32, now_ms: u64) -> bool {
        let len = self.devices.len();
        let d = match self.devices.get_mut(&imei) {
            Some(d) => d,
            None if len < self.capacity => self.devices.entry(imei).or_default(),
            None => return false,
        };
        d.frames += 1;
        d.records += records as u64;
        d.last_seen_ms = now_ms;
        true
    }

    /// Forgets devices without a connection that sent nothing since `before_ms`.
    pub fn expire(&mut self, before_ms: u64) {
        self.devices
            .retain(|_, d| d.conn.is_some() || d.last_seen_ms >= before_ms);
    }

    /// The connected devices and their connections.
    pub fn connected(&self) -> impl Iterator<Item = (Imei, &Rc<ConnCtl>)> {
        self.devices
            .iter()
            .filter_map(|(i, d)| d.conn.as_ref().map(|c| (*i, c)))
    }

    pub fn get(&self, imei: Imei) -> Option<&Device> {
        self.devices.get(&imei)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    fn ctl(id: u64) -> Rc<ConnCtl> {
        Rc::new(ConnCtl {
            id,
            fd: -1,
            signal: Cell::new(None),
            waker: RefCell::new(None),
        })
    }

    fn imei(n: u64) -> Imei {
        Imei::new(356_000_000_000_000 + n).unwrap()
    }

    #[test]
    fn entries_live_as_long_as_the_device_does() {
        let mut t = DeviceTable::new(2);
        assert!(t.attach(imei(1), ctl(1)).is_none());
        assert_eq!(t.attach(imei(1), ctl(2)).unwrap().id, 1, "replaced");
        t.detach(imei(1), 1);
        assert_eq!(
            t.len(),
            1,
            "the stale connection does not remove its successor"
        );
        t.detach(imei(1), 2);
        assert!(t.is_empty());

        // UDP-only devices: at most `capacity`, expired when silent.
        assert!(t.stored(imei(2), 1, 1_000));
        assert!(t.stored(imei(3), 1, 2_000));
        assert!(!t.stored(imei(4), 1, 2_000), "full: not tracked");
        t.expire(1_500);
        assert!(t.get(imei(2)).is_none());
        assert!(t.stored(imei(4), 1, 3_000));
        assert_eq!(t.len(), 2);
    }
}
