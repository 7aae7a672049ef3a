//! Subject and bucket names: the only place that builds them.
//! `subjects.md` is the normative table this module mirrors; a test checks
//! that every name here appears there.

use std::time::Duration;

use crate::store::BucketSpec;

/// The default prefix of every subject and bucket.
pub const DEFAULT_PREFIX: &str = "otto";

/// Header naming the encoding of a task request and its reply (`json` when absent).
pub const ENCODING_HEADER: &str = "Otto-Encoding";

/// Names under one prefix (`otto` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(DEFAULT_PREFIX)
    }
}

/// Every subject pattern, with `<prefix>` for the prefix: what `subjects.md` documents.
pub const SUBJECT_PATTERNS: &[&str] = &[
    "<prefix>.task.<workload-id>",
    "<prefix>.fanout",
    "<prefix>.events.<workload-id>.<event>",
];

/// Every bucket name pattern: what `subjects.md` documents.
pub const BUCKET_PATTERNS: &[&str] = &["<prefix>_workloads", "<prefix>_nodes", "<prefix>_state"];

impl Subjects {
    /// Names under `prefix`: one token of letters, digits, `_` or `-`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    /// Checks a prefix can be both a subject token and a bucket name prefix.
    pub fn validate_prefix(prefix: &str) -> Result<(), String> {
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "prefix {prefix:?} must be non-empty letters, digits, '_' or '-'"
            ));
        }
        Ok(())
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.task.<workload-id>`: request/reply for one workload.
    pub fn task(&self, workload: &str) -> String {
        format!("{}.task.{}", self.prefix, workload)
    }

    /// `<prefix>.task.*`: every workload's task subject (for permissions).
    pub fn task_wildcard(&self) -> String {
        format!("{}.task.*", self.prefix)
    }

    /// The workload id of a task subject, if it is one.
    pub fn parse_task<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".task.")
            .filter(|id| !id.is_empty() && !id.contains('.'))
    }

    /// `<prefix>.fanout`: a task for a selection of workloads, answered by every node.
    pub fn fanout(&self) -> String {
        format!("{}.fanout", self.prefix)
    }

    /// `<prefix>.node.<node-id>.status`: a node's status (its NATS micro
    /// service endpoint).
    pub fn node_status(&self, node: &str) -> String {
        format!("{}.node.{}.status", self.prefix, node)
    }

    /// `<prefix>.events.<workload-id>.<event>`: lifecycle events.
    pub fn event(&self, workload: &str, event: &str) -> String {
        format!("{}.events.{}.{}", self.prefix, workload, event)
    }

    /// `<prefix>.events.>`: every event (for subscribers and permissions).
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// The desired-state bucket: key = workload id, value = spec JSON.
    pub fn workloads_bucket(&self) -> String {
        format!("{}_workloads", self.prefix)
    }

    /// The membership bucket: key = node id, value = node info JSON.
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.prefix)
    }

    /// The claims-and-status bucket: key = workload id, value = state JSON.
    pub fn state_bucket(&self) -> String {
        format!("{}_state", self.prefix)
    }

    /// Settings of the desired-state bucket.
    pub fn workloads_bucket_spec(&self, replicas: usize) -> BucketSpec {
        BucketSpec {
            history: 1,
            replicas,
            description: "Ottomato desired state: workload id -> spec".into(),
            ..BucketSpec::new(self.workloads_bucket())
        }
    }

    /// Settings of the membership bucket: entries expire `ttl` after their last heartbeat.
    pub fn nodes_bucket_spec(&self, ttl: Duration, replicas: usize) -> BucketSpec {
        BucketSpec {
            max_age: Some(ttl),
            history: 1,
            replicas,
            // On disk: membership must survive a nats-server restart.
            in_memory: false,
            description: "Ottomato membership: node id -> node info, expires without heartbeat"
                .into(),
            ..BucketSpec::new(self.nodes_bucket())
        }
    }

    /// Settings of the claims-and-status bucket.
    pub fn state_bucket_spec(&self) -> BucketSpec {
        self.state_bucket_spec_with(1)
    }

    /// Settings of the claims-and-status bucket with `replicas` copies.
    pub fn state_bucket_spec_with(&self, replicas: usize) -> BucketSpec {
        BucketSpec {
            history: 1,
            replicas,
            description: "Ottomato claims and status: workload id -> owner, status".into(),
            ..BucketSpec::new(self.state_bucket())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let s = Subjects::default();
        assert_eq!(s.task("r1"), "otto.task.r1");
        assert_eq!(s.parse_task("otto.task.r1"), Some("r1"));
        assert_eq!(s.parse_task("otto.task.r1.x"), None);
        assert_eq!(s.parse_task("other.task.r1"), None);
        assert_eq!(s.fanout(), "otto.fanout");
        assert_eq!(s.event("r1", "dead"), "otto.events.r1.dead");
        assert_eq!(
            (s.workloads_bucket(), s.nodes_bucket(), s.state_bucket()),
            (
                "otto_workloads".into(),
                "otto_nodes".into(),
                "otto_state".into()
            )
        );
        assert!(Subjects::validate_prefix("otto-2").is_ok());
        assert!(Subjects::validate_prefix("a.b").is_err());
    }
}

/// A role of the recommended NATS permissions (`subjects.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A worker node: writes state and membership, creates the buckets.
    Node,
    /// An operator: writes specs, runs tasks, reads state and events.
    Operator,
    /// A read-only watcher: state, events and node discovery only.
    Watcher,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "node" => Ok(Role::Node),
            "operator" => Ok(Role::Operator),
            "watcher" => Ok(Role::Watcher),
            other => Err(format!("role {other:?}: one of node, operator, watcher")),
        }
    }
}

