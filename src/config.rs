//! Node settings: every timing and limit the engine uses, with the original's defaults.

use std::time::Duration;

/// How a node supervises, checks and feeds its workloads.
///
/// Build it as a plain struct with `..Default::default()` or through
/// [`crate::NodeBuilder`]'s chained setters.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id; a random UUID when not given.
    pub node_id: String,
    /// Lower bound of the random interval between two pings of one workload.
    pub ping_splay_min: Duration,
    /// Upper bound of that interval. Pings are spread evenly over the window so
    /// 100k workloads never ping at once.
    pub ping_splay_max: Duration,
    /// How long one ping may take before it counts as a failure.
    pub ping_timeout: Duration,
    /// Consecutive ping failures after which a workload is `dead`.
    pub ping_down_threshold: u32,
    /// A dead workload keeps being pinged, this many times less often.
    pub dead_ping_factor: u32,
    /// The original's behaviour: delete a workload once it is dead.
    pub remove_dead: bool,
    /// How long one `init` may take.
    pub init_timeout: Duration,
    /// First delay before retrying a failed init; doubles per attempt.
    pub init_retry_min: Duration,
    /// Cap of the init retry delay.
    pub init_retry_max: Duration,
    /// How long one `stop` may take; it never blocks the caller either way.
    pub stop_timeout: Duration,
    /// Default deadline of a task when the request carries none.
    pub task_timeout: Duration,
    /// Longest deadline a task may have: a request asking for more gets
    /// this. Bounds how long a release waits for a task in flight.
    pub max_task_deadline: Duration,
    /// Tasks that may wait for one workload; one more answers `busy` at once.
    pub queue_capacity: u32,
    /// Tasks one workload runs at the same time (a spec may raise it).
    pub task_concurrency: u32,
    /// Largest task request accepted from a transport, in bytes.
    pub max_payload: usize,
    /// What the supervisor does when a workload's actor fails.
    pub restart: RestartPolicy,
    /// Events buffered per subscriber before a slow one starts missing some.
    pub event_capacity: usize,
    /// Scheduled runs in flight at once on this node; ticks over it are
    /// shed (counted).
    pub schedule_max_inflight: usize,
    /// Results waiting to be stored; results over it are dropped (counted).
    pub results_buffer: usize,
}

/// The supervisor's restart policy for a failed workload actor.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each restart in the window.
    pub backoff_min: Duration,
    /// Cap of the restart delay.
    pub backoff_max: Duration,
    /// Restarts allowed within `window`; one more and the workload is `failed`.
    pub max_restarts: u32,
    /// The window over which restarts are counted.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: String::new(),
            ping_splay_min: Duration::from_secs(8),
            ping_splay_max: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(10),
            ping_down_threshold: 2,
            dead_ping_factor: 3,
            remove_dead: false,
            init_timeout: Duration::from_secs(25),
            init_retry_min: Duration::from_secs(1),
            init_retry_max: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            task_timeout: Duration::from_secs(30),
            max_task_deadline: Duration::from_secs(15 * 60),
            queue_capacity: 64,
            task_concurrency: 1,
            max_payload: 1024 * 1024,
            restart: RestartPolicy::default(),
            event_capacity: 65_536,
            schedule_max_inflight: 10_000,
            results_buffer: 10_000,
        }
    }
}

impl NodeConfig {
    /// Checks the settings against each other; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.ping_splay_min.is_zero() || self.ping_splay_max < self.ping_splay_min {
            return Err("ping splay: need 0 < min <= max".into());
        }
        if self.ping_down_threshold == 0 {
            return Err("ping_down_threshold must be at least 1".into());
        }
        if self.queue_capacity == 0 || self.task_concurrency == 0 {
            return Err("queue_capacity and task_concurrency must be at least 1".into());
        }
        if self.init_retry_min.is_zero() || self.init_retry_max < self.init_retry_min {
            return Err("init retry: need 0 < min <= max".into());
        }
        if self.max_task_deadline < self.task_timeout {
            return Err(format!(
                "max_task_deadline ({:?}) must be at least task_timeout ({:?})",
                self.max_task_deadline, self.task_timeout
            ));
        }
        if self.restart.backoff_max < self.restart.backoff_min {
            return Err("restart backoff: need min <= max".into());
        }
        Ok(())
    }
}

/// `min * 2^(n-1)` capped at `max`: the backoff of the n-th attempt (n >= 1).
pub(crate) fn backoff(min: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32
        .checked_shl(n.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    min.checked_mul(factor).map_or(max, |d| d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (a, b) = (Duration::from_millis(100), Duration::from_secs(1));
        let got: Vec<_> = (1..=6).map(|n| backoff(a, b, n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(a, b, 1000), b);
    }
}
