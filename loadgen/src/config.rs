//! The resolved run configuration: what the command line asked for, checked and with every
//! default filled in. It is serde so that the same value is the `config` of the JSON report
//! and the whole input of a `--processes` worker (one JSON argument, nothing to keep in sync
//! with the command line).

use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;
use fleetgate::protocol::Codec;
use serde::{Deserialize, Serialize};

use crate::pacing::{frame_interval, Share};

/// How long devices wait for outstanding acks after sending stops.
pub const DRAIN: Duration = Duration::from_secs(5);
/// What the automatic hard cap allows past ramp + duration + drain.
pub const HARD_CAP_MARGIN: Duration = Duration::from_secs(30);

/// AVL codec of the generated records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum CodecArg {
    /// Codec 8: one-byte IO ids and counts.
    #[value(name = "8")]
    #[serde(rename = "8")]
    C8,
    /// Codec 8 Extended: two-byte IO ids and counts, plus variable-length (NX) elements.
    #[value(name = "8e", alias = "8E")]
    #[serde(rename = "8e")]
    C8e,
    /// Codec 16: two-byte IO ids, one-byte counts, a generation type.
    #[value(name = "16")]
    #[serde(rename = "16")]
    C16,
}

impl CodecArg {
    pub fn codec(self) -> Codec {
        match self {
            CodecArg::C8 => Codec::C8,
            CodecArg::C8e => Codec::C8E,
            CodecArg::C16 => Codec::C16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CodecArg::C8 => "8",
            CodecArg::C8e => "8e",
            CodecArg::C16 => "16",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// Closed loop: each device sends when its in-flight window allows. Open loop: the fleet
/// offers a fixed records/s whatever the gateway does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

/// One run, as every process of it sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub addr: SocketAddr,
    pub transport: Transport,
    pub codec: CodecArg,
    /// Devices of this run (of this process, in a worker).
    pub devices: u64,
    pub imei_base: u64,
    pub processes: u64,
    /// Tokio worker threads per process.
    pub threads: usize,
    pub records_per_frame: usize,
    pub io_per_record: usize,
    pub in_flight: usize,
    pub mode: Mode,
    /// Open loop: records/s offered by the devices of this config; 0 in closed loop.
    pub rate_records_per_s: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub ack_timeout_s: f64,
    /// Connection attempts per second (0: unpaced).
    pub connect_rate: f64,
    pub connect_timeout_s: f64,
    pub source_addrs: u8,
    pub drop_fraction: f64,
    pub drop_interval_s: f64,
    pub command_delay_ms: u64,
    /// The run ends by this many seconds after its start whatever happens.
    pub hard_cap_s: f64,
    /// First record timestamp, ms since the Unix epoch.
    pub ts_base_ms: u64,
    /// A worker starts its clock here (ms since the Unix epoch), so that the processes of a
    /// run share one timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_unix_ms: Option<u64>,
}

impl Config {
    /// Expected time for every device to get its first connect token.
    pub fn ramp(&self) -> Duration {
        if self.connect_rate > 0.0 {
            Duration::from_secs_f64(self.devices as f64 / self.connect_rate)
        } else {
            Duration::ZERO
        }
    }

    /// The automatic hard cap: ramp, duration and drain, plus a margin.
    pub fn auto_hard_cap(&self) -> Duration {
        self.ramp() + Duration::from_secs_f64(self.duration_s) + DRAIN + HARD_CAP_MARGIN
    }

    /// Open loop: the time between one device's frames.
    pub fn frame_interval(&self) -> Option<Duration> {
        match self.mode {
            Mode::Closed => None,
            Mode::Open => frame_interval(
                self.rate_records_per_s,
                self.devices,
                self.records_per_frame,
            )
            .ok(),
        }
    }

    /// The configuration of the worker process that runs `share` of this run's devices:
    /// its IMEIs, and its part of the fleet-wide rates (so per-device pacing is unchanged).
    pub fn for_share(&self, share: Share, threads: usize, start_at_unix_ms: u64) -> Config {
        Config {
            devices: share.count,
            imei_base: self.imei_base + share.offset,
            processes: 1,
            threads,
            rate_records_per_s: share.of_rate(self.rate_records_per_s, self.devices),
            connect_rate: share.of_rate(self.connect_rate, self.devices),
            start_at_unix_ms: Some(start_at_unix_ms),
            ..self.clone()
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::pacing::split;

    /// A plausible configuration for tests.
    pub fn sample() -> Config {
        Config {
            addr: "127.0.0.1:5027".parse().unwrap(),
            transport: Transport::Tcp,
            codec: CodecArg::C8e,
            devices: 18_000,
            imei_base: 350_000_000_000_000,
            processes: 3,
            threads: 2,
            records_per_frame: 10,
            io_per_record: 25,
            in_flight: 1,
            mode: Mode::Open,
            rate_records_per_s: 90_000.0,
            duration_s: 20.0,
            warmup_s: 2.0,
            ack_timeout_s: 5.0,
            connect_rate: 5000.0,
            connect_timeout_s: 5.0,
            source_addrs: 8,
            drop_fraction: 0.01,
            drop_interval_s: 5.0,
            command_delay_ms: 100,
            hard_cap_s: 70.0,
            ts_base_ms: 1_700_000_000_000,
            start_at_unix_ms: None,
        }
    }

    #[test]
    fn worker_configs_keep_the_timeline_and_split_the_rates() {
        let c = sample();
        let parts: Vec<Config> = split(c.devices, 3)
            .into_iter()
            .map(|s| c.for_share(s, 1, 42))
            .collect();
        assert_eq!(parts.iter().map(|p| p.devices).sum::<u64>(), c.devices);
        assert_eq!(parts[1].imei_base, c.imei_base + 6000);
        let rate: f64 = parts.iter().map(|p| p.rate_records_per_s).sum();
        assert!((rate - c.rate_records_per_s).abs() < 1e-6);
        for p in &parts {
            let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_micros(1);
            assert!(close(p.ramp(), c.ramp()), "same ramp in every process");
            assert!(close(
                p.frame_interval().unwrap(),
                c.frame_interval().unwrap()
            ));
            assert_eq!(p.start_at_unix_ms, Some(42));
            // The worker's input is this JSON: it must come back identical.
            let back: Config = serde_json::from_str(&serde_json::to_string(p).unwrap()).unwrap();
            assert_eq!(&back, p);
        }
        assert_eq!(c.ramp(), Duration::from_secs_f64(3.6));
    }
}
