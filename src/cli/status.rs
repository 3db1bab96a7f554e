use std::path::Path;

use anyhow::Result;
use serde_json::json;
use troops::deploy::DEPLOYED_REF;
use troops::deploy::record::RunStore;
use troops::node::Node;
use troops::pull::PullReport;
use troops::repo::Repo;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON for machines.
    #[arg(long)]
    json: bool,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let node = Node::open(root)?;
    let layout = &node.layout;
    let branch = &node.settings.branch;
    // Status reports on a damaged repository too: what is wrong is part of the report.
    let mut damage: Vec<String> =
        troops::repair::damaged_packs(&layout.node_repo().join("objects/pack"))
            .into_iter()
            .map(|d| format!("{}: {}", d.pack.display(), d.why))
            .collect();
    for (name, id) in troops::repair::pending(&layout.node_repo()) {
        damage.push(format!(
            "{name} was at {}, which is lost; the next pull fetches it again",
            id.short()
        ));
    }
    let (head, deployed) =
        match Repo::open(&layout.node_repo()) {
            Ok(repo) => {
                match repo.refs_to_missing() {
                    Ok(missing) => damage.extend(missing.into_iter().map(|(name, id)| {
                        format!("{name} names {}, which is missing", id.short())
                    })),
                    Err(e) => damage.push(e.to_string()),
                }
                let mut read = |name: &str| {
                    repo.ref_id(name).unwrap_or_else(|e| {
                        damage.push(e.to_string());
                        None
                    })
                };
                (read(&format!("refs/heads/{branch}")), read(DEPLOYED_REF))
            }
            Err(e) => {
                damage.push(e.to_string());
                (None, None)
            }
        };
    let store = RunStore::new(layout.runs());
    let last = store.latest().map(|r| store.settle(r, &layout.lock_file()));
    let pull = PullReport::load(&layout.pull_report());
    let remotes: Vec<(String, String)> = troops::repo::remote_urls(&layout.repo().join("config"))?
        .into_iter()
        .map(|(n, u)| (n, troops::repo::redact_url(&u)))
        .collect();

    if args.json {
        let value = json!({
            "root": root,
            "branch": branch,
            "head": head,
            "deployed": deployed,
            "roles": node.settings.roles,
            "remotes": remotes.iter().map(|(n, u)| json!({"name": n, "url": u})).collect::<Vec<_>>(),
            "last_run": last,
            "last_pull": pull,
            "damage": damage,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
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
    for d in &damage {
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
