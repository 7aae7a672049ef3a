//! Device kinds for Ottomato, and the [`Workload`] trait they implement.
//!
//! This crate is the *device side* of Ottomato: it knows how to talk to a device
//! (or, for [`sim`], how to pretend to), and nothing about actors, supervision,
//! NATS or placement. The engine (`ottomato`) depends on it, never the reverse.
//!
//! Bring your own integration: implement [`Workload`] for your device type and
//! a [`Kind`] that builds it from a JSON config, then register the kind on the
//! node builder. [`sim::SimKind`] is the complete worked example.
#![warn(missing_docs, unreachable_pub)]

#[cfg_attr(
    not(all(
        feature = "http",
        feature = "modbus",
        feature = "snmp",
        feature = "ssh"
    )),
    allow(dead_code)
)]
mod common;
pub mod credentials;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "modbus")]
pub mod modbus;
pub mod sim;
#[cfg(feature = "snmp")]
pub mod snmp;
#[cfg(feature = "ssh")]
pub mod ssh;
pub mod tcp;
mod workload;

use std::sync::Arc;

pub use credentials::{Credential, Credentials};
pub use workload::{CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError};

/// Every kind this crate was compiled with (`sim`, `tcp`, and `http` and
/// `modbus` with their features), resolving named credentials from
/// `credentials`.
pub fn builtin(credentials: &Credentials) -> Vec<Arc<dyn Kind>> {
    let _ = credentials; // unused when no kind that needs secrets is compiled in
    vec![
        Arc::new(sim::SimKind),
        Arc::new(tcp::TcpKind),
        #[cfg(feature = "http")]
        Arc::new(http::HttpKind::new(credentials.clone())),
        #[cfg(feature = "modbus")]
        Arc::new(modbus::ModbusKind),
        #[cfg(feature = "snmp")]
        Arc::new(snmp::SnmpKind::new(credentials.clone())),
        #[cfg(feature = "ssh")]
        Arc::new(ssh::SshKind::new(credentials.clone())),
    ]
}
