#!/usr/bin/python3
"""Troops against what a user would pick instead, side by side in one run.

Scenarios (each against the same repositories, runs interleaved between tools):
  1. noop       - a poll with nothing changed, three file:// remotes
  2. changed    - one new commit on all remotes, trivial deploy.py, warm venv
  3. first      - first deploy on an empty node (requirements: one local package, offline)
  4. *-large    - 1-3 on a repository of 2,000 files and 1,000 commits
  5. reqs-uv / reqs-pip - a requirements change (venv rebuild) with uv on PATH and without
  6. real-reqs-pip / real-reqs-uv - a real-world requirements.txt (requests, jinja2 and their
     dependencies) from a local index downloaded once from PyPI: first deploy, then a one-line
     change (a markupsafe pin), with pip and with uv; and a new venv's size on disk
  7. server cost of a poll - smart HTTP (nginx + git-http-backend on loopback) on a repository
     with 5,000 tags: bytes each way, requests and `fetch` commands per no-op and changed
     poll, for troops, `git fetch` and `ansible-pull` (`bench/run server-cost` runs only this)

Peers for 1-2: `ansible-pull -o` with an equivalent one-task playbook, and the plain-git shell
floor (fetch three remotes, take the most advanced tip that fast-forwards, check it out, run
deploy.py). Reports medians, min-max, peak RSS (of the process tree) and troops/peer ratios;
prints a table and writes bench/results.json. A benchmark reports; it never fails a build.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SCRATCH = os.environ.get("BENCH_DIR", os.path.join(TOP, "target", "bench"))
RUNS = int(os.environ.get("BENCH_RUNS", "15"))
SLOW_RUNS = int(os.environ.get("BENCH_SLOW_RUNS", "5"))
PY = "/usr/bin/python3"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def sh(*args, cwd=None, env=None, check=True):
    return subprocess.run(args, cwd=cwd, env=env or ENV, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def git(repo, *args):
    return sh("git", "-C", repo, "-c", "user.name=Bench", "-c", "user.email=bench@example.com", "-c", "init.defaultBranch=master", *args).stdout.strip()


def measure(argv, env=None, cwd=None):
    """Wall seconds and peak RSS (KiB) of the largest process in the tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env or ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[0]} failed: {err[-2000:]}")
    return wall, usage.ru_maxrss


def setup_tools():
    os.makedirs(SCRATCH, exist_ok=True)
    print("bench: building troops (release)", flush=True)
    subprocess.run(["cargo", "build", "--workspace", "--release", "--locked"], cwd=TOP, check=True)
    tools = os.path.join(SCRATCH, "tools")
    if not os.path.exists(os.path.join(tools, "bin", "ansible-pull")):
        print("bench: installing ansible-core and uv from PyPI", flush=True)
        sh(PY, "-m", "venv", tools)
        sh(os.path.join(tools, "bin", "pip"), "install", "-q", "ansible-core", "uv")
    return os.path.join(TOP, "target", "release", "troops"), tools


def make_repo(path, files=0, commits=1):
    """An upstream with deploy.py, a local package, local.yml for ansible; `files` extra files
    spread over `commits` commits."""
    shutil.rmtree(path, ignore_errors=True)
    git(TOP, "init", "-q", path)
    shutil.copytree(os.path.join(TOP, "example", "greeting"), os.path.join(path, "greeting"))
    with open(os.path.join(path, "requirements.txt"), "w") as f:
        f.write("--no-index\n./greeting\n")
    with open(os.path.join(path, "deploy.py"), "w") as f:
        f.write("import pathlib, sys\npathlib.Path(sys.argv[0]).with_name('.deployed').write_text('x')\nprint('deployed')\n")
    with open(os.path.join(path, "local.yml"), "w") as f:
        f.write("- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n    - command: /bin/true\n")
    per = max(1, files // max(1, commits))
    n = 0
    for c in range(commits):
        for _ in range(per if files else 0):
            d = os.path.join(path, "data", f"d{n % 50}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{n}.txt"), "w") as f:
                f.write(f"file {n}\n" * 20)
            n += 1
        git(path, "add", "-A")
        git(path, "commit", "-q", "--allow-empty", "-m", f"commit {c}")
    return path


def push_all(upstream, remotes):
    for r in remotes:
        git(upstream, "push", "-q", "-f", r, "HEAD:refs/heads/master")


def new_commit(upstream, remotes, tag):
    with open(os.path.join(upstream, "marker"), "w") as f:
        f.write(tag)
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", tag)
    push_all(upstream, remotes)


