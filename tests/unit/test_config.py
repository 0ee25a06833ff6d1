"""Config loading, overrides and one-line errors that name the culprit."""

from pathlib import Path

import pytest

from moe_vae.config import Config, ConfigError, config_to_yaml, load_config, parse_overrides
from moe_vae.config.load import read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_seed_yaml_is_the_founding_recipe():
    """configs/mnist_seed.yaml == model.md's table, and == the schema defaults."""
    cfg = load_config(CONFIGS / "mnist_seed.yaml")
    m, lo, o, t = cfg.model, cfg.loss, cfg.optim, cfg.train
    assert m.num_experts == 10
    assert m.expert == "mlp"
    assert m.manager_layers == [128]
    assert m.encoder_layers == [128]
    assert m.decoder_layers == [128]
    assert m.activation == "sigmoid"
    assert lo.likelihood == "gaussian" and lo.decoder_std == 0.5
    assert m.z_dim == 10
    assert m.var_floor == 1e-5
    assert lo.objective == "expected" and lo.balancing_weight == 0.1
    assert t.epochs == 100 and t.batch_size == 100
    assert o.name == "adam" and o.lr == 1e-3 and o.weight_decay == 0.0
    assert cfg.data.name == "mnist" and cfg.data.train_limit is None
    assert cfg == Config(), "schema defaults drifted from the founding recipe"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_dotted_overrides_both_forms_and_yaml_values():
    cfg = load_config(
        CONFIGS / "mnist_seed.yaml",
        [
            "--train.epochs=3",
            "--optim.lr",
            "3e-4",
            "--model.encoder_layers=[64, 32]",
            "--data.train_limit=null",
            "--output.name=abc",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 3e-4
    assert cfg.model.encoder_layers == [64, 32]
    assert cfg.output.name == "abc"
    assert parse_overrides(["--a.b=1e-3"]) == [("a.b", 1e-3)]  # YAML 1.1 would give a string


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.num_experts=7", "--loss.objective=mixture"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.num_experts=0"], r"model\.num_experts: .*greater than or equal to 1, got 0"),
        (["--optim.lr=-0.001"], r"optim\.lr: .*greater than 0, got -0\.001"),
        (["--model.z_dim=0"], r"model\.z_dim: .*greater than or equal to 1"),
        (
            ["--model.num_expert=3"],
            r"unknown key 'model\.num_expert' \(expected one of: num_experts",
        ),
        (["--nope.x=3"], r"unknown key 'nope'"),
        (["--train.epochs=three"], r"train\.epochs: Input should be a valid integer, got 'three'"),
        (["--train.epochs=2.5"], r"train\.epochs: Input should be a valid integer"),
        (["--train.epochs=true"], r"train\.epochs: Input should be a valid integer, got True"),
        (["--model.activation=swish"], r"model\.activation: Input should be 'sigmoid', "),
        (["--loss.decoder_std=0"], r"loss\.decoder_std: .*greater than 0"),
        (["--model.encoder_layers=[128, 0]"], r"model\.encoder_layers\.1: .*greater than or equal"),
        (["--data.source=dir"], r"data\.root must name a directory when data\.source is 'dir'"),
        (["--train.epochs.x=1"], r"train\.epochs: Input should be a valid integer"),
        (["--model=3"], r"unknown option --model: config overrides are dotted"),
        (["train.epochs=3"], r"unexpected argument 'train\.epochs=3'"),
        (["--train.epochs"], r"override --train\.epochs has no value"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed\n", r"config file '.*bad\.yaml': .* at line \d+, column \d+"),
        ("- 1\n- 2\n", r"must hold a mapping of sections, got list"),
        ("model:\n  z_dim: ten\n", r"model\.z_dim: Input should be a valid integer, got 'ten'"),
        ("model:\n  zdim: 3\n", r"unknown key 'model\.zdim'"),
        ("train: 5\n", r"train: Input should be a valid dictionary"),
        (
            "optim:\n  lr: 1e-3\n  lr: 3e-4\n",
            r"config file '.*bad\.yaml': duplicate key 'lr' at line 3, column 3",
        ),
        ("model: {}\ntrain: {}\nmodel: {}\n", r"duplicate key 'model' at line 3"),
    ],
)
def test_bad_yaml_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """A `<<: *anchor` merge then a key of its own is not a duplicate: that is what merging is."""
    path = tmp_path / "merge.yaml"
    path.write_text("x-base: &base {z_dim: 3, num_experts: 4}\nmodel:\n  <<: *base\n  z_dim: 5\n")
    data = read_yaml(path)
    assert data["model"] == {"z_dim": 5, "num_experts": 4}


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' not found"):
        load_config(tmp_path / "missing.yaml")


def test_best_recipe_is_the_founding_model_with_a_warm_start():
    """docs/results.md's claim: the seed's model, the mixture objective, and the warm start."""
    seed, best = load_config(CONFIGS / "mnist_seed.yaml"), load_config(CONFIGS / "mnist_best.yaml")
    assert best.model == seed.model and best.optim == seed.optim
    assert best.loss == seed.loss.model_copy(update={"objective": "mixture"})
    assert best.warm_start.method == "cluster" and best.warm_start.weight == 100.0
    assert best.loss.label_fraction == 0 and best.loss.labelled_keys is None  # unsupervised


GRAPH = ["--train.cuda_graph=true", "--train.host_sync=log"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--train.cuda_graph=true"], r"train\.cuda_graph needs train\.host_sync=log"),
        ([*GRAPH, "--train.compile=reduce-overhead"], r"needs train\.compile none or default"),
        ([*GRAPH, "--optim.impl=foreach"], r"needs optim\.impl=fused"),
        (
            [*GRAPH, "--model.routing=topk", "--model.capacity_factor=0"],
            r"needs a fixed top-k capacity",
        ),
        ([*GRAPH, "--data.loader=stream"], r"needs in-memory training data"),
        (
            [*GRAPH, "--loss.label_fraction=0.1", "--loss.labelled_batch=10"],
            r"needs loss\.labelled_batch=0",
        ),
        ([*GRAPH, "--train.revive_dead_experts=true"], r"revive_dead_experts=false"),
    ],
)
def test_cuda_graph_names_what_it_needs(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_cuda_graph_with_what_it_needs_validates():
    cfg = load_config(None, [*GRAPH, "--train.compile=default", "--model.routing=topk"])
    assert cfg.train.cuda_graph
    # Labels and the warm start's pseudo-labels come from per-sample tables on the device.
    load_config(None, [*GRAPH, "--loss.label_fraction=0.1", "--warm_start.method=cluster"])
