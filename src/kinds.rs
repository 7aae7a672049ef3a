//! The kind registry: which device kinds a node can run.

use std::collections::HashMap;
use std::sync::Arc;

use ottomato_actors::{Kind, Workload};

use crate::error::NodeError;
use crate::spec::WorkloadSpec;

/// The kinds a node was built with, by name.
#[derive(Clone, Default)]
pub struct Kinds {
    by_name: HashMap<String, Arc<dyn Kind>>,
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Kinds {
    /// Registers a kind under its name (a later one with the same name wins).
    pub fn register(&mut self, kind: impl Kind) {
        self.by_name.insert(kind.name().to_string(), Arc::new(kind));
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Builds an instance for `spec`: `UnknownKind` or `InvalidConfig` when it can't.
    pub fn create(&self, spec: &WorkloadSpec) -> Result<Arc<dyn Workload>, NodeError> {
        let kind = self
            .by_name
            .get(&spec.kind)
            .ok_or_else(|| NodeError::UnknownKind {
                kind: spec.kind.clone(),
                known: self.names().join(", "),
            })?;
        kind.create(&spec.id, &spec.config)
            .map_err(|e| NodeError::InvalidConfig(e.to_string()))
    }
}