FLOOR = r"""#!/bin/sh
# The plain-git floor: what a troops poll does, with the git CLI.
set -e
R=$1; WT=$2; VENV=$3
cur=$(git -C "$R" rev-parse -q --verify refs/troops/deployed || true)
best=$cur
for remote in a b c; do
  git -C "$R" fetch -q "$remote" master:refs/remotes/$remote/master 2>/dev/null || continue
  tip=$(git -C "$R" rev-parse refs/remotes/$remote/master)
  if [ -z "$best" ] || git -C "$R" merge-base --is-ancestor "$best" "$tip"; then best=$tip; fi
done
if [ "$best" != "$cur" ]; then
  git --git-dir="$R" --work-tree="$WT" checkout -q -f "$best" -- .
  (cd "$WT" && "$VENV/bin/python" deploy.py >/dev/null)
  git -C "$R" update-ref refs/troops/deployed "$best"
fi
"""


class Fleet:
    """One upstream, three bare remotes, and a node per tool."""

    def __init__(self, name, troops, tools, files=0, commits=1):
        self.dir = os.path.join(SCRATCH, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.troops, self.tools = troops, tools
        self.upstream = make_repo(os.path.join(self.dir, "upstream"), files, commits)
        self.remotes = []
        for r in "abc":
            p = os.path.join(self.dir, f"{r}.git")
            sh("git", "init", "-q", "--bare", p)
            self.remotes.append(p)
        push_all(self.upstream, self.remotes)
        self.root = os.path.join(self.dir, "troops-node")
        self.group = "bench" + str(os.getpid())

    def troops_init(self, root=None):
        root = root or self.root
        args = [self.troops, "--root", root, "init", "--no-pull", "--group", self.group]
        for name, p in zip("abc", self.remotes):
            args += ["--remote", f"{name}=file://{p}"]
        sh(*args)

    def floor_setup(self):
        self.floor_repo = os.path.join(self.dir, "floor.git")
        self.floor_wt = os.path.join(self.dir, "floor-wt")
        os.makedirs(self.floor_wt, exist_ok=True)
        sh("git", "init", "-q", "--bare", self.floor_repo)
        for name, p in zip("abc", self.remotes):
            sh("git", "-C", self.floor_repo, "remote", "add", name, f"file://{p}")
        self.floor_venv = os.path.join(self.dir, "floor-venv")
        sh(PY, "-m", "venv", "--without-pip", self.floor_venv)
        self.floor_script = os.path.join(self.dir, "floor.sh")
        with open(self.floor_script, "w") as f:
            f.write(FLOOR)
        os.chmod(self.floor_script, 0o755)

    def floor_argv(self):
        return ["/bin/sh", self.floor_script, self.floor_repo, self.floor_wt, self.floor_venv]

    def ansible_argv(self):
        return [os.path.join(self.tools, "bin", "ansible-pull"), "-U", f"file://{self.remotes[0]}", "-d", os.path.join(self.dir, "ansible-checkout"), "-i", "localhost,", "-o", "local.yml"]

    def ansible_env(self):
        env = dict(ENV)
        env["ANSIBLE_PYTHON_INTERPRETER"] = PY
        env["ANSIBLE_LOCALHOST_WARNING"] = "false"
        env["ANSIBLE_HOME"] = os.path.join(self.dir, "ansible-home")
        return env


def summary(samples):
    walls = [s[0] for s in samples]
    rss = [s[1] for s in samples]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls), "peak_rss_mib": max(rss) / 1024, "runs": len(samples)}


def interleave(tools, runs, before=None):
    """Run each tool `runs` times, round-robin; `before(name)` prepares each run untimed."""
    samples = {name: [] for name in tools}
    for i in range(runs):
        for name, (argv, env, n) in tools.items():
            if i >= n:
                continue
            if before:
                before(name)
            samples[name].append(measure(argv, env))
    return {name: summary(s) for name, s in samples.items() if s}


def scenario_polls(label, fleet, with_ansible):
    fleet.troops_init()
    sh(fleet.troops, "--root", fleet.root, "pull")
    fleet.floor_setup()
    sh(*fleet.floor_argv())
    tools = {
        "troops": ([fleet.troops, "--root", fleet.root, "pull"], ENV, RUNS),
        "git-floor": (fleet.floor_argv(), ENV, RUNS),
    }
    if with_ansible:
        sh(*fleet.ansible_argv(), env=fleet.ansible_env())
        tools["ansible-pull"] = (fleet.ansible_argv(), fleet.ansible_env(), SLOW_RUNS)
    results = {f"noop{label}": interleave(tools, RUNS)}
    counter = [0]

    def before(name):
        # Every tool sees a commit it has not deployed yet.
        counter[0] += 1
        new_commit(fleet.upstream, fleet.remotes, f"{name}-{counter[0]}")

    results[f"changed{label}"] = interleave(tools, RUNS, before)
    return results


