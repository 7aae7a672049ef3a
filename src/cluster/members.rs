//! Who is alive, judged on this node's own monotonic clock — never on the
//! server's clock or on expiry markers.
//!
//! A peer's claims may be taken over only once this node **knows** the peer
//! has not renewed its lease for a full TTL:
//!
//! - every heartbeat of ours carries a counter (`beat`) and we note when we
//!   sent it; when our watch of the membership bucket delivers it, the watch
//!   has shown us everything written to the bucket before that moment (one
//!   stream, delivered in order). That send time is `current_as_of`.
//! - a peer incarnation last seen (delivered) at `seen` — or, if we never saw
//!   it, since our watch started — is **dead** once
//!   `current_as_of ≥ max(seen, watch started) + TTL`: it wrote nothing for a
//!   full TTL, so its lease (`its send time + TTL − margin`) has run out, and
//!   a node renews a lease only from an unbroken one (else it fences first).
//! - a restarted watch (reconnect, resync) may have missed anything:
//!   observation starts again from then. So may a watch that delivered
//!   nothing of ours for longer than half the TTL, or two heartbeats if
//!   that is longer (held up, our writes failing, we were cut off, or our
//!   coordinator stalled): entries expire (a server clock running fast
//!   expires them early), and a held-up watcher never sees those that
//!   expired meanwhile. Assumed: the server keeps an entry at least half
//!   the TTL. The cost is liveness only: after such a hole, a full TTL of
//!   fresh observation before anyone is found dead.
//! - a peer that left cleanly (`left: true`, nothing held) is dead at once.
//! - every state record a peer writes while we watch (a claim, a status;
//!   delivered live, not replayed) is proof of life too, as of its
//!   delivery: a peer cut off past its TTL fences everything
//!   and may come back **under the same incarnation**, and a watcher whose
//!   membership view has a hole must not go on judging it dead while its
//!   new claims arrive ([`Members::note_claimant`]).
//!
//! A stalled watch or a node that cannot heartbeat has a stale
//! `current_as_of`, so it declares nobody dead: it cannot take over wrongly.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::wire::NodeInfo;

/// Send times of our heartbeats not yet seen on the watch (beat → sent).
pub(crate) type SentBeats = Arc<Mutex<BTreeMap<u64, Instant>>>;

struct Peer {
    info: NodeInfo,
    /// When its latest heartbeat was delivered to us.
    seen: Instant,
}

/// What a membership change was.
pub(crate) enum Observed {
    /// A heartbeat of ours or of a peer.
    Heartbeat,
    /// Another process wrote our node id's entry.
    Intruder(Box<NodeInfo>),
}

pub(crate) struct Members {
    me: String,
    incarnation: String,
    ttl: Duration,
    peers: BTreeMap<String, Peer>,
    /// Older incarnations of ids (replaced by a restart): last seen.
    retired: HashMap<String, Instant>,
    /// Incarnations known only from their claims (never seen heartbeating):
    /// when we first saw one of their claims. The membership and state
    /// watches are separate streams: a claim may arrive before its owner's
    /// first heartbeat does.
    claimants: HashMap<String, Instant>,
    watch_since: Instant,
    current_as_of: Option<Instant>,
    /// Longer than this between two sightings of our own beats is a hole
    /// in our view (see [`Members::observe`]).
    hole: Duration,
    sent: SentBeats,
}

impl Members {
    pub(crate) fn new(
        me: &str,
        incarnation: &str,
        ttl: Duration,
        sent: SentBeats,
        now: Instant,
    ) -> Members {
        Members {
            me: me.to_string(),
            incarnation: incarnation.to_string(),
            ttl,
            peers: BTreeMap::new(),
            retired: HashMap::new(),
            claimants: HashMap::new(),
            watch_since: now,
            current_as_of: None,
            hole: ttl / 2,
            sent,
        }
    }

    /// Our heartbeat interval: a hole is a gap longer than half the TTL,
    /// or than two heartbeats if that is longer (with a heartbeat of half
    /// the TTL, every normal gap would otherwise count as one and nobody
    /// would ever be found dead).
    pub(crate) fn with_heartbeat(mut self, heartbeat: Duration) -> Members {
        self.hole = (self.ttl / 2).max(heartbeat * 2);
        self
    }

