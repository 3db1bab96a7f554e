//! The `troops` module that deploy.py imports: roles, the host name, `@deployable`, and what
//! the agent knows about the run. Built against the stable ABI (abi3-py39), so one file serves
//! every python3 from 3.9 on; it links no libpython and is loaded by the venv's own
//! interpreter through a `.pth` file.
//!
//! The agent hands the context in through the file named by `TROOPS_CONTEXT` and reads the
//! results back from `TROOPS_RESULTS`. Without them (someone ran `python deploy.py` by hand)
//! the module reads the node's settings itself. Either way the deployables run when the
//! interpreter exits, after deploy.py's top level has finished, so a role added anywhere in
//! the file counts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PySystemExit, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet, PyString, PyTuple};

static TOP_LEVEL_FAILED: AtomicBool = AtomicBool::new(false);

fn this(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    py.import("troops")
}

fn check_role(name: &str) -> PyResult<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "invalid role name {name:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

/// A role name or an iterable of them, as a list of names.
fn role_list(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = obj.extract::<String>() {
        check_role(&s)?;
        return Ok(vec![s]);
    }
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        let s: String = item?.extract()?;
        check_role(&s)?;
        out.push(s);
    }
    Ok(out)
}

/// Whether this node has role `name`.
#[pyfunction]
fn have_role(py: Python<'_>, name: &str) -> PyResult<bool> {
    this(py)?.getattr("roles")?.contains(name)
}

/// The node's fully qualified host name.
#[pyfunction]
fn hostname(py: Python<'_>) -> PyResult<String> {
    let m = this(py)?;
    let given = m.getattr("_hostname")?;
    if !given.is_none() {
        return given.extract();
    }
    let fqdn: String = py.import("socket")?.call_method0("getfqdn")?.extract()?;
    m.setattr("_hostname", &fqdn)?;
    Ok(fqdn)
}

/// Give this node role `name` if its host name (fully qualified or short) matches one of
/// `hosts`: exact names or shell-style patterns. Returns whether it matched.
#[pyfunction]
#[pyo3(signature = (name, hosts))]
fn define_role(py: Python<'_>, name: &str, hosts: &Bound<'_, PyAny>) -> PyResult<bool> {
    check_role(name)?;
    let patterns: Vec<String> = match hosts.extract::<String>() {
        Ok(one) => vec![one],
        Err(_) => hosts
            .try_iter()?
            .map(|h| h?.extract())
            .collect::<PyResult<_>>()?,
    };
    let fqdn = hostname(py)?;
    let short = fqdn.split('.').next().unwrap_or(&fqdn).to_owned();
    let fnmatch = py.import("fnmatch")?;
    let mut matched = false;
    for p in &patterns {
        for candidate in [&fqdn, &short] {
            if fnmatch
                .call_method1("fnmatchcase", (candidate, p))?
                .is_truthy()?
            {
                matched = true;
            }
        }
    }
    let m = this(py)?;
    m.getattr("defined_roles")?
        .set_item(name, PyList::new(py, &patterns)?)?;
    if matched {
        m.getattr("roles")?.call_method1("add", (name,))?;
    }
    Ok(matched)
}

/// The decorator `@deployable(roles=[...])` returns: it records the function.
#[pyclass]
struct Register {
    roles: Option<Vec<String>>,
}

#[pymethods]
impl Register {
    fn __call__(&self, py: Python<'_>, func: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        register(py, &func, self.roles.clone())?;
        Ok(func.unbind())
    }
}

fn register(py: Python<'_>, func: &Bound<'_, PyAny>, roles: Option<Vec<String>>) -> PyResult<()> {
    if !func.is_callable() {
        return Err(PyValueError::new_err("@deployable needs a function"));
    }
    let name: String = func
        .getattr("__name__")
        .and_then(|n| n.extract())
        .unwrap_or_else(|_| "deployable".into());
    let roles = match roles {
        Some(r) => PyList::new(py, r)?.into_any(),
        None => py.None().into_bound(py),
    };
    let entry = PyTuple::new(
        py,
        [PyString::new(py, &name).into_any(), func.clone(), roles],
    )?;
    this(py)?
        .getattr("_deployables")?
        .call_method1("append", (entry,))?;
    Ok(())
}

