//! `troops __assets DIR`: the man page and shell completions, generated from the CLI's own
//! definition for the package (packaging/build-deb).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write troops.1 and the completions.
    dir: PathBuf,
}

pub fn run(args: &Args) -> Result<u8> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("failed to create {}", args.dir.display()))?;
    let cmd = super::Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut man)
        .context("failed to render the man page")?;
    std::fs::write(args.dir.join("troops.1"), man).context("failed to write troops.1")?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "troops.bash"),
        (clap_complete::Shell::Zsh, "_troops"),
        (clap_complete::Shell::Fish, "troops.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "troops", &mut out);
        std::fs::write(args.dir.join(name), out)
            .with_context(|| format!("failed to write {name}"))?;
    }
    Ok(0)
}
