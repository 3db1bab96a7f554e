//! Which commit the node moves to, given what every remote offers. Pure: the caller answers
//! ancestry questions, so the rules are tested here over small hand-made histories.
//!
//! The rules (DESIGN.md, "Choosing the target"): the branch never moves backwards; a remote
//! that is merely behind is fine; one that went backwards or diverged is ignored and reported;
//! among the remotes ahead, the one that contains all the others wins, and if they diverge
//! from each other the node stays where it is and names them.

use serde::Serialize;

/// How one remote's tip relates to the local branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// At the local branch.
    Current,
    /// Descends from the local branch: a candidate.
    Ahead,
    /// An ancestor of the local branch that has not moved backwards: a lagging mirror.
    Behind,
    /// An ancestor of a tip this remote offered before: it was force-pushed backwards.
    Rewound,
    /// Neither ancestor nor descendant of the local branch.
    Diverged,
}

impl Standing {
    /// Whether an operator should hear about it.
    pub fn is_problem(self) -> bool {
        matches!(self, Standing::Rewound | Standing::Diverged)
    }
}

/// What one remote offered this time, and the newest tip it offered before.
#[derive(Debug, Clone)]
pub struct Offer<Id> {
    pub remote: String,
    pub tip: Id,
    pub seen: Option<Id>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<Id> {
    /// Each remote's standing, in the order offered.
    pub standings: Vec<(String, Standing)>,
    /// The commit to move to, if the branch should move.
    pub target: Option<Id>,
    /// Remotes ahead of the branch that do not agree with each other; non-empty means stay.
    pub disagree: Vec<String>,
    /// The newest tip to remember for each remote (the high-water mark for `Rewound`).
    pub seen: Vec<(String, Id)>,
}

/// `is_ancestor(a, b)` answers whether `a` is reachable from `b` (`a == b` counts).
pub fn choose<Id: Copy + Eq>(
    local: Option<Id>,
    offers: &[Offer<Id>],
    is_ancestor: impl Fn(Id, Id) -> bool,
) -> Decision<Id> {
    let mut standings = Vec::new();
    let mut seen = Vec::new();
    let mut candidates: Vec<(&str, Id)> = Vec::new();
    for offer in offers {
        let standing = match local {
            None => Standing::Ahead,
            Some(l) if l == offer.tip => Standing::Current,
            Some(l) if is_ancestor(l, offer.tip) => Standing::Ahead,
            Some(l) if is_ancestor(offer.tip, l) => match offer.seen {
                Some(s) if s != offer.tip && is_ancestor(offer.tip, s) => Standing::Rewound,
                _ => Standing::Behind,
            },
            Some(_) => Standing::Diverged,
        };
        if standing == Standing::Ahead {
            candidates.push((&offer.remote, offer.tip));
        }
        standings.push((offer.remote.clone(), standing));
        // A tip that went backwards keeps the old high-water mark, so the rewind stays
        // reported until the remote catches up again.
        let high = match offer.seen {
            Some(s) if is_ancestor(offer.tip, s) => s,
            _ => offer.tip,
        };
        seen.push((offer.remote.clone(), high));
    }

    let contains_all = |c: Id| candidates.iter().all(|&(_, d)| is_ancestor(d, c));
    let target = candidates
        .iter()
        .map(|&(_, c)| c)
        .find(|&c| contains_all(c));
    let disagree = if target.is_none() && !candidates.is_empty() {
        // Name the remotes whose tips no other candidate contains: the heads that diverge.
        let mut names: Vec<String> = candidates
            .iter()
            .filter(|&&(_, c)| !candidates.iter().any(|&(_, d)| d != c && is_ancestor(c, d)))
            .map(|&(name, _)| name.to_owned())
            .collect();
        names.dedup();
        names
    } else {
        Vec::new()
    };
    // Report standings against where the branch ends up, not where it started.
    if let Some(t) = target {
        for ((_, standing), offer) in standings.iter_mut().zip(offers) {
            if matches!(*standing, Standing::Ahead | Standing::Current) {
                *standing = if offer.tip == t {
                    Standing::Current
                } else {
                    Standing::Behind
                };
            }
        }
    }
    Decision {
        standings,
        target: target.filter(|&t| Some(t) != local),
        disagree,
        seen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny history: each commit lists its parents.
    ///
    /// ```text
    /// 1 - 2 - 3 - 4
    ///      \
    ///       5 - 6
    /// ```
    fn history() -> impl Fn(u32, u32) -> bool {
        let parents = |c: u32| -> Vec<u32> {
            match c {
                2 => vec![1],
                3 => vec![2],
                4 => vec![3],
                5 => vec![2],
                6 => vec![5],
                _ => vec![],
            }
        };
        move |a, b| {
            let mut stack = vec![b];
            while let Some(c) = stack.pop() {
                if c == a {
                    return true;
                }
                stack.extend(parents(c));
            }
            false
        }
    }

    fn offer(remote: &str, tip: u32, seen: Option<u32>) -> Offer<u32> {
        Offer {
            remote: remote.into(),
            tip,
            seen,
        }
    }

    fn standing(d: &Decision<u32>, remote: &str) -> Standing {
        d.standings.iter().find(|(r, _)| r == remote).unwrap().1
    }

    #[test]
    fn takes_the_tip_that_contains_the_others() {
        let d = choose(
            Some(2),
            &[
                offer("a", 3, None),
                offer("b", 4, None),
                offer("c", 2, None),
            ],
            history(),
        );
        assert_eq!(d.target, Some(4));
        // Standings are against the branch after the move.
        assert_eq!(standing(&d, "a"), Standing::Behind);
        assert_eq!(standing(&d, "b"), Standing::Current);
        assert_eq!(standing(&d, "c"), Standing::Behind);
        assert!(d.disagree.is_empty());
    }

    #[test]
    fn first_pull_has_no_local_branch() {
        let d = choose(None, &[offer("a", 3, None), offer("b", 1, None)], history());
        assert_eq!(d.target, Some(3));
        let d = choose(None, &[offer("a", 4, None), offer("b", 6, None)], history());
        assert_eq!(d.target, None);
        assert_eq!(d.disagree, vec!["a", "b"]);
    }

    #[test]
    fn a_stale_remote_is_fine_and_never_rewinds() {
        let d = choose(Some(4), &[offer("a", 2, Some(2))], history());
        assert_eq!(d.target, None);
        assert_eq!(standing(&d, "a"), Standing::Behind);
        assert!(!Standing::Behind.is_problem());
    }

    #[test]
    fn a_remote_that_went_backwards_is_reported_until_it_recovers() {
        let d = choose(Some(4), &[offer("a", 2, Some(4))], history());
        assert_eq!(d.target, None);
        assert_eq!(standing(&d, "a"), Standing::Rewound);
        assert_eq!(d.seen, vec![("a".to_string(), 4)]);
        // Next pull: still rewound, because the high-water mark was kept.
        let d = choose(Some(4), &[offer("a", 2, Some(4))], history());
        assert_eq!(standing(&d, "a"), Standing::Rewound);
        let d = choose(Some(4), &[offer("a", 4, Some(4))], history());
        assert_eq!(standing(&d, "a"), Standing::Current);
    }

    #[test]
    fn a_diverged_remote_is_ignored_while_others_advance() {
        let d = choose(
            Some(3),
            &[offer("a", 6, None), offer("b", 4, None)],
            history(),
        );
        assert_eq!(d.target, Some(4));
        assert_eq!(standing(&d, "a"), Standing::Diverged);
        assert!(Standing::Diverged.is_problem());
    }

    #[test]
    fn candidates_that_diverge_from_each_other_mean_stay() {
        let d = choose(
            Some(2),
            &[
                offer("a", 4, None),
                offer("b", 6, None),
                offer("c", 3, None),
            ],
            history(),
        );
        assert_eq!(d.target, None);
        // c is contained in a, so only the diverging heads are named.
        assert_eq!(d.disagree, vec!["a", "b"]);
    }

    #[test]
    fn equal_tips_agree() {
        let d = choose(
            Some(1),
            &[offer("a", 4, None), offer("b", 4, None)],
            history(),
        );
        assert_eq!(d.target, Some(4));
        assert!(d.disagree.is_empty());
    }
}
