//! Workload specs: what an operator asks a node to run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The desired state of one workload: `{id, kind, config, labels}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Unique id; a single NATS subject token (see [`validate_id`]).
    pub id: String,
    /// The device kind that runs it (`"sim"`).
    pub kind: String,
    /// Kind-specific settings, validated by the kind.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub config: Value,
    /// Free-form labels, used by selections and placement.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Tasks run at the same time on this workload (node default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Tasks that may wait on this workload (node default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Where it may run (cluster mode).
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
}

/// Placement constraints of a workload, matched against node info.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Run only on nodes of this zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Prefer nodes of this zone when any is eligible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_zone: Option<String>,
    /// Run only on nodes that have all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

impl Placement {
    /// No constraint at all.
    pub fn is_empty(&self) -> bool {
        self.zone.is_none() && self.prefer_zone.is_none() && self.node_selector.is_empty()
    }
}

impl WorkloadSpec {
    /// A spec with no config and no labels.
    pub fn new(id: impl Into<String>, kind: impl Into<String>) -> Self {
        WorkloadSpec {
            id: id.into(),
            kind: kind.into(),
            config: Value::Null,
            labels: BTreeMap::new(),
            concurrency: None,
            queue: None,
            placement: Placement::default(),
        }
    }

    /// Sets the kind config (builder style).
    pub fn with_config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    /// Requires a zone (builder style).
    pub fn in_zone(mut self, zone: impl Into<String>) -> Self {
        self.placement.zone = Some(zone.into());
        self
    }

    /// Adds a label (builder style).
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Longest workload id accepted.
pub const MAX_ID_LEN: usize = 200;

/// Checks that `id` can be a NATS subject token and a JetStream KV key:
/// 1 to 200 characters from `A-Z a-z 0-9 _ -`.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("workload id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "workload id is {} bytes long; the limit is {MAX_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "workload id {id:?} contains {c:?}; use only letters, digits, '_' and '-' \
             (an id is one NATS subject token and one KV key)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("router-01_a").is_ok());
        for bad in ["", "a.b", "a b", "a*", ">", "ü", &"x".repeat(201)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spec_json_round_trip() {
        let s = WorkloadSpec::new("a", "sim")
            .with_config(serde_json::json!({"ping_ms": 1}))
            .with_label("site", "oslo");
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"id":"a","kind":"sim","config":{"ping_ms":1},"labels":{"site":"oslo"}}"#
        );
        assert_eq!(serde_json::from_str::<WorkloadSpec>(&j).unwrap(), s);
    }
}
