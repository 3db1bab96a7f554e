//! Fetching from real git hosting on loopback: git-http-backend behind nginx over TLS, with a
//! CA the test makes and basic auth, reached directly or through tinyproxy. Configured the
//! git way: `git config --file <root>/etc/gitconfig` and the unit's proxy environment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

pub const USER: &str = "deploy";
pub const TOKEN: &str = "s3cr3t-t0ken";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx serving `repos/*.git` with git-http-backend (through fcgiwrap) over TLS on a
/// loopback port: `/git/…` needs basic auth as USER/TOKEN, `/old/…` answers 301 to `/git/…`.
pub struct GitHttps {
    _procs: Vec<Killed>,
    pub port: u16,
    pub dir: PathBuf,
    /// The CA that signed the server's certificate, in no system store.
    pub ca: PathBuf,
}

impl GitHttps {
    pub fn start(world: &World) -> GitHttps {
        for tool in ["/usr/sbin/nginx", "/usr/sbin/fcgiwrap", "/usr/bin/openssl"] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is needed: ./dev/test installs it"
            );
        }
        let dir = world.path("https");
        std::fs::create_dir_all(dir.join("repos")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        sh(
            &dir,
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.pem -days 2 -subj '/CN=Troops test CA' 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
             printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
             openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
               -out server.pem -days 2 -extfile ext 2>/dev/null
             printf '%s:%s\\n' deploy \"$(openssl passwd -apr1 s3cr3t-t0ken)\" > htpasswd",
        );
        let port = free_port();
        let fcgi = dir.join("fcgi.sock");
        let fcgiwrap = Command::new("/usr/sbin/fcgiwrap")
            .arg("-s")
            .arg(format!("unix:{}", fcgi.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("fcgiwrap.log")).unwrap())
            .spawn()
            .unwrap();
        let fcgiwrap = Killed(fcgiwrap);
        let d = dir.display();
        let git_location = format!(
            r#"
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {d}/repos;
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $1;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_pass unix:{d}/fcgi.sock;"#
        );
        let conf = format!(
            r#"user root;
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{}}
http {{
    log_format bytes '$host $request_method $uri $status user=$remote_user in=$request_length out=$bytes_sent';
    access_log {d}/access.log bytes;
    client_body_temp_path {d}/tmp/body;
    fastcgi_temp_path {d}/tmp/fastcgi;
    proxy_temp_path {d}/tmp/proxy;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        location ~ ^/old(/.*)$ {{
            return 301 https://localhost:{port}/git$1$is_args$args;
        }}
        location ~ ^/elsewhere(/.*)$ {{
            return 301 https://127.0.0.1:{port}/git$1$is_args$args;
        }}
        location ~ ^/open(/.*)$ {{ {git_location}
        }}
        location ~ ^/git(/.*)$ {{
            auth_basic "git";
            auth_basic_user_file {d}/htpasswd; {git_location}
        }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let nginx = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.out")).unwrap())
            .spawn()
            .unwrap();
        let nginx = Killed(nginx);
        wait_for_port(port, "nginx", &dir.join("nginx.out"));
        let ca = dir.join("ca.pem");
        GitHttps {
            _procs: vec![nginx, fcgiwrap],
            port,
            dir,
            ca,
        }
    }

    /// A bare repository served as `/git/<name>.git`.
    pub fn repo(&self, name: &str) -> PathBuf {
        let p = self.dir.join(format!("repos/{name}.git"));
        std::fs::create_dir_all(&p).unwrap();
        git(&p, &["init", "-q", "--bare"]);
        git(&p, &["config", "http.receivepack", "false"]);
        p
    }

    /// `https://localhost:PORT/<prefix>/<name>.git`, without credentials.
    pub fn url(&self, prefix: &str, name: &str) -> String {
        format!("https://localhost:{}/{prefix}/{name}.git", self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// tinyproxy on a loopback port, logging every connection it makes.
pub struct Tinyproxy {
    _proc: Killed,
    pub port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    pub fn start(world: &World) -> Tinyproxy {
        assert!(
            Path::new("/usr/bin/tinyproxy").exists(),
            "tinyproxy is needed: ./dev/test installs it"
        );
        let dir = world.path("proxy");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = dir.join("tinyproxy.log");
        // No ConnectPort line: CONNECT to any port (the test server's is random).
        std::fs::write(
            dir.join("tinyproxy.conf"),
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 20\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
                log.display(),
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/tinyproxy")
            .args(["-d", "-c"])
            .arg(dir.join("tinyproxy.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("tinyproxy.out")).unwrap())
            .spawn()
            .unwrap();
        let child = Killed(child);
        wait_for_port(port, "tinyproxy", &dir.join("tinyproxy.out"));
        Tinyproxy {
            _proc: child,
            port,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Set `key` to `value` in the node's system git config, as `git config --system` would on
/// the node.
pub fn system_config(node: &Node, key: &str, value: &str) {
    let file = node.path("etc/gitconfig");
    let out = Command::new("git")
        .arg("config")
        .arg("--file")
        .arg(&file)
        .args(["--add", key, value])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An upstream with one deployable commit pushed to `bare`.
fn shipped(world: &World, bare: &Path) -> String {
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("hosted"));
    let c = up.commit("hosted");
    up.push(bare);
    c
}

/// A node initialised (without a pull) with origin at `url`.
fn node_for(world: &World, name: &str, url: &str) -> Node {
    let node = world.node(name);
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--remote",
        &format!("origin={url}"),
    ])
    .ok();
    node
}

/// A pull run the way the unit runs it, with no proxy or CA in its environment but `env`.
fn pull(node: &Node, env: &[(&str, &str)]) -> Run {
    let mut c = node.command(&["pull"]);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    c.output().unwrap().into()
}

fn error_of(node: &Node) -> String {
    node.remote_report("origin")["problem"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_ca_named_in_the_system_gitconfig_is_trusted() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(
        &world,
        "ca",
        &format!(
            "https://{USER}:{TOKEN}@localhost:{}/git/app.git",
            https.port
        ),
    );
    // Not in any store the node knows: refused, and the error says it is the certificate.
    pull(&node, &[]).failed();
    let err = error_of(&node);
    assert!(
        err.to_lowercase().contains("certificate"),
        "the refusal should name the certificate: {err}"
    );
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
}

#[test]
fn ssl_cert_file_in_the_units_environment_is_trusted() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "env-ca", &https.url("open", "app"));
    pull(&node, &[("SSL_CERT_FILE", https.ca.to_str().unwrap())]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
}

#[test]
fn a_url_scoped_ca_applies_to_its_url_only() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "scoped", &https.url("open", "app"));
    system_config(
        &node,
        "http.https://elsewhere.example/.sslCAInfo",
        https.ca.to_str().unwrap(),
    );
    pull(&node, &[]).failed();
    system_config(
        &node,
        &format!("http.https://localhost:{}/.sslCAInfo", https.port),
        https.ca.to_str().unwrap(),
    );
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
}

#[test]
fn ssl_verify_false_works_and_is_warned_about_on_every_pull() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(&world, "noverify", &https.url("open", "app"));
    system_config(&node, "http.sslVerify", "false");
    for _ in 0..2 {
        let run = pull(&node, &[]).ok();
        assert!(
            run.all().contains("http.sslVerify=false"),
            "every pull warns: {}",
            run.all()
        );
    }
    assert!(node.deployed().is_some());
    let warnings = node.status()["last_pull"]["warnings"].to_string();
    assert!(
        warnings.contains("sslVerify"),
        "status shows it: {warnings}"
    );
}

#[test]
fn a_proxy_from_the_system_gitconfig_carries_every_fetch() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let proxy = Tinyproxy::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "proxied", &https.url("open", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    // A dead proxy first: the pull fails, which proves the proxy is used at all.
    let dead = free_port();
    system_config(&node, "http.proxy", &format!("http://127.0.0.1:{dead}"));
    pull(&node, &[]).failed();
    let err = error_of(&node);
    assert!(err.contains("proxy"), "the error names the proxy: {err}");
    // remote.<name>.proxy wins over http.proxy, as in git.
    system_config(&node, "remote.origin.proxy", &proxy.url());
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
    assert!(
        proxy.log().contains(&format!("localhost:{}", https.port)),
        "tinyproxy carried the fetch: {}",
        proxy.log()
    );
}

#[test]
fn a_proxy_from_the_units_environment_is_used_and_no_proxy_excludes() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let proxy = Tinyproxy::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "envproxy", &https.url("open", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    // Dead proxy, excluded host: goes direct.
    let dead = format!("http://127.0.0.1:{}", free_port());
    pull(&node, &[("https_proxy", &dead), ("no_proxy", "localhost")]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
    // Dead proxy, not excluded: fails.
    let up = world.upstream("src");
    up.write("x", "2");
    let second = up.commit("second");
    up.push(&bare);
    pull(&node, &[("HTTPS_PROXY", &dead)]).failed();
    // The live one: through it.
    pull(&node, &[("https_proxy", &proxy.url())]).ok();
    assert_eq!(node.deployed().as_deref(), Some(second.as_str()));
    assert!(
        proxy.log().contains(&format!("localhost:{}", https.port)),
        "tinyproxy carried the fetch: {}",
        proxy.log()
    );
}

#[test]
fn a_refused_token_is_reported_at_once_and_never_prompts() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(
        &world,
        "badtoken",
        &format!("https://{USER}:wrong@localhost:{}/git/app.git", https.port),
    );
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    node.set("fetch_timeout", "20");
    // Under a pseudo-terminal, as an operator would run it: no prompt, no wait.
    let script = format!("{} --root {} pull", node.exe.display(), node.root.display());
    let started = Instant::now();
    let out = Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("Username"), "prompted: {text}");
    assert!(
        took < Duration::from_secs(15),
        "waited for the fetch timeout ({took:?}): {text}"
    );
    let err = error_of(&node);
    assert!(
        err.contains("the server refused the credentials (HTTP 401)"),
        "{err}"
    );
    assert!(
        !err.contains("none are configured"),
        "a token was offered: {err}"
    );
    assert!(!err.contains("wrong"), "the token leaked: {err}");
    assert!(text.contains("refused the credentials"), "{text}");
    // No credentials at all: the same, at once.
    let anon = node_for(&world, "anon", &https.url("git", "app"));
    system_config(&anon, "http.sslCAInfo", https.ca.to_str().unwrap());
    pull(&anon, &[]).failed();
    assert!(
        error_of(&anon).contains("refused the credentials (HTTP 401)")
            && error_of(&anon).contains("none are configured"),
        "{}",
        error_of(&anon)
    );
}

#[test]
fn a_credential_helper_in_the_system_gitconfig_answers() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "helper", &https.url("git", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    let store = world.path("git-credentials");
    std::fs::write(
        &store,
        format!("https://{USER}:{TOKEN}@localhost:{}\n", https.port),
    )
    .unwrap();
    system_config(
        &node,
        "credential.helper",
        &format!("store --file {}", store.display()),
    );
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
}

#[test]
fn an_extra_header_in_the_system_gitconfig_is_sent() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(&world, "header", &https.url("git", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    use std::io::Write;
    let mut b64 = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    b64.stdin
        .take()
        .unwrap()
        .write_all(format!("{USER}:{TOKEN}").as_bytes())
        .unwrap();
    let basic = String::from_utf8(b64.wait_with_output().unwrap().stdout).unwrap();
    system_config(
        &node,
        "http.extraHeader",
        &format!("Authorization: Basic {basic}"),
    );
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
    assert!(
        !node.status().to_string().contains(&basic),
        "the header is a secret"
    );
}

#[test]
fn a_moved_repository_is_reported_and_keeps_working() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = node_for(
        &world,
        "moved",
        &format!(
            "https://{USER}:{TOKEN}@localhost:{}/old/app.git",
            https.port
        ),
    );
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    // Credentials are for the old URL's host, which is the new one's too.
    pull(&node, &[]).ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
    let report = node.remote_report("origin");
    assert_eq!(
        report["moved_to"].as_str(),
        Some(https.url("git", "app").as_str()),
        "{report}"
    );
    let human = node.troops(&["status"]).ok().stdout;
    assert!(human.contains("moved to"), "{human}");
}

#[test]
fn a_git_http_key_troops_does_not_support_is_named() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(&world, "unsupported", &https.url("open", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    system_config(&node, "http.sslCert", "/etc/ssl/client.pem");
    system_config(&node, "http.postBuffer", "524288000");
    let run = pull(&node, &[]).ok();
    for key in ["http.sslCert", "http.postBuffer"] {
        assert!(run.all().contains(key), "{key} not named: {}", run.all());
    }
}

#[test]
fn the_shared_repos_config_cannot_set_a_proxy_a_tls_exception_or_a_helper() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    // What a member can write: the shared repo's config. A dead proxy and no certificate
    // checks there would change the error; they are not read, so the CA is what fails.
    let node = node_for(&world, "shared", &https.url("open", "app"));
    let shared = node.repo();
    let dead = format!("http://127.0.0.1:{}", free_port());
    git(&shared, &["config", "http.proxy", &dead]);
    git(&shared, &["config", "remote.origin.proxy", &dead]);
    git(&shared, &["config", "http.sslVerify", "false"]);
    pull(&node, &[]).failed();
    let err = error_of(&node);
    assert!(
        err.contains("UnknownIssuer") && !err.contains("proxy"),
        "{err}"
    );
    // A helper there is never run, even when the server asks for credentials.
    let asks = node_for(&world, "asks", &https.url("git", "app"));
    system_config(&asks, "http.sslCAInfo", https.ca.to_str().unwrap());
    let marker = world.path("helper-ran");
    git(
        &asks.repo(),
        &[
            "config",
            "credential.helper",
            &format!("!touch {}", marker.display()),
        ],
    );
    pull(&asks, &[]).failed();
    assert!(error_of(&asks).contains("HTTP 401"), "{}", error_of(&asks));
    assert!(!marker.exists(), "root ran a member's credential helper");
}

#[test]
fn a_system_gitconfig_others_may_write_is_not_followed() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(&world, "writable", &https.url("open", "app"));
    system_config(&node, "http.sslVerify", "false");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        node.path("etc/gitconfig"),
        std::fs::Permissions::from_mode(0o664),
    )
    .unwrap();
    let run = pull(&node, &[]).failed();
    assert!(
        error_of(&node).contains("UnknownIssuer"),
        "{}",
        error_of(&node)
    );
    assert!(
        run.all().contains("writable by others than root"),
        "{}",
        run.all()
    );
}

#[test]
fn a_redirect_to_another_host_gets_no_credentials() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(
        &world,
        "elsewhere",
        &format!(
            "https://{USER}:{TOKEN}@localhost:{}/elsewhere/app.git",
            https.port
        ),
    );
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    pull(&node, &[]).failed();
    let err = error_of(&node);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    let log = https.access_log();
    assert!(
        log.contains("127.0.0.1 GET"),
        "the redirect was followed: {log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("127.0.0.1 ") && l.contains(&format!("user={USER}"))),
        "the account went to the other host: {log}"
    );
}

#[test]
fn an_unscoped_header_is_not_sent_to_a_remote_a_member_added() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let bare = https.repo("app");
    shipped(&world, &bare);
    let node = node_for(&world, "member-remote", &https.url("open", "app"));
    system_config(&node, "http.sslCAInfo", https.ca.to_str().unwrap());
    system_config(
        &node,
        "http.extraHeader",
        "Authorization: Basic ZGVwbG95OnMzY3IzdC10MGtlbg==",
    );
    // A member points a remote of their own at a URL that needs the header.
    git(
        &node.repo(),
        &["remote", "add", "mine", &https.url("git", "app")],
    );
    let run = pull(&node, &[]);
    let mine = node.remote_report("mine");
    assert!(
        mine["problem"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP 401"),
        "{mine}"
    );
    assert!(run.all().contains("a member added"), "{}", run.all());
    // And a URL whose host part parsers disagree on is refused outright.
    let evil = format!(
        "https://127.0.0.1:{0}?@localhost:{0}/git/app.git",
        https.port
    );
    let refused = world.node("evil");
    let run = refused
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &refused.group,
            "--remote",
            &format!("origin={evil}"),
        ])
        .failed();
    assert!(run.stderr.contains("host part"), "{}", run.all());
}

