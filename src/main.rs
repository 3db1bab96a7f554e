//! The `troops` binary: logging, parsing, `run()`, exit codes. Everything else is in the
//! library and `cli/`.

mod cli;

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use tracing_subscriber::{EnvFilter, Layer, filter::filter_fn, prelude::*};

/// Log lines as people read them: `troops: …`, `troops: warning: …`, in the style of every
/// line troops prints itself, with no level column. The journal keeps the level and the
/// fields (tracing-journald).
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let prefix = match *event.metadata().level() {
            tracing::Level::ERROR => "troops: error: ",
            tracing::Level::WARN => "troops: warning: ",
            tracing::Level::INFO => "troops: ",
            _ => "troops: debug: ",
        };
        w.write_str(prefix)?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Whether fd `fd` is the journal's stream (`JOURNAL_STREAM` is its `dev:ino`).
fn is_journal(fd: i32) -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata(format!("/proc/self/fd/{fd}")) else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("TROOPS_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Under systemd stderr is the journal already: log there with structured fields instead
    // of twice as text.
    let journald = is_journal(2)
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| {
            l.with_syslog_identifier("troops".into())
                .with_field_prefix(None)
        });
    // A run's output lines reach a person through stdout; the text log would repeat them.
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Plain)
            .with_filter(filter_fn(|m| m.target() != "troops::output"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(fmt)
        .init();
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    // Relative roots would break as soon as a child runs in another directory.
    let root = &std::path::absolute(&cli.root)
        .map_err(|e| anyhow::anyhow!("failed to resolve --root {}: {e}", cli.root.display()))?;
    let journal = is_journal(1);
    match &cli.command {
        Command::Init(args) => cli::init::run(root, args, journal),
        Command::Key => cli::key::run(root),
        Command::Pull => cli::pull::run(root, cli.now, journal),
        Command::Deploy => cli::deploy::run(root, journal),
        Command::Status(args) => cli::status::run(root, args),
        Command::Log(args) => cli::log::run(root, args),
        Command::Run(args) => cli::run::run(root, args),
        Command::Fetch(args) => cli::fetch_worker::run(root, args),
        Command::Serve => cli::serve::run(root),
        Command::Assets(args) => cli::generate::run(args),
        Command::Hook(args) => cli::hook::run(root, args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `troops status | head -1`: a reader that went away ends a report quietly, as for any
    // Unix tool (Rust ignores SIGPIPE, and println! would panic). Only the commands that
    // just report: a pull or deploy must never die half-way because its reader left, and
    // the daemon must lose one client, not its life.
    if matches!(
        cli.command,
        Command::Status(_) | Command::Log(_) | Command::Key | Command::Assets(_)
    ) {
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line that names what was wrong; the chain is already in the message.
            eprintln!("troops: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
