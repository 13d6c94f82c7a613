"""Blend specs: resolution to version ids, and bad specs failing up front with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_cpt.cli import main
from moe_cpt.errors import ConfigError, CptError, NotFoundError
from moe_cpt.mixer.spec import blend_from_json, resolve
from tests.support.mixer_store import make_tokenizer, publish, spec


def test_resolve_pins_versions_and_round_trips(mix_store: str, tmp_path: Path) -> None:
    blend, dss = resolve(spec(mix_store, {"new": 0.95, "replay": 0.05}))
    assert [s.version for s in blend.sources] == [d.version for d in dss]
    again = blend_from_json(json.loads(json.dumps(blend.to_json())))
    assert again.fingerprint == blend.fingerprint
    moved = blend.to_json()
    moved["seed"] = 8
    with pytest.raises(ConfigError, match="modified"):
        blend_from_json(moved)


@pytest.mark.parametrize(
    "mutate, err, msg",
    [
        (lambda s: s["sources"].update(nope={"dataset": "nope@latest"}), NotFoundError, "nope"),
        (lambda s: s["sources"]["new"].update(dataset="new@v9"), NotFoundError, "unknown ref 'v9'"),
        (lambda s: s["sources"]["new"].update(weight=-1), ConfigError, ">= 0"),
        (lambda s: [v.update(weight=0) for v in s["sources"].values()], ConfigError, "all zero"),
        (lambda s: s.update(seq_len=10**6), ConfigError, "seq_len 1000000 is too large"),
        (lambda s: s.update(bogus=1), ConfigError, "unknown key"),
        (lambda s: s.update(schedule=[{"step": 0, "weights": {"zzz": 1}}]), ConfigError, "unknown source"),
    ],
)
def test_bad_specs_fail_up_front(mix_store: str, mutate, err, msg: str) -> None:
    s = spec(mix_store, {"new": 0.95, "replay": 0.05})
    mutate(s)
    with pytest.raises(err, match=msg):
        resolve(s)


def test_tokenizer_mismatch_is_refused(mix_store: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other")
    publish(other, "alien", 9, 50, tok=make_tokenizer(tag="b"))
    s = spec(mix_store, {"new": 0.5})
    s["sources"]["alien"] = {"dataset": "alien@latest", "store": other, "weight": 0.5}
    with pytest.raises(ConfigError, match="different tokenizers"):
        resolve(s)


def test_cli_resolve_and_inspect(mix_store: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    p = tmp_path / "blend.yaml"
    p.write_text(yaml.safe_dump(spec(mix_store, {"new": 0.95, "replay": 0.05}, gbs=20)))
    out = tmp_path / "resolved.json"
    assert main(["mix", "resolve", str(p), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["resolved"] is True
    assert main(["mix", "inspect", str(p), "--steps", "100"]) == 0
    text = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("  new") or ln.startswith("  replay")}
    assert int(rows["new"][3]) == 1900 and int(rows["replay"][3]) == 100
    assert float(rows["replay"][5]) > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [")
    assert main(["mix", "inspect", str(bad), "--steps", "1"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(CptError):
        resolve(str(tmp_path / "missing.yaml"))
