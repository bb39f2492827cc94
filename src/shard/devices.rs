//! The devices a shard owns: who is connected on which connection, and per-device counters.
//! Runs on a shard (plain `HashMap`, no locks): only the owning shard ever touches an IMEI.
//!
//! Bounded by live devices, not by every IMEI ever seen: a TCP device's entry goes with its
//! connection, a UDP-only device's entry expires after the idle timeout
//! ([`DeviceTable::expire`]), and at most `capacity` entries exist (spoofed UDP IMEIs cannot
//! grow it without end; what does not fit is counted, not tracked).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::rc::Rc;

use super::ConnCtl;
use crate::protocol::Imei;
use crate::time::utc_text;

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

/// IMEI -> device, for the live devices this shard owns; ordered, so that the API pages
/// through them by IMEI without sorting.
#[derive(Debug)]
pub struct DeviceTable {
    devices: BTreeMap<Imei, Device>,
    capacity: usize,
}

impl DeviceTable {
    pub fn new(capacity: usize) -> DeviceTable {
        DeviceTable {
            devices: BTreeMap::new(),
            capacity,
        }
    }

    /// Records that `conn` now serves `imei`; returns the connection it replaces, if any. A
    /// connection always gets its entry (connections are capped on their own).
    pub fn attach(&mut self, imei: Imei, conn: Rc<ConnCtl>) -> Option<Rc<ConnCtl>> {
        self.devices.entry(imei).or_default().conn.replace(conn)
    }

    /// Connection `conn_id` no longer serves `imei`: the entry goes, unless a newer connection
    /// replaced it (`false`: the device is still connected).
    pub fn detach(&mut self, imei: Imei, conn_id: u64) -> bool {
        let ours = self
            .devices
            .get(&imei)
            .is_some_and(|d| d.conn.as_ref().is_some_and(|c| c.id == conn_id));
        if ours {
            self.devices.remove(&imei);
        }
        ours
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

    /// Up to `limit` connected devices with an IMEI in `range`, after `after`, in IMEI order.
    pub fn page(
        &self,
        shard: usize,
        range: (Imei, Imei),
        after: Option<Imei>,
        limit: usize,
    ) -> Vec<DeviceInfo> {
        let lo = match after {
            Some(a) if a >= range.0 => Bound::Excluded(a),
            _ => Bound::Included(range.0),
        };
        self.devices
            .range((lo, Bound::Included(range.1)))
            .filter_map(|(i, d)| d.conn.as_ref().map(|c| DeviceInfo::of(*i, shard, c)))
            .take(limit)
            .collect()
    }

    /// The live session of `imei`, if it is connected here.
    pub fn info(&self, shard: usize, imei: Imei) -> Option<DeviceInfo> {
        let d = self.devices.get(&imei)?;
        d.conn.as_ref().map(|c| DeviceInfo::of(imei, shard, c))
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

/// A connected device as the API shows it (`GET /api/v1/devices[/{imei}]`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DeviceInfo {
    /// The 15 digits.
    pub imei: String,
    pub shard: usize,
    pub transport: &'static str,
    pub remote_addr: Option<String>,
    pub connected_since: Option<String>,
    /// When the last frame was received, and when bytes were last sent to the device.
    pub last_frame_at: Option<String>,
    pub last_sent_at: Option<String>,
    pub frames_received: u64,
    pub records_received: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub commands_sent: u64,
    pub last_position: Option<Position>,
}

/// The last position a device reported.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Position {
    /// The device's time of the fix.
    pub time: Option<String>,
    pub lat: f64,
    pub lon: f64,
    pub alt: i16,
    pub angle: u16,
    pub sats: u8,
    pub speed: u16,
}

impl DeviceInfo {
    fn of(imei: Imei, shard: usize, c: &ConnCtl) -> DeviceInfo {
        let l = &c.live;
        let when = |ms: u64| (ms > 0).then(|| utc_text(ms)).flatten();
        DeviceInfo {
            imei: imei.to_string(),
            shard,
            transport: "tcp",
            remote_addr: l.peer.get().map(|p| p.to_string()),
            connected_since: when(l.connected_at_ms.get()),
            last_frame_at: when(l.last_frame_ms.get()),
            last_sent_at: when(l.last_sent_ms.get()),
            frames_received: l.frames.get(),
            records_received: l.records.get(),
            bytes_received: l.bytes_received.get(),
            bytes_sent: l.bytes_sent.get(),
            commands_sent: l.commands_sent.get(),
            last_position: l.last_fix.get().map(|f| Position {
                time: utc_text(f.ts_ms),
                lat: f.lat,
                lon: f.lon,
                alt: f.alt,
                angle: f.angle,
                sats: f.sats,
                speed: f.speed,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl(id: u64) -> Rc<ConnCtl> {
        Rc::new(ConnCtl::new(id))
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

    #[test]
    fn pages_in_imei_order_within_a_range_and_only_connected_devices() {
        let mut t = DeviceTable::new(100);
        for n in [5, 1, 9, 3, 7] {
            t.attach(imei(n), ctl(n));
        }
        t.stored(imei(4), 1, 1); // UDP only: not listed
        let all = (imei(0), imei(99));
        let ids = |v: Vec<DeviceInfo>| v.into_iter().map(|d| d.imei).collect::<Vec<_>>();
        assert_eq!(
            ids(t.page(0, all, None, 3)),
            [imei(1), imei(3), imei(5)].map(|i| i.to_string())
        );
        assert_eq!(
            ids(t.page(0, all, Some(imei(5)), 3)),
            [imei(7), imei(9)].map(|i| i.to_string())
        );
        assert_eq!(
            ids(t.page(0, (imei(3), imei(7)), Some(imei(3)), 10)),
            [imei(5), imei(7)].map(|i| i.to_string())
        );
        assert!(t.info(0, imei(4)).is_none());
        assert_eq!(t.info(0, imei(9)).unwrap().shard, 0);
    }
}
