//! Subject and bucket names: the only place that builds them.
//! `subjects.md` is the normative table this module mirrors.

/// The default prefix of every subject and bucket.
pub const DEFAULT_PREFIX: &str = "otto";

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

impl Subjects {
    /// Names under `prefix` (itself a single token, e.g. `otto`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.task.<workload-id>`: request/reply for one workload.
    pub fn task(&self, workload: &str) -> String {
        format!("{}.task.{}", self.prefix, workload)
    }

    /// The workload id of a task subject, if it is one.
    pub fn parse_task<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".task.")
            .filter(|id| !id.is_empty() && !id.contains('.'))
    }

    /// The state bucket: claims and status, key = workload id.
    pub fn state_bucket(&self) -> String {
        format!("{}_state", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_subject_round_trip() {
        let s = Subjects::default();
        assert_eq!(s.task("r1"), "otto.task.r1");
        assert_eq!(s.parse_task("otto.task.r1"), Some("r1"));
        assert_eq!(s.parse_task("otto.task.r1.x"), None);
        assert_eq!(s.parse_task("other.task.r1"), None);
        assert_eq!(s.state_bucket(), "otto_state");
    }
}
