//! What the bare repo's hooks decide for a `git push` to the node. Pre-receive refuses any
//! update that `pull` would refuse: a rewind of the branch, its deletion, other refs unless
//! settings allow them. Pure: the caller answers ancestry questions.

use crate::repo::CommitId;

/// One line of a hook's stdin: `<old> <new> <ref>`; all-zero ids mean none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub old: Option<CommitId>,
    pub new: Option<CommitId>,
    pub reference: String,
}

pub fn parse_updates(stdin: &str) -> Result<Vec<Update>, String> {
    let id = |s: &str| -> Result<Option<CommitId>, String> {
        if !s.is_empty() && s.bytes().all(|b| b == b'0') {
            return Ok(None);
        }
        s.parse().map(Some)
    };
    stdin
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [old, new, reference] => Ok(Update {
                    old: id(old)?,
                    new: id(new)?,
                    reference: (*reference).to_owned(),
                }),
                _ => Err(format!("malformed hook input line {l:?}")),
            }
        })
        .collect()
}

/// `Ok` if `update` may land; otherwise why not, in words for the pusher.
pub fn check(
    update: &Update,
    branch: &str,
    allow_other_refs: bool,
    is_ancestor: impl Fn(CommitId, CommitId) -> bool,
) -> Result<(), String> {
    let tracked = format!("refs/heads/{branch}");
    if update.reference != tracked {
        if allow_other_refs {
            return Ok(());
        }
        return Err(format!(
            "{}: only {tracked} may be pushed to this node (allow_other_refs = true in troops.toml allows others)",
            update.reference
        ));
    }
    match (update.old, update.new) {
        (_, None) => Err(format!(
            "deleting {tracked} is refused: the node would have nothing to deploy"
        )),
        (None, Some(_)) => Ok(()),
        (Some(old), Some(new)) if is_ancestor(old, new) => Ok(()),
        (Some(old), Some(new)) => Err(format!(
            "{tracked}: {} is not a fast-forward of {}; a node never moves backwards (fetch, rebase or merge, then push)",
            new.short(),
            old.short()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> CommitId {
        format!("{n:040x}").parse().unwrap()
    }

    #[test]
    fn parses_hook_input() {
        let zero = "0".repeat(40);
        let u = parse_updates(&format!("{zero} {} refs/heads/master\n", c(1))).unwrap();
        assert_eq!(u[0].old, None);
        assert_eq!(u[0].new, Some(c(1)));
        assert!(parse_updates("junk\n").is_err());
    }

    #[test]
    fn only_fast_forwards_of_the_branch() {
        let anc = |a: CommitId, b: CommitId| a <= b; // a toy linear history
        let up = |old, new, r: &str| Update {
            old,
            new,
            reference: r.into(),
        };
        assert!(
            check(
                &up(Some(c(1)), Some(c(2)), "refs/heads/master"),
                "master",
                false,
                anc
            )
            .is_ok()
        );
        assert!(
            check(
                &up(None, Some(c(2)), "refs/heads/master"),
                "master",
                false,
                anc
            )
            .is_ok()
        );
        let e = check(
            &up(Some(c(2)), Some(c(1)), "refs/heads/master"),
            "master",
            false,
            anc,
        )
        .unwrap_err();
        assert!(e.contains("not a fast-forward"), "{e}");
        let e = check(
            &up(Some(c(2)), None, "refs/heads/master"),
            "master",
            false,
            anc,
        )
        .unwrap_err();
        assert!(e.contains("deleting"), "{e}");
        let e = check(&up(None, Some(c(1)), "refs/tags/v1"), "master", false, anc).unwrap_err();
        assert!(e.contains("only refs/heads/master"), "{e}");
        assert!(check(&up(None, Some(c(1)), "refs/tags/v1"), "master", true, anc).is_ok());
    }
}
