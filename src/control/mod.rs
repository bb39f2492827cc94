//! The control plane: the admin/command API, the command ledger and dispatcher, event delivery
//! (webhooks) and metrics. Runs on its own thread (a tokio current-thread runtime), talks to
//! shards by message: it sends [`crate::shard::ShardMsg`]s to their inboxes, they answer on
//! oneshot channels or report through the [`ControlTx`] they were given.

pub mod api;
pub mod commands;

use tokio::sync::mpsc;

use crate::protocol::Imei;

/// What shards report to the control thread.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlMsg {
    /// A device logged in on this gateway (its owning shard).
    DeviceOnline { imei: Imei, shard: usize },
    /// A device's session ended (and no newer connection replaced it).
    DeviceOffline { imei: Imei },
    /// Command `id` was handed to the device's socket.
    CommandSent { id: i64, imei: Imei },
    /// Command `id` was not sent (the device is not connected here, has a command in flight,
    /// or is ending), or was in flight when its session ended: it may be sent again.
    CommandUndelivered { id: i64, imei: Imei },
    /// The device answered command `id`: a response (`refused: false`) or a Codec 14 refusal.
    CommandAnswered {
        id: i64,
        imei: Imei,
        refused: bool,
        text: String,
    },
    /// Command `id` got no answer within the command timeout.
    CommandTimedOut { id: i64, imei: Imei },
}

/// The shards' side of the control channel: never blocks (unbounded: shards send a few
/// messages per session and per command, all bounded by sessions and commands in flight).
pub type ControlTx = mpsc::UnboundedSender<ControlMsg>;
/// The control thread's side.
pub type ControlRx = mpsc::UnboundedReceiver<ControlMsg>;

/// A new control channel.
pub fn channel() -> (ControlTx, ControlRx) {
    mpsc::unbounded_channel()
}
