"""Many malformed configs: each is rejected with one clean line (a ConfigError), never another
exception, and the CLI never prints a traceback for them."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_vae.config import Config, ConfigError, load_config

VALUES = [
    0,
    -1,
    1.5,
    -0.001,
    True,
    None,
    "",
    "abc",
    "1e-3",
    [],
    [0],
    [-3, "x"],
    {},
    {"a": 1},
    10**12,
    float("nan"),
    "[1, 2",
    "{",
    "null",
]
GARBAGE = [
    "model: [unclosed",
    "- a\n- b\n",
    "train:\n  epochs: 3\n epochs: 4\n",
    "\t\tx: 1",
    "model: {num_experts: }}",
    ": :",
    "a: b: c",
    "!!python/object:os.system ls",
    "\x00",
]


def _mutate(rng: random.Random) -> dict:
    data = Config().model_dump(mode="json")
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(list(data))
        choice = rng.random()
        if choice < 0.6 and isinstance(data[section], dict) and data[section]:
            key = rng.choice(list(data[section]))
            data[section][key] = rng.choice(VALUES)
        elif choice < 0.8 and isinstance(data[section], dict):
            data[section][f"typo_{rng.randint(0, 9)}"] = 1
        else:
            data[rng.choice(["modle", "trian", "x"])] = rng.choice(VALUES)
    return data


def test_many_malformed_configs_fail_cleanly(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "c.yaml"
    rejected = 0
    for i in range(400):
        if i % 10 == 0:
            path.write_text(rng.choice(GARBAGE))
        else:
            path.write_text(yaml.safe_dump(_mutate(rng)))
        try:
            load_config(path)
        except ConfigError as err:
            rejected += 1
            assert "\n" not in str(err) and str(err), str(err)
    assert rejected > 300  # nearly every mutation is invalid; the rest must load as valid configs


@pytest.mark.parametrize(
    "text", ["model: [unclosed\n", "train:\n  batch_size: -5\n", "optim:\n  lr: {a: 1}\n"]
)
def test_cli_prints_no_traceback(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "moe-vae"), "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
