"""The offline GPU kit's logic, without building it: wheel choice on the host, version order, vendored library
names, ldd parsing, wheel repacking, manifest checks, host checks and the ffcv source patch.
(benchmarks/check_gpu_kit.sh proves a built kit in a clean Python 3.12 environment.)"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import platform
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_kit as kit


def wheel(name: str, version: str) -> dict:
    return {"file": f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "name": name, "version": version}


def test_version_order():
    key = kit.version_key
    assert key("2.10.0") > key("2.9.1")
    assert key("4.16.0") > key("4.14.1") > key("4.14")
    assert key("1.0rc1") < key("1.0") < key("1.0.1")
    assert key("2.11.0+cu130") == key("2.11.0")


def test_select_wheels_takes_what_the_host_lacks_or_has_older():
    wheels = [wheel("deepspeed", "0.19.8"), wheel("ffcv", "1.0.2"), wheel("hjson", "3.1.0"),
              wheel("tqdm", "4.70.1"), wheel("typing-extensions", "4.16.0"), wheel("pydantic", "2.14.4"),
              wheel("pydantic-core", "2.50.5"), wheel("packaging", "26.4")]
    host = {"deepspeed": "0.20.0", "ffcv": None, "hjson": None, "tqdm": "4.70.1", "typing-extensions": "4.12.2",
            "pydantic": "2.5.0", "pydantic-core": "2.60.0", "packaging": "27.0"}
    chosen = {w["name"]: w["reason"] for w in kit.select_wheels(wheels, host)}
    assert chosen["deepspeed"] == "always" and chosen["ffcv"] == "always"   # even over a newer host copy
    assert chosen["hjson"] == "missing on the host"
    assert "tqdm" not in chosen and "packaging" not in chosen               # same or newer on the host
    assert chosen["typing-extensions"] == "host has 4.12.2, older"
    assert chosen["pydantic"] == "host has 2.5.0, older"
    assert chosen["pydantic-core"] == "installed with pydantic"            # exact pin, even though the host's is newer
    assert len(kit.select_wheels(wheels, host, take_all=True)) == len(wheels)


def test_vendored_names_and_system_libraries():
    a = kit.vendored_name("libopencv_core.so.406", b"one")
    b = kit.vendored_name("libopencv_core.so.406", b"two")
    assert a.startswith("libopencv_core-") and a.endswith(".so.406") and a != b
    assert kit.vendored_name("libz.so.1", b"x") == f"libz-{hashlib.sha256(b'x').hexdigest()[:8]}.so.1"
    for name in ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                 "libpthread.so.0", "linux-vdso.so.1"):
        assert kit.is_system_lib(name), name
    for name in ("libz.so.1", "libopencv_core.so.406", "libturbojpeg.so.0", "libtbb.so.12", "libgfortran.so.5",
                 "libcrypt.so.1"):
        assert not kit.is_system_lib(name), name


def test_parse_ldd():
    text = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibopencv_core.so.406 => /lib/x86_64-linux-gnu/libopencv_core.so.406 (0x00007f14)
\tlibmissing.so.2 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f14c564d000)
"""
    assert kit.parse_ldd(text) == [("linux-vdso.so.1", None),
                                   ("libopencv_core.so.406", "/lib/x86_64-linux-gnu/libopencv_core.so.406"),
                                   ("libmissing.so.2", None), ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
                                   ("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2")]


def test_max_symbol_versions():
    needs = ["GLIBC_2.2.5", "GLIBC_2.34", "GLIBC_2.4", "GLIBCXX_3.4.9", "GLIBCXX_3.4.30", "CXXABI_1.3.13", "GFORTRAN_8"]
    assert kit.max_symbol_versions(needs) == {"GLIBC": "2.34", "GLIBCXX": "3.4.30", "CXXABI": "1.3.13"}


