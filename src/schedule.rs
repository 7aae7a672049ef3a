//! Schedules: recurring tasks over a selection of workloads, kept as
//! desired state in the `<prefix>_schedules` bucket and run by whichever
//! node owns each workload (see `node/scheduler.rs`).
//!
//! A schedule's **ticks** are wall-clock instants every node computes alike:
//! multiples of `every` since the Unix epoch, or the matches of a cron
//! expression in a time zone. Workload `w` runs tick `T` at `T + offset(w)`,
//! where the offset is a stable hash of (schedule, workload) spread over the
//! `splay` window, so 100 000 devices are not hit in the same second. The
//! identity of a run is (schedule id, `T`): its result carries both.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::wire::glob_match;

/// The source name of ad-hoc task results (a schedule id never starts with `_`).
pub const AD_HOC: &str = "_task";

/// What a device still busy with the previous tick does with the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Skip it (counted): ticks never pile up behind a slow device.
    #[default]
    Skip,
    /// Queue it behind the running one (the workload's queue bounds it).
    Queue,
}

/// Whether a tick missed while the workload moved between nodes runs once
/// on the new owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// The new owner continues from the next tick.
    #[default]
    Skip,
    /// The new owner runs the last due tick once if the results show it
    /// did not run (and the workload ran this schedule before).
    RunOnce,
}

fn yes() -> bool {
    true
}

/// A schedule as stored in the bucket (JSON, camelCase), key = its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Glob on workload ids (`*`, `?`); every workload when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// Labels a workload must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The task's command.
    pub command: String,
    /// Positional arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
    /// Deadline of each run in ms (the node default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// An interval (`30s`, `5m`, `1h`): ticks at its multiples since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A cron expression (5 fields, or 6 with seconds first; `@daily` …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The cron expression's time zone (IANA name; UTC when absent). As
    /// with cron, local times a daylight-saving change skips never fire,
    /// and a repeated local hour fires once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// Window over which one tick's runs are spread (`0s` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splay: Option<String>,
    /// A paused schedule runs nothing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `skip` (default) or `queue`.
    #[serde(default)]
    pub overlap: Overlap,
    /// `skip` (default) or `run-once`.
    #[serde(default)]
    pub missed: Missed,
}

impl ScheduleSpec {
    /// A schedule running `command` every `every` (a humantime duration).
    pub fn every(command: impl Into<String>, every: impl Into<String>) -> Self {
        ScheduleSpec {
            select: None,
            labels: BTreeMap::new(),
            command: command.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            timeout_ms: None,
            every: Some(every.into()),
            cron: None,
            tz: None,
            splay: None,
            enabled: true,
            overlap: Overlap::Skip,
            missed: Missed::Skip,
        }
    }
}

/// When ticks fall.
#[derive(Debug, Clone)]
enum Timing {
    Every(Duration),
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

/// A validated schedule, ready to compute ticks.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its id (the bucket key).
    pub id: Arc<str>,
    /// What was stored.
    pub spec: ScheduleSpec,
    timing: Timing,
    splay: Duration,
}

/// Checks a schedule id: like a workload id (one subject token), not
/// starting with `_` (reserved for [`AD_HOC`]).
pub fn validate_schedule_id(id: &str) -> Result<(), String> {
    crate::spec::validate_id(id).map_err(|e| e.replacen("workload id", "schedule id", 1))?;
    if id.starts_with('_') {
        return Err(format!(
            "schedule id {id:?} starts with '_' (reserved); start it with a letter or digit"
        ));
    }
    Ok(())
}

fn duration(field: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{field}: {s:?} is not a duration ({e}); e.g. \"30s\", \"5m\", \"1h\"")
    })
}