impl Subjects {
    /// The recommended NATS permissions of `role` (publish, subscribe), for
    /// a client whose reply inboxes start with `inbox` (`_INBOX.alice`).
    /// `subjects.md` lists the same for the default prefix; a test holds
    /// them equal, another loads them into a nats-server.
    pub fn permissions(&self, role: Role, inbox: &str) -> (Vec<String>, Vec<String>) {
        let p = &self.prefix;
        let buckets = [
            self.workloads_bucket(),
            self.nodes_bucket(),
            self.state_bucket(),
        ];
        // Reading a bucket: info, gets, and the watch's ordered consumer.
        let read = |b: &str| {
            vec![
                format!("$JS.API.STREAM.INFO.KV_{b}"),
                format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
                format!("$JS.API.DIRECT.GET.KV_{b}.>"),
                format!("$JS.API.CONSUMER.CREATE.KV_{b}"),
                format!("$JS.API.CONSUMER.CREATE.KV_{b}.>"),
                format!("$JS.API.CONSUMER.DELETE.KV_{b}.>"),
            ]
        };
        let mut publish: Vec<String> = Vec::new();
        let mut subscribe: Vec<String> = Vec::new();
        match role {
            Role::Node => {
                publish.push(format!("$KV.{}.>", self.state_bucket()));
                publish.push(format!("$KV.{}.>", self.nodes_bucket()));
                publish.push(self.events_wildcard());
                publish.push("_INBOX.>".into());
                publish.extend(["$JS.FC.>".to_string(), "$JS.API.INFO".to_string()]);
                for b in &buckets {
                    publish.push(format!("$JS.API.STREAM.CREATE.KV_{b}"));
                }
                for b in &buckets {
                    publish.push(format!("$JS.API.STREAM.UPDATE.KV_{b}"));
                }
                for b in &buckets {
                    publish.extend(read(b));
                }
                subscribe.extend([
                    self.task_wildcard(),
                    self.fanout(),
                    format!("{inbox}.>"),
                    "$SRV.>".to_string(),
                    format!("{p}.node.*.status"),
                ]);
            }
            Role::Operator | Role::Watcher => {
                if role == Role::Operator {
                    publish.push(format!("$KV.{}.>", self.workloads_bucket()));
                    publish.push(self.task_wildcard());
                    publish.push(self.fanout());
                }
                publish.extend(["$JS.FC.>".to_string(), "$JS.API.INFO".to_string()]);
                for b in &buckets {
                    publish.extend(read(b));
                }
                publish.extend(["$SRV.>".to_string(), format!("{p}.node.*.status")]);
                subscribe.extend([format!("{inbox}.>"), self.events_wildcard()]);
            }
        }
        (publish, subscribe)
    }

    /// [`Subjects::permissions`] as a nats-server `permissions` block.
    pub fn permissions_conf(&self, role: Role, inbox: &str) -> String {
        let (p, s) = self.permissions(role, inbox);
        let list = |v: &[String]| {
            v.iter()
                .map(|x| format!("      {x:?}"))
                .collect::<Vec<_>>()
                .join(",\n")
        };
        format!(
            "permissions: {{\n  publish: {{\n    allow: [\n{}\n    ]\n  }}\n  subscribe: {{\n    allow: [\n{}\n    ]\n  }}\n}}\n",
            list(&p),
            list(&s)
        )
    }
}