def scenario_first(label, fleet, runs):
    samples = []
    for i in range(runs):
        root = os.path.join(fleet.dir, f"first-{i}")
        shutil.rmtree(root, ignore_errors=True)
        fleet.troops_init(root)
        samples.append(measure([fleet.troops, "--root", root, "pull"]))
        shutil.rmtree(root, ignore_errors=True)
    return {f"first{label}": {"troops": summary(samples)}}


def scenario_requirements(fleet, tools_dir, runs):
    fleet.troops_init()
    sh(fleet.troops, "--root", fleet.root, "pull")
    out = {}
    for name, path in [("reqs-uv", os.path.join(tools_dir, "bin") + ":" + ENV["PATH"]), ("reqs-pip", ENV["PATH"])]:
        env = dict(ENV, PATH=path)
        samples = []
        for i in range(runs):
            with open(os.path.join(fleet.upstream, "requirements.txt"), "a") as f:
                f.write(f"# change {name} {i}\n")
            git(fleet.upstream, "commit", "-q", "-am", f"{name} {i}")
            push_all(fleet.upstream, fleet.remotes)
            samples.append(measure([fleet.troops, "--root", fleet.root, "pull"], env))
        out[name] = {"troops": summary(samples)}
    return out


NGINX = """daemon off;
master_process off;
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
    log_format bytes '$request_method $uri $status $request_length $bytes_sent';
    access_log {d}/access.log bytes;
    client_body_temp_path {d}/tmp/body;
    fastcgi_temp_path {d}/tmp/fastcgi;
    proxy_temp_path {d}/tmp/proxy;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/git(/.*)$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {d}/repos;
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $1;
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_param GIT_TRACE_PACKET {d}/packets.log;
            fastcgi_pass unix:{d}/fcgi.sock;
        }}
    }}
}}
"""


class GitServer:
    """nginx + fcgiwrap + git-http-backend on a loopback port, counting what each poll costs."""

    def __init__(self, d):
        import socket
        self.dir = d
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "repos"))
        os.makedirs(os.path.join(d, "tmp"))
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            self.port = s_.getsockname()[1]
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(NGINX.format(d=d, port=self.port))
        self.procs = [
            subprocess.Popen(["/usr/sbin/fcgiwrap", "-s", f"unix:{d}/fcgi.sock"], stderr=subprocess.DEVNULL),
            subprocess.Popen(["/usr/sbin/nginx", "-p", d, "-e", f"{d}/error.log", "-c", f"{d}/nginx.conf"], stderr=subprocess.DEVNULL),
        ]
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                break
            except OSError:
                time.sleep(0.05)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()

    def counters(self):
        def lines(name):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    return f.read().splitlines()
            except FileNotFoundError:
                return []
        log = lines("access.log")
        packets = lines("packets.log")
        return {
            "requests": len(log),
            "bytes_up": sum(int(l.split()[3]) for l in log),
            "bytes_down": sum(int(l.split()[4]) for l in log),
            # Each request runs git-http-backend, which runs upload-pack (2 processes).
            "git_processes": 2 * len(log),
            "fetch_commands": sum(1 for l in packets if "command=fetch" in l and "packet:" in l and "<" in l),
            "packets": len(packets),
        }

    def cost(self, argv, env=None, cwd=None):
        before = self.counters()
        sh(*argv, env=env, cwd=cwd)
        after = self.counters()
        return {k: after[k] - before[k] for k in ("requests", "bytes_up", "bytes_down", "git_processes", "fetch_commands")}


