"""Provenance: versions, CPU and commit are read from the machine, not assumed."""

import subprocess
from importlib import metadata

from slimloop.provenance import cpu_info, environment, git_commit, package_versions


def test_versions_are_the_installed_ones():
    versions = package_versions(("torch", "numpy", "no-such-package-xyz"))
    assert versions["torch"] == metadata.version("torch")
    assert versions["numpy"] == metadata.version("numpy")
    assert versions["no-such-package-xyz"] is None


def test_cpu_model_and_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    cpu = cpu_info(info)
    assert cpu["model"] == "Test CPU 9000" and cpu["flags"] == ["avx", "avx2", "fma", "sse4_2"]


def test_git_commit_and_dirty_code(tmp_path):
    assert git_commit(tmp_path) is None
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "metrics.json").write_text("{}")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "metrics.json").write_text('{"map": 1}')  # a run rewrites metrics: not dirty code
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path)["dirty"] is True


def test_environment_is_json_able():
    import json

    env = environment()
    assert json.loads(json.dumps(env)) == env
    assert env["packages"]["slimloop"] is not None and env["torch_threads"] >= 1
