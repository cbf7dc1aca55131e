"""studies/attacks-quickstart.yaml: its rows load as valid trials, and the rows it leaves out are the
ones the families refuse. Loading only: no attack runs and no dataset is read."""

from collections import Counter
from pathlib import Path

import pytest

from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec
from sweep.cli.main import main
from sweep.study import StudyError, load_study

STUDY = Path(__file__).resolve().parent.parent / "studies" / "attacks-quickstart.yaml"

# (attack, model, images per client) -> trials per dataset: 8 images, one trial per image at batch 1
ROWS = {
    ("ig", "convnet", 1): 8,
    ("ig", "convnet", 8): 1,
    ("dlg", "lenet-zhu", 1): 8,
    ("dlg", "lenet-zhu", 8): 1,
    ("analytic", "mlp", 1): 8,
    ("imprint", "convnet", 1): 8,
    ("imprint", "convnet", 8): 1,
}
DATASETS = ("fashion-mnist", "faces")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADINV_DATA", str(tmp_path / "no-data-here"))  # loading must not need the images


def test_every_row_is_a_valid_trial_and_the_count_is_the_header_s(no_data):
    study = load_study(STUDY)  # a row a family refuses would raise StudyError here
    assert study.collapsed == 0 and len(study.trials) == 2 * sum(ROWS.values()) == 70
    counts = Counter((t.dataset, t.attack, t.model, len(t.images)) for t in study.trials)
    assert counts == {(dataset, *row): n for dataset in DATASETS for row, n in ROWS.items()}
    for trial in study.trials:
        assert trial.fl == "fedsgd" and trial.trained_epochs == 0
        assert trial.threat_model == ("malicious" if trial.attack == "imprint" else "honest")
        assert set(trial.images) <= set(range(8))  # faces: the first 8 test images are all faces
        if trial.attack == "ig":  # the quickstart's leaking settings
            settings = (trial.width, trial.iterations, trial.lr, trial.decay, trial.init)
            assert settings == (32, 300, 0.3, "cosine", "rand")


def test_the_rows_left_out_are_refused_by_their_families():
    with pytest.raises(ConfigError, match="images_per_client"):
        TrialSpec(attack="analytic", model="mlp", images=tuple(range(8)))
    with pytest.raises(ConfigError, match="model"):
        TrialSpec(attack="analytic", model="convnet")
    with pytest.raises(ConfigError, match="threat_model"):
        TrialSpec(attack="imprint", model="convnet", images=tuple(range(8)))
    with pytest.raises(ConfigError, match="imprint_sample"):  # faces keeps 150 training images
        TrialSpec(dataset="faces", attack="imprint", threat_model="malicious", imprint_sample=151)


def test_batch_64_does_not_fit_faces(no_data, tmp_path):
    text = STUDY.read_text().replace("images: 8 ", "images: 64 ", 1)
    assert text != STUDY.read_text()
    (tmp_path / "study.yaml").write_text(text)
    with pytest.raises(StudyError, match="faces has 50 test images"):
        load_study(tmp_path / "study.yaml")


def test_dry_run_counts_and_writes_nothing(no_data, tmp_path, capsys):
    assert main(["run", str(STUDY), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "70 trials"
    assert not (tmp_path / "r").exists()