def scenario_server_cost(troops, tools):
    """What one poll costs the git server, per tool, on a repository with 5,000 tags."""
    d = os.path.join(SCRATCH, "server-cost")
    server = GitServer(os.path.join(d, "server"))
    try:
        up = make_repo(os.path.join(d, "upstream"), 0, 1)
        for i in range(20):
            new_commit_local(up, f"history {i}")
        head = git(up, "rev-parse", "HEAD")
        commits = git(up, "rev-list", "HEAD").split()
        refs = "".join(f"create refs/tags/v{i} {commits[i % len(commits)]}\n" for i in range(5000))
        subprocess.run(["git", "-C", up, "update-ref", "--stdin"], input=refs, text=True, check=True)
        bare = os.path.join(server.dir, "repos", "big.git")
        sh("git", "init", "-q", "--bare", bare)
        sh("git", "-C", up, "push", "-q", bare, "master", "--tags")
        url = f"http://127.0.0.1:{server.port}/git/big.git"
        group = "benchsc" + str(os.getpid())
        sh("groupadd", "--system", group)
        root = os.path.join(d, "troops-node")
        shutil.rmtree(root, ignore_errors=True)
        sh(troops, "--root", root, "init", "--no-pull", "--group", group, "--remote", f"origin={url}")
        sh(troops, "--root", root, "pull")
        clone = os.path.join(d, "git-clone")
        shutil.rmtree(clone, ignore_errors=True)
        sh("git", "clone", "-q", "--bare", url, clone)
        sh("git", "-C", clone, "config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*")
        sh("git", "-C", clone, "fetch", "-q", "origin")
        ansible = [os.path.join(tools, "bin", "ansible-pull"), "-U", url, "-d", os.path.join(d, "ansible-checkout"), "-i", "localhost,", "-o", "local.yml"]
        aenv = dict(ENV, ANSIBLE_PYTHON_INTERPRETER=PY, ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_HOME=os.path.join(d, "ansible-home"))
        sh(*ansible, env=aenv)
        pollers = {
            "troops": ([troops, "--root", root, "pull"], ENV),
            "git fetch": (["git", "-C", clone, "fetch", "-q", "origin"], ENV),
            "ansible-pull": (ansible, aenv),
        }
        out = {}
        for name, (argv, env) in pollers.items():
            out.setdefault("noop", {})[name] = server.cost(argv, env)
        for name, (argv, env) in pollers.items():
            new_commit_local(up, f"changed for {name}")
            sh("git", "-C", up, "push", "-q", bare, "master")
            out.setdefault("changed", {})[name] = server.cost(argv, env)
        sh("groupdel", group, check=False)
        return out
    finally:
        server.stop()


def new_commit_local(repo, message):
    with open(os.path.join(repo, "deploy.py"), "a") as f:
        f.write(f"# {message}\n")
    git(repo, "commit", "-q", "-am", message)


def print_server_cost(cost):
    lines = [f"{'poll':<8} {'tool':<13} {'requests':>8} {'bytes up':>9} {'bytes down':>10} {'git procs':>9} {'fetch cmds':>10}"]
    for kind, tools_ in cost.items():
        for name, c in tools_.items():
            lines.append(f"{kind:<8} {name:<13} {c['requests']:>8} {c['bytes_up']:>9} {c['bytes_down']:>10} {c['git_processes']:>9} {c['fetch_commands']:>10}")
    print("\nserver cost of a poll (smart HTTP, 5,000 tags):\n" + "\n".join(lines))


def real_index(tools):
    """requests and jinja2 with their dependencies as wheels, downloaded once."""
    wheels = os.path.join(SCRATCH, "wheels")
    have = os.listdir(wheels) if os.path.isdir(wheels) else []
    if not any(f.startswith("requests-") for f in have):
        os.makedirs(wheels, exist_ok=True)
        print("bench: downloading requests and jinja2 from PyPI (once)", flush=True)
        sh(os.path.join(tools, "bin", "pip"), "download", "-q", "-d", wheels, "--only-binary=:all:", "requests", "jinja2")
    return wheels


def scenario_real_requirements(troops, tools, runs):
    wheels = real_index(tools)
    markupsafe = next(f.split("-")[1] for f in os.listdir(wheels) if f.lower().startswith("markupsafe-"))
    fleet = Fleet("real", troops, tools)
    base = f"--no-index\n--find-links {wheels}\nrequests\njinja2\n"
    out = {}
    for name, path in [("uv", os.path.join(tools, "bin") + ":" + ENV["PATH"]), ("pip", ENV["PATH"])]:
        env = dict(ENV, PATH=path)
        first, change = [], []
        for i in range(runs):
            root = os.path.join(fleet.dir, f"real-{name}-{i}")
            shutil.rmtree(root, ignore_errors=True)
            with open(os.path.join(fleet.upstream, "requirements.txt"), "w") as f:
                f.write(base + f"# {name} {i}\n")
            git(fleet.upstream, "commit", "-q", "-am", f"real {name} {i}")
            push_all(fleet.upstream, fleet.remotes)
            fleet.troops_init(root)
            first.append(measure([troops, "--root", root, "pull"], env))
            with open(os.path.join(fleet.upstream, "requirements.txt"), "a") as f:
                f.write(f"markupsafe=={markupsafe}\n")
            git(fleet.upstream, "commit", "-q", "-am", f"pin markupsafe {name} {i}")
            push_all(fleet.upstream, fleet.remotes)
            change.append(measure([troops, "--root", root, "pull"], env))
            shutil.rmtree(root, ignore_errors=True)
        out[f"real-first-{name}"] = {"troops": summary(first)}
        out[f"real-change-{name}"] = {"troops": summary(change)}
    return out


