"""Check that a set of wheels plus the packages a machine already has closes over Requires-Dist.

usage: python3 tools/wheel_closure.py WHEEL_DIR ROOT_REQ [--present NAME ...] [--python 3.12]

Reads each wheel's METADATA (no install), starts from ROOT_REQ (e.g. 'ray[serve]==2.60.0'), follows every
requirement whose marker holds for Linux x86_64 / CPython --python with the extras asked for, and prints:
  staged   the wheels the closure needs (NAME==VERSION), with sizes,
  present  requirements met by a package assumed present (with the specifier its version must satisfy),
  missing  requirements met by neither (exit 1), and version conflicts among staged wheels (exit 1).
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def wheel_meta(path: Path) -> tuple[str, Version, list[str]]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = Parser().parsestr(z.read(name).decode())
    return canonicalize_name(msg["Name"]), Version(msg["Version"]), msg.get_all("Requires-Dist") or []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("wheels", type=Path)
    ap.add_argument("root")
    ap.add_argument("--present", nargs="*", default=[], help="names the machine already has (any version)")
    ap.add_argument("--python", default="3.12")
    a = ap.parse_args()
    env = default_environment()
    env.update({"python_version": a.python, "python_full_version": a.python + ".3", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "os_name": "posix"})
    wheels: dict[str, tuple[Version, list[str], Path]] = {}
    for p in sorted(a.wheels.glob("*.whl")):
        n, v, reqs = wheel_meta(p)
        if n in wheels:
            print(f"two wheels for {n}: {wheels[n][2].name} and {p.name}")
            return 1
        wheels[n] = (v, reqs, p)
    present = {canonicalize_name(n) for n in a.present}
    todo = [(Requirement(a.root), "<root>")]
    seen: set[tuple[str, frozenset[str]]] = set()
    used: set[str] = set()
    on_present: list[str] = []
    bad: list[str] = []
    while todo:
        req, by = todo.pop()
        n = canonicalize_name(req.name)
        if n in present and n not in wheels:
            if str(req.specifier):
                on_present.append(f"{n}{req.specifier}  (needed by {by})")
            continue
        if n not in wheels:
            bad.append(f"missing: {req}  (needed by {by})")
            continue
        v, reqs, _ = wheels[n]
        if not req.specifier.contains(v, prereleases=True):
            bad.append(f"conflict: {n} {v} does not satisfy {req}  (needed by {by})")
        used.add(n)
        key = (n, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in reqs:
            sub = Requirement(text)
            ok = True
            if sub.marker is not None:
                ok = any(sub.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})) if req.extras \
                    else sub.marker.evaluate({**env, "extra": ""})
            if ok:
                todo.append((sub, f"{n} {v}"))
    total = 0
    print("staged:")
    for n in sorted(used):
        v, _, p = wheels[n]
        total += p.stat().st_size
        print(f"  {n}=={v}  {p.stat().st_size / 1e6:.2f} MB")
    print(f"  {len(used)} wheels, {total / 1e6:.1f} MB ({total / 2**20:.1f} MiB)")
    unused = sorted(set(wheels) - used)
    if unused:
        print("in the folder but not needed: " + " ".join(unused))
    print("requirements on packages assumed present (check their versions there):")
    for line in sorted(set(on_present)):
        print("  " + line)
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