/// Mark a function to run once deploy.py's top level has finished, in definition order; with
/// `roles`, only on nodes that have one of them. Use as `@deployable` or
/// `@deployable(roles=["web"])`.
#[pyfunction]
#[pyo3(signature = (func=None, *, roles=None))]
fn deployable(
    py: Python<'_>,
    func: Option<Bound<'_, PyAny>>,
    roles: Option<Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let roles = roles.map(|r| role_list(&r)).transpose()?;
    match func {
        Some(f) => {
            register(py, &f, roles)?;
            Ok(f.unbind())
        }
        None => Ok(Py::new(py, Register { roles })?.into_any()),
    }
}

/// Installed as sys.excepthook: an uncaught exception means the top level failed, so the
/// deployables must not run.
#[pyfunction]
fn _excepthook(
    py: Python<'_>,
    kind: Bound<'_, PyAny>,
    value: Bound<'_, PyAny>,
    tb: Bound<'_, PyAny>,
) -> PyResult<()> {
    TOP_LEVEL_FAILED.store(true, Ordering::SeqCst);
    this(py)?
        .getattr("_previous_excepthook")?
        .call1((kind, value, tb))?;
    Ok(())
}

struct Ran {
    name: String,
    status: &'static str,
    detail: Option<String>,
}

/// Registered with atexit: run the deployables, report, and make a failure the exit status.
#[pyfunction]
fn _finish(py: Python<'_>) -> PyResult<()> {
    let m = this(py)?;
    let roles = m.getattr("roles")?;
    let deployables = m.getattr("_deployables")?;
    let top_failed = TOP_LEVEL_FAILED.load(Ordering::SeqCst);
    let mut ran = Vec::new();
    let mut failed = false;
    for entry in deployables.try_iter()? {
        let entry = entry?;
        let (name, func, wanted): (String, Bound<'_, PyAny>, Option<Vec<String>>) =
            entry.extract()?;
        let skip = |detail: String| Ran {
            name: name.clone(),
            status: "skipped",
            detail: Some(detail),
        };
        if top_failed {
            ran.push(skip("deploy.py failed before its end".into()));
            continue;
        }
        if failed {
            ran.push(skip("an earlier deployable failed".into()));
            continue;
        }
        if let Some(w) = &wanted
            && !w
                .iter()
                .try_fold(false, |any, r| Ok::<_, PyErr>(any || roles.contains(r)?))?
        {
            ran.push(skip(format!("needs role {}", w.join(" or "))));
            continue;
        }
        match func.call0() {
            Ok(_) => ran.push(Ran {
                name,
                status: "ran",
                detail: None,
            }),
            Err(e)
                if e.is_instance_of::<PySystemExit>(py)
                    && e.value(py)
                        .getattr("code")
                        .is_ok_and(|c| c.is_none() || c.extract::<i64>().is_ok_and(|c| c == 0)) =>
            {
                ran.push(Ran {
                    name,
                    status: "ran",
                    detail: None,
                })
            }
            Err(e) => {
                // display() prints the traceback as the interpreter would, without exiting on
                // SystemExit the way PyErr_Print does.
                e.display(py);
                let detail = e
                    .value(py)
                    .repr()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                ran.push(Ran {
                    name,
                    status: "failed",
                    detail: Some(detail),
                });
                failed = true;
            }
        }
    }

    // Only the interpreter the agent started reports; a python that deploy.py runs in turn
    // inherits the environment but must not overwrite its parent's results.
    let started_by_agent = std::env::var("TROOPS_AGENT_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::os::unix::process::parent_id());
    let results_path = std::env::var_os("TROOPS_RESULTS")
        .map(PathBuf::from)
        .filter(|_| started_by_agent);
    match &results_path {
        Some(path) => write_results(py, path, top_failed, &roles, &ran)?,
        None if std::env::var_os("TROOPS_RESULTS").is_some() => {}
        None => {
            let sys = py.import("sys")?;
            for r in &ran {
                let line = format!(
                    "troops: deployable {}: {}{}\n",
                    r.name,
                    r.status,
                    r.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
                sys.getattr("stdout")?.call_method1("write", (line,))?;
            }
        }
    }
    if failed {
        // An atexit handler cannot change the exit status any other way.
        let sys = py.import("sys")?;
        let _ = sys.getattr("stdout")?.call_method0("flush");
        let _ = sys.getattr("stderr")?.call_method0("flush");
        if sys.getattr("modules")?.contains("logging")? {
            let _ = py.import("logging")?.call_method0("shutdown");
        }
        py.import("os")?.call_method1("_exit", (1,))?;
    }
    Ok(())
}

fn write_results(
    py: Python<'_>,
    path: &Path,
    top_failed: bool,
    roles: &Bound<'_, PyAny>,
    ran: &[Ran],
) -> PyResult<()> {
    let mut role_names: Vec<String> = roles
        .try_iter()?
        .map(|r| r?.extract())
        .collect::<PyResult<_>>()?;
    role_names.sort();
    let value = serde_json::json!({
        "top_level": if top_failed { "failed" } else { "ok" },
        "roles": role_names,
        "deployables": ran.iter().map(|r| serde_json::json!({
            "name": r.name, "status": r.status, "detail": r.detail,
        })).collect::<Vec<_>>(),
    });
    let tmp = path.with_extension("tmp");
    let write = std::fs::write(&tmp, value.to_string()).and_then(|_| std::fs::rename(&tmp, path));
    write.map_err(|e| {
        let _ = py;
        pyo3::exceptions::PyOSError::new_err(format!("failed to write {}: {e}", path.display()))
    })
}

/// What the module starts from: the agent's context, or the node's settings when run by hand.
struct Start {
    roles: Vec<String>,
    commit: Option<String>,
    previous_commit: Option<String>,
    settings_json: String,
    hostname: Option<String>,
    root: String,
}

fn load_start() -> Result<Start, String> {
    if let Some(path) = std::env::var_os("TROOPS_CONTEXT") {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", Path::new(&path).display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: {e}", Path::new(&path).display()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
        return Ok(Start {
            roles: v["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(String::from))
                .collect(),
            commit: s("commit"),
            previous_commit: s("previous_commit"),
            settings_json: v.get("settings").map_or("{}".into(), |x| x.to_string()),
            hostname: s("hostname"),
            root: s("root").unwrap_or_else(|| "/".into()),
        });
    }
    // By hand: the node's own settings, under TROOPS_ROOT like the agent.
    let root = std::env::var_os("TROOPS_ROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    let path = root.join("etc/troops/troops.toml");
    let settings: toml::Table = match std::fs::read_to_string(&path) {
        Ok(t) => t.parse().map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => toml::Table::new(),
    };
    let json = serde_json::to_value(&settings).map_err(|e| e.to_string())?;
    Ok(Start {
        roles: json["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect(),
        commit: None,
        previous_commit: None,
        settings_json: json.to_string(),
        hostname: json
            .get("hostname")
            .and_then(|h| h.as_str())
            .map(String::from),
        root: root.display().to_string(),
    })
}

#[pymodule]
fn troops(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let start = load_start()
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("troops: {e}")))?;
    m.add("roles", PySet::new(py, &start.roles)?)?;
    m.add("commit", start.commit)?;
    m.add("previous_commit", start.previous_commit)?;
    m.add(
        "settings",
        py.import("json")?
            .call_method1("loads", (start.settings_json,))?,
    )?;
    m.add("root", start.root)?;
    m.add("defined_roles", PyDict::new(py))?;
    m.add("_hostname", start.hostname)?;
    m.add("_deployables", PyList::empty(py))?;
    m.add_function(wrap_pyfunction!(have_role, m)?)?;
    m.add_function(wrap_pyfunction!(define_role, m)?)?;
    m.add_function(wrap_pyfunction!(hostname, m)?)?;
    m.add_function(wrap_pyfunction!(deployable, m)?)?;
    m.add_function(wrap_pyfunction!(_excepthook, m)?)?;
    m.add_function(wrap_pyfunction!(_finish, m)?)?;
    m.add_class::<Register>()?;
    let sys = py.import("sys")?;
    m.add("_previous_excepthook", sys.getattr("excepthook")?)?;
    sys.setattr("excepthook", m.getattr("_excepthook")?)?;
    py.import("atexit")?
        .call_method1("register", (m.getattr("_finish")?,))?;
    Ok(())
}
