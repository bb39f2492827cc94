//! The device policies: which IMEIs may log in, and whose telemetry becomes events. Shared
//! read-mostly state: the shards read them (at each login; before summarising a frame), the
//! housekeeper thread reloads their sets from the `devices` table.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::config::{DevicePolicyKind, TelemetryEventsKind};
use crate::protocol::Imei;

/// Who may log in.
#[derive(Debug)]
pub struct DevicePolicy {
    kind: DevicePolicyKind,
    allowed: RwLock<Arc<HashSet<u64>>>,
}

impl DevicePolicy {
    pub fn new(kind: DevicePolicyKind) -> DevicePolicy {
        DevicePolicy {
            kind,
            allowed: RwLock::new(Arc::new(HashSet::new())),
        }
    }

    pub fn kind(&self) -> DevicePolicyKind {
        self.kind
    }

    /// Whether `imei` may log in now.
    pub fn admits(&self, imei: Imei) -> bool {
        match self.kind {
            DevicePolicyKind::Open => true,
            DevicePolicyKind::AllowList => {
                let set = self
                    .allowed
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                set.contains(&imei.as_u64())
            }
        }
    }

    /// Replaces the allow-list (the enabled rows of `devices`). Returns whether the set
    /// changed, so the reloader can tell the shards only when there is something to act on.
    pub fn set_allowed(&self, allowed: HashSet<u64>) -> bool {
        let mut current = self.allowed.write().unwrap_or_else(|p| p.into_inner());
        if **current == allowed {
            return false;
        }
        *current = Arc::new(allowed);
        true
    }
}

/// Whose telemetry is published as `devices/{imei}/telemetry` events (config key
/// `telemetry_events`). Shards ask [`TelemetryPolicy::wants_telemetry`] for every AVL frame,
/// before building its summary; under `none` that is one comparison and nothing else.
#[derive(Debug)]
pub struct TelemetryPolicy {
    kind: TelemetryEventsKind,
    /// Under `opted_in`: the devices whose `devices.telemetry_events` is true.
    opted_in: RwLock<HashSet<u64>>,
}

impl TelemetryPolicy {
    pub fn new(kind: TelemetryEventsKind) -> TelemetryPolicy {
        TelemetryPolicy {
            kind,
            opted_in: RwLock::new(HashSet::new()),
        }
    }

    pub fn kind(&self) -> TelemetryEventsKind {
        self.kind
    }

    /// Whether frames of `imei` should carry a telemetry summary to the writer.
    #[inline]
    pub fn wants_telemetry(&self, imei: Imei) -> bool {
        match self.kind {
            TelemetryEventsKind::None => false,
            TelemetryEventsKind::All => true,
            TelemetryEventsKind::OptedIn => self
                .opted_in
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&imei.as_u64()),
        }
    }

    /// Replaces the opted-in set; returns whether it changed.
    pub fn set_opted_in(&self, devices: HashSet<u64>) -> bool {
        let mut current = self.opted_in.write().unwrap_or_else(|p| p.into_inner());
        if *current == devices {
            return false;
        }
        *current = devices;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_policy_by_kind() {
        let a = Imei::new(356_307_042_441_013).unwrap();
        let b = Imei::new(356_307_042_441_014).unwrap();
        assert!(!TelemetryPolicy::new(TelemetryEventsKind::None).wants_telemetry(a));
        assert!(TelemetryPolicy::new(TelemetryEventsKind::All).wants_telemetry(a));
        let p = TelemetryPolicy::new(TelemetryEventsKind::OptedIn);
        assert!(!p.wants_telemetry(a));
        assert!(p.set_opted_in([a.as_u64()].into()));
        assert!(!p.set_opted_in([a.as_u64()].into()));
        assert!(p.wants_telemetry(a) && !p.wants_telemetry(b));
    }
}
