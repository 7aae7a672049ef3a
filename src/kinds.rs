//! The kind registry: which device kinds a node can run.

use std::collections::HashMap;
use std::sync::Arc;

use ottomato_actors::{Credentials, Kind, Workload};

use crate::error::NodeError;
use crate::spec::WorkloadSpec;

/// The kinds a node was built with, by name.
#[derive(Clone, Default)]
pub struct Kinds {
    by_name: HashMap<String, Arc<dyn Kind>>,
    credentials: Credentials,
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Kinds {
    /// The kinds that ship with Ottomato: `sim` and the protocol kinds of
    /// `ottomato-actors` compiled in (see [`ottomato_actors::builtin`]).
    ///
    /// They resolve named credentials from [`Kinds::credentials`]; load the
    /// node's credentials file there (the CLI's `--credentials` does).
    pub fn builtin() -> Self {
        let mut kinds = Kinds::default();
        for kind in ottomato_actors::builtin(&kinds.credentials) {
            kinds.by_name.insert(kind.name().to_string(), kind);
        }
        kinds
    }

    /// Adds every kind of `other` (its kinds win over same-named ones).
    /// Credentials stay those of `self`'s kinds and `other`'s kinds each.
    pub fn extend(&mut self, other: Kinds) {
        self.by_name.extend(other.by_name);
    }

    /// The credentials the built-in kinds resolve names from (shared: load
    /// a file into this handle and every built-in kind sees it).
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Checks a spec's config with its kind, when this process knows the
    /// kind (an operator tool may not run every kind a node does: unknown
    /// kinds pass here and are checked by the node that runs them).
    pub fn validate(&self, spec: &WorkloadSpec) -> Result<(), NodeError> {
        match self.by_name.get(&spec.kind) {
            Some(kind) => kind
                .validate(&spec.config)
                .map_err(|e| NodeError::InvalidConfig(e.to_string())),
            None => Ok(()),
        }
    }

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
