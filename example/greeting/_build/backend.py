"""A minimal PEP 517 build backend: packs the `greeting` package into a wheel with nothing but
the standard library, so `pip install ./greeting` needs no index."""
import base64
import hashlib
import os
import zipfile

NAME, VERSION = "greeting", "1.0"
DIST = f"{NAME}-{VERSION}.dist-info"


def _record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = {}
    for dirpath, _, names in os.walk(os.path.join(here, NAME)):
        for n in sorted(names):
            if n.endswith(".py"):
                full = os.path.join(dirpath, n)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, here)] = f.read()
    files[f"{DIST}/METADATA"] = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode()
    files[f"{DIST}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [_record_line(p, d) for p, d in files.items()] + [f"{DIST}/RECORD,,"]
    files[f"{DIST}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return wheel


def get_requires_for_build_wheel(config_settings=None):
    return []
