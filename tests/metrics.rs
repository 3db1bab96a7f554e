//! Fleet metrics: the node's textfile passes promtool and a real node_exporter serves it,
//! through a first deploy, a failed one, a held rollout and a fix. The example alerting
//! rules pass `promtool check rules` and their unit tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

struct Exporter {
    child: Child,
    port: u16,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exporter {
    fn start(dir: &Path, log: &Path) -> Exporter {
        let bin = Path::new("/usr/bin/prometheus-node-exporter");
        assert!(
            bin.exists(),
            "prometheus-node-exporter is needed: ./dev/test installs it"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "node_exporter did not come up");
            std::thread::sleep(Duration::from_millis(30));
        }
        Exporter { child, port }
    }

    /// GET /metrics, the troops_ lines only.
    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(
            body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
            "{body}"
        );
        body.lines()
            .filter(|l| l.starts_with("troops_"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn promtool_check(file: &Path) {
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("promtool runs: ./dev/test installs prometheus");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics {}: {}{}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap()
    );
}

/// The value of the series `name{labels}` exactly as scraped, or None.
fn value(scraped: &str, series: &str) -> Option<String> {
    scraped
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

#[test]
fn a_node_exports_its_state_through_node_exporter() {
    let t = one_remote(&[]);
    let dir: PathBuf = t.node.path("var/lib/prometheus/node-exporter");
    std::fs::create_dir_all(&dir).unwrap();
    let prom = dir.join("troops.prom");
    let exporter = Exporter::start(&dir, &t.world.path("node-exporter.log"));

    // 1. First deploy.
    t.up.write("deploy.py", &simple_deploy("one"));
    let first = t.ship("one");
    t.node.troops(&["pull"]).ok();
    promtool_check(&prom);
    let m = exporter.scrape();
    assert_eq!(
        value(
            &m,
            &format!("troops_deployed_info{{branch=\"master\",commit=\"{first}\"}}")
        )
        .as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(value(&m, "troops_up_to_date").as_deref(), Some("1"), "{m}");
    assert_eq!(
        value(&m, "troops_last_run_success").as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(
        value(&m, "troops_runs_total{result=\"success\"}").as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(
        value(&m, "troops_remote_up{remote=\"origin\"}").as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(value(&m, "troops_held").as_deref(), Some("0"), "{m}");
    let status = t.node.status();
    assert_eq!(
        value(&m, "troops_rollout_bucket_id"),
        Some(status["last_pull"]["bucket"].to_string()),
        "status and metrics agree"
    );
    assert!(!m.contains("file://"), "no URL in a label: {m}");

    // 2. A failed deploy: the node stays, says so, and waits to retry.
    t.up.write("deploy.py", "import sys\nsys.exit(3)\n");
    let broken = t.ship("broken");
    t.node.troops(&["pull"]).failed();
    promtool_check(&prom);
    let m = exporter.scrape();
    assert_eq!(value(&m, "troops_up_to_date").as_deref(), Some("0"), "{m}");
    assert_eq!(
        value(&m, "troops_last_run_success").as_deref(),
        Some("0"),
        "{m}"
    );
    assert_eq!(
        value(&m, "troops_runs_total{result=\"failed\"}").as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("troops_branch_info{{commit=\"{broken}\"}}")).as_deref(),
        Some("1"),
        "{m}"
    );
    let retry: f64 = value(&m, "troops_retry_at_timestamp_seconds")
        .unwrap_or_else(|| panic!("no retry time: {m}"))
        .parse()
        .unwrap();
    assert_eq!(
        Some(retry as u64),
        t.node.status()["retry_at"].as_u64(),
        "status and metrics agree"
    );

    // 3. A fix, then a commit held by a rollout that admits nobody: the node takes the fix
    // and stops before the hold.
    t.up.write("deploy.py", &simple_deploy("fixed"));
    let fixed = t.up.commit("fixed");
    git(
        &t.up.dir,
        &[
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "hold",
            "--trailer",
            "Troops-Rollout: 0%",
        ],
    );
    let hold = t.up.head();
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    promtool_check(&prom);
    let m = exporter.scrape();
    assert_eq!(value(&m, "troops_held").as_deref(), Some("1"), "{m}");
    let held_line = m
        .lines()
        .find(|l| l.starts_with("troops_held_info{"))
        .unwrap_or_else(|| panic!("no held info: {m}"));
    assert!(
        held_line.contains(&format!("commit=\"{hold}\"")),
        "{held_line}"
    );
    assert!(
        held_line.contains("reason=\"rolled out to 0%"),
        "{held_line}"
    );
    assert_eq!(
        value(
            &m,
            &format!("troops_deployed_info{{branch=\"master\",commit=\"{fixed}\"}}")
        )
        .as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(value(&m, "troops_up_to_date").as_deref(), Some("1"), "{m}");

    // 4. Released: everyone takes it, and the node is up to date again.
    git(
        &t.up.dir,
        &[
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "go",
            "--trailer",
            "Troops-Rollout: 100%",
        ],
    );
    let released = t.up.head();
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    promtool_check(&prom);
    let m = exporter.scrape();
    assert_eq!(value(&m, "troops_up_to_date").as_deref(), Some("1"), "{m}");
    assert_eq!(value(&m, "troops_held").as_deref(), Some("0"), "{m}");
    assert!(!m.contains("troops_held_info"), "{m}");
    assert!(!m.contains("troops_retry_at"), "{m}");
    assert_eq!(
        value(
            &m,
            &format!("troops_deployed_info{{branch=\"master\",commit=\"{released}\"}}")
        )
        .as_deref(),
        Some("1"),
        "{m}"
    );
    assert_eq!(
        value(&m, "troops_runs_total{result=\"success\"}").as_deref(),
        Some("3"),
        "{m}"
    );
    // One series per remote and per commit label: the file does not grow with history.
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("troops_deployed_info"))
            .count(),
        1
    );
}

#[test]
fn metrics_go_where_the_setting_says_and_nowhere_when_it_is_empty() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    t.node.set("metrics_file", "\"/srv/metrics/troops.prom\"");
    t.node.troops(&["pull"]).ok();
    let custom = t.node.path("srv/metrics/troops.prom");
    promtool_check(&custom);
    std::fs::remove_file(&custom).unwrap();
    std::fs::create_dir_all(t.node.path("var/lib/prometheus/node-exporter")).unwrap();
    t.node.set("metrics_file", "\"\"");
    t.node.troops(&["deploy"]).ok();
    assert!(!custom.exists());
    assert!(
        !t.node
            .path("var/lib/prometheus/node-exporter/troops.prom")
            .exists()
    );
    t.node.set("metrics_file", "\"relative.prom\"");
    let bad = t.node.troops(&["status"]).failed();
    assert!(bad.stderr.contains("metrics_file"), "{}", bad.all());
}

#[test]
fn the_example_alerting_rules_pass_promtool_and_fire_when_they_should() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus");
    for args in [
        vec!["check", "rules", "troops-rules.yml"],
        vec!["test", "rules", "troops-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
