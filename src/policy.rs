//! The device policy: which IMEIs may log in. Shared read-mostly state: the shards read it at
//! each login, the housekeeper thread reloads the allow-list from the `devices` table.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::config::DevicePolicyKind;
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
