"""The unit files: in sync with service_install, `systemd-analyze verify` clean, hardening score <= 3.0.

systemd-analyze (systemd 252 here) works offline although systemd is not PID 1. Two quirks handled below:
`verify` fails when the ExecStart binary is missing (so a tmp copy points ExecStart at an existing binary),
and `security --threshold=N` takes an integer in tenths of the displayed exposure (30 means 3.0).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from daemon.service_install import (
    DEFAULT_EXEC,
    SERVICE,
    TEMPLATE,
    ServiceOptions,
    check_options,
    install_service,
    render_unit,
    unit_files,
)

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
DROPIN = UNITS / "deltayolo.service.d" / "example-override.conf"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt: systemd)")
EXISTING_EXEC = Path("/bin/true")


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)


def _copy_units(tmp_path: Path, with_dropin: bool = False) -> Path:
    """The repo's units with ExecStart pointing at a binary that exists here."""
    for name in (SERVICE, TEMPLATE):
        text = (UNITS / name).read_text().replace(str(DEFAULT_EXEC), str(EXISTING_EXEC))
        (tmp_path / name).write_text(text)
    if with_dropin:
        d = tmp_path / "deltayolo.service.d"
        d.mkdir()
        text = re.sub(r"^#([A-Za-z]+=)", r"\1", DROPIN.read_text(), flags=re.MULTILINE)
        (d / "override.conf").write_text(text.replace(str(DEFAULT_EXEC), str(EXISTING_EXEC)))
    return tmp_path


def test_repo_units_are_what_install_service_writes() -> None:
    files = unit_files(ServiceOptions())
    assert (UNITS / SERVICE).read_text() == files[SERVICE]
    assert (UNITS / TEMPLATE).read_text() == files[TEMPLATE]