#[test]
fn a_first_boot_behind_a_proxy_with_a_company_ca_deploys() {
    let world = World::new();
    let https = GitHttps::start(&world);
    let proxy = Tinyproxy::start(&world);
    let bare = https.repo("app");
    let commit = shipped(&world, &bare);
    let node = world.node("firstboot");
    let ca = std::fs::read_to_string(&https.ca).unwrap();
    let seed = world.path("user-data");
    std::fs::write(
        &seed,
        serde_json::json!({
            "troops": {
                "remotes": {"origin": https.url("open", "app")},
                "proxy": proxy.url(),
                "ca_certs": ca,
            }
        })
        .to_string(),
    )
    .unwrap();
    // A dead proxy in the environment: the seed's, in the system git config, wins.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let run: Run = node
        .command(&[
            "init",
            "--group",
            &node.group,
            "--seed",
            seed.to_str().unwrap(),
        ])
        .env("https_proxy", &dead)
        .output()
        .unwrap()
        .into();
    run.ok();
    assert_eq!(node.deployed().as_deref(), Some(commit.as_str()));
    assert!(
        proxy.log().contains(&format!("localhost:{}", https.port)),
        "{}",
        proxy.log()
    );
    let gitconfig = node.read("etc/gitconfig").unwrap();
    assert!(gitconfig.contains(&proxy.url()), "{gitconfig}");
    assert_eq!(
        node.read("etc/troops/ca-certificates.pem").as_deref(),
        Some(ca.as_str())
    );
    // A seed whose CA is not PEM stops init, naming the key, and leaves nothing behind.
    let bad = world.node("badca");
    std::fs::write(
        &seed,
        r#"{"troops": {"remotes": {"origin": "https://h/x.git"}, "ca_certs": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"}}"#,
    )
    .unwrap();
    let run = bad
        .troops(&[
            "init",
            "--group",
            &bad.group,
            "--seed",
            seed.to_str().unwrap(),
        ])
        .failed();
    assert!(run.stderr.contains("troops.ca_certs"), "{}", run.all());
    assert!(!bad.path("etc/troops").exists());
}
