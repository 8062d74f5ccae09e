"""`tinydiff train --sde ve|vp|subvp`: the run records its SDE, sampling and resuming rebuild it,
and a checkpoint of one SDE is refused as another (tiny ScoreNet, a few dozen images)."""
import json

import numpy as np
import pytest

from tinydiff import cli, experiments, train
from tinydiff.sde import VESDE, VPSDE, subVPSDE
from test_example import TINY, mnist_root  # noqa: F401 (a fixture)


def _train(out, root, *extra):
    return cli.main(["train", "--out", str(out), "--data", root, *TINY, "--epochs", "1", *extra])


def test_a_vp_run_records_and_rebuilds_its_sde(mnist_root, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "vp"
    assert _train(out, mnist_root, "--sde", "vp", "--beta-max", "15", "--sampler", "ancestral") == 0
    config = train.read_config(str(out / "checkpoint.npz"))
    assert (config["sde"], config["beta_min"], config["beta_max"], config["sigma"]) == \
        ("vp", 0.1, 15.0, None)
    assert json.loads((out / "config.json").read_text())["sde"] == "vp"
    run = experiments.load_run(str(out))
    assert run.sde == VPSDE(0.1, 15.0)
    assert run.model.marginal_std(0.5) == pytest.approx(VPSDE(0.1, 15.0).marginal_std(0.5))
    with np.load(out / "samples_ancestral.npz") as f:
        assert np.isfinite(f["samples"]).all()
    # sampling rebuilds the SDE; DDPM's sampler is there for VP runs
    assert cli.main(["sample", str(out), "--num-samples", "3", "--steps", "4", "--sampler",
                     "ancestral", "--no-progress"]) == 0
    # the same SDE restated is fine; another one (or other parameters) is refused in one line
    assert cli.main(["train", "--out", str(out), "--sample-only", "--sde", "vp", "--beta-max", "15",
                     "--data", mnist_root, "--no-progress", "--sample-steps", "3"]) == 0
    capsys.readouterr()
    for extra in (["--sample-only", "--sde", "ve"], ["--resume", "--sde", "subvp"],
                  ["--resume", "--beta-max", "20"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--out", str(out), "--data", mnist_root, "--no-progress", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "was trained with VPSDE(beta_min=0.1, beta_max=15.0)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--sde", "ve", "--beta-max", "5"], "--beta-max 5.0 is a parameter of --sde vp / subvp, not of --sde ve"),
    (["--sde", "subvp", "--sigma", "30"], "--sigma 30.0 is a parameter of --sde ve, not of --sde subvp"),
    (["--sde", "vp", "--beta-min", "3", "--beta-max", "2"], "0 <= beta_min <= beta_max"),
    (["--sampler", "ancestral"], "--sampler ancestral is DDPM's sampler for the VP SDE, but --sde is ve"),
    (["--sde", "ddpm"], "invalid choice: 'ddpm'"),
    (["--beta-min", "-1", "--sde", "vp"], "--beta-min"),
])
def test_bad_sde_flags_are_refused_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(tmp_path / "r"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_configs_of_each_sde():
    def config(**explicit):
        return experiments.resolve_config(explicit)
    ve, vp, sub = config(), config(sde="vp"), config(sde="subvp", beta_min=0.2)
    assert experiments.build_sde(ve) == VESDE(25.0) and ve["beta_min"] is None
    assert experiments.build_sde(vp) == VPSDE() and vp["sigma"] is None
    assert experiments.build_sde(sub) == subVPSDE(0.2, 20.0)
    # a VE run written before the VP SDEs (no "sde", no betas) reads as VE
    assert experiments.build_sde({"sigma": 30.0}) == VESDE(30.0)
