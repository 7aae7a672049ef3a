//! Subject and bucket names: the only place that builds them.
//! `subjects.md` is the normative table this module mirrors; a test checks
//! that every name here appears there.

use std::time::Duration;

use crate::store::BucketSpec;
use crate::CommandClass;

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
    "<prefix>.task.<class>.<workload-id>",
    "<prefix>.fanout.<class>",
    "<prefix>.events.<workload-id>.<event>",
    "<prefix>.results.<workload-id>.<source>",
];

/// Every bucket name pattern: what `subjects.md` documents.
pub const BUCKET_PATTERNS: &[&str] = &[
    "<prefix>_workloads",
    "<prefix>_nodes",
    "<prefix>_state",
    "<prefix>_schedules",
    "<prefix>_results",
];

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

    /// `<prefix>.task.<class>.<workload-id>`: request/reply for one
    /// workload; a `read` subject runs only read-class commands.
    pub fn task(&self, class: CommandClass, workload: &str) -> String {
        format!("{}.task.{}.{}", self.prefix, class, workload)
    }

    /// `<prefix>.task.*.<workload-id>`: what the owner subscribes (both
    /// classes, one subscription).
    pub fn task_served(&self, workload: &str) -> String {
        format!("{}.task.*.{}", self.prefix, workload)
    }

    /// `<prefix>.task.<class>.*` (or `<prefix>.task.*.*` for both): every
    /// workload's task subject of a class (for permissions).
    pub fn task_wildcard(&self, class: Option<CommandClass>) -> String {
        match class {
            Some(c) => format!("{}.task.{}.*", self.prefix, c),
            None => format!("{}.task.*.*", self.prefix),
        }
    }

    /// The class token and workload id of a task subject, if it is one. The
    /// class token is returned as sent (the node answers an unknown one).
    pub fn parse_task<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".task.")?;
        let (class, id) = rest.split_once('.')?;
        (!class.is_empty() && !id.is_empty() && !id.contains('.')).then_some((class, id))
    }

    /// `<prefix>.fanout.<class>`: a task for a selection of workloads,
    /// answered by every node; `read` runs only read-class commands.
    pub fn fanout(&self, class: CommandClass) -> String {
        format!("{}.fanout.{}", self.prefix, class)
    }

    /// `<prefix>.fanout.*`: what every node subscribes (both classes).
    pub fn fanout_served(&self) -> String {
        format!("{}.fanout.*", self.prefix)
    }

    /// The class token of a fan-out subject, if it is one.
    pub fn parse_fanout<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".fanout.")
            .filter(|c| !c.is_empty() && !c.contains('.'))
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

    /// `<prefix>.results.<workload-id>.<source>`: one stored result (the
    /// source is a schedule id or `_task`).
    pub fn result(&self, workload: &str, source: &str) -> String {
        format!("{}.results.{}.{}", self.prefix, workload, source)
    }

    /// `<prefix>.results.>`: every stored result (the stream's subjects).
    pub fn results_wildcard(&self) -> String {
        format!("{}.results.>", self.prefix)
    }

    /// The workload and source of a result subject.
    pub fn parse_result<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".results.")?
            .split_once('.')
            .filter(|(w, s)| !w.is_empty() && !s.is_empty() && !s.contains('.'))
    }

    /// The result history stream (JetStream, not a KV bucket).
    pub fn results_stream(&self) -> String {
        format!("{}_results", self.prefix)
    }

    /// The schedules bucket: key = schedule id, value = schedule JSON.
    pub fn schedules_bucket(&self) -> String {
        format!("{}_schedules", self.prefix)
    }

    /// Settings of the schedules bucket.
    pub fn schedules_bucket_spec(&self, replicas: usize) -> BucketSpec {
        BucketSpec {
            history: 1,
            replicas,
            description: "Ottomato schedules: schedule id -> schedule".into(),
            ..BucketSpec::new(self.schedules_bucket())
        }
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
        assert_eq!(s.task(CommandClass::Read, "r1"), "otto.task.read.r1");
        assert_eq!(s.task(CommandClass::Write, "r1"), "otto.task.write.r1");
        assert_eq!(s.task_served("r1"), "otto.task.*.r1");
        assert_eq!(s.parse_task("otto.task.read.r1"), Some(("read", "r1")));
        assert_eq!(s.parse_task("otto.task.r1"), None);
        assert_eq!(s.parse_task("otto.task.read.r1.x"), None);
        assert_eq!(s.parse_task("other.task.read.r1"), None);
        assert_eq!(s.fanout(CommandClass::Write), "otto.fanout.write");
        assert_eq!(s.fanout_served(), "otto.fanout.*");
        assert_eq!(s.parse_fanout("otto.fanout.read"), Some("read"));
        assert_eq!(s.parse_fanout("otto.fanout"), None);
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
    /// An operator: writes specs, runs tasks of both classes, reads state and events.
    Operator,
    /// A read-only operator: runs read-class tasks only; reads state, events and results.
    Reader,
    /// A schedule manager: writes schedules; reads state, events and results; runs no task.
    Scheduler,
    /// A read-only watcher: state, events and node discovery only.
    Watcher,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "node" => Ok(Role::Node),
            "operator" => Ok(Role::Operator),
            "reader" => Ok(Role::Reader),
            "scheduler" => Ok(Role::Scheduler),
            "watcher" => Ok(Role::Watcher),
            other => Err(format!(
                "role {other:?}: one of node, operator, reader, scheduler, watcher"
            )),
        }
    }
}

