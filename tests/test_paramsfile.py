"""pipeline/paramsfile.py's YAML reader: what it still reads (anchors, merge keys, YAML 1.2
floats) next to what it refuses (alias bombs, self-referring aliases, deep nesting, keys given
twice, text that is not UTF-8). The catalogue (test_bad_inputs) runs the refusals through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.paramsfile import MAX_VALUES, Refused, apply_override, load_yaml, read_yaml
from tests.conftest import BILLION_LAUGHS


def test_anchors_merge_keys_and_yaml_12_floats_still_read() -> None:
    text = (
        "base: &base {lr: 0.01, batch_size: 2}\n"
        "train:\n  <<: *base\n  lr: 1e-6\n"  # a merged key may be overridden
        "tune: {a: *base, b: *base}\n"  # one mapping named twice is not a key given twice
    )
    data = load_yaml(text)
    assert data["train"] == {"lr": 1e-6, "batch_size": 2}
    assert data["tune"]["a"] is data["tune"]["b"]


def test_an_alias_bomb_is_refused_at_once() -> None:
    with pytest.raises(Refused, match=f"more than {MAX_VALUES:,} values"):
        load_yaml(BILLION_LAUGHS)  # refused while counting: 9**9 values are never built


def test_aliases_within_the_bound_expand() -> None:
    text = "a: &a [" + ", ".join(["1"] * 100) + "]\nb: [" + ", ".join(["*a"] * 100) + "]\n"
    assert sum(len(x) for x in load_yaml(text)["b"]) == 10_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", r"line 1: alias \*a refers to the value it is in"),
        ("a: " + "[" * 65 + "]" * 65 + "\n", "nest more than 64 deep"),
        ("train:\n  loss_weights: {out: 1, pam: 2, out: 3}\n", r"train\.loss_weights\.out is"),
        ("s: [{k: 1}, {k: 1, k: 2}]\n", r"s\[1\]\.k is given twice \(lines 1 and 1\)"),
        ("1: a\n0x1: b\n", r"1 is given twice"),  # the same key, written two ways
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(Refused, match=message):
        load_yaml(text)


def test_read_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"train: {lr: 0.1}\ntrain: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: train is given twice \(lines 1 and 2\)"):
        read_yaml(path)
    path.write_bytes(b"train: {run_name: \xff}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: not UTF-8 text \(byte 18\)"):
        read_yaml(path)


def test_set_names_the_assignment() -> None:
    with pytest.raises(ConfigError, match=r"--set train\.x=\{a: 1, a: 2\}: a is given twice"):
        apply_override({}, "train.x={a: 1, a: 2}")