    /// A predecessor under our id, seen at `at` (before we took the id over).
    pub(crate) fn predecessor(&mut self, incarnation: &str, at: Instant) {
        self.retired.insert(incarnation.to_string(), at);
    }

    /// A state record written by `owner`/`incarnation` was delivered at
    /// `now`. An incarnation we know nothing of yet starts being observed
    /// from here. When the record was written while we watched
    /// (`live_write`: delivered live, not replayed), its writer was alive
    /// then, so it counts as seen now — like a heartbeat.
    ///
    /// This matters because "dead" is not for ever: a node cut off for
    /// longer than the TTL fences everything, and when it is back it renews
    /// its lease and claims again **under the same incarnation**. A watcher
    /// whose membership view has a hole (a gap in its watch, heartbeats
    /// that expired while it was cut off itself) may still judge it dead;
    /// its claims, delivered on the state watch, say otherwise, and the
    /// coordinator only ever acts on claims it has been delivered.
    pub(crate) fn note_claimant(
        &mut self,
        owner: &str,
        incarnation: &str,
        now: Instant,
        live_write: bool,
    ) {
        if owner.is_empty() || (owner == self.me && incarnation == self.incarnation) {
            return; // ownerless, or ours: nothing to learn
        }
        if let Some(p) = self
            .peers
            .get_mut(owner)
            .filter(|p| p.info.incarnation == incarnation)
        {
            if live_write {
                p.seen = p.seen.max(now);
            }
            return;
        }
        if let Some(seen) = self.retired.get_mut(incarnation) {
            if live_write {
                *seen = (*seen).max(now);
            }
            return;
        }
        match self.claimants.get_mut(incarnation) {
            Some(seen) if live_write => *seen = (*seen).max(now),
            Some(_) => {}
            None => {
                self.claimants.insert(incarnation.to_string(), now);
            }
        }
    }

    /// The watch (re)started: whatever happened before may be unseen.
    pub(crate) fn watch_restarted(&mut self, now: Instant) {
        self.watch_since = now;
    }

    /// A membership entry was written (or replayed).
    pub(crate) fn observe(&mut self, info: NodeInfo, now: Instant) -> Observed {
        if info.id == self.me {
            if info.incarnation != self.incarnation {
                return Observed::Intruder(Box::new(info));
            }
            let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = sent.get(&info.beat).copied() {
                if self
                    .current_as_of
                    .is_some_and(|c| now.saturating_duration_since(c) > self.hole)
                {
                    // A hole: since the last beat of ours we saw, long
                    // enough passed (our watch held up, our writes failing,
                    // ourselves cut off) that others' entries written
                    // meanwhile may have expired before they reached us.
                    // What we did not see proves nothing: observe afresh.
                    self.watch_since = now;
                }
                self.current_as_of = Some(self.current_as_of.map_or(at, |c| c.max(at)));
            }
            // Older beats can no longer tell us more than this one.
            *sent = sent.split_off(&(info.beat + 1));
            return Observed::Heartbeat;
        }
        match self.peers.get_mut(&info.id) {
            Some(p) if p.info.incarnation == info.incarnation => {
                p.info = info;
                p.seen = now;
            }
            Some(p) => {
                // A new process under that id: the old one's claims stay
                // held until it has been silent for a full TTL.
                self.retired.insert(p.info.incarnation.clone(), p.seen);
                p.info = info;
                p.seen = now;
            }
            None => {
                self.peers.insert(info.id.clone(), Peer { info, seen: now });
            }
        }
        Observed::Heartbeat
    }

    /// Whether the process `incarnation` of node `owner` is certainly gone:
    /// silent for a full TTL as far as our up-to-date watch shows, or left.
    pub(crate) fn dead(&self, owner: &str, incarnation: &str) -> bool {
        if owner == self.me && incarnation == self.incarnation {
            return false;
        }
        let seen = match self.peers.get(owner) {
            Some(p) if p.info.incarnation == incarnation => {
                if p.info.left {
                    return true;
                }
                Some(p.seen)
            }
            _ => self
                .retired
                .get(incarnation)
                .or_else(|| self.claimants.get(incarnation))
                .copied(),
        };
        let since = seen.map_or(self.watch_since, |s| s.max(self.watch_since));
        self.current_as_of.is_some_and(|c| c >= since + self.ttl)
    }

