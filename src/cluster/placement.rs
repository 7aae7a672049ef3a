//! Placement: which live node should own each workload. Every node computes
//! it alike from the same inputs (live node infos and specs), so no
//! coordination is needed to agree; the claim protocol makes the moments
//! when views differ harmless.
//!
//! The scheme: **weighted rendezvous hashing with bounded loads**.
//! - Each (node, workload) pair has a score `weight / -ln(u)`, `u` a stable
//!   hash in (0, 1); a workload prefers nodes in score order. When a node
//!   joins or leaves, only the workloads whose top choice changed move —
//!   about 1/N of them.
//! - Eligible nodes: not draining, in the workload's required zone, carrying
//!   its node-selector labels; among them, those of its preferred zone if any.
//! - Loads are bounded: a node takes at most `ceil(total * w / Σw * (1 + ε))`
//!   workloads (ε = 0.1 %), and never more than its capacity. Workloads are
//!   placed most-constrained first, then in hash order, each on its
//!   best-scoring eligible node with room. This keeps max − min load within
//!   about 1 % while moving little more than the ideal share.
//! - A workload no node can take is unplaceable, with the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

#[cfg(test)]
use rustc_hash::FxHashMap as HashMap;

use crate::spec::Placement;
use crate::wire::NodeInfo;

/// Slack over the perfectly even share.
const EPSILON: f64 = 0.001;

