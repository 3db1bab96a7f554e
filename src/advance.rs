//! How far the node may move toward the commit its remotes offer: one decision, commit by
//! commit, over every gate at once. Pure: a small commit graph in, a commit out.
//!
//! The node takes the newest commit C on the first-parent line toward the candidate such
//! that C, and every commit C brings in, pass every gate:
//!
//! - rollout: the trailers that govern C are those on commits in (local, C], on any parent
//!   line, that no later trailer-carrying commit in that range descends from; C is
//!   admitted only if every one of them admits this node's bucket now. On linear history
//!   that is the newest trailer; a merge carrying its own trailer supersedes what it
//!   merges, and a side branch's `10%` still governs the merge that brings it in.
//! - signatures: with `tip` C verifies, with `all` every commit in (local, C] does.
//!
//! No gate's answer is reused for a commit it was not asked about.

use std::collections::{BTreeMap, BTreeSet};

use crate::rollout::Schedule;

/// A commit the node does not have yet: one of (local, candidate].
#[derive(Debug, Clone)]
pub struct Commit<Id> {
    pub parents: Vec<Id>,
    /// Committer date, unix seconds.
    pub time: i64,
    /// When this node first saw it, unix seconds, if recorded.
    pub seen: Option<i64>,
    pub trailer: Option<Result<Schedule, String>>,
}

/// A committer date this far ahead of the node's clock is not believed: the commit is held
/// until the clock catches up, and said so (a typo'd year would hold a ramp for years).
pub const FUTURE_SLACK: i64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signatures {
    Off,
    Tip,
    All,
}

#[derive(Debug, Clone, Copy)]
pub struct Gates {
    pub bucket: u8,
    pub now: i64,
    /// Staged rollout applies to what remotes offer, not to what is pushed to the node.
    pub rollout: bool,
    pub signatures: Signatures,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Rollout,
    Signature,
}

/// Why the node stops short of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold<Id> {
    pub gate: Gate,
    /// The commit the node may not take (for a signature: the one that failed).
    pub commit: Id,
    pub reason: String,
    /// For rollout: unix time this node's bucket is admitted, if ever.
    pub eligible_at: Option<i64>,
}

/// The newest commit of `line` (the first-parent line toward the candidate, oldest first,
/// every one of them in `graph`) that passes every gate, and what holds the node below the
/// candidate: a signature refusal if there is one past the commit taken, else the first
/// rollout hold. `verdict` checks one commit's signature; it is asked once per commit.
pub fn advance<Id: Copy + Ord>(
    graph: &BTreeMap<Id, Commit<Id>>,
    line: &[Id],
    gates: Gates,
    verdict: &mut dyn FnMut(Id) -> Result<(), String>,
) -> (Option<Id>, Option<Hold<Id>>) {
    let mut verdicts: BTreeMap<Id, Result<(), String>> = BTreeMap::new();
    let mut verdict_of = |id: Id| verdicts.entry(id).or_insert_with(|| verdict(id)).clone();
    let mut take = None;
    let mut rollout_hold: Option<Hold<Id>> = None;
    let mut signature_hold: Option<Hold<Id>> = None;
    for &c in line {
        let brought = ancestors_within(graph, c);
        let signed = match gates.signatures {
            Signatures::Off => Ok(()),
            Signatures::Tip => verdict_of(c).map_err(|why| (c, why)),
            // Oldest first, so the reason names the first bad commit.
            Signatures::All => brought
                .iter()
                .rev()
                .map(|&id| verdict_of(id).map_err(|why| (id, why)))
                .find(Result::is_err)
                .unwrap_or(Ok(())),
        };
        let admitted = match gates.rollout {
            true => admits(graph, &brought, gates.bucket, gates.now),
            false => Ok(()),
        };
        match (signed, admitted) {
            (Ok(()), Ok(())) => {
                take = Some(c);
                rollout_hold = None;
                signature_hold = None;
            }
            (signed, admitted) => {
                if let (Err((id, reason)), None) = (signed, &signature_hold) {
                    signature_hold = Some(Hold {
                        gate: Gate::Signature,
                        commit: id,
                        reason,
                        eligible_at: None,
                    });
                }
                if let (Err((reason, eligible_at)), None) = (admitted, &rollout_hold) {
                    rollout_hold = Some(Hold {
                        gate: Gate::Rollout,
                        commit: c,
                        reason,
                        eligible_at,
                    });
                }
            }
        }
    }
    (take, signature_hold.or(rollout_hold))
}

