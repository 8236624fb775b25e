"""benchmarks/gpu_wheelhouse.py's repack_wheel on tiny synthetic wheels: dropped folders are gone,
RECORD lists every remaining file with its sha256 and size, pip installs the result offline, a big
binary moves into the solid tar.xz and install.sh brings it back (executable, matching RECORD)."""
import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

WHEELHOUSE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_wheelhouse.py"
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture(scope="module")
def wheelhouse():
    spec = importlib.util.spec_from_file_location("plabel_gpu_wheelhouse", WHEELHOUSE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path) -> Path:
    """tinypkg 0.1 (pure Python): a module, a data file, an executable, a folder to drop, and RECORD."""
    files = {
        "tinypkg/__init__.py": b"from tinypkg.core import VALUE\n",
        "tinypkg/core.py": b"VALUE = 42\n" + b"# padding to compress\n" * 200,
        "tinypkg/bin/tool": b"#!/bin/sh\necho tool\n",
        "tinypkg/webui/build/index.html": b"<html>" + b"x" * 5000 + b"</html>",
        "tinypkg/webui/build/static/app.js": b"console.log(1);\n" * 300,
        "tinypkg/webui/__init__.py": b"",
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                       b"Tag: py3-none-any\n",
        "tinypkg-0.1.dist-info/top_level.txt": b"tinypkg\n",
    }
    return _write_wheel(folder / "tinypkg-0.1-py3-none-any.whl", files, executable=("/tool",))


