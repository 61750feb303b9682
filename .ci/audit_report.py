"""Report pip-audit's JSON; look up on PyPI's project page any pin pip-audit could not; exit 1 on a vulnerability."""
from __future__ import annotations

import json
import sys
import urllib.request

INDEX = "https://pypi.org/pypi/{}/json"


class Unreachable(Exception):
    """The index gave no project page for a pin pip-audit could not audit."""


def pins(path: str) -> dict[str, str]:
    """The name==version lines of a requirements file, by lower-case name."""
    found = {}
    with open(path) as f:
        for line in f:
            spec = line.split("#", 1)[0].strip()
            if "==" in spec:
                name, version = spec.split("==", 1)
                found[name.strip().lower().replace("_", "-").replace(".", "-")] = version.strip()
    return found


def latest_release_vulns(name: str, version: str) -> list[dict] | None:
    """PyPI's advisories for `version` when it is the project's newest release (the project page's own data)."""
    # Some indexes serve the project page but not the per-release one pip-audit asks for; the
    # project page's "vulnerabilities" are those of its newest release, so they are exact for that release only.
    try:
        with urllib.request.urlopen(INDEX.format(name), timeout=20) as resp:
            page = json.load(resp)
    except (OSError, ValueError) as err:  # no answer is no audit: the caller fails the run
        raise Unreachable(f"{name}: {err}") from None
    if page.get("info", {}).get("version") != version or "vulnerabilities" not in page:
        return None
    return page["vulnerabilities"]


def main(report_path: str, requirements: str, status: int, strict: bool) -> int:
    """Print the findings; 1 on any vulnerability, or (strict) on a pin that could not be audited."""
    try:
        with open(report_path) as f:
            deps = json.load(f)["dependencies"]
    except (OSError, ValueError, KeyError):
        print(f"[audit] pip-audit wrote no report (exit {status})")
        return 1
    versions = pins(requirements)
    found: list[tuple[str, str, dict]] = []
    unaudited: list[str] = []
    unreachable: list[str] = []
    for dep in deps:
        name = dep["name"].lower()
        version = dep.get("version") or versions.get(name, "?")
        try:
            vulns = dep.get("vulns", []) if "skip_reason" not in dep else latest_release_vulns(name, version)
        except Unreachable as err:
            unreachable.append(str(err))
            continue
        if vulns is None:
            unaudited.append(f"{name}=={version}")
            continue
        found += [(name, version, v) for v in vulns]
    for name, version, vuln in found:
        fixes = ", ".join(vuln.get("fix_versions") or vuln.get("fixed_in") or []) or "none yet"
        print(f"[audit] VULNERABLE {name}=={version}: {vuln['id']} (fixed in: {fixes})")
    if unaudited:
        print(f"[audit] {len(unaudited)} pins without advisory data here (not their newest release):", *unaudited)
    for reason in unreachable:
        print(f"[audit] no advisory data could be fetched for {reason}")
    audited = len(deps) - len(unaudited) - len(unreachable)
    print(f"[audit] {audited} of {len(deps)} pins audited, {len(found)} known vulnerabilities")
    # A pin that is not its project's newest release has no advisory data on an index that serves
    # only project pages: it is named above, and fails only under CI_AUDIT_STRICT=1 (a new release
    # elsewhere would otherwise fail every landing). An index that does not answer fails always.
    return 1 if found or unreachable or not audited or (strict and unaudited) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"))
