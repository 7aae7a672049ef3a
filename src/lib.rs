//! Ottomato: keeps a live, supervised handle on every device of a fleet,
//! checks that each answers, and runs tasks against one, some or all.
//!
//! Map of the crate:
//! - [`Node`] / [`NodeBuilder`] ([`node`]): the engine — a supervisor actor,
//!   one ractor actor per workload, the health scheduler, the state writer.
//! - [`NodeConfig`] ([`config`]): every timing and limit, with defaults.
//! - [`WorkloadSpec`] ([`spec`]), [`Kinds`] ([`kinds`]): what to run and with which device kind.
//! - [`Workload`], [`Kind`], [`Task`]: the device contract, from the `ottomato-actors` crate.
//! - [`Event`] ([`events`]), [`Status`]/[`WorkloadInfo`] ([`status`]): what a node reports.
//! - [`wire`]: the JSON clients see; [`subjects`]: every subject and bucket name.
//! - [`store`] and [`transport`]: bring-your-own storage and transport traits,
//!   with the in-memory embedded defaults.
#![warn(missing_docs, unreachable_pub)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
#[cfg(feature = "cli")]
pub mod demo;
pub mod error;
pub mod events;
pub mod kinds;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod nats;
pub mod node;
pub mod results;
pub mod schedule;
pub mod spec;
pub mod status;
pub mod store;
pub mod subjects;
pub mod transport;
#[cfg(feature = "cli")]
pub mod ui;
pub mod wire;

pub use cluster::{Cluster, ClusterConfig};
pub use config::{NodeConfig, RestartPolicy};
pub use error::NodeError;
pub use events::Event;
pub use kinds::Kinds;
pub use node::{Node, NodeBuilder};
pub use ottomato_actors::{
    self as actors, CommandClass, ConfigError, Kind, Task, TaskError, Workload, WorkloadError,
};
pub use spec::{Placement, WorkloadSpec};
pub use status::{ScheduledJob, Status, WorkloadInfo};
pub use wire::{ErrorCode, TaskResult};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