def test_wheel_repack_round_trip(tmp_path):
    tree = tmp_path / "tree"
    (tree / "pkg.libs").mkdir(parents=True)
    (tree / "pkg").mkdir()
    (tree / "pkg" / "__init__.py").write_text("x = 1\n")
    lib = tree / "pkg.libs" / "libfoo-12345678.so.1"
    lib.write_bytes(b"\x7fELF" + bytes(100))
    lib.chmod(0o755)
    info = tree / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp312-cp312-linux_x86_64\n")
    (info / "RECORD").write_text("stale,,\n")
    whl = tmp_path / "pkg-1.0-cp312-cp312-linux_x86_64.whl"
    kit.write_wheel_tree(tree, info.name, whl)
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert names[-1] == "pkg-1.0.dist-info/RECORD"
        rows = list(csv.reader(io.StringIO(z.read("pkg-1.0.dist-info/RECORD").decode())))
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == "" and size == ""
                continue
            data = z.read(path)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expect}" and int(size) == len(data), path
        assert {r[0] for r in rows} == set(names)
        assert (z.getinfo("pkg.libs/libfoo-12345678.so.1").external_attr >> 16) & 0o111  # still executable
    out = tmp_path / "out"
    out.mkdir()
    assert kit.read_wheel_tree(whl, out) == "pkg-1.0.dist-info"
    assert (out / "pkg" / "__init__.py").read_text() == "x = 1\n"
    assert os.stat(out / "pkg.libs" / "libfoo-12345678.so.1").st_mode & stat.S_IXUSR


def fake_kit(root: Path) -> Path:
    root.mkdir()
    wheels = []
    for name in list(kit.ALWAYS) + list(kit.DEPENDENCIES):
        w = wheel(name, "1.0")
        (root / w["file"]).write_bytes(name.encode())
        wheels.append({**w, "bytes": len(name), "sha256": hashlib.sha256(name.encode()).hexdigest()})
    (root / "kit.json").write_text(json.dumps({"schema": kit.SCHEMA, "python": "3.12", "wheels": wheels,
                                               "ffcv": {"requires": {}}}))
    return root


def test_verify_kit_finds_missing_extra_and_altered_wheels(tmp_path):
    root = fake_kit(tmp_path / "kit")
    assert kit.verify_kit(root) == []
    (root / "hjson-1.0-py3-none-any.whl").write_bytes(b"changed")
    (root / "tqdm-1.0-py3-none-any.whl").unlink()
    (root / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    problems = kit.verify_kit(root)
    assert any(p.startswith("hjson-1.0") and "sha256" in p for p in problems)
    assert any(p.startswith("tqdm-1.0") and "missing" in p for p in problems)
    assert any(p.startswith("extra-1.0") and "not in kit.json" for p in problems)
    m = json.loads((root / "kit.json").read_text())
    m["wheels"] = [w for w in m["wheels"] if w["name"] != "pydantic"]
    (root / "kit.json").write_text(json.dumps(m))
    assert "no wheel for pydantic" in kit.verify_kit(root)


@pytest.mark.skipif(not platform.libc_ver()[1], reason="checks glibc versions: needs a glibc system")
def test_check_host():
    here = "%d.%d" % sys.version_info[:2]
    ok = {"python": here, "ffcv": {"requires": {"GLIBC": "2.17"}}}
    assert kit.check_host(ok) == []
    bad = kit.check_host({"python": "2.7", "ffcv": {"requires": {"GLIBC": "99.1"}}})
    assert any("Python" in p and "2.7" in p for p in bad)
    assert any("glibc" in p and "99.1" in p for p in bad)


def test_ffcv_source_patch(tmp_path):
    graph = tmp_path / "src" / "ffcv" / "pipeline" / "graph.py"
    graph.parent.mkdir(parents=True)
    graph.write_text("from distutils.log import warn\nimport warnings\n\ndef f():\n    warnings.warn('x')\n")
    assert kit.patch_ffcv_source(tmp_path / "src")
    assert "distutils" not in graph.read_text() and "warnings.warn('x')" in graph.read_text()
    with pytest.raises(kit.KitError, match="not there"):
        kit.patch_ffcv_source(tmp_path / "src")  # already patched: not ffcv 1.0.2's source
    graph.write_text("from distutils.log import warn\n\ndef f():\n    warn('x')\n")
    with pytest.raises(kit.KitError, match="would break"):
        kit.patch_ffcv_source(tmp_path / "src")


def test_install_refuses_a_host_the_kit_cannot_serve(tmp_path):
    root = fake_kit(tmp_path / "kit")
    m = json.loads((root / "kit.json").read_text())
    m["python"] = "2.7"
    (root / "kit.json").write_text(json.dumps(m))
    report = tmp_path / "report.json"
    with pytest.raises(kit.KitError, match="cannot be installed here"):
        kit.install(root, tmp_path / "site", report=report)
    assert not (tmp_path / "site").exists()
    assert json.loads(report.read_text())["problems"]
