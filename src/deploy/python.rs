//! The boundary with deploy.py and the `troops` module: the context handed in through a file
//! named by `TROOPS_CONTEXT`, the per-deployable results read back from `TROOPS_RESULTS`,
//! and the run of the venv's own interpreter on deploy.py.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::DeployableResult;
use super::runner::{self, Invocation};

pub const CONTEXT_ENV: &str = "TROOPS_CONTEXT";
pub const RESULTS_ENV: &str = "TROOPS_RESULTS";

#[derive(Debug, Serialize)]
pub struct Context {
    pub roles: Vec<String>,
    pub commit: Option<String>,
    pub previous_commit: Option<String>,
    pub settings: serde_json::Value,
    /// Unset: the module asks the machine (socket.getfqdn()).
    pub hostname: Option<String>,
    /// The node's root prefix, "/" on a real node.
    pub root: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct Results {
    /// Whether deploy.py's top level finished without an exception.
    pub top_level: String,
    pub roles: Vec<String>,
    pub deployables: Vec<DeployableResult>,
}

pub struct Outcome {
    pub exit_code: Option<i32>,
    /// `None` if the interpreter never got to write them (it crashed, or never imported troops).
    pub results: Option<Results>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self
                .results
                .as_ref()
                .is_none_or(|r| r.deployables.iter().all(|d| d.status != "failed"))
    }
}

/// Run `deploy.py` in `checkout` with `venv`'s interpreter; `scratch` holds the two files.
pub fn run_deploy_py(
    venv: &Path,
    checkout: &Path,
    context: &Context,
    scratch: &Path,
    timeout: std::time::Duration,
    // The installers' environment (shared caches), for the pip deploy.py may run.
    installer_env: Vec<(String, String)>,
    on_line: &mut dyn FnMut(&str),
) -> io::Result<Outcome> {
    let context_path = scratch.with_extension("context.json");
    let results_path: PathBuf = scratch.with_extension("results.json");
    let _ = fs::remove_file(&results_path);
    fs::write(
        &context_path,
        serde_json::to_vec(context).expect("context serialises"),
    )?;
    let inv = Invocation {
        program: venv.join("bin/python"),
        args: vec!["-u".into(), "deploy.py".into()],
        cwd: checkout.to_owned(),
        venv: Some(venv.to_owned()),
        env: vec![
            (CONTEXT_ENV.into(), context_path.display().to_string()),
            (RESULTS_ENV.into(), results_path.display().to_string()),
            // Lets the module tell the interpreter we started from the ones deploy.py starts.
            ("TROOPS_AGENT_PID".into(), std::process::id().to_string()),
        ]
        .into_iter()
        .chain(installer_env)
        .collect(),
        timeout: Some(timeout),
    };
    let status = runner::run(&inv, on_line);
    let results = fs::read(&results_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let _ = fs::remove_file(&context_path);
    let _ = fs::remove_file(&results_path);
    Ok(Outcome {
        exit_code: status?.code(),
        results,
    })
}