/// FNV-1a then a splitmix64 finaliser: stable across builds and platforms
/// (std's hasher is not), so nodes of different versions agree.
pub(crate) fn stable_hash(node: &str, workload: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(workload.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The score of `node` for `workload`; higher wins.
fn score(node: &str, weight: f64, workload: &str) -> f64 {
    // u in (0, 1), never 0 or 1.
    let u = ((stable_hash(node, workload) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight.max(1e-9) / -u.ln()
}

/// Whether `node` may run a workload with `placement` (ignoring load).
pub(crate) fn eligible(node: &NodeInfo, kind: &str, placement: &Placement) -> bool {
    !node.draining
        && runs(node, kind)
        && placement
            .zone
            .as_ref()
            .is_none_or(|z| node.zone.as_ref() == Some(z))
        && placement
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
}

/// Where one workload should run: `Ok(node id)` or `Err(why not)`.
pub(crate) type Target = Result<Arc<str>, String>;

/// Where each workload should run, by id.
#[cfg(test)]
pub(crate) type Assignment = HashMap<String, Target>;

/// Computes the assignment of `workloads` (id, placement, nodes to avoid)
/// over `nodes`. Avoided nodes are those a device was dead from: skipped
/// while any other eligible node exists, and nodes in other zones than the
/// avoided ones are preferred.
/// Whether `node` can run workloads of `kind` (a node that does not say —
/// an older version — is taken to run every kind; `""`: an unusable spec,
/// whose `failed` record any node may write).
pub(crate) fn runs(node: &NodeInfo, kind: &str) -> bool {
    kind.is_empty() || node.kinds.is_empty() || node.kinds.iter().any(|k| k == kind)
}

/// [`assign_each`] as a map by id.
#[cfg(test)]
pub(crate) fn assign<'a>(
    nodes: &BTreeMap<String, NodeInfo>,
    workloads: impl IntoIterator<Item = (&'a str, &'a str, &'a Placement, &'a [String])>,
) -> Assignment {
    let workloads: Vec<_> = workloads.into_iter().collect();
    let ids: Vec<&str> = workloads.iter().map(|w| w.0).collect();
    ids.into_iter()
        .map(str::to_string)
        .zip(assign_each(nodes, workloads))
        .collect()
}

/// Where each of `workloads` (id, kind, placement, nodes to avoid) should
/// run, in their order. Nothing is allocated per workload but an
/// unplaceable one's reason: the coordinator recomputes this over every
/// spec whenever its view changes.
pub(crate) fn assign_each<'a>(
    nodes: &BTreeMap<String, NodeInfo>,
    workloads: impl IntoIterator<Item = (&'a str, &'a str, &'a Placement, &'a [String])>,
) -> Vec<Target> {
    let workloads: Vec<(&str, &str, &Placement, &[String])> = workloads.into_iter().collect();
    // Usable nodes by index, in id order (a BTreeMap's): comparing indexes
    // compares ids. Each id is allocated once and shared by every workload
    // placed on it.
    let usable: Vec<(Arc<str>, &NodeInfo)> = nodes
        .iter()
        .filter(|(_, n)| !n.draining)
        .map(|(id, n)| (Arc::from(id.as_str()), n))
        .collect();
    let total_weight: f64 = usable.iter().map(|(_, n)| n.weight.max(1e-9)).sum();
    let total = workloads.len() as f64;
    let hard: Vec<u64> = usable
        .iter()
        .map(|(_, n)| n.capacity.map_or(u64::MAX, u64::from))
        .collect();
    let mut caps: Vec<u64> = usable
        .iter()
        .zip(&hard)
        .map(|((_, n), hard)| {
            let fair = (total * n.weight.max(1e-9) / total_weight * (1.0 + EPSILON)).ceil() as u64;
            // At least one (so a share rounds up), never past the hard capacity.
            fair.max(1).min(*hard)
        })
        .collect();
    let mut load: Vec<u64> = vec![0; usable.len()];
    let zone = |c: u32| usable[c as usize].1.zone.as_deref();

    // Candidates per workload, all in one vector (no allocation per
    // workload): (candidates, hash, workload, where its candidates start).
    let mut flat: Vec<u32> = Vec::with_capacity(workloads.len() * usable.len().min(8));
    let mut order: Vec<(usize, u64, u32, usize)> = Vec::with_capacity(workloads.len());
    let mut cands: Vec<u32> = Vec::with_capacity(usable.len());
    let mut bad_zones: Vec<&str> = Vec::new();
    for (w, (id, kind, p, avoid)) in workloads.iter().enumerate() {
        cands.clear();
        cands.extend((0..usable.len() as u32).filter(|c| eligible(usable[*c as usize].1, kind, p)));
        let avoided = |c: &u32| avoid.iter().any(|a| **a == *usable[*c as usize].0);
        if !avoid.is_empty() && cands.iter().any(|c| !avoided(c)) {
            // Elsewhere than the avoided nodes; in another zone than
            // theirs if any such candidate exists.
            cands.retain(|c| !avoided(c));
            bad_zones.clear();
            bad_zones.extend(
                avoid
                    .iter()
                    .filter_map(|a| nodes.get(a).and_then(|n| n.zone.as_deref())),
            );
            let other_zone = |c: &u32| zone(*c).is_none_or(|z| !bad_zones.contains(&z));
            if cands.iter().any(other_zone) {
                cands.retain(other_zone);
            }
        }
        if let Some(pz) = &p.prefer_zone {
            let preferred = |c: &u32| zone(*c) == Some(pz.as_str());
            if cands.iter().any(preferred) {
                cands.retain(preferred);
            }
        }
        order.push((cands.len(), stable_hash("", id), w as u32, flat.len()));
        flat.extend_from_slice(&cands);
    }
    // Most constrained first, then by hash (then id).
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, workloads[a.2 as usize].0).cmp(&(b.0, b.1, workloads[b.2 as usize].0))
    });

    let mut out: Vec<Target> = Vec::new();
    out.resize_with(workloads.len(), || Err(String::new()));
    let mut scored: Vec<(f64, u32)> = Vec::with_capacity(usable.len());
    for (n, _, w, start) in order {
        let (id, kind, placement, _) = workloads[w as usize];
        if n == 0 {
            out[w as usize] = Err(why_unplaceable(nodes, kind, placement));
            continue;
        }
        // Best score first; equal scores by node id.
        scored.clear();
        scored.extend(flat[start..start + n].iter().map(|c| {
            let (nid, info) = &usable[*c as usize];
            (score(nid, info.weight, id), *c)
        }));
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        // The fair share first; past it, any room under the hard capacity.
        let chosen = scored
            .iter()
            .find(|(_, c)| load[*c as usize] < caps[*c as usize])
            .or_else(|| {
                scored
                    .iter()
                    .find(|(_, c)| load[*c as usize] < hard[*c as usize])
            })
            .map(|(_, c)| *c as usize);
        match chosen {
            Some(c) => {
                load[c] += 1;
                // Grown past the fair share: lift it so later workloads see it.
                caps[c] = caps[c].max(load[c]);
                out[w as usize] = Ok(usable[c].0.clone());
            }
            None => {
                out[w as usize] = Err(format!("every eligible node is at capacity ({n} eligible)"));
            }
        }
    }
    out
}