def venv_size(troops):
    """Bytes on disk of a new venv with no packages (what every requirements change adds)."""
    d = os.path.join(SCRATCH, "venv-size")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "deploy.py"), "w") as f:
        f.write("print('size')\n")
    env = dict(ENV, XDG_CACHE_HOME=os.path.join(d, "cache"))
    sh(troops, "run", d, env=env)
    venvs = os.path.join(d, "cache", "troops", "venvs")
    v = os.path.join(venvs, os.listdir(venvs)[0])
    return int(sh("du", "-sb", v).stdout.split()[0])


def main():
    if sys.argv[1:] == ["venvs"]:
        troops, tools = setup_tools()
        sh("groupadd", "--system", "bench" + str(os.getpid()))
        try:
            results = scenario_real_requirements(troops, tools, SLOW_RUNS)
            results.update(scenario_first("", Fleet("small", troops, tools), SLOW_RUNS))
            results.update(scenario_requirements(Fleet("reqs", troops, tools), tools, SLOW_RUNS))
        finally:
            sh("groupdel", "bench" + str(os.getpid()), check=False)
        for scen, r in results.items():
            t = r["troops"]
            print(f"{scen:<20} median {t['median_s'] * 1000:8.1f} ms  ({t['min_s'] * 1000:.1f}-{t['max_s'] * 1000:.1f})")
        print(f"new venv on disk: {venv_size(troops) / 1024:.0f} KiB")
        return 0
    if sys.argv[1:] == ["server-cost"]:
        troops, tools = setup_tools()
        cost = scenario_server_cost(troops, tools)
        print_server_cost(cost)
        path = os.path.join(HERE, "results.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data["server_cost"] = cost
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        return 0
    troops, tools = setup_tools()
    results = {}
    small = Fleet("small", troops, tools)
    try:
        sh("groupadd", "--system", small.group)
        results.update(scenario_polls("", small, True))
        results.update(scenario_first("", small, SLOW_RUNS))
        large = Fleet("large", troops, tools, files=2000, commits=1000)
        results.update(scenario_polls("-large", large, False))
        results.update(scenario_first("-large", large, SLOW_RUNS))
        results.update(scenario_requirements(Fleet("reqs", troops, tools), tools, SLOW_RUNS))
        results.update(scenario_real_requirements(troops, tools, SLOW_RUNS))
        server_cost = scenario_server_cost(troops, tools)
    finally:
        sh("groupdel", small.group, check=False)

    lines = [f"{'scenario':<15} {'tool':<13} {'median':>9} {'min-max':>19} {'peak RSS':>9} {'troops/peer':>12}"]
    for scen, tools_ in results.items():
        t = tools_.get("troops")
        for name, r in tools_.items():
            ratio = "" if name == "troops" or not t else f"{t['median_s'] / r['median_s']:.2f}x"
            r["troops_over_peer"] = None if not ratio else t["median_s"] / r["median_s"]
            lines.append(
                f"{scen:<15} {name:<13} {r['median_s'] * 1000:>7.1f}ms {r['min_s'] * 1000:>8.1f}-{r['max_s'] * 1000:<8.1f}ms {r['peak_rss_mib']:>6.1f}MiB {ratio:>12}"
            )
    machine = f"{os.cpu_count()} cores, {sh('uname', '-r').stdout.strip()}, {sh('git', '--version').stdout.strip()}"
    table = "\n".join(lines)
    print(f"\n{table}\n\nmachine: {machine}")
    print_server_cost(server_cost)
    size = venv_size(troops)
    print(f"new venv on disk (no packages): {size / 1024:.0f} KiB")
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump({"machine": machine, "runs": RUNS, "results": results, "server_cost": server_cost, "venv_bytes": size}, f, indent=2)
    print(f"wrote {os.path.join(HERE, 'results.json')}")


if __name__ == "__main__":
    sys.exit(main())
