use std::path::Path;

use anyhow::Result;
use troops::node::Node;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON for machines.
    #[arg(long)]
    json: bool,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let node = Node::open(root)?;
    let status = troops::status::gather(&node)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(0);
    }
    let troops::status::Status {
        branch,
        head,
        deployed,
        last_run: last,
        last_pull: pull,
        damage,
        ..
    } = &status;
    let (head, deployed) = (*head, *deployed);
    let short = |c: Option<troops::repo::CommitId>| c.map_or("(none)".to_string(), |c| c.short());
    println!("node      {}", root.display());
    println!(
        "branch    {branch} at {}{}",
        short(head),
        if head == deployed {
            ", deployed".to_string()
        } else {
            format!(", deployed {}", short(deployed))
        }
    );
    println!("roles     {}", node.settings.roles.join(" "));
    for a in &status.pending_admins {
        println!(
            "pending   admin {a}: no such user yet (added to the admin group by the first pull after it exists)"
        );
    }
    for d in damage {
        println!("DAMAGED   {d} (the next pull repairs it from the remotes)");
    }
    if let Some(r) = &last {
        println!("last      {}", super::run_summary(r));
    }
    match &pull {
        None => println!("last pull (never)"),
        Some(p) => {
            println!("last pull {}", p.time);
            for r in &p.remotes {
                let what = match (&r.problem, r.tip, &r.standing) {
                    (Some(problem), _, _) => format!("PROBLEM: {problem}"),
                    (None, Some(t), Some(s)) => format!("{} {s}", t.short()),
                    _ => r.fetch.clone(),
                };
                println!("  {:<10} {:<40} {what}", r.name, r.url);
                if let Some(to) = &r.moved_to {
                    println!("  {:<10} moved to {to} (update the remote's URL)", "");
                }
            }
            for w in &p.warnings {
                println!("WARNING   {w}");
            }
            if !p.disagree.is_empty() {
                println!(
                    "WARNING   remotes {} disagree (their tips diverge); the node stays at {}",
                    p.disagree.join(" and "),
                    short(head)
                );
            }
            println!("bucket    {} (rollout)", p.bucket);
            if let Some(h) = &p.held {
                let when = match h.eligible_at {
                    Some(at) => format!("; eligible {}", troops::rollout::eligible_text(at)),
                    None => String::new(),
                };
                println!("held      {}: {}{when}", h.commit.short(), h.reason);
            }
            if let Some(w) = &p.waiting {
                println!("waiting   {w}");
            }
            for r in &p.repaired {
                println!("repaired  {r}");
            }
        }
    }
    Ok(0)
}
