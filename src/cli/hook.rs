//! `troops hook pre-receive|post-receive`: what the bare repo's hooks run for a `git push`.
//! Everything printed here reaches the pusher as `remote:` lines.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use troops::daemon::{self, client, protocol::Reply, protocol::Request};
use troops::hook;
use troops::node::Node;
use troops::repo;
use troops::settings::Verify;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    which: Which,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Which {
    PreReceive,
    PostReceive,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("failed to read the hook's input")?;
    let updates = hook::parse_updates(&input).map_err(anyhow::Error::msg)?;
    let node = Node::open(root)?;
    match args.which {
        Which::PreReceive => pre_receive(&node, &updates),
        Which::PostReceive => post_receive(&node, &updates),
    }
}

fn pre_receive(node: &Node, updates: &[hook::Update]) -> Result<u8> {
    let settings = &node.settings;
    // What root last accepted, from root's own repository: the shared repo's branch is
    // whatever a member last wrote there.
    let accepted = troops::repo::Repo::open(&node.layout.node_repo())?
        .ref_target(&format!("refs/heads/{}", settings.branch))?;
    for u in updates {
        // A failed ancestry check refuses the push with its own reason, not "not a
        // fast-forward".
        let failure = std::cell::RefCell::new(None);
        let check = hook::check(u, &settings.branch, settings.allow_other_refs, |a, b| {
            repo::hook_is_ancestor(a, b).unwrap_or_else(|e| {
                *failure.borrow_mut() = Some(e.to_string());
                false
            })
        });
        if let Some(e) = failure.into_inner() {
            eprintln!("troops: refused: {e}");
            return Ok(1);
        }
        if let Err(why) = check {
            eprintln!("troops: refused: {why}");
            return Ok(1);
        }
        // A push never lands what a pull would refuse to take: the same signature checks.
        let tracked = u.reference == format!("refs/heads/{}", settings.branch);
        let Some(new) = u.new.filter(|_| tracked) else {
            continue;
        };
        if let Some(a) = accepted
            && !repo::hook_is_ancestor(a, new)?
        {
            eprintln!(
                "troops: refused: {} does not contain {}, which the node has taken; a node never moves backwards (fetch, rebase or merge, then push)",
                new.short(),
                a.short()
            );
            return Ok(1);
        }
        if let Some(why) = unsigned(node, accepted, new)? {
            eprintln!("troops: refused: {why}");
            return Ok(1);
        }
    }
    Ok(0)
}

/// Why the commits a push brings fail `verify`, if they do. Runs inside receive-pack, so
/// the git CLI (through gate's verifier) sees the quarantined objects.
fn unsigned(
    node: &Node,
    old: Option<troops::repo::CommitId>,
    new: troops::repo::CommitId,
) -> Result<Option<String>> {
    if node.settings.verify == Verify::None {
        return Ok(None);
    }
    let verifier = troops::gate::verifier(node, None)?;
    let commits = match node.settings.verify {
        Verify::All => verifier.rev_list(new, old)?,
        _ => vec![new],
    };
    for c in commits {
        if let Err(why) = verifier.check(c)? {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

fn post_receive(node: &Node, updates: &[hook::Update]) -> Result<u8> {
    let tracked = format!("refs/heads/{}", node.settings.branch);
    if !updates
        .iter()
        .any(|u| u.reference == tracked && u.new.is_some())
    {
        return Ok(0);
    }
    let socket = daemon::socket_path(&node.layout);
    relay(&socket, Request::Push).or_else(|e| match e.downcast_ref::<client::ClientError>() {
        Some(client::ClientError::NotListening(_)) => {
            println!(
                "troops: no troops daemon is running here; the deploy will happen at the next pull"
            );
            Ok(0)
        }
        _ => Err(e),
    })
}

/// Ask the daemon and print its replies as they come: output on stdout, progress on stderr,
/// the summary last. Used by the hook and by `troops deploy|pull` run by a non-root admin.
pub fn relay(socket: &Path, request: Request) -> Result<u8> {
    let (code, summary) = client::request(socket, request, |reply| match reply {
        Reply::Out(line) => {
            let mut out = std::io::stdout().lock();
            // Escaped at capture already; again here, for a daemon that predates that.
            let _ = writeln!(out, "{}", troops::deploy::runner::escape_controls(line));
            let _ = out.flush();
        }
        Reply::Info(info) => eprintln!("troops: {info}"),
        _ => {}
    })?;
    if code == 0 {
        println!("troops: {summary}");
    } else {
        println!("troops: FAILED: {summary}");
    }
    Ok(code)
}
