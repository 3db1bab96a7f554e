"""The example deployment bundled with troops: what a small fleet's deploy.py looks like.

troops runs this file with the venv's own python whenever the node's branch moves. The top
level runs first (decide roles here); the @deployable functions run after it, in order, each
only on nodes that have one of its roles.
"""
import pathlib
import subprocess
import sys

import troops
import greeting  # a package of this repository, installed from requirements.txt

# Roles come from the node's settings, and can be given by host name here too.
troops.define_role("web", hosts=["web-*", "www*.example.com"])

# Everything goes under troops.root, "/" on a real node, the throwaway root in the demo.
SITE = pathlib.Path(troops.root, "srv/example")

print(f"deploying {troops.commit} on {troops.hostname()}, roles {sorted(troops.roles)}")


@troops.deployable
def motd():
    SITE.mkdir(parents=True, exist_ok=True)
    (SITE / "motd").write_text(greeting.message(troops.hostname(), troops.commit) + "\n")
    print(f"wrote {SITE / 'motd'}")


@troops.deployable(roles=["web"])
def webpage():
    # subprocess and sys.executable behave as in any venv.
    version = subprocess.run([sys.executable, "--version"], capture_output=True, text=True).stdout.strip()
    (SITE / "index.html").write_text(f"<h1>{troops.hostname()}</h1><p>{version}</p>\n")
    print(f"wrote {SITE / 'index.html'} ({version})")


@troops.deployable(roles=["db"])
def database():
    print("this node has no db role, so this never prints")
