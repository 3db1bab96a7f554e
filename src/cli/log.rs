use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use troops::deploy::record::RunStore;
use troops::paths::Layout;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print this run's full output.
    run: Option<u64>,
    /// Print JSON for machines.
    #[arg(long)]
    json: bool,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let layout = Layout::new(root);
    let store = RunStore::new(layout.runs());
    // A record still "running" while no run holds the lock is one whose agent died.
    let lock = layout.lock_file();
    if let Some(id) = args.run {
        let record = store
            .load(id)
            .with_context(|| format!("no run {id} in {}", store.dir().display()))?;
        let record = store.settle(record, &lock);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&record)?);
            return Ok(0);
        }
        let file = std::fs::File::open(&record.output)
            .with_context(|| format!("failed to read {}", record.output.display()))?;
        // Streamed, a bounded piece at a time: a log of any size costs little memory. Logs
        // written before output was escaped at capture may still hold raw escapes.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        troops::deploy::runner::for_each_line(file, &mut |line| {
            let _ = writeln!(out, "{}", troops::deploy::runner::escape_controls(line));
        })
        .with_context(|| format!("failed to read {}", record.output.display()))?;
        return Ok(0);
    }
    let runs: Vec<_> = store
        .list()
        .into_iter()
        .map(|r| store.settle(r, &lock))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(0);
    }
    for r in runs {
        println!("{}", super::run_summary(&r));
    }
    Ok(0)
}