    /// The next moment a peer still counted alive would be dead if it
    /// stays silent: a heartbeat of ours sent then, once it comes back,
    /// proves it gone — failover need not wait for our next regular beat.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter(|(id, p)| !p.info.left && !self.dead(id, &p.info.incarnation))
            .map(|(_, p)| p.seen.max(self.watch_since) + self.ttl)
            .chain(
                self.retired
                    .iter()
                    .chain(self.claimants.iter())
                    .map(|(_, seen)| (*seen).max(self.watch_since) + self.ttl)
                    .filter(|d| self.current_as_of.is_none_or(|c| c < *d)),
            )
            .min()
    }

    /// Whether a claim by `owner`/`incarnation` is (possibly) held by a live
    /// process: not known dead.
    pub(crate) fn holds(&self, owner: &str, incarnation: &str) -> bool {
        !owner.is_empty() && !self.dead(owner, incarnation)
    }

    /// The nodes placement counts as live: each id's latest incarnation
    /// not known dead, and ourselves.
    pub(crate) fn live(&self, me: &NodeInfo) -> BTreeMap<String, NodeInfo> {
        let mut live: BTreeMap<String, NodeInfo> = self
            .peers
            .iter()
            .filter(|(id, p)| !p.info.left && !self.dead(id, &p.info.incarnation))
            .map(|(id, p)| (id.clone(), p.info.clone()))
            .collect();
        live.insert(self.me.clone(), me.clone());
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, inc: &str, beat: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            incarnation: inc.into(),
            beat,
            ..Default::default()
        }
    }

    /// Our heartbeats, one a second for `d`, each seen on the watch.
    async fn beats(m: &mut Members, sent: &SentBeats, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            tokio::time::advance(Duration::from_secs(1)).await;
            let beat = sent.lock().unwrap().keys().last().map_or(1000, |b| b + 1);
            sent.lock().unwrap().insert(beat, Instant::now());
            m.observe(info("me", "i-me", beat), Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_is_dead_only_after_a_full_ttl_of_our_own_fresh_heartbeats() {
        let ttl = Duration::from_secs(5);
        let sent = SentBeats::default();
        let t0 = Instant::now();
        let mut m = Members::new("me", "i-me", ttl, sent.clone(), t0);
        m.observe(info("p", "i-p", 1), t0);
        assert!(!m.dead("p", "i-p"));
        // Time passes, but our own heartbeats do not come back: nobody dies.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!m.dead("p", "i-p"), "a stalled watch declares nobody dead");
        // Our heartbeat sent at t0+20 s comes back: p silent for 20 s ≥ TTL.
        sent.lock().unwrap().insert(7, Instant::now());
        m.observe(info("me", "i-me", 7), Instant::now());
        assert!(m.dead("p", "i-p"));
        // A restarted watch starts observation afresh.
        m.watch_restarted(Instant::now());
        assert!(!m.dead("p", "i-p"));
        beats(&mut m, &sent, ttl).await;
        assert!(m.dead("p", "i-p"));
        // Claims of a process never seen: dead after a TTL of watching.
        assert!(m.dead("q", "i-q"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hole_in_our_own_heartbeats_starts_observation_afresh() {
        // Our watch was held up (or we were cut off) for longer than half
        // the TTL: p's heartbeats of that time may have expired unseen.
        // Our own fresh beat then proves nothing about p.
        let ttl = Duration::from_secs(5);
        let sent = SentBeats::default();
        let mut m = Members::new("me", "i-me", ttl, sent.clone(), Instant::now());
        m.observe(info("p", "i-p", 1), Instant::now());
        beats(&mut m, &sent, Duration::from_secs(2)).await;
        tokio::time::advance(Duration::from_secs(6)).await;
        sent.lock().unwrap().insert(50, Instant::now());
        m.observe(info("me", "i-me", 50), Instant::now());
        assert!(m.holds("p", "i-p"), "not seen, but nothing proves it gone");
        beats(&mut m, &sent, ttl - Duration::from_secs(1)).await;
        assert!(m.holds("p", "i-p"));
        beats(&mut m, &sent, Duration::from_secs(1)).await;
        assert!(!m.holds("p", "i-p"), "a full TTL of fresh observation");
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_seen_before_its_owners_first_heartbeat_is_not_taken_early() {
        let ttl = Duration::from_secs(5);
        let sent = SentBeats::default();
        let mut m = Members::new("me", "i-me", ttl, sent.clone(), Instant::now());
        beats(&mut m, &sent, Duration::from_secs(60)).await;
        // A new node's claim arrives on the state watch before its heartbeat.
        m.note_claimant("d", "i-d", Instant::now(), false);
        assert!(m.holds("d", "i-d"), "first seen just now");
        beats(&mut m, &sent, ttl).await;
        assert!(
            !m.holds("d", "i-d"),
            "silent for a full TTL since its claim"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_back_from_a_cutoff_is_alive_again_by_its_claims() {
        // p was judged dead; it was cut off, fenced, and came back under the
        // same incarnation. Our membership view has a hole (its heartbeats
        // since never reached us), but its new claims did: it holds them.
        let ttl = Duration::from_secs(5);
        let sent = SentBeats::default();
        let mut m = Members::new("me", "i-me", ttl, sent.clone(), Instant::now());
        m.observe(info("p", "i-p", 1), Instant::now());
        beats(&mut m, &sent, ttl * 2).await;
        assert!(m.dead("p", "i-p"));
        m.note_claimant("p", "i-p", Instant::now(), true);
        assert!(m.holds("p", "i-p"), "its claim just arrived");
        // The same for an older incarnation of an id, and for one known
        // only by its claims: each new record of theirs is proof of life.
        m.observe(info("p", "i-p2", 1), Instant::now());
        m.note_claimant("q", "i-q", Instant::now(), true);
        beats(&mut m, &sent, ttl).await;
        assert!(!m.holds("p", "i-p") && !m.holds("q", "i-q"));
        m.note_claimant("p", "i-p", Instant::now(), true);
        m.note_claimant("q", "i-q", Instant::now(), true);
        assert!(m.holds("p", "i-p") && m.holds("q", "i-q"));
        // Silent for a full TTL after that: dead again.
        beats(&mut m, &sent, ttl).await;
        assert!(!m.holds("p", "i-p") && !m.holds("q", "i-q"));
        // Its old records replayed (a watch restart) prove nothing.
        m.note_claimant("p", "i-p", Instant::now(), false);
        m.note_claimant("q", "i-q", Instant::now(), false);
        assert!(!m.holds("p", "i-p") && !m.holds("q", "i-q"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_peer_does_not_inherit_its_predecessors_claims_early() {
        let ttl = Duration::from_secs(5);
        let sent = SentBeats::default();
        let mut m = Members::new("me", "i-me", ttl, sent.clone(), Instant::now());
        m.observe(info("p", "old", 1), Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        m.observe(info("p", "new", 1), Instant::now());
        sent.lock().unwrap().insert(1, Instant::now());
        m.observe(info("me", "i-me", 1), Instant::now());
        assert!(m.holds("p", "old"), "old incarnation seen 2 s ago");
        assert!(m.holds("p", "new"));
        beats(&mut m, &sent, Duration::from_secs(3)).await;
        assert!(!m.holds("p", "old"), "old incarnation silent for 5 s");
        assert!(m.holds("p", "new"));
        let live = m.live(&info("me", "i-me", 2));
        assert_eq!(live.keys().collect::<Vec<_>>(), ["me", "p"]);
        // Someone else writing our id is an intruder.
        assert!(matches!(
            m.observe(info("me", "other", 1), Instant::now()),
            Observed::Intruder(_)
        ));
        // A clean leave is dead at once.
        let mut left = info("p", "new", 2);
        left.left = true;
        m.observe(left, Instant::now());
        assert!(m.dead("p", "new"));
    }
}