def _write_wheel(path: Path, files: dict[str, bytes], executable: tuple[str, ...]) -> Path:
    """Write ``files`` (name -> bytes) as the wheel ``path`` with a RECORD of them (names ending in
    ``executable`` get mode 755)."""
    dist_info = next(name.split("/")[0] for name in files if name.split("/")[0].endswith(".dist-info"))
    rows = [(name, _digest(data), str(len(data))) for name, data in files.items()]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows + [(f"{dist_info}/RECORD", "", "")])
    files = {**files, f"{dist_info}/RECORD": buf.getvalue().encode()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
            info.external_attr = (0o755 if name.endswith(executable) else 0o644) << 16
            info.create_system = 3
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize("compression", ["lzma", "deflate", "auto"])
def test_repack_drops_rewrites_record_and_installs(wheelhouse, tmp_path, compression):
    src = make_wheel(tmp_path)
    stats = wheelhouse.repack_wheel(src, tmp_path / "out", drop=("tinypkg/webui/build",), strip=False,
                                    compression=compression, note={"why": "test"})
    out = tmp_path / "out" / src.name
    assert stats.path == out and out.exists() and stats.size == out.stat().st_size
    assert stats.dropped_files == 2 and stats.compression in ("lzma", "deflate")

    with zipfile.ZipFile(out) as z:
        names = [i.filename for i in z.infolist()]
        assert not [n for n in names if n.startswith("tinypkg/webui/build/")]
        assert "tinypkg/webui/__init__.py" in names  # only the named folder goes
        assert names[-1] == "tinypkg-0.1.dist-info/RECORD"  # RECORD last, after the rest of .dist-info
        expected = {"lzma": zipfile.ZIP_LZMA, "deflate": zipfile.ZIP_DEFLATED}[stats.compression]
        assert {i.compress_type for i in z.infolist()} == {expected}
        assert z.getinfo("tinypkg/bin/tool").external_attr >> 16 & 0o111  # executable bits kept
        rows = list(csv.reader(io.StringIO(z.read("tinypkg-0.1.dist-info/RECORD").decode())))
        listed = {r[0]: r[1:] for r in rows}
        assert len(listed) == len(rows) and set(listed) == set(names)
        for name in names:
            if name.endswith("/RECORD"):
                assert listed[name] == ["", ""]
            else:
                data = z.read(name)
                assert listed[name] == [_digest(data), str(len(data))], name
    assert wheelhouse.verify_record(out) == len(names)

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", str(site), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (site / "tinypkg" / "webui" / "build").exists()
    assert wheelhouse.check_installed(site) >= 5
    imported = subprocess.run([sys.executable, "-c", "import tinypkg, sys; print(tinypkg.VALUE, tinypkg.__file__)"],
                              cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    value, where = imported.stdout.split()
    assert value == "42" and where.startswith(str(site))


def test_repack_refuses_to_drop_dist_info(wheelhouse, tmp_path):
    src = make_wheel(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        wheelhouse.repack_wheel(src, tmp_path / "out", drop=("tinypkg-0.1.dist-info",), strip=False)


def test_verify_record_catches_a_stale_line(wheelhouse, tmp_path):
    src = make_wheel(tmp_path)
    bad = tmp_path / "bad" / src.name
    bad.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b"# changed\n" if info.filename == "tinypkg/core.py" else data)
    with pytest.raises(ValueError, match="tinypkg/core.py"):
        wheelhouse.verify_record(bad)


def make_wheel_with_binary(folder: Path, size: int = 96 * 1024) -> tuple[Path, bytes]:
    """tinybin 0.2 (platform wheel): a module, a small ELF-looking file and a big "binary" (an ELF header
    and ``size`` bytes, executable), console scripts into a kept and a dropped folder, and RECORD."""
    big = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + bytes((i * 7919 >> 3) & 0xFF for i in range(size))
    files = {
        "tinybin/__init__.py": b"VALUE = 7\n",
        "tinybin/core/engine": big,
        "tinybin/small.so": b"\x7fELF\x02\x01\x01" + b"\x00" * 200,
        "tinybin/extra/__init__.py": b"",
        "tinybin-0.2.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinybin\nVersion: 0.2\n",
        "tinybin-0.2.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                      b"Tag: py3-none-any\n",
        "tinybin-0.2.dist-info/entry_points.txt": b"[console_scripts]\ntinybin = tinybin:main\n"
                                                  b"tinyextra = tinybin.extra.cli:main\n",
    }
    return _write_wheel(folder / "tinybin-0.2-py3-none-any.whl", files, executable=("/engine", ".so")), big


def _tool_path(tmp_path: Path, with_xz: bool) -> str:
    """PATH for install.sh: the system's, or one without xz (so that it falls back to Python's tarfile)."""
    if with_xz:
        return "/usr/bin:/bin"
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "tar"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    return str(tools)


@pytest.mark.parametrize("with_xz", [True, False], ids=["tar-xJf", "python-tarfile"])
def test_solid_binaries_leave_the_wheel_and_install_sh_brings_them_back(wheelhouse, tmp_path, with_xz):
    if with_xz and not (shutil.which("tar") and shutil.which("xz")):
        pytest.skip("no tar / xz here")
    src, big = make_wheel_with_binary(tmp_path)
    stats = wheelhouse.repack_wheel(src, tmp_path / "folder", drop=("tinybin/extra",), strip=False,
                                    compression="lzma", note={"why": "test"}, solid_min_bytes=64 * 1024,
                                    solid_preset=6)
    solid = tmp_path / "folder" / "tinybin-binaries-0.2-py3.tar.xz"
    assert stats.solid == solid and solid.exists() and stats.solid_size == solid.stat().st_size
    assert stats.solid_files == [("tinybin/core/engine", len(big))]  # small.so is under the threshold
    assert stats.dropped_entry_points == ["tinyextra = tinybin.extra.cli:main"]

    with zipfile.ZipFile(stats.path) as z:
        names = set(z.namelist())
        assert "tinybin/core/engine" not in names and "tinybin/small.so" in names
        assert "tinybin = tinybin:main" in z.read("tinybin-0.2.dist-info/entry_points.txt").decode()
        assert "tinyextra" not in z.read("tinybin-0.2.dist-info/entry_points.txt").decode()
        record = {r[0]: r[1:] for r in csv.reader(io.StringIO(z.read("tinybin-0.2.dist-info/RECORD").decode()))}
        note = json.loads(z.read("tinybin-0.2.dist-info/REPACKED.json"))
    assert record["tinybin/core/engine"] == [_digest(big), str(len(big))]  # RECORD keeps the binary's line
    assert note["solid_archive"]["name"] == solid.name and note["solid_archive"]["members"] == ["tinybin/core/engine"]
    with tarfile.open(solid) as tar:
        (member,) = tar.getmembers()
        assert member.name == "tinybin/core/engine" and member.mode & 0o777 == 0o755
    assert wheelhouse.verify_record(stats.path, solid) == len(names) + 1
    with pytest.raises(ValueError, match="tinybin/core/engine"):
        wheelhouse.verify_record(stats.path)  # without the tar RECORD lists a file the wheel lacks
    assert wheelhouse.reusable(stats.path, {"why": "test"}) == [stats.path, solid]
    assert wheelhouse.reusable(stats.path, {"why": "other"}) is None

    script = wheelhouse.write_install_script(tmp_path / "folder", binaries=("tinybin/core/engine",))
    assert script.stat().st_mode & 0o111
    site = tmp_path / "site"
    env = {"PATH": _tool_path(tmp_path, with_xz), "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "HOME": str(tmp_path)}
    for attempt in range(2):  # a second run over an existing target (pip --upgrade, then the tar again)
        proc = subprocess.run([BASH, str(script), str(site)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 binaries present and executable" in proc.stdout
        assert ("python tarfile" in proc.stdout) != with_xz
    engine = site / "tinybin" / "core" / "engine"
    assert engine.read_bytes() == big and os.access(engine, os.X_OK)
    installed = {r[0]: r[1:] for r in csv.reader(io.StringIO((site / "tinybin-0.2.dist-info" / "RECORD").read_text()))}
    assert installed["tinybin/core/engine"] == [_digest(big), str(len(big))]
    assert not (site / "tinybin" / "extra").exists()
    assert wheelhouse.check_installed(site) >= 6  # every file, the extracted binary included, matches RECORD


def test_install_sh_fails_loudly(wheelhouse, tmp_path):
    src, _ = make_wheel_with_binary(tmp_path)
    folder = tmp_path / "folder"
    wheelhouse.repack_wheel(src, folder, drop=(), strip=False, compression="deflate", solid_min_bytes=None)
    script = wheelhouse.write_install_script(folder, binaries=("tinybin/core/missing",))
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "HOME": str(tmp_path)}
    proc = subprocess.run([BASH, str(script), str(tmp_path / "site")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "tinybin/core/missing is missing or not executable" in proc.stderr
    proc = subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