def test_unit_settings() -> None:
    for name in (SERVICE, TEMPLATE):
        k = _keys((UNITS / name).read_text())
        assert k["Type"] == ["notify"]
        assert k["NotifyAccess"] == ["main"]
        assert k["WatchdogSec"] == ["30s"]
        assert k["Restart"] == ["on-failure"]
        assert k["StartLimitIntervalSec"] == ["300"] and k["StartLimitBurst"] == ["5"]
        assert k["TimeoutStopSec"] == ["30s"]
        assert k["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert k["DynamicUser"] == ["yes"] and k["User"] == ["deltayolo"]
        assert k["CacheDirectory"] == ["deltayolo"]
        assert k["ProtectSystem"] == ["strict"]
        assert k["PrivateTmp"] == ["yes"] and k["NoNewPrivileges"] == ["yes"]
        assert k["CapabilityBoundingSet"] == [""]
        assert k["DevicePolicy"] == ["closed"] and k["DeviceAllow"] == ["char-nvidia* rw"]
        assert k["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
        assert "@system-service" in k["SystemCallFilter"]
        assert "ReadWritePaths" not in k  # StateDirectory/CacheDirectory are the only writable places
    service = _keys((UNITS / SERVICE).read_text())
    template = _keys((UNITS / TEMPLATE).read_text())
    assert service["ExecStart"] == [f"{DEFAULT_EXEC} run --config /etc/deltayolo/config.yaml"]
    assert template["ExecStart"] == [f"{DEFAULT_EXEC} run --config /etc/deltayolo/%i.yaml"]
    assert service["StateDirectory"] == ["deltayolo"]
    assert template["StateDirectory"] == ["deltayolo/%i"]


@needs_analyze
def test_verify_reports_a_missing_exec_start(tmp_path: Path) -> None:
    if DEFAULT_EXEC.exists():
        pytest.skip(f"{DEFAULT_EXEC} exists on this machine")
    shutil.copy(UNITS / SERVICE, tmp_path / SERVICE)
    r = _analyze("verify", f"./{SERVICE}", cwd=tmp_path)
    assert r.returncode != 0
    assert f"Command {DEFAULT_EXEC} is not executable" in r.stderr


@needs_analyze
@pytest.mark.parametrize("unit", [SERVICE, TEMPLATE, "deltayolo@line1.service"])
def test_verify_is_clean(tmp_path: Path, unit: str) -> None:
    d = _copy_units(tmp_path)
    r = _analyze("verify", str(d / unit), cwd=d)
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


@needs_analyze
def test_verify_catches_unknown_keys_on_stderr_only(tmp_path: Path) -> None:
    """Why the tests demand empty stderr: verify exits 0 on a misspelt key."""
    d = _copy_units(tmp_path)
    text = (d / SERVICE).read_text().replace("PrivateTmp=yes", "PrivateTmp=yes\nPrivatTmp=yes")
    (d / SERVICE).write_text(text)
    r = _analyze("verify", f"./{SERVICE}", cwd=d)
    assert r.returncode == 0
    assert "Unknown key 'PrivatTmp'" in r.stderr


@needs_analyze
def test_example_dropin_verifies_when_every_example_is_enabled(tmp_path: Path) -> None:
    d = _copy_units(tmp_path, with_dropin=True)
    enabled = _keys((d / "deltayolo.service.d" / "override.conf").read_text())
    assert {"LoadCredential", "SupplementaryGroups", "WatchdogSec", "ExecStart"} <= set(enabled)
    r = _analyze("verify", f"./{SERVICE}", cwd=d)
    assert (r.returncode, r.stderr) == (0, "")


def _exposure(stdout: str) -> float:
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", stdout)
    assert m is not None, stdout[-500:]
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize(("unit", "dropin"), [(SERVICE, False), (TEMPLATE, False), (SERVICE, True)])
def test_security_score_at_most_3(tmp_path: Path, unit: str, dropin: bool) -> None:
    d = _copy_units(tmp_path, with_dropin=dropin)
    r = _analyze("security", "--offline=yes", "--threshold=30", f"./{unit}", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert _exposure(r.stdout) <= 3.0


def test_render_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="absolute"):
        render_unit(Path("bin/deltayolo"))
    with pytest.raises(ValueError, match="without spaces"):
        render_unit(Path("/opt/my app/deltayolo"))
    with pytest.raises(ValueError, match="WatchdogSec"):
        render_unit(watchdog_s=1)


def _opts(tmp_path: Path, **kw: object) -> ServiceOptions:
    conf = tmp_path / "etc"
    conf.mkdir(exist_ok=True)
    (conf / "config.yaml").write_text("# placeholder\n")
    base: dict[str, object] = {"exec_path": EXISTING_EXEC, "config_dir": conf, "unit_dir": tmp_path / "units"}
    base.update(kw)
    return ServiceOptions(**base)  # type: ignore[arg-type]


class Recorder:
    """Stands in for systemctl, which cannot run without systemd as PID 1."""

    def __init__(self, fail_on: str | None = None, rc: int = 0) -> None:
        self.calls: list[list[str]] = []
        self._fail_on, self._rc = fail_on, rc

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(list(argv))
        return self._rc if self._fail_on in argv else 0


def test_install_without_systemd_changes_nothing_and_fails(tmp_path: Path) -> None:
    out = io.StringIO()
    systemctl = Recorder()
    rc = install_service(_opts(tmp_path), runner=systemctl, booted=lambda: False, out=out)
    assert rc == 1
    assert systemctl.calls == []
    assert not (tmp_path / "units").exists()
    text = out.getvalue()
    assert "systemd is not running as PID 1" in text
    assert f"would write {tmp_path / 'units' / SERVICE}" in text
    assert "would run: systemctl daemon-reload" in text
    assert "would run: systemctl enable deltayolo.service" in text


def test_install_on_systemd_writes_reloads_and_enables(tmp_path: Path) -> None:
    out = io.StringIO()
    systemctl = Recorder()
    opts = _opts(tmp_path, instance="line1", start=True)
    rc = install_service(opts, runner=systemctl, booted=lambda: True, out=out)
    assert rc == 0, out.getvalue()
    assert systemctl.calls == [["systemctl", "daemon-reload"],
                               ["systemctl", "enable", "--now", "deltayolo@line1.service"]]
    written = (tmp_path / "units" / TEMPLATE).read_text()
    assert f"ExecStart={EXISTING_EXEC} run --config {tmp_path / 'etc'}/%i.yaml" in written
    assert (tmp_path / "units" / TEMPLATE).stat().st_mode & 0o777 == 0o644
    assert "warning: config" in out.getvalue()  # etc/line1.yaml does not exist


def test_install_reports_systemctl_failure(tmp_path: Path) -> None:
    out = io.StringIO()
    rc = install_service(_opts(tmp_path), runner=Recorder("enable", 3), booted=lambda: True, out=out)
    assert rc == 3
    assert "`systemctl enable deltayolo.service` exited 3" in out.getvalue()


def test_install_refuses_a_missing_binary(tmp_path: Path) -> None:
    out = io.StringIO()
    opts = _opts(tmp_path, exec_path=tmp_path / "nope" / "deltayolo")
    rc = install_service(opts, runner=lambda a: 0, booted=lambda: True, out=out)
    assert rc == 1
    assert "does not exist or is not executable" in out.getvalue()
    assert not (tmp_path / "units").exists()


def test_dry_run_prints_and_succeeds(tmp_path: Path) -> None:
    out = io.StringIO()
    rc = install_service(_opts(tmp_path), dry_run=True, runner=lambda a: 1, booted=lambda: True, out=out)
    assert rc == 0
    assert "Type=notify" in out.getvalue()
    assert not (tmp_path / "units").exists()


def test_checks_flag_paths_hidden_by_protect_home(tmp_path: Path) -> None:
    opts = _opts(tmp_path, exec_path=Path("/root/.venv/bin/deltayolo"), instance="bad name")
    problems = check_options(opts)
    assert any("ProtectHome" in p for p in problems)
    assert any("instance name 'bad name'" in p for p in problems)