impl Schedule {
    /// Validates `spec` under `id`; the error says which field is wrong.
    pub fn parse(id: &str, spec: ScheduleSpec) -> Result<Schedule, String> {
        validate_schedule_id(id)?;
        if spec.command.is_empty() {
            return Err("command is empty".into());
        }
        if spec.select.as_deref() == Some("") {
            return Err("select is empty; leave it out to select every workload".into());
        }
        let timing = match (&spec.every, &spec.cron) {
            (Some(_), Some(_)) => return Err("give either every or cron, not both".into()),
            (None, None) => {
                return Err("give every (e.g. \"5m\") or cron (e.g. \"0 2 * * *\")".into())
            }
            (Some(every), None) => {
                if spec.tz.is_some() {
                    return Err("tz applies to cron only (every counts from the epoch)".into());
                }
                let d = duration("every", every)?;
                if d < Duration::from_secs(1) {
                    return Err(format!("every: {every:?} is under the 1s minimum"));
                }
                Timing::Every(d)
            }
            (None, Some(expr)) => {
                let cron =
                    croner::Cron::from_str(expr).map_err(|e| format!("cron: {expr:?}: {e}"))?;
                let tz = match &spec.tz {
                    None => chrono_tz::Tz::UTC,
                    Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| {
                        format!("tz: {name:?} is not an IANA time zone (e.g. \"Europe/Oslo\")")
                    })?,
                };
                Timing::Cron(Box::new(cron), tz)
            }
        };
        let splay = match &spec.splay {
            None => Duration::ZERO,
            Some(s) => duration("splay", s)?,
        };
        if let Timing::Every(d) = timing {
            if splay > d {
                return Err(format!(
                    "splay ({}) is longer than every ({}): one tick's runs would overlap the next's",
                    humantime::format_duration(splay),
                    humantime::format_duration(d)
                ));
            }
        }
        let mut s = Schedule {
            id: id.into(),
            spec,
            timing,
            splay,
        };
        if s.next_tick_after(SystemTime::now()).is_none() {
            s.spec.enabled = false;
            return Err("cron: the expression never fires".into());
        }
        Ok(s)
    }

    /// Parses the JSON of a stored schedule.
    pub fn from_json(id: &str, bytes: &[u8]) -> Result<Schedule, String> {
        let spec: ScheduleSpec =
            serde_json::from_slice(bytes).map_err(|e| format!("not a schedule: {e}"))?;
        Schedule::parse(id, spec)
    }

    /// The interval, for interval schedules.
    pub fn period(&self) -> Option<Duration> {
        match self.timing {
            Timing::Every(d) => Some(d),
            Timing::Cron(..) => None,
        }
    }

    /// Whether workload `id` with `labels` is selected.
    pub fn selects(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .select
            .as_deref()
            .is_none_or(|g| glob_match(g, id))
            && self
                .spec
                .labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The first tick strictly after `t`.
    pub fn next_tick_after(&self, t: SystemTime) -> Option<SystemTime> {
        match &self.timing {
            Timing::Every(d) => {
                let since = t.duration_since(UNIX_EPOCH).ok()?.as_nanos();
                let p = d.as_nanos();
                let k = since / p + 1;
                Some(UNIX_EPOCH + nanos(k * p))
            }
            Timing::Cron(cron, tz) => {
                // Whole seconds: a tick is the same instant on every node
                // whatever the fraction of "now" each one asked at.
                let mut from = whole_seconds(t);
                for _ in 0..64 {
                    let at = chrono::DateTime::<chrono::Utc>::from(from).with_timezone(tz);
                    let next = whole_seconds(SystemTime::from(
                        cron.find_next_occurrence(&at, false)
                            .ok()?
                            .with_timezone(&chrono::Utc),
                    ));
                    if next > t {
                        return Some(next);
                    }
                    // In a repeated (daylight-saving fall-back) hour the
                    // match may map to its earlier instant, before `t`: the
                    // same local time an hour later is the one after `t`.
                    let later = next + Duration::from_secs(3600);
                    let local = chrono::DateTime::<chrono::Utc>::from(later).with_timezone(tz);
                    if later > t && cron.is_time_matching(&local).unwrap_or(false) {
                        return Some(later);
                    }
                    from = from.max(next) + Duration::from_secs(1);
                }
                None
            }
        }
    }

    /// The last tick at or before `t`.
    pub fn tick_at_or_before(&self, t: SystemTime) -> Option<SystemTime> {
        match &self.timing {
            Timing::Every(d) => {
                let since = t.duration_since(UNIX_EPOCH).ok()?.as_nanos();
                let p = d.as_nanos();
                Some(UNIX_EPOCH + nanos(since / p * p))
            }
            Timing::Cron(cron, tz) => {
                let at = chrono::DateTime::<chrono::Utc>::from(whole_seconds(t)).with_timezone(tz);
                let prev = cron.find_previous_occurrence(&at, true).ok()?;
                Some(whole_seconds(SystemTime::from(
                    prev.with_timezone(&chrono::Utc),
                )))
                .filter(|p| *p <= t)
            }
        }
    }

    /// Where in the splay window workload `id` runs each tick: the same on
    /// every node and every version (a stable hash), spread evenly over
    /// the window across many workloads.
    pub fn offset(&self, id: &str) -> Duration {
        if self.splay.is_zero() {
            return Duration::ZERO;
        }
        let h = crate::cluster::placement::stable_hash(&self.id, id);
        let frac = (h >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_nanos((self.splay.as_nanos() as f64 * frac) as u64)
    }

    /// The next run of workload `id` strictly after `now`: (tick, when it runs).
    pub fn next_run(&self, id: &str, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
        let off = self.offset(id);
        let tick = self.next_tick_after(now.checked_sub(off)?)?;
        Some((tick, tick + off))
    }

    /// The last run of workload `id` due at or before `now`.
    pub fn last_due(&self, id: &str, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
        let off = self.offset(id);
        let tick = self.tick_at_or_before(now.checked_sub(off)?)?;
        Some((tick, tick + off))
    }

    /// The task each run sends.
    pub fn task(&self) -> crate::Task {
        crate::Task {
            command: self.spec.command.clone(),
            args: self.spec.args.clone(),
            kwargs: self.spec.kwargs.clone(),
        }
    }

    /// The deadline of each run (`None`: the node's default).
    pub fn timeout(&self) -> Option<Duration> {
        self.spec.timeout_ms.map(Duration::from_millis)
    }
}

/// Every schedule in `bucket`, by id, parsed (or the reason it is invalid).
pub async fn read_all(
    bucket: &Arc<dyn crate::store::KvBucket>,
) -> Result<Vec<(String, Result<Schedule, String>)>, crate::store::StoreError> {
    use futures::StreamExt;
    let mut w = bucket.watch().await?;
    let mut all = std::collections::BTreeMap::new();
    while let Some(c) = w.next().await {
        match c {
            crate::store::KvChange::Put(e) => {
                let parsed = Schedule::from_json(&e.key, &e.value);
                all.insert(e.key, parsed);
            }
            crate::store::KvChange::Delete { key, .. } => {
                all.remove(&key);
            }
            crate::store::KvChange::Synced => break,
        }
    }
    Ok(all.into_iter().collect())
}

/// `t` without its fraction of a second.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn nanos(n: u128) -> Duration {
    Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn parse(json: &str) -> Result<Schedule, String> {
        Schedule::from_json("s1", json.as_bytes())
    }

    #[test]
    fn interval_ticks_are_multiples_of_the_period_since_the_epoch() {
        let s = parse(r#"{"command":"poll","every":"5m"}"#).unwrap();
        let t = at("2026-11-30T12:03:10Z");
        assert_eq!(s.next_tick_after(t), Some(at("2026-11-30T12:05:00Z")));
        assert_eq!(
            s.next_tick_after(at("2026-11-30T12:05:00Z")),
            Some(at("2026-11-30T12:10:00Z"))
        );
        assert_eq!(s.tick_at_or_before(t), Some(at("2026-11-30T12:00:00Z")));
        assert_eq!(s.offset("anything"), Duration::ZERO);
    }

    #[test]
    fn cron_ticks_follow_the_time_zone() {
        let s = parse(r#"{"command":"backup","cron":"0 2 * * *","tz":"Europe/Oslo"}"#).unwrap();
        // 02:00 in Oslo is 01:00 UTC in winter.
        assert_eq!(
            s.next_tick_after(at("2026-11-30T12:00:00Z")),
            Some(at("2026-12-01T01:00:00Z"))
        );
        let s = parse(r#"{"command":"x","cron":"*/10 * * * * *"}"#).unwrap();
        assert_eq!(
            s.next_tick_after(at("2026-11-30T12:00:01Z")),
            Some(at("2026-11-30T12:00:10Z"))
        );
        assert_eq!(
            s.tick_at_or_before(at("2026-11-30T12:00:10Z")),
            Some(at("2026-11-30T12:00:10Z"))
        );
        // The fraction of a second "now" has is not part of the tick.
        assert_eq!(
            s.next_tick_after(at("2026-11-30T12:00:01.734Z")),
            Some(at("2026-11-30T12:00:10Z"))
        );
        assert_eq!(
            s.tick_at_or_before(at("2026-11-30T12:00:19.5Z")),
            Some(at("2026-11-30T12:00:10Z"))
        );
    }

    #[test]
    fn cron_ticks_move_forward_through_a_repeated_daylight_saving_hour() {
        // Europe/Oslo falls back on 2026-10-25: 03:00 CEST becomes 02:00 CET,
        // so local 02:00–03:00 happens twice (00:00–02:00 UTC).
        let s = parse(r#"{"command":"x","cron":"*/5 * * * *","tz":"Europe/Oslo"}"#).unwrap();
        let mut t = at("2026-10-24T23:50:00Z");
        let mut seen = Vec::new();
        while t < at("2026-10-25T02:30:00Z") {
            let next = s.next_tick_after(t).unwrap();
            assert!(next > t, "{next:?} not after {t:?}");
            assert!(next.duration_since(t).unwrap() <= Duration::from_secs(3600 + 300));
            seen.push(next);
            t = next;
        }
        // Like cron, the repeated local hour runs once (its first pass):
        // every 5 minutes before and after it, each tick once.
        assert_eq!(seen.len(), 20, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn splay_spreads_runs_evenly_and_the_same_everywhere() {
        let s = parse(r#"{"command":"poll","every":"60s","splay":"60s"}"#).unwrap();
        let mut buckets = [0usize; 10];
        for i in 0..10_000 {
            let off = s.offset(&format!("dev-{i}"));
            assert!(off < Duration::from_secs(60));
            assert_eq!(off, s.offset(&format!("dev-{i}")));
            buckets[(off.as_secs() / 6) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
        let now = at("2026-11-30T12:00:30Z");
        let (tick, when) = s.next_run("dev-1", now).unwrap();
        assert!(when > now && when.duration_since(tick).unwrap() == s.offset("dev-1"));
        assert!(when <= now + Duration::from_secs(60));
    }

    #[test]
    fn bad_schedules_are_refused_with_the_reason() {
        for (json, want) in [
            (r#"{"command":"x"}"#, "give every"),
            (
                r#"{"command":"x","every":"5m","cron":"* * * * *"}"#,
                "not both",
            ),
            (
                r#"{"command":"x","every":"soon"}"#,
                "every: \"soon\" is not a duration",
            ),
            (r#"{"command":"x","every":"10ms"}"#, "1s minimum"),
            (
                r#"{"command":"x","cron":"61 * * * *"}"#,
                "cron: \"61 * * * *\"",
            ),
            (
                r#"{"command":"x","cron":"0 2 * * *","tz":"Mars/Olympus"}"#,
                "tz: \"Mars/Olympus\"",
            ),
            (
                r#"{"command":"x","every":"1m","tz":"UTC"}"#,
                "tz applies to cron",
            ),
            (
                r#"{"command":"x","every":"1m","splay":"2m"}"#,
                "splay (2m) is longer",
            ),
            (r#"{"command":"","every":"1m"}"#, "command is empty"),
            (
                r#"{"command":"x","every":"1m","evry":"1m"}"#,
                "unknown field `evry`",
            ),
            (
                r#"{"command":"x","every":"1m","overlap":"pile"}"#,
                "unknown variant `pile`",
            ),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(
            Schedule::from_json("_x", br#"{"command":"x","every":"1m"}"#)
                .unwrap_err()
                .contains("reserved")
        );
        assert!(
            Schedule::from_json("a.b", br#"{"command":"x","every":"1m"}"#)
                .unwrap_err()
                .contains("schedule id")
        );
    }
}