/// The first-parent line from `tip` back through `graph`'s commits (those the node does
/// not have), oldest first.
pub fn first_parent_line<Id: Copy + Ord>(graph: &BTreeMap<Id, Commit<Id>>, tip: Id) -> Vec<Id> {
    let mut line = Vec::new();
    let mut cur = Some(tip);
    while let Some(id) = cur.filter(|id| graph.contains_key(id)) {
        line.push(id);
        cur = graph[&id].parents.first().copied();
    }
    line.reverse();
    line
}

/// `c` and its ancestors among `graph`'s commits (those the node does not have), newest
/// first in a topological sense: a commit comes before its parents.
fn ancestors_within<Id: Copy + Ord>(graph: &BTreeMap<Id, Commit<Id>>, c: Id) -> Vec<Id> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    // Iterative post-order, reversed: children before parents.
    let mut stack = vec![(c, false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            order.push(id);
            continue;
        }
        if !graph.contains_key(&id) || !seen.insert(id) {
            continue;
        }
        stack.push((id, true));
        for &p in &graph[&id].parents {
            stack.push((p, false));
        }
    }
    order.reverse();
    order
}

/// Whether every trailer that governs the commit whose ancestry is `brought` (newest
/// first, the commit itself first) admits `bucket` at `now`; if not, the reason and when
/// it will (the latest of the governing trailers' times; never if any never does).
fn admits<Id: Copy + Ord>(
    graph: &BTreeMap<Id, Commit<Id>>,
    brought: &[Id],
    bucket: u8,
    now: i64,
) -> Result<(), (String, Option<i64>)> {
    let carriers: Vec<Id> = brought
        .iter()
        .copied()
        .filter(|id| graph[id].trailer.is_some())
        .collect();
    // A carrier governs unless a later carrier in the range descends from it.
    let mut superseded = BTreeSet::new();
    for &t in &carriers {
        for a in ancestors_within(graph, t).into_iter().skip(1) {
            superseded.insert(a);
        }
    }
    let mut refusals = Vec::new();
    let mut eligible_at = Some(i64::MIN);
    for &t in carriers.iter().filter(|t| !superseded.contains(*t)) {
        let commit = &graph[&t];
        match commit.trailer.as_ref().expect("a carrier") {
            Err(e) => {
                refusals.push(format!("malformed trailer: {e}"));
                eligible_at = None;
            }
            Ok(_) if commit.time > now.saturating_add(FUTURE_SLACK) => {
                refusals.push(format!(
                    "its committer date is {}s in the future; held until the clock reaches it",
                    commit.time - now
                ));
                let at = commit.time - FUTURE_SLACK;
                eligible_at = eligible_at.map(|a| a.max(at));
            }
            Ok(schedule) => {
                // A ramp runs from when the commit was made or when this node first saw it,
                // whichever is later: never shorter than written, however late it arrives.
                let start = commit.seen.map_or(commit.time, |s| s.max(commit.time));
                let elapsed = u64::try_from(now.saturating_sub(start)).unwrap_or(0);
                let pct = schedule.percent_at(elapsed);
                if bucket >= pct {
                    refusals.push(format!(
                        "rolled out to {pct}% so far; this node's bucket is {bucket}"
                    ));
                    // Beyond what i64 holds is as good as never, and shown so.
                    let at = schedule
                        .admits_after(bucket)
                        .map(|s| start.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
                    eligible_at = eligible_at.zip(at).map(|(a, b)| a.max(b));
                }
            }
        }
    }
    match refusals.is_empty() {
        true => Ok(()),
        false => Err((refusals.join("; "), eligible_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy graph: (id, parents, trailer).
    fn graph(commits: &[(u32, &[u32], Option<&str>)]) -> BTreeMap<u32, Commit<u32>> {
        commits
            .iter()
            .map(|(id, parents, trailer)| {
                (
                    *id,
                    Commit {
                        parents: parents.to_vec(),
                        time: 1_000,
                        seen: None,
                        trailer: trailer.map(Schedule::parse),
                    },
                )
            })
            .collect()
    }

    fn gates(bucket: u8, signatures: Signatures) -> Gates {
        Gates {
            bucket,
            now: 1_000,
            rollout: true,
            signatures,
        }
    }

    /// Run with the commits in `unsigned` failing their signature check.
    fn run(
        g: &BTreeMap<u32, Commit<u32>>,
        line: &[u32],
        gates: Gates,
        unsigned: &[u32],
    ) -> (Option<u32>, Option<Hold<u32>>) {
        let mut asked = BTreeSet::new();
        advance(g, line, gates, &mut |id| {
            assert!(asked.insert(id), "asked twice about {id}");
            match unsigned.contains(&id) {
                true => Err(format!("{id} is not signed")),
                false => Ok(()),
            }
        })
    }

    #[test]
    fn linear_history_follows_the_newest_trailer() {
        // 1 canary 10%, 2 plain, 3 finishes at 100%.
        let g = graph(&[
            (1, &[], Some("10%")),
            (2, &[1], None),
            (3, &[2], Some("100%")),
        ]);
        for b in [5, 30, 95] {
            assert_eq!(
                run(&g, &[1, 2, 3], gates(b, Signatures::Off), &[]).0,
                Some(3)
            );
        }
        let (take, hold) = run(&g, &[1, 2], gates(30, Signatures::Off), &[]);
        assert_eq!(take, None);
        assert_eq!(hold.unwrap().commit, 1);
        assert_eq!(run(&g, &[1, 2], gates(5, Signatures::Off), &[]).0, Some(2));
    }

    #[test]
    fn a_signed_revert_at_100_does_not_carry_an_unadmitted_canary_past_a_bad_signature() {
        // Signed canary 10% -> unsigned -> signed revert carrying 100%.
        let g = graph(&[
            (1, &[], Some("10%")),
            (2, &[1], None),
            (3, &[2], Some("100%")),
        ]);
        for b in [30, 95] {
            let (take, hold) = run(&g, &[1, 2, 3], gates(b, Signatures::All), &[2]);
            assert_eq!(take, None, "bucket {b} must not land on the canary");
            let hold = hold.unwrap();
            assert_eq!((hold.gate, hold.commit), (Gate::Signature, 2));
        }
        // Bucket 5 is in the canary: it takes it and stops before the unsigned commit.
        let (take, hold) = run(&g, &[1, 2, 3], gates(5, Signatures::All), &[2]);
        assert_eq!(take, Some(1));
        assert_eq!(hold.unwrap().gate, Gate::Signature);
    }

    #[test]
    fn a_hold_after_a_canary_keeps_late_buckets_below_both() {
        // Signed canary 10% -> signed 0% hold -> (later) 100% finish, unsigned.
        let g = graph(&[
            (1, &[], Some("10%")),
            (2, &[1], Some("0%")),
            (3, &[2], Some("100%")),
        ]);
        let (take, _) = run(&g, &[1, 2, 3], gates(95, Signatures::All), &[3]);
        assert_eq!(
            take, None,
            "bucket 95 lands on neither the canary nor the hold"
        );
        let (take, _) = run(&g, &[1, 2, 3], gates(95, Signatures::All), &[]);
        assert_eq!(take, Some(3));
    }

    #[test]
    fn tip_checks_each_commit_taken_not_only_the_newest_admitted() {
        // Signed canary 10% under an unsigned 100% tip.
        let g = graph(&[(1, &[], Some("10%")), (2, &[1], Some("100%"))]);
        let (take, hold) = run(&g, &[1, 2], gates(95, Signatures::Tip), &[2]);
        assert_eq!(take, None);
        assert_eq!(hold.unwrap().gate, Gate::Signature);
        // With tip an unsigned commit on the way is fine when the one landed on verifies.
        let g = graph(&[(1, &[], None), (2, &[1], None), (3, &[2], None)]);
        assert_eq!(
            run(&g, &[1, 2, 3], gates(95, Signatures::Tip), &[2]).0,
            Some(3)
        );
        assert_eq!(
            run(&g, &[1, 2, 3], gates(95, Signatures::All), &[2]).0,
            Some(1)
        );
    }

    #[test]
    fn trailers_on_merged_side_branches_govern_the_merge() {
        // Main line 1 -> 3 (merge of side 2, which says 10% or 0%).
        for side in ["10%", "0%"] {
            let g = graph(&[(1, &[], None), (2, &[1], Some(side)), (3, &[1, 2], None)]);
            let (take, hold) = run(&g, &[1, 3], gates(50, Signatures::Off), &[]);
            assert_eq!(take, Some(1), "{side}");
            assert_eq!(hold.unwrap().commit, 3);
            let expect = if side == "10%" { Some(3) } else { Some(1) };
            assert_eq!(run(&g, &[1, 3], gates(5, Signatures::Off), &[]).0, expect);
        }
        // A merge carrying its own trailer supersedes what it merges.
        let g = graph(&[
            (1, &[], None),
            (2, &[1], Some("0%")),
            (3, &[1, 2], Some("100%")),
        ]);
        assert_eq!(run(&g, &[1, 3], gates(95, Signatures::Off), &[]).0, Some(3));
        // Two side branches with trailers: both govern; the stricter holds.
        let g = graph(&[
            (1, &[], None),
            (2, &[1], Some("50%")),
            (3, &[1], Some("10%")),
            (4, &[1, 2, 3], None),
        ]);
        assert_eq!(run(&g, &[1, 4], gates(30, Signatures::Off), &[]).0, Some(1));
        assert_eq!(run(&g, &[1, 4], gates(5, Signatures::Off), &[]).0, Some(4));
    }

    #[test]
    fn all_checks_side_branches_too_and_names_the_first_bad_commit() {
        let g = graph(&[(1, &[], None), (2, &[1], None), (3, &[1, 2], None)]);
        let (take, hold) = run(&g, &[1, 3], gates(0, Signatures::All), &[2]);
        assert_eq!(take, Some(1));
        assert_eq!(hold.unwrap().commit, 2);
    }

    #[test]
    fn a_malformed_trailer_holds_everyone() {
        let g = graph(&[(1, &[], None), (2, &[1], Some("ten percent"))]);
        for b in [0, 50, 99] {
            let (take, hold) = run(&g, &[1, 2], gates(b, Signatures::Off), &[]);
            assert_eq!(take, Some(1));
            assert!(hold.unwrap().reason.contains("malformed"));
        }
    }

    #[test]
    fn holds_say_when_and_the_clock_admits() {
        let mut g = graph(&[(1, &[], Some("10%, 100% after 1h"))]);
        g.get_mut(&1).unwrap().time = 1_000;
        let at = |now| Gates {
            now,
            ..gates(50, Signatures::Off)
        };
        let (take, hold) = run(&g, &[1], at(1_100), &[]);
        assert_eq!(take, None);
        assert_eq!(hold.unwrap().eligible_at, Some(4_600));
        assert_eq!(run(&g, &[1], at(4_600), &[]).0, Some(1));
        // 0% holds everyone, even a pinned canary.
        let g = graph(&[(1, &[], Some("0%"))]);
        assert_eq!(run(&g, &[1], gates(0, Signatures::Off), &[]).0, None);
    }

    #[test]
    fn a_ramp_runs_from_when_the_node_first_saw_the_commit() {
        // Made at 1000 with "10%, 100% after 1h", first seen at 10000: still 10% at 10100.
        let mut g = graph(&[(1, &[], Some("10%, 100% after 1h"))]);
        g.get_mut(&1).unwrap().seen = Some(10_000);
        let at = |now| Gates {
            now,
            ..gates(50, Signatures::Off)
        };
        let (take, hold) = run(&g, &[1], at(10_100), &[]);
        assert_eq!(take, None);
        assert_eq!(hold.unwrap().eligible_at, Some(13_600));
        assert_eq!(run(&g, &[1], at(13_600), &[]).0, Some(1));
    }

    #[test]
    fn a_commit_dated_in_the_future_is_held_and_said_so() {
        let mut g = graph(&[(1, &[], Some("100%"))]);
        g.get_mut(&1).unwrap().time = 1_000 + FUTURE_SLACK + 1;
        let (take, hold) = run(&g, &[1], gates(5, Signatures::Off), &[]);
        assert_eq!(take, None);
        assert!(hold.unwrap().reason.contains("in the future"));
        g.get_mut(&1).unwrap().time = 1_000 + FUTURE_SLACK;
        assert_eq!(run(&g, &[1], gates(5, Signatures::Off), &[]).0, Some(1));
    }

    #[test]
    fn eligibility_never_overflows() {
        let mut g = graph(&[(1, &[], Some("10%, 100% after 10000000000000000000s"))]);
        g.get_mut(&1).unwrap().time = i64::MAX - 5;
        let late = Gates {
            now: i64::MAX - 5,
            ..gates(50, Signatures::Off)
        };
        let (take, hold) = run(&g, &[1], late, &[]);
        assert_eq!(take, None);
        assert_eq!(hold.unwrap().eligible_at, Some(i64::MAX));
    }

    #[test]
    fn the_line_follows_first_parents_within_the_graph() {
        let g = graph(&[(1, &[], None), (2, &[1], None), (3, &[2, 7], None)]);
        assert_eq!(first_parent_line(&g, 3), vec![1, 2, 3]);
        let g = graph(&[(2, &[1], None), (3, &[2], None)]);
        assert_eq!(first_parent_line(&g, 3), vec![2, 3], "1 is the node's own");
    }

    #[test]
    fn rollout_off_for_pushes() {
        let g = graph(&[(1, &[], Some("0%"))]);
        let mut gates = gates(50, Signatures::Off);
        gates.rollout = false;
        assert_eq!(run(&g, &[1], gates, &[]).0, Some(1));
    }
}
