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

pub mod sim;
mod workload;

pub use workload::{ConfigError, Kind, Task, TaskError, Workload, WorkloadError};