fn why_unplaceable(nodes: &BTreeMap<String, NodeInfo>, kind: &str, p: &Placement) -> String {
    if nodes.values().all(|n| n.draining) {
        return "no live node".into();
    }
    if !nodes.values().any(|n| !n.draining && runs(n, kind)) {
        return format!("no live node runs kind {kind:?}");
    }
    let mut parts = vec![];
    if let Some(z) = &p.zone {
        parts.push(format!("zone {z:?}"));
    }
    if !p.node_selector.is_empty() {
        let sel: Vec<String> = p
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("labels {}", sel.join(",")));
    }
    format!("no live node matches {}", parts.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn node(id: &str, zone: Option<&str>, capacity: Option<u32>) -> (String, NodeInfo) {
        (
            id.to_string(),
            NodeInfo {
                id: id.to_string(),
                zone: zone.map(str::to_string),
                labels: BTreeMap::new(),
                capacity,
                weight: 1.0,
                version: "t".into(),
                started: SystemTime::UNIX_EPOCH,
                ..Default::default()
            },
        )
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    fn run(nodes: &BTreeMap<String, NodeInfo>, ids: &[String], p: &Placement) -> Assignment {
        assign(nodes, ids.iter().map(|i| (i.as_str(), "sim", p, &[][..])))
    }

    #[test]
    fn avoided_nodes_are_skipped_and_other_zones_preferred() {
        let nodes: BTreeMap<_, _> = [
            node("a1", Some("a"), None),
            node("a2", Some("a"), None),
            node("b1", Some("b"), None),
        ]
        .into_iter()
        .collect();
        let p = Placement::default();
        let avoid = ["a1".to_string()];
        let a = assign(
            &nodes,
            (0..50)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(|i| (i.as_str(), "sim", &p, &avoid[..])),
        );
        assert!(a.values().all(|r| r.as_deref() == Ok("b1")), "{a:?}");
        // Avoiding everyone falls back to running it somewhere.
        let all = ["a1".to_string(), "a2".to_string(), "b1".to_string()];
        let a = assign(&nodes, [("x", "sim", &p, &all[..])]);
        assert!(a["x"].is_ok());
    }

    fn loads(a: &Assignment) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in a.values().flatten() {
            *m.entry(o.to_string()).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn scale_out_moves_about_a_quarter_and_ends_balanced() {
        let three: BTreeMap<_, _> = ["a", "b", "c"]
            .iter()
            .map(|n| node(n, None, None))
            .collect();
        let mut four = three.clone();
        four.extend([node("d", None, None)]);
        let ids = ids(30_000);
        let p = Placement::default();
        let (before, after) = (run(&three, &ids, &p), run(&four, &ids, &p));
        let moved = ids.iter().filter(|i| before[*i] != after[*i]).count();
        let ideal = 30_000.0 / 4.0;
        assert!(
            (moved as f64) <= ideal * 1.1,
            "moved {moved}, ideal {ideal}"
        );
        let l = loads(&after);
        let (max, min) = (*l.values().max().unwrap(), *l.values().min().unwrap());
        assert!(((max - min) as f64) <= 0.01 * 7_500.0, "{l:?}");
    }

    #[test]
    fn a_kind_goes_only_to_nodes_that_run_it() {
        let (a, mut b) = (node("a", None, None), node("b", None, None));
        b.1.kinds = vec!["snmp".into()];
        let mut c = node("c", None, None);
        c.1.kinds = vec!["sim".into()];
        let nodes: BTreeMap<String, NodeInfo> = [a, b, c].into();
        let none = Placement::default();
        let ids = ids(40);
        let got = assign(
            &nodes,
            ids.iter().map(|i| (i.as_str(), "modbus", &none, &[][..])),
        );
        // "a" says nothing (older version): it may take any kind.
        assert!(got.values().all(|o| o.as_deref() == Ok("a")), "{got:?}");
        let only: BTreeMap<String, NodeInfo> =
            nodes.into_iter().filter(|(id, _)| id != "a").collect();
        let got = assign(&only, [("x", "modbus", &none, &[][..])]);
        assert_eq!(
            got["x"],
            Err("no live node runs kind \"modbus\"".to_string())
        );
    }

    #[test]
    fn a_node_with_capacity_zero_gets_nothing() {
        let nodes: BTreeMap<String, NodeInfo> =
            [node("a", None, Some(0)), node("b", None, None)].into();
        let ids = ids(50);
        let none = Placement::default();
        let a = assign(
            &nodes,
            ids.iter().map(|i| (i.as_str(), "sim", &none, &[][..])),
        );
        assert!(a.values().all(|o| o.as_deref() == Ok("b")), "{a:?}");
        let only: BTreeMap<String, NodeInfo> = [node("a", None, Some(0))].into();
        let a = assign(
            &only,
            ids.iter().map(|i| (i.as_str(), "sim", &none, &[][..])),
        );
        assert!(a
            .values()
            .all(|o| o.as_ref().is_err_and(|e| e.contains("capacity"))));
    }

    #[test]
    fn zones_selectors_capacity_and_unplaceable() {
        let mut nodes: BTreeMap<_, _> =
            [node("a1", Some("a"), None), node("b1", Some("b"), Some(10))]
                .into_iter()
                .collect();
        nodes
            .get_mut("a1")
            .unwrap()
            .labels
            .insert("rack".into(), "r1".into());
        let ids = ids(50);
        let in_b = Placement {
            zone: Some("b".into()),
            ..Default::default()
        };
        let a = run(&nodes, &ids, &in_b);
        let l = loads(&a);
        assert_eq!(l.get("b1"), Some(&10), "capacity 10 is never exceeded");
        assert!(!l.contains_key("a1"), "zone b only");
        let refused = a.values().filter(|r| r.is_err()).count();
        assert_eq!(refused, 40);
        assert!(a
            .values()
            .flat_map(|r| r.as_ref().err())
            .all(|e| e.contains("capacity")));
        let in_c = Placement {
            zone: Some("c".into()),
            ..Default::default()
        };
        assert_eq!(
            run(&nodes, &ids[..1], &in_c)["w0"],
            Err("no live node matches zone \"c\"".into())
        );
        let rack = Placement {
            node_selector: [("rack".to_string(), "r1".to_string())].into(),
            ..Default::default()
        };
        assert!(run(&nodes, &ids, &rack)
            .values()
            .all(|r| r.as_deref() == Ok("a1")));
        let prefer_b = Placement {
            prefer_zone: Some("b".into()),
            ..Default::default()
        };
        let l = loads(&run(&nodes, &ids[..5], &prefer_b));
        assert_eq!(l.get("b1"), Some(&5));
    }

    #[test]
    fn draining_nodes_get_nothing() {
        let mut nodes: BTreeMap<_, _> = [node("a", None, None), node("b", None, None)]
            .into_iter()
            .collect();
        nodes.get_mut("b").unwrap().draining = true;
        assert!(run(&nodes, &ids(100), &Placement::default())
            .values()
            .all(|r| r.as_deref() == Ok("a")));
    }

    #[test]
    fn stable_values() {
        // Pinned: changing the hash would make mixed-version clusters disagree.
        assert_eq!(stable_hash("node-1", "w1"), 0x32ed_be3b_fc9d_b797);
    }

    /// The placement before it stopped allocating per workload, kept as the
    /// oracle the new one must agree with exactly (mixed-version clusters
    /// must compute the same assignment).
    /// A workload waiting for placement: how many candidates, its hash, id,
    /// kind, placement and the candidate nodes.
    type Candidates<'a> = (usize, u64, &'a str, &'a str, &'a Placement, Vec<&'a str>);

    fn assign_before<'a>(
        nodes: &BTreeMap<String, NodeInfo>,
        workloads: impl IntoIterator<Item = (&'a str, &'a str, &'a Placement, &'a [String])>,
    ) -> HashMap<String, Result<String, String>> {
        let workloads: Vec<(&str, &str, &Placement, &[String])> = workloads.into_iter().collect();
        let usable: Vec<(&str, &NodeInfo)> = nodes
            .iter()
            .filter(|(_, n)| !n.draining)
            .map(|(id, n)| (id.as_str(), n))
            .collect();
        let total_weight: f64 = usable.iter().map(|(_, n)| n.weight.max(1e-9)).sum();
        let total = workloads.len() as f64;
        let mut caps: HashMap<&str, u64> = usable
            .iter()
            .map(|(id, n)| {
                let fair =
                    (total * n.weight.max(1e-9) / total_weight * (1.0 + EPSILON)).ceil() as u64;
                let hard = n.capacity.map_or(u64::MAX, u64::from);
                // At least one (so a share rounds up), never past the hard capacity.
                (*id, fair.max(1).min(hard))
            })
            .collect();
        let mut load: HashMap<&str, u64> = HashMap::default();

        // Candidates per workload, most constrained first, then by hash.
        let mut order: Vec<Candidates> = workloads
            .iter()
            .map(|(id, kind, p, avoid)| {
                let mut cands: Vec<&str> = usable
                    .iter()
                    .filter(|(_, n)| eligible(n, kind, p))
                    .map(|(nid, _)| *nid)
                    .collect();
                if !avoid.is_empty() {
                    let elsewhere: Vec<&str> = cands
                        .iter()
                        .copied()
                        .filter(|nid| !avoid.iter().any(|a| a == nid))
                        .collect();
                    if !elsewhere.is_empty() {
                        let bad_zones: Vec<&str> = avoid
                            .iter()
                            .filter_map(|a| nodes.get(a).and_then(|n| n.zone.as_deref()))
                            .collect();
                        let other_zone: Vec<&str> = elsewhere
                            .iter()
                            .copied()
                            .filter(|nid| {
                                nodes[*nid]
                                    .zone
                                    .as_deref()
                                    .is_none_or(|z| !bad_zones.contains(&z))
                            })
                            .collect();
                        cands = if other_zone.is_empty() {
                            elsewhere
                        } else {
                            other_zone
                        };
                    }
                }
                if let Some(pz) = &p.prefer_zone {
                    let preferred: Vec<&str> = cands
                        .iter()
                        .copied()
                        .filter(|nid| nodes[*nid].zone.as_ref() == Some(pz))
                        .collect();
                    if !preferred.is_empty() {
                        cands = preferred;
                    }
                }
                (cands.len(), stable_hash("", id), *id, *kind, *p, cands)
            })
            .collect();
        order.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));

        let mut out = HashMap::<String, Result<String, String>>::with_capacity_and_hasher(
            order.len(),
            Default::default(),
        );
        for (_, _, id, kind, placement, mut cands) in order {
            if cands.is_empty() {
                out.insert(id.to_string(), Err(why_unplaceable(nodes, kind, placement)));
                continue;
            }
            cands.sort_unstable_by(|a, b| {
                let (sa, sb) = (
                    score(a, nodes[*a].weight, id),
                    score(b, nodes[*b].weight, id),
                );
                sb.total_cmp(&sa).then_with(|| a.cmp(b))
            });
            let has_room = |nid: &&str, cap: u64| load.get(*nid).copied().unwrap_or(0) < cap;
            // The fair share first; past it, any room under the hard capacity.
            let chosen = cands
                .iter()
                .find(|nid| has_room(nid, caps[**nid]))
                .or_else(|| {
                    cands.iter().find(|nid| {
                        has_room(nid, nodes[**nid].capacity.map_or(u64::MAX, u64::from))
                    })
                })
                .copied();
            match chosen {
                Some(nid) => {
                    let l = load.entry(nid).or_insert(0);
                    *l += 1;
                    if *l > caps[nid] {
                        // Grew past the fair share: lift it so later workloads see it.
                        caps.insert(nid, *l);
                    }
                    out.insert(id.to_string(), Ok(nid.to_string()));
                }
                None => {
                    out.insert(
                        id.to_string(),
                        Err(format!(
                            "every eligible node is at capacity ({} eligible)",
                            cands.len()
                        )),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn the_same_assignment_as_before_for_random_fleets() {
        use rand::{Rng, SeedableRng};
        let zones = [None, Some("z1"), Some("z2"), Some("z3")];
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut nodes = BTreeMap::new();
            for i in 0..rng.gen_range(0..7) {
                let cap = rng.gen_bool(0.3).then(|| rng.gen_range(0..40));
                let (id, mut n) = node(&format!("n{i}"), zones[rng.gen_range(0..4)], cap);
                n.draining = rng.gen_bool(0.15);
                n.weight = [1.0, 1.0, 2.0, 0.5][rng.gen_range(0..4)];
                if rng.gen_bool(0.2) {
                    n.kinds = vec!["sim".into()];
                }
                nodes.insert(id, n);
            }
            let placements: Vec<Placement> = (0..4)
                .map(|_| Placement {
                    zone: rng.gen_bool(0.2).then(|| "z1".to_string()),
                    prefer_zone: rng.gen_bool(0.3).then(|| "z2".to_string()),
                    ..Default::default()
                })
                .collect();
            let work: Vec<(String, &str, usize, Vec<String>)> = (0..rng.gen_range(0..120))
                .map(|w| {
                    let avoid = (0..rng.gen_range(0..3))
                        .map(|_| format!("n{}", rng.gen_range(0..7)))
                        .collect();
                    let kind = ["sim", "snmp", ""][rng.gen_range(0..3)];
                    (format!("w{w}"), kind, rng.gen_range(0..4), avoid)
                })
                .collect();
            let input = || {
                work.iter()
                    .map(|(id, kind, p, avoid)| (id.as_str(), *kind, &placements[*p], &avoid[..]))
            };
            let (now, before) = (assign(&nodes, input()), assign_before(&nodes, input()));
            let now: HashMap<String, Result<String, String>> = now
                .into_iter()
                .map(|(k, v)| (k, v.map(|o| o.to_string())))
                .collect();
            assert_eq!(now, before, "seed {seed}");
        }
    }
}
