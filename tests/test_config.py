"""Experiment configs: schema errors name the key, overrides, round trip; the CLI's error contract."""

import pytest

from ppl_models.app.cli import main
from ppl_models.app.config import Config, ConfigError, load_config, parse_override, to_toml
from ppl_models.app.experiment import Experiment
from ppl_models.registry import UnknownNameError

EXAMPLE = "examples/configs/vae_mnist.toml"


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_round_trips(tmp_path):
    config = load_config(EXAMPLE)
    assert config.model.name == "vae" and config.model.hparams["z_dim"] == 50
    assert config.train.elbo == "TraceMeanField_ELBO"
    again = load_config(write(tmp_path, to_toml(config)))
    assert again == config


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[train]\nlearning_rate = 0.1\n"))
    message = str(info.value)
    assert "[train] unknown key 'learning_rate'" in message
    assert "lr" in message and "batch_size" in message


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'; valid sections: .*train"):
        load_config(write(tmp_path, "[trian]\nlr = 0.1\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ('[train]\nlr = "fast"\n', r"\[train\].lr: expected float, received str 'fast'"),
        ("[train]\nbatch_size = 1.5\n", r"\[train\].batch_size: expected int, received float 1.5"),
        ("[train]\nbatch_size = true\n", r"\[train\].batch_size: expected int, received bool True"),
        ("[model]\nname = 3\n", r"\[model\].name: expected str, received int"),
        ("train = 3\n", r"\[train\] must be a table"),
    ],
)
def test_wrong_types_name_the_expected_type(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_int_is_accepted_for_a_float_key(tmp_path):
    assert load_config(write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1.0


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_parsed_as_toml_and_validated():
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("model.hidden_dims=[200, 200]") == ("model.hidden_dims", [200, 200])
    assert parse_override("output.run_dir=runs/x") == ("output.run_dir", "runs/x")
    config = Config().with_overrides({"train.lr": 3e-4, "model.z_dim": 5})
    assert config.train.lr == 3e-4 and config.model.hparams == {"z_dim": 5}
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        Config().with_overrides({"train.lrr": 1.0})
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        parse_override("lr")


def test_model_hyperparameters_are_checked_against_the_model(tmp_path):
    experiment = Experiment(Config().with_overrides({"model.zdim": 5}), tmp_path)
    with pytest.raises(UnknownNameError, match="unknown model 'vae' hyperparameter 'zdim'; valid .*z_dim"):
        experiment.build(num_data=10)
    experiment = Experiment(Config().with_overrides({"model.z_dim": "five"}), tmp_path)
    with pytest.raises(TypeError, match="hyperparameter 'z_dim': expected int .* received str 'five'"):
        experiment.build(num_data=10)


def test_unknown_data_set_and_loader_option(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown data set 'mnsit'; valid data sets: mnist"):
        Experiment(Config().with_overrides({"data.name": "mnsit"}), tmp_path).load_data()
    with pytest.raises(UnknownNameError, match="unknown data 'mnist' hyperparameter 'binarisation'"):
        Experiment(Config().with_overrides({"data.binarisation": "fixed"}), tmp_path).load_data()


def test_cli_reports_one_clear_error_and_status_2(tmp_path, capsys):
    path = write(tmp_path, "[train]\nlearning_rate = 0.1\n")
    assert main(["fit", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "learning_rate" in err[0]
    assert main(["evaluate", str(tmp_path / "no_run")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "model vae: guides amortized, amortized-mlp, mean-field" in out
    assert "TraceGraph_ELBO" in out and "adam" in out


def test_cli_list_names_strategies_estimators_and_every_data_set(capsys):
    from ppl_models.data import DATASETS
    from ppl_models.infer.objectives import GRADIENT_ESTIMATORS
    from ppl_models.infer.strategies import STRATEGIES

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split(":", 1)[0]: line.split(":", 1)[1].strip().split(", ") for line in lines}
    assert listed["data sets"] == sorted(DATASETS) and "ptb" in listed["data sets"]
    assert listed["strategies ([train] strategy)"] == list(STRATEGIES)
    assert listed["gradient estimators ([compare] estimators by default)"] == list(GRADIENT_ESTIMATORS)


def test_the_data_set_table_lives_in_the_data_layer(monkeypatch):
    from ppl_models.data import DATASETS, dataset_loader, register_dataset
    from ppl_models.data.ptb import ptb_splits

    assert dataset_loader("ptb") is ptb_splits  # loader(**options) -> {"train", "valid", "test"}
    with pytest.raises(UnknownNameError, match=r"unknown data set 'ptbb'; valid .*ptb"):
        dataset_loader("ptbb")
    with pytest.raises(TypeError, match=r"register_dataset\('mine'\): expected a callable loader"):
        register_dataset("mine", "ppl_models.data.ptb:ptb_splits")
    monkeypatch.setitem(DATASETS, "placeholder", None)  # restored after the test
    register_dataset("placeholder", ptb_splits)
    assert dataset_loader("placeholder") is ptb_splits