impl Subjects {
    /// The recommended NATS permissions of `role` (publish, subscribe), for
    /// a client whose reply inboxes start with `inbox` (`_INBOX.alice`).
    /// `subjects.md` lists the same for the default prefix; a test holds
    /// them equal, another loads them into a nats-server.
    pub fn permissions(&self, role: Role, inbox: &str) -> (Vec<String>, Vec<String>) {
        self.permissions_for(role, inbox, None)
    }

    /// [`Subjects::permissions`], with the task rights of an operator or
    /// reader limited to the workloads `ids` when given: their task
    /// subjects one by one, and no fan-out (NATS cannot check a fan-out's
    /// selection, which is in its payload).
    pub fn permissions_for(
        &self,
        role: Role,
        inbox: &str,
        ids: Option<&[String]>,
    ) -> (Vec<String>, Vec<String>) {
        let p = &self.prefix;
        let tasks = |class: Option<CommandClass>| -> Vec<String> {
            match ids {
                None => vec![
                    self.task_wildcard(class),
                    match class {
                        Some(c) => self.fanout(c),
                        None => self.fanout_served(),
                    },
                ],
                Some(ids) => ids
                    .iter()
                    .map(|id| match class {
                        Some(c) => self.task(c, id),
                        None => self.task_served(id),
                    })
                    .collect(),
            }
        };
        let buckets = [
            self.workloads_bucket(),
            self.nodes_bucket(),
            self.state_bucket(),
            self.schedules_bucket(),
        ];
        // Reading a stream: info, gets, and an ordered consumer (KV watch,
        // results query).
        let read_stream = |stream: &str| {
            vec![
                format!("$JS.API.STREAM.INFO.{stream}"),
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}.>"),
                format!("$JS.API.CONSUMER.CREATE.{stream}"),
                format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
            ]
        };
        let read = |b: &str| read_stream(&format!("KV_{b}"));
        let results = self.results_stream();
        let mut publish: Vec<String> = Vec::new();
        let mut subscribe: Vec<String> = Vec::new();
        match role {
            Role::Node => {
                publish.push(format!("$KV.{}.>", self.state_bucket()));
                publish.push(format!("$KV.{}.>", self.nodes_bucket()));
                publish.push(self.events_wildcard());
                publish.push(self.results_wildcard());
                publish.push("_INBOX.>".into());
                publish.extend(["$JS.FC.>".to_string(), "$JS.API.INFO".to_string()]);
                for b in &buckets {
                    publish.push(format!("$JS.API.STREAM.CREATE.KV_{b}"));
                }
                publish.push(format!("$JS.API.STREAM.CREATE.{results}"));
                for b in &buckets {
                    publish.push(format!("$JS.API.STREAM.UPDATE.KV_{b}"));
                }
                for b in &buckets {
                    publish.extend(read(b));
                }
                publish.push(format!("$JS.API.STREAM.INFO.{results}"));
                publish.push(format!("$JS.API.DIRECT.GET.{results}.>"));
                subscribe.extend([
                    self.task_wildcard(None),
                    self.fanout_served(),
                    format!("{inbox}.>"),
                    "$SRV.>".to_string(),
                    format!("{p}.node.*.status"),
                ]);
            }
            Role::Operator | Role::Reader | Role::Scheduler | Role::Watcher => {
                match role {
                    Role::Operator => {
                        match ids {
                            None => publish.push(format!("$KV.{}.>", self.workloads_bucket())),
                            Some(ids) => publish.extend(
                                ids.iter()
                                    .map(|id| format!("$KV.{}.{id}", self.workloads_bucket())),
                            ),
                        }
                        publish.push(format!("$KV.{}.>", self.schedules_bucket()));
                        publish.extend(tasks(None));
                    }
                    Role::Scheduler => publish.push(format!("$KV.{}.>", self.schedules_bucket())),
                    Role::Reader => publish.extend(tasks(Some(CommandClass::Read))),
                    _ => {}
                }
                publish.extend(["$JS.FC.>".to_string(), "$JS.API.INFO".to_string()]);
                for b in &buckets {
                    publish.extend(read(b));
                }
                if role != Role::Watcher {
                    publish.extend(read_stream(&results));
                }
                publish.extend(["$SRV.>".to_string(), format!("{p}.node.*.status")]);
                subscribe.extend([format!("{inbox}.>"), self.events_wildcard()]);
            }
        }
        (publish, subscribe)
    }

    /// [`Subjects::permissions`] as a nats-server `permissions` block.
    pub fn permissions_conf(&self, role: Role, inbox: &str, ids: Option<&[String]>) -> String {
        let (p, s) = self.permissions_for(role, inbox, ids);
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
